"""The chart's ValidatingAdmissionPolicy in the real API server: a user allowed to create
FineTuneJobs gains nothing more through one — no foreign image, no toleration of other
taints, no Secret they cannot read, and no pods where they may not create pods. Requests
are made as impersonated users with only those rights (server-side dry runs: admission runs,
nothing is stored)."""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.cluster.deploy_helpers import finetunejob, render
from tests.support import Cluster, wait_for

pytestmark = pytest.mark.cluster

ALLOWED = ["registry.example.com/ml/", "ghcr.io/kubetune/trainer:0.1.0"]


def controller_sa(mark: str) -> str:
    """The controller ServiceAccount of the release the policy was rendered for."""
    return f"system:serviceaccount:kubetune-system:kubetune-adm-{mark}-controller"


@pytest.fixture(scope="module")
def policy(cluster: Cluster, crds: None) -> Iterator[str]:
    """The chart's policy, bound to namespaces carrying this module's label only (other tests
    share the cluster). Yields the label value."""
    mark = uuid.uuid4().hex[:8]
    docs = render(
        release=f"kubetune-adm-{mark}",  # its own policy name: never another run's
        values={"admissionPolicy": {
            "allowedImages": ALLOWED,
            "namespaceSelector": {"matchLabels": {"kubetune.io/admission-test": mark}}}},
        show_only=["templates/admission-policy.yaml"],
    )
    assert [d["kind"] for d in docs] == [
        "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"]
    assert docs[0]["spec"]["matchConditions"][0]["expression"].endswith(
        f'"{controller_sa(mark)}"')
    text = json.dumps({"apiVersion": "v1", "kind": "List", "items": docs})
    cluster.kubectl("apply", "-f", "-", input=text)
    try:
        yield mark
    finally:
        cluster.kubectl("delete", "-f", "-", "--wait=false", input=text, check=False)


def _role(
    name: str, namespace: str, rules: list[dict[str, Any]], user: str
) -> list[dict[str, Any]]:
    return [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": name, "namespace": namespace}, "rules": rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": name, "namespace": namespace},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]},
    ]


JOBS_ONLY = {"apiGroups": ["kubetune.io"], "resources": ["finetunejobs", "finetunesweeps"],
             "verbs": ["create", "get", "list", "update", "patch"]}


@pytest.fixture
def users(cluster: Cluster, namespace: str, policy: str) -> tuple[str, str]:
    """alice may only manage FineTuneJobs/sweeps; bob may also create pods and read the
    Secret s3-creds; the controller's ServiceAccount has the FineTuneJob rights."""
    cluster.kubectl("label", "namespace", namespace, f"kubetune.io/admission-test={policy}")
    objects = (
        _role("alice", namespace, [JOBS_ONLY], "alice")
        + _role("bob", namespace, [
            JOBS_ONLY,
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["create"]},
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"],
             "resourceNames": ["s3-creds"]},
        ], "bob")
        + _role("controller", namespace, [JOBS_ONLY], controller_sa(policy))
    )
    cluster.kubectl("apply", "-n", namespace, "-f", "-",
                    input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))
    return namespace, policy


def _try(cluster: Cluster, namespace: str, user: str, obj: dict[str, Any]) -> str:
    """'' when the API server admits `obj` created by `user`, else its error message."""
    proc = cluster.kubectl("create", "--dry-run=server", "-n", namespace, "-f", "-",
                           input=json.dumps(obj), as_user=user, check=False)
    return "" if proc.returncode == 0 else proc.stderr.strip()


def _in_force(cluster: Cluster, namespace: str, denied: dict[str, Any]) -> None:
    """Waits until the policy refuses `denied` for bob (it takes effect within seconds of
    its creation); on timeout, says what the API server answered instead."""
    seen: list[str] = []

    def refused() -> bool:
        seen.append(_try(cluster, namespace, "bob", denied))
        return "not an allowed trainer image" in seen[-1]

    try:
        wait_for(refused, timeout=120, interval=1, what="the admission policy in force")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; last answer: {seen[-1]!r}") from None


def _job(**spec: Any) -> dict[str, Any]:
    job = finetunejob(f"j-{uuid.uuid4().hex[:6]}")
    for key, value in spec.items():
        job["spec"][key] = value
    return job


