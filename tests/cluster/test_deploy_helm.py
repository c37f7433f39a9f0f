"""The Helm chart against the real control plane: install, permissions, upgrade, uninstall.

Each test installs its own release (named after its namespace) so cluster-scoped objects
never collide. The CRDs are shared by the whole cluster: tests that need them take the
`crds` fixture, and the chart's install skips CRDs that already exist, as Helm always does.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.deploy_helpers import (
    CHART,
    Permission,
    delete_test_volumes,
    finetunejob,
    granted,
    helm,
    kubectl_json,
    prebound_volume,
    release_for,
    remove_rbac,
    set_args,
)
from tests.support import Cluster, wait_for

pytestmark = pytest.mark.cluster


def _perms(resources: list[str], verbs: list[str], names: str = "") -> set[Permission]:
    return {(r, names, v) for r in resources for v in verbs}


# What the controller may do, from its design (not read back from the chart): a verb added to
# the chart without a reason fails these tests.
NAMESPACED: set[Permission] = (
    _perms(["finetunejobs.kubetune.io", "finetunesweeps.kubetune.io"],
           ["get", "list", "watch", "create", "patch", "delete"])
    | _perms(["finetunejobs.kubetune.io/status", "finetunesweeps.kubetune.io/status"],
             ["get", "patch", "update"])
    | _perms(["jobs.batch", "configmaps", "services"],
             ["get", "list", "watch", "create", "patch", "delete"])
    | _perms(["pods"], ["get", "list", "watch"])
    # get: the referenced credentials Secret exists. Never create: no Secret is written to a
    # user's namespace (report tokens derive from the controller's own key).
    | _perms(["secrets"], ["get"])
    # blockOwnerDeletion on children (trial jobs, Jobs) needs the owner's finalizers.
    | _perms(["finetunejobs.kubetune.io/finalizers", "finetunesweeps.kubetune.io/finalizers"],
             ["update"])
    | _perms(["events", "events.events.k8s.io"], ["create", "patch"])
)
CRD_DISCOVERY = _perms(["customresourcedefinitions.apiextensions.k8s.io"],
                       ["get", "list", "watch"])
NAMESPACE_WATCH = _perms(["namespaces"], ["get", "list", "watch"])


def lease(name: str) -> set[Permission]:
    return (_perms(["leases.coordination.k8s.io"], ["create"])
            | _perms(["leases.coordination.k8s.io"], ["get", "update"], names=name))


def report_key(name: str) -> set[Permission]:
    """The controller's report master key, in its own namespace only."""
    return _perms(["secrets"], ["create"]) | _perms(["secrets"], ["get"], names=name)


@pytest.fixture
def release(cluster: Cluster, namespace: str) -> Iterator[str]:
    name = release_for(namespace)
    yield name
    helm("uninstall", name, "-n", namespace, "--ignore-not-found", "--wait", cluster=cluster,
         check=False)
    remove_rbac(cluster, namespace, release=name)
    delete_test_volumes(cluster, namespace)


def install(cluster: Cluster, release: str, namespace: str, values: dict[str, Any] | None = None,
            chart: Path = CHART) -> None:
    helm("install", release, str(chart), "-n", namespace, "--wait", "--timeout", "180s",
         *set_args(values), cluster=cluster)


def _get(cluster: Cluster, *args: str) -> Any:
    return kubectl_json(cluster, "get", *args)


def _exists(cluster: Cluster, *args: str) -> bool:
    return cluster.kubectl("get", *args, check=False).returncode == 0