def test_a_finetunejob_gives_its_creator_nothing_more(
    cluster: Cluster, users: tuple[str, str]
) -> None:
    ns, mark = users
    evil = _job(image="evil.example.com/miner:latest")
    _in_force(cluster, ns, evil)
    denied = _try(cluster, ns, "bob", evil)
    assert "spec.image: evil.example.com/miner:latest is not an allowed trainer image" in denied
    assert "admissionPolicy.allowedImages" in denied

    # bob may create pods and read s3-creds: an ordinary job, an allowed image (a prefix
    # ending in '/', the exact default), the GPU toleration and his Secret pass
    assert _try(cluster, ns, "bob", _job()) == ""
    assert _try(cluster, ns, "bob", _job(image="registry.example.com/ml/trainer:v2")) == ""
    assert _try(cluster, ns, "bob", _job(image="ghcr.io/kubetune/trainer:0.1.0")) == ""
    assert _try(cluster, ns, "bob", _job(
        resources={"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                    "effect": "NoSchedule"}]},
        storage={"credentialsSecret": "s3-creds"})) == ""
    # a prefix is a whole path segment, a tag is not a prefix
    assert "not an allowed" in _try(cluster, ns, "bob",
                                    _job(image="registry.example.com/mlx/trainer:v2"))
    assert "not an allowed" in _try(cluster, ns, "bob",
                                    _job(image="ghcr.io/kubetune/trainer:0.1.0-evil"))

    # tolerations: other taints, and a keyless toleration (tolerates everything)
    for tol in ({"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"},
                {"operator": "Exists"}):
        msg = _try(cluster, ns, "bob", _job(resources={"tolerations": [tol]}))
        assert ("spec.resources.tolerations: only taints with these keys may be tolerated: "
                "nvidia.com/gpu") in msg and "allowedTolerationKeys" in msg, msg

    # Secrets bob may not read, by either field
    msg = _try(cluster, ns, "bob", _job(storage={"credentialsSecret": "db-password"}))
    assert ("spec.storage.credentialsSecret: bob may not get Secret db-password in "
            f"namespace {ns}") in msg, msg
    msg = _try(cluster, ns, "bob", _job(pod={"imagePullSecrets": [{"name": "regcred"}]}))
    assert ("spec.pod.imagePullSecrets[0]: bob may not get Secret regcred in namespace "
            f"{ns}; a job may only use Secrets its creator may read.") in msg, msg
    assert _try(cluster, ns, "bob", _job(pod={"imagePullSecrets": [{"name": "s3-creds"}]})) == ""

    # alice may create FineTuneJobs but not pods: a FineTuneJob would run pods for her
    msg = _try(cluster, ns, "alice", _job())
    assert f"alice may not create pods in namespace {ns}" in msg, msg

    # a sweep's template is held to the same rules
    sweep = {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneSweep",
        "metadata": {"name": "s"},
        "spec": {"template": copy.deepcopy(evil["spec"]),
                 "parameters": [{"name": "method.rank", "int": {"low": 4, "high": 8}}],
                 "objectives": [{"metric": "evalLoss", "direction": "minimize"}],
                 "maxTrials": 2},
    }
    assert "not an allowed trainer image" in _try(cluster, ns, "bob", sweep)
    sweep["spec"]["template"].pop("image")
    assert _try(cluster, ns, "bob", sweep) == ""

    # the controller creates trials and writes finalizers: never held up by the policy
    assert _try(cluster, ns, controller_sa(mark), evil) == ""


def test_updates_that_keep_the_spec_pass(cluster: Cluster, users: tuple[str, str]) -> None:
    """alice labels a job bob created (metadata only): admitted, though she could not create
    it; changing its image is not."""
    ns, _ = users
    job = _job()
    name = job["metadata"]["name"]
    _in_force(cluster, ns, _job(image="x.io/y:z"))
    cluster.kubectl("create", "-n", ns, "-f", "-", input=json.dumps(job), as_user="bob")
    try:
        cluster.kubectl("label", "ftj", "-n", ns, name, "team=a", as_user="alice")
        proc = cluster.kubectl("patch", "ftj", "-n", ns, name, "--type=merge", "-p",
                               json.dumps({"spec": {"image": "x.io/y:z"}}), as_user="bob",
                               check=False)
        assert proc.returncode != 0 and "not an allowed trainer image" in proc.stderr
    finally:
        cluster.kubectl("delete", "ftj", "-n", ns, name, "--wait=false", check=False)


def _env_ref(var: str, secret: str, key: str = "key") -> dict[str, Any]:
    return {"name": var, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def test_env_from_secrets_needs_get_on_each_secret(
    cluster: Cluster, users: tuple[str, str]
) -> None:
    """pod.env[].valueFrom.secretKeyRef is held to credentialsSecret's rule: bob (pods, and
    Secret s3-creds only) may not make a job read Secret wandb; once he may get wandb (and
    mlflow, hf), a job reading all three passes, though one CEL expression may make only two
    authorizer calls (one rule per entry)."""
    ns, _ = users
    _in_force(cluster, ns, _job(image="x.io/y:z"))
    wandb = _env_ref("WANDB_API_KEY", "wandb", "api-key")
    msg = _try(cluster, ns, "bob", _job(pod={"env": [wandb]}))
    assert ("spec.pod.env[WANDB_API_KEY].valueFrom.secretKeyRef: bob may not get Secret wandb "
            f"in namespace {ns}; a job may only use Secrets its creator may read.") in msg, msg
    # a Secret bob may read, next to literals: admitted
    assert _try(cluster, ns, "bob", _job(pod={"env": [
        {"name": "WANDB_PROJECT", "value": "llm"}, _env_ref("S3_KEY", "s3-creds")]})) == ""
    # the refused entry is named, wherever it is in the list
    msg = _try(cluster, ns, "bob", _job(pod={"env": [
        _env_ref("A", "s3-creds"), _env_ref("B", "s3-creds"), _env_ref("HF_TOKEN", "hf")]}))
    assert "spec.pod.env[HF_TOKEN].valueFrom.secretKeyRef: bob may not get Secret hf" in msg, msg
    # a sweep's template likewise
    sweep = {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneSweep",
        "metadata": {"name": "s"},
        "spec": {"template": _job(pod={"env": [wandb]})["spec"],
                 "parameters": [{"name": "method.rank", "int": {"low": 4, "high": 8}}],
                 "objectives": [{"metric": "evalLoss", "direction": "minimize"}],
                 "maxTrials": 2},
    }
    msg = _try(cluster, ns, "bob", sweep)
    assert "spec.pod.env[WANDB_API_KEY].valueFrom.secretKeyRef: bob may not get Secret wandb" in msg

    many = _job(pod={"env": [
        wandb, _env_ref("WANDB_ENTITY", "wandb", "entity"),
        _env_ref("MLFLOW_TRACKING_TOKEN", "mlflow", "token"),
        _env_ref("HF_TOKEN", "hf", "token"), _env_ref("S3_KEY", "s3-creds")]})
    _let_bob_get(cluster, ns, "bob-tracking", ["wandb", "mlflow", "hf"], many)
    assert _try(cluster, ns, "bob", sweep) == ""
    # alice still may not (nor may she create pods): refused
    assert _try(cluster, ns, "alice", _job(pod={"env": [wandb]})) != ""


def _let_bob_get(cluster: Cluster, ns: str, role: str, secrets: list[str],
                 spec: dict[str, Any]) -> None:
    """Grants bob `get` on ``secrets`` and waits until the policy admits his ``spec``
    (authorizer decisions follow a new Role within seconds)."""
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "List", "items": _role(role, ns, [
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"],
             "resourceNames": secrets}], "bob")}))
    seen: list[str] = []

    def admitted() -> bool:
        seen.append(_try(cluster, ns, "bob", spec))
        return seen[-1] == ""

    try:
        wait_for(admitted, timeout=60, interval=1, what=f"bob's Role {role} in force")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; last answer: {seen[-1]!r}") from None