def test_install_with_defaults_runs_the_controller(
    cluster: Cluster, namespace: str, release: str
) -> None:
    prefix = release  # contains "kubetune", so resources are "<release>-<part>"
    prebound_volume(cluster, namespace, f"{prefix}-study")
    crds_before = {c["metadata"]["name"]: c["metadata"]["uid"]
                   for c in _get(cluster, "crd", "-l", "app.kubernetes.io/name=kubetune")["items"]}

    install(cluster, release, namespace)

    status = json.loads(helm("status", release, "-n", namespace, "-o", "json",
                             cluster=cluster).stdout)
    assert status["info"]["status"] == "deployed"
    assert "kubectl delete crd finetunejobs.kubetune.io" in status["info"]["notes"]

    # The CRDs exist and serve; ones that were already installed were left as they were.
    for crd in ("finetunejobs.kubetune.io", "finetunesweeps.kubetune.io"):
        obj = _get(cluster, "crd", crd)
        established = {c["type"]: c["status"] for c in obj["status"]["conditions"]}
        assert established["Established"] == "True"
        if crd in crds_before:
            assert obj["metadata"]["uid"] == crds_before[crd]

    dep = _get(cluster, "deployment", f"{prefix}-controller", "-n", namespace)
    assert dep["status"]["availableReplicas"] == 1
    pod_spec = dep["spec"]["template"]["spec"]
    assert pod_spec["serviceAccountName"] == f"{prefix}-controller"
    assert _get(cluster, "pvc", f"{prefix}-study", "-n", namespace)["status"]["phase"] == "Bound"

    (pod,) = _get(cluster, "pods", "-n", namespace, "-l",
                  "app.kubernetes.io/component=controller")["items"]
    ready = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
    assert ready["Ready"] == "True"
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["KUBETUNE_REPORT_URL"] == f"http://{prefix}-report.$(POD_NAMESPACE).svc:8081/report"
    assert env["KUBETUNE_LEASE_NAME"] == f"{prefix}-controller"

    # Trial pods reach the controller through the report Service; Prometheus through metrics.
    for svc, port in ((f"{prefix}-report", 8081), (f"{prefix}-metrics", 8080)):
        def endpoints(svc: str = svc) -> list[dict[str, Any]]:
            slices = _get(cluster, "endpointslices", "-n", namespace, "-l",
                          f"kubernetes.io/service-name={svc}")["items"]
            return [e for s in slices for e in s.get("endpoints") or []]
        eps = wait_for(endpoints, timeout=30, what=f"{svc} endpoints")
        assert [e["targetRef"]["name"] for e in eps] == [pod["metadata"]["name"]]
        assert _get(cluster, "service", svc, "-n", namespace)["spec"]["ports"][0]["port"] == port

    policy = _get(cluster, "networkpolicy", f"{prefix}-controller", "-n", namespace)
    assert {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]} == {8080, 8081}

    # `kubectl auth can-i --list` shows exactly what the controller uses. By default it
    # serves its own namespace only: everything it needs there (with the Lease and the
    # report key), nothing anywhere else, not even cluster-scoped reads.
    user = f"system:serviceaccount:{namespace}:{prefix}-controller"
    assert env["KUBETUNE_NAMESPACES"] == "$(POD_NAMESPACE)"
    assert granted(cluster, user, namespace) == (
        NAMESPACED | lease(f"{prefix}-controller") | report_key(f"{prefix}-report-key")
    )
    assert granted(cluster, user, "default") == set()
    assert not _get(cluster, "clusterrolebindings", "-l",
                    f"app.kubernetes.io/instance={release}")["items"]
    # Pods and Secrets: readable where it serves jobs, not in a namespace it does not watch.
    for verb, resource in (("list", "pods"), ("get", "pods"), ("watch", "pods"),
                           ("get", "secrets"), ("list", "secrets")):
        served = _can_i(cluster, user, verb, resource, namespace)
        assert served == (resource == "pods" or verb == "get"), (verb, resource)
        assert not _can_i(cluster, user, verb, resource, "default"), (verb, resource)
    notes = status["info"]["notes"]
    assert f"Watching:    namespaces {namespace} only" in notes


def _can_i(cluster: Cluster, user: str, verb: str, resource: str, namespace: str) -> bool:
    """`kubectl auth can-i VERB RESOURCE --as USER -n NAMESPACE` (exit 0: yes, 1: no)."""
    proc = cluster.kubectl("auth", "can-i", verb, resource, f"--as={user}", "-n", namespace,
                           check=False)
    assert proc.stdout.strip() in ("yes", "no"), proc.stdout + proc.stderr
    return proc.stdout.strip() == "yes"