def _pull(*names: str) -> dict[str, Any]:
    return {"imagePullSecrets": [{"name": n} for n in names]}


def test_pull_secrets_need_get_on_each_secret(cluster: Cluster, users: tuple[str, str]) -> None:
    """Three or more imagePullSecrets: one CEL expression may make only two authorizer calls
    (cost limit), so the policy has one rule per entry. bob, once he may get regcred, mirror
    and quay, creates a job (and a sweep) pulling with all three; the entry naming a Secret he
    may not get is refused by index and name; more than the CRD allows is a schema error."""
    ns, _ = users
    _in_force(cluster, ns, _job(image="x.io/y:z"))
    three = _job(pod=_pull("regcred", "mirror", "quay"))
    _let_bob_get(cluster, ns, "bob-pull", ["regcred", "mirror", "quay"], three)
    # repeats are checked once; 8 entries, the most the CRD allows
    assert _try(cluster, ns, "bob", _job(pod=_pull(
        "regcred", "regcred", "mirror", "s3-creds", "quay", "mirror", "quay", "regcred"))) == ""

    # bob may not get the third: refused, naming it
    msg = _try(cluster, ns, "bob", _job(pod=_pull("regcred", "mirror", "private")))
    assert ("spec.pod.imagePullSecrets[2]: bob may not get Secret private in namespace "
            f"{ns}; a job may only use Secrets its creator may read.") in msg, msg
    assert "cost" not in msg, msg

    # a sweep's template likewise
    def sweep(pod: dict[str, Any]) -> dict[str, Any]:
        return {
            "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneSweep",
            "metadata": {"name": f"s-{uuid.uuid4().hex[:6]}"},
            "spec": {"template": _job(pod=pod)["spec"],
                     "parameters": [{"name": "method.rank", "int": {"low": 4, "high": 8}}],
                     "objectives": [{"metric": "evalLoss", "direction": "minimize"}],
                     "maxTrials": 2},
        }

    assert _try(cluster, ns, "bob", sweep(_pull("regcred", "mirror", "quay"))) == ""
    msg = _try(cluster, ns, "bob", sweep(_pull("regcred", "mirror", "quay", "private")))
    assert "spec.pod.imagePullSecrets[3]: bob may not get Secret private" in msg, msg

    # alice may get none of them (nor create pods): refused
    assert _try(cluster, ns, "alice", three) != ""

    # over the CRD's bound: the schema refuses it, naming the field (not the policy)
    msg = _try(cluster, ns, "bob", _job(pod=_pull(*[f"reg{i}" for i in range(9)])))
    assert "spec.pod.imagePullSecrets" in msg and "must have at most 8 items" in msg, msg
    assert "may not get" not in msg, msg