def test_cluster_wide_install(cluster: Cluster, namespace: str, release: str) -> None:
    # The API server's real endpoints, as the docs tell users to find them: the egress policy
    # the chart renders from them is accepted (not enforced: the test CNI enforces none).
    ips = cluster.kubectl("get", "endpoints", "kubernetes", "-n", "default", "-o",
                          "jsonpath={.subsets[*].addresses[*].ip}").stdout.split()
    assert ips
    egress = {"enabled": True, "apiServerCIDRs": [f"{ip}/32" for ip in ips],
              "storageCIDRs": ["192.0.2.0/24"], "storagePorts": [5432],
              "extraRules": [{"to": [{"namespaceSelector": {"matchLabels": {
                  "kubernetes.io/metadata.name": "storage"}}}],
                  "ports": [{"port": 8333, "protocol": "TCP"}]}]}
    install(cluster, release, namespace, {"clusterWide": True,
                                          "studyStorage.persistence.enabled": False,
                                          "networkPolicy.controllerEgress": egress})
    dep = _get(cluster, "deployment", f"{release}-controller", "-n", namespace)
    env = {e["name"]: e.get("value")
           for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert not env["KUBETUNE_NAMESPACES"]  # every namespace ("" is stored as no value)

    # Everything it needs everywhere, the Lease and the report key only in its own namespace.
    user = f"system:serviceaccount:{namespace}:{release}-controller"
    everywhere = NAMESPACED | CRD_DISCOVERY | NAMESPACE_WATCH
    assert granted(cluster, user, namespace) == (
        everywhere | lease(f"{release}-controller") | report_key(f"{release}-report-key")
    )
    assert granted(cluster, user, "default") == everywhere

    policy = _get(cluster, "networkpolicy", f"{release}-egress", "-n", namespace)
    assert policy["spec"]["policyTypes"] == ["Egress"]
    api, dns, storage, extra = policy["spec"]["egress"]
    assert sorted(p["ipBlock"]["cidr"] for p in api["to"]) == sorted(f"{ip}/32" for ip in ips)
    assert {p["port"] for p in api["ports"]} == {443, 6443}
    assert {(p["port"], p["protocol"]) for p in dns["ports"]} == {(53, "UDP"), (53, "TCP")}
    assert storage["to"] == [{"ipBlock": {"cidr": "192.0.2.0/24"}}]
    assert extra == egress["extraRules"][0]


def test_watch_namespaces_grants_only_those_namespaces(
    cluster: Cluster, namespace: str, release: str
) -> None:
    team = f"{namespace}-team"
    cluster.kubectl("create", "namespace", team)
    try:
        install(cluster, release, namespace, {"watchNamespaces": [team],
                                              "studyStorage.persistence.enabled": False})
        dep = _get(cluster, "deployment", f"{release}-controller", "-n", namespace)
        env = {e["name"]: e.get("value")
               for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["KUBETUNE_NAMESPACES"] == team

        user = f"system:serviceaccount:{namespace}:{release}-controller"
        assert granted(cluster, user, team) == NAMESPACED
        # Its own namespace (not listed): only the Lease and its key; anywhere else: nothing.
        assert granted(cluster, user, namespace) == (
            lease(f"{release}-controller") | report_key(f"{release}-report-key")
        )
        assert granted(cluster, user, "default") == set()
    finally:
        cluster.kubectl("delete", "namespace", team, "--wait=false", check=False)


def test_upgrade_with_changed_values_leaves_jobs_untouched(
    cluster: Cluster, namespace: str, release: str, crds: None
) -> None:
    install(cluster, release, namespace, {"studyStorage.persistence.enabled": False})
    for name in ("support-lora", "support-dora"):
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(finetunejob(name)))
    ftj = _get(cluster, "finetunejob", "support-lora", "-n", namespace)
    # A training gang in flight, owned by its FineTuneJob like the controller's (named apart
    # from the controller's children, in case a controller from another test is running).
    gang = {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "inflight-gang", "ownerReferences": [{
            "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
            "name": "support-lora", "uid": ftj["metadata"]["uid"], "controller": True}]},
        "spec": {"completionMode": "Indexed", "completions": 1, "parallelism": 1,
                 "backoffLimit": 0, "template": {
                     "metadata": {"labels": {"app.kubernetes.io/name": "kubetune",
                                             "app.kubernetes.io/component": "trainer"}},
                     "spec": {"restartPolicy": "Never", "containers": [{
                         "name": "trainer", "image": "ghcr.io/kubetune/trainer:0.1.0",
                         "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}}},
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(gang))

    def running_pod() -> dict[str, Any] | None:
        pods = _get(cluster, "pods", "-n", namespace, "-l", "job-name=inflight-gang")["items"]
        return next((p for p in pods if p["status"].get("phase") == "Running"), None)

    pod_before = wait_for(running_pod, timeout=60, what="training pod Running")
    assert pod_before is not None
    jobs_before = {j["metadata"]["name"]: j for j in
                   _get(cluster, "finetunejobs", "-n", namespace)["items"]}
    old_template = _get(cluster, "deployment", f"{release}-controller", "-n", namespace)

    helm("upgrade", release, str(CHART), "-n", namespace, "--reuse-values", "--wait",
         "--timeout", "180s",
         *set_args({"trainer.image": "ghcr.io/kubetune/trainer:0.2.0",
                    "objectStorage.endpoint": "http://s3.storage:8333",
                    "resyncSeconds": 30}),
         cluster=cluster)

    # The controller rolled out with the new settings ...
    dep = _get(cluster, "deployment", f"{release}-controller", "-n", namespace)
    assert dep["metadata"]["generation"] > old_template["metadata"]["generation"]
    assert dep["status"]["updatedReplicas"] == dep["status"]["availableReplicas"] == 1
    env = {e["name"]: e.get("value")
           for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KUBETUNE_TRAINER_IMAGE"] == "ghcr.io/kubetune/trainer:0.2.0"
    assert env["KUBETUNE_S3_ENDPOINT"] == "http://s3.storage:8333"
    assert env["KUBETUNE_RESYNC_SECONDS"] == "30"
    # ... the earlier value survived --reuse-values ...
    assert not any(v["name"] == "study" and "persistentVolumeClaim" in v
                   for v in dep["spec"]["template"]["spec"]["volumes"])

    # ... and the users' jobs and the running training pod were not touched at all: same
    # objects, same spec, never written by Helm. (Status and kopf's annotations may move if
    # a controller from another test is running, so resourceVersion is not compared.)
    jobs_after = {j["metadata"]["name"]: j for j in
                  _get(cluster, "finetunejobs", "-n", namespace, "--show-managed-fields")["items"]}
    assert sorted(jobs_after) == ["support-dora", "support-lora"]
    for name, before in jobs_before.items():
        after = jobs_after[name]
        assert after["metadata"]["uid"] == before["metadata"]["uid"]
        assert after["metadata"]["generation"] == before["metadata"]["generation"]
        assert after["spec"] == before["spec"]
        assert all(m["manager"] != "helm" for m in after["metadata"]["managedFields"])
    pod_after = running_pod()
    assert pod_after is not None
    assert pod_after["metadata"]["uid"] == pod_before["metadata"]["uid"]


def _chart_with_private_crds(tmp: Path, group: str) -> tuple[Path, list[str]]:
    """A copy of the chart whose CRDs live in a group of their own, so the test can watch
    Helm install them and keep them without touching the cluster's shared kubetune CRDs."""
    chart = tmp / "kubetune"
    shutil.copytree(CHART, chart)
    names = []
    for path in sorted((chart / "crds").glob("*.yaml")):
        text = path.read_text().replace("kubetune.io", group)
        path.write_text(text)
        names.append(yaml.safe_load(text)["metadata"]["name"])
    return chart, names


def test_uninstall_keeps_crds_jobs_and_studies(
    cluster: Cluster, namespace: str, release: str, crds: None, tmp_path: Path
) -> None:
    group = f"{namespace}.kubetune.test"
    chart, private_crds = _chart_with_private_crds(tmp_path, group)
    try:
        prebound_volume(cluster, namespace, f"{release}-study")
        install(cluster, release, namespace, chart=chart)
        for crd in private_crds:  # Helm created these: they did not exist before
            cluster.kubectl("wait", "--for=condition=Established", f"crd/{crd}",
                            "--timeout=30s")
        cluster.kubectl("apply", "-n", namespace, "-f", "-",
                        input=json.dumps(finetunejob("keep-me")))
        job = _get(cluster, "finetunejob", "keep-me", "-n", namespace)

        helm("uninstall", release, "-n", namespace, "--wait", cluster=cluster)

        # The controller and its permissions are gone ...
        for kind in ("deployment", "serviceaccount", "service", "networkpolicy"):
            assert not _get(cluster, kind, "-n", namespace, "-l",
                            f"app.kubernetes.io/instance={release}")["items"], kind
        assert not _exists(cluster, "role", f"{release}-controller", "-n", namespace)
        assert not _exists(cluster, "role", f"{release}-leader-election", "-n", namespace)
        # ... the CRDs Helm installed stay (Helm never deletes CRDs), and with them the jobs ...
        for crd in private_crds:
            assert _exists(cluster, "crd", crd)
        after = _get(cluster, "finetunejob", "keep-me", "-n", namespace)
        assert after["metadata"]["uid"] == job["metadata"]["uid"]
        # ... and so does the Optuna study volume (helm.sh/resource-policy: keep).
        assert _get(cluster, "pvc", f"{release}-study", "-n", namespace)["status"]["phase"] \
            == "Bound"
        listed = json.loads(helm("list", "-n", namespace, "-o", "json", cluster=cluster).stdout)
        assert listed == []
    finally:
        for crd in private_crds:
            cluster.kubectl("delete", "crd", crd, "--ignore-not-found", "--wait=false",
                            check=False)
