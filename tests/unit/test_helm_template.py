"""`helm template` of the chart for a few value combinations: golden files for review, plus
the properties that matter to a platform team, asserted directly.

To accept an intended change to the rendered chart:

    KUBETUNE_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_helm_template.py

and review the diff of tests/golden/helm/.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from orchestrator.api.pod import SecretKeySelector
from tests.cluster.deploy_helpers import CHART, helm, render, rule_permissions, set_args
from tests.support import REPO, tool

pytestmark = pytest.mark.unit

GOLDEN = REPO / "tests" / "golden" / "helm"

CASES: dict[str, dict[str, Any]] = {
    "defaults": {},
    # A team-scoped install against an external object store and an external study database.
    "namespaced": {
        "watchNamespaces": ["team-a", "team-b"],
        "objectStorage": {"endpoint": "http://s3.storage:8333",
                          "credentialsSecret": "s3-credentials", "region": "eu-west-1"},
        "studyStorage.existingSecret": "optuna-db",
        "trainer.image": "registry.example.com/kubetune/trainer:0.1.0-cu124",
    },
    # Highly available with Prometheus Operator monitoring and pinned to system nodes.
    "ha-monitoring": {
        "replicas": 2,
        "image.tag": "0.1.1",
        "studyStorage.url": "postgresql://optuna@pg.db:5432/optuna",
        "metrics.serviceMonitor": {"enabled": True, "labels": {"release": "prom"},
                                   "scrapeTimeout": "10s"},
        "networkPolicy.metricsPodSelector": {"matchLabels": {"app.kubernetes.io/name":
                                                             "prometheus"}},
        "nodeSelector": {"node-role.kubernetes.io/system": ""},
        "tolerations": [{"key": "CriticalAddonsOnly", "operator": "Exists"}],
        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 100, "podAffinityTerm": {
                "topologyKey": "kubernetes.io/hostname",
                "labelSelector": {"matchLabels": {"app.kubernetes.io/component":
                                                  "controller"}}}}]}},
    },
    # Every namespace (the pre-0.2 default), the controller's egress locked down to the API
    # server, DNS and an external study database.
    "cluster-wide-egress": {
        "clusterWide": True,
        "studyStorage.url": "postgresql://optuna@pg.db:5432/optuna",
        "networkPolicy.controllerEgress": {
            "enabled": True, "apiServerCIDRs": ["10.0.0.10/32", "10.0.0.11/32"],
            "storageCIDRs": ["10.20.0.0/16"], "storagePorts": [5432]},
    },
    # Everything optional switched off: bring-your-own ServiceAccount and RBAC, no network
    # policy, no leader election, studies on an emptyDir.
    "minimal": {
        "serviceAccount": {"create": False, "name": "kubetune-sa"},
        "rbac.create": False,
        "networkPolicy.enabled": False,
        "leaderElection.enabled": False,
        "studyStorage.persistence.enabled": False,
    },
}


@pytest.fixture(scope="module", autouse=True)
def _helm() -> None:
    try:
        tool("helm")
    except RuntimeError as exc:  # `make test` builds it; a bare checkout may not have it yet
        pytest.skip(str(exc))


def _template(values: dict[str, Any]) -> str:
    return helm("template", "kubetune", str(CHART), "--namespace", "kubetune-system",
                *set_args(values)).stdout


def _kind(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs
            if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def _deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (dep,) = _kind(docs, "Deployment")
    return dep


def _env(dep: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom"))
            for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rendered_chart_matches_golden(case: str) -> None:
    text = _template(CASES[case])
    path = GOLDEN / f"{case}.yaml"
    if os.environ.get("KUBETUNE_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing {path}: run with KUBETUNE_UPDATE_GOLDEN=1"
    assert text == path.read_text(), \
        f"{path.name} differs: review, then regenerate with KUBETUNE_UPDATE_GOLDEN=1"


@pytest.mark.parametrize("case", sorted(CASES))
def test_helm_lint_is_clean(case: str) -> None:
    proc = helm("lint", "--strict", str(CHART), *set_args(CASES[case]), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout


def test_controller_runs_locked_down() -> None:
    spec = _deployment(render())["spec"]["template"]["spec"]
    pod, container = spec["securityContext"], spec["containers"][0]
    sc = container["securityContext"]
    assert pod["runAsNonRoot"] and pod["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"] == {"drop": ["ALL"]}
    # With a read-only root, the only writable places are the mounted volumes.
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"/tmp", "/var/lib/kubetune"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 8080, "report": 8081, "health": 8082}


def test_controller_settings_come_from_values() -> None:
    docs = render(values=CASES["namespaced"])
    env = _env(_deployment(docs))
    assert env["KUBETUNE_NAMESPACES"] == "team-a,team-b"
    assert env["KUBETUNE_TRAINER_IMAGE"] == "registry.example.com/kubetune/trainer:0.1.0-cu124"
    assert env["KUBETUNE_S3_ENDPOINT"] == "http://s3.storage:8333"
    assert env["KUBETUNE_S3_CREDENTIALS_SECRET"] == "s3-credentials"
    assert env["KUBETUNE_S3_REGION"] == "eu-west-1"
    # The database URL (with its password) stays in the Secret.
    assert env["KUBETUNE_STUDY_STORAGE"] == {"secretKeyRef": {"name": "optuna-db", "key": "url"}}
    assert env["KUBETUNE_LEASE_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["KUBETUNE_LEADER_ELECTION"] == "true"


def test_report_url_points_at_the_report_service() -> None:
    docs = render()
    (svc,) = [s for s in _kind(docs, "Service") if s["metadata"]["name"].endswith("-report")]
    port = svc["spec"]["ports"][0]["port"]
    url = _env(_deployment(docs))["KUBETUNE_REPORT_URL"]
    # the path the report server serves: a bare host:port made every trial's report a 404
    assert url == f"http://{svc['metadata']['name']}.$(POD_NAMESPACE).svc:{port}/report"
    # Both Services select the controller pods, and only them.
    labels = _deployment(docs)["spec"]["template"]["metadata"]["labels"]
    for s in _kind(docs, "Service"):
        assert s["spec"]["selector"].items() <= labels.items()
        assert s["spec"]["selector"]["app.kubernetes.io/component"] == "controller"


def test_study_storage_modes() -> None:
    default = render()
    assert _kind(default, "PersistentVolumeClaim", "kubetune-study")
    assert _deployment(default)["spec"]["strategy"] == {"type": "Recreate"}

    external = render(values={"studyStorage.url": "postgresql://pg/optuna"})
    assert not _kind(external, "PersistentVolumeClaim")
    assert _env(_deployment(external))["KUBETUNE_STUDY_STORAGE"] == "postgresql://pg/optuna"
    volumes = {v["name"] for v in _deployment(external)["spec"]["template"]["spec"]["volumes"]}
    assert volumes == {"tmp"}

    ephemeral = render(values={"studyStorage.persistence.enabled": False})
    assert not _kind(ephemeral, "PersistentVolumeClaim")
    (study,) = [v for v in _deployment(ephemeral)["spec"]["template"]["spec"]["volumes"]
                if v["name"] == "study"]
    assert study == {"name": "study", "emptyDir": {}}

    existing = render(values={"studyStorage.persistence.existingClaim": "my-claim"})
    assert not _kind(existing, "PersistentVolumeClaim")
    (study,) = [v for v in _deployment(existing)["spec"]["template"]["spec"]["volumes"]
                if v["name"] == "study"]
    assert study["persistentVolumeClaim"] == {"claimName": "my-claim"}


@pytest.mark.parametrize(("values", "message"), [
    ({"replicas": 2, "leaderElection.enabled": False}, "needs leaderElection.enabled"),
    # SQLite in every form: one file for one replica (issue 12)
    ({"replicas": 2}, "replicas > 1 cannot use SQLite study storage"),
    ({"replicas": 2, "studyStorage.persistence.accessModes": ["ReadWriteMany"]},
     "set studyStorage.url or studyStorage.existingSecret"),
    ({"replicas": 3, "studyStorage.persistence.enabled": False},
     "replicas > 1 cannot use SQLite study storage"),
])
def test_unsafe_replica_settings_are_refused(values: dict[str, Any], message: str) -> None:
    proc = helm("template", "kubetune", str(CHART), *set_args(values), check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


def test_cluster_wide_rbac_is_one_cluster_role() -> None:
    docs = render(values={"clusterWide": True})
    (cr,) = _kind(docs, "ClusterRole")
    perms = rule_permissions(cr["rules"])
    assert ("namespaces", "", "watch") in perms
    assert ("finetunejobs.kubetune.io", "", "create") in perms
    assert not _kind(docs, "Role", "kubetune-controller")
    (lease_role,) = _kind(docs, "Role", "kubetune-leader-election")
    assert lease_role["metadata"]["namespace"] == "kubetune-system"
    # Pods are only read; Secrets in the served namespaces are only fetched by name: never
    # listed, watched or created (sweep report tokens derive from the controller's own key).
    assert {v for r, _, v in perms if r == "pods"} == {"get", "list", "watch"}
    assert {v for r, _, v in perms if r == "secrets"} == {"get"}
    # ... which is one Secret in the release namespace: create, and get by its name only
    (key_role,) = _kind(docs, "Role", "kubetune-report-key")
    assert key_role["metadata"]["namespace"] == "kubetune-system"
    key_perms = rule_permissions(key_role["rules"])
    assert key_perms == {("secrets", "", "create"), ("secrets", "kubetune-report-key", "get")}
    env = _env(_deployment(docs))
    assert env["KUBETUNE_REPORT_KEY_SECRET"] == "kubetune-report-key"
    assert env["KUBETUNE_NAMESPACES"] == ""  # every namespace
    # the admission policy applies everywhere the controller may run pods
    (binding,) = _kind(docs, "ValidatingAdmissionPolicyBinding")
    assert "matchResources" not in binding["spec"]


def _watched_by_policy(docs: list[dict[str, Any]]) -> list[str]:
    (binding,) = _kind(docs, "ValidatingAdmissionPolicyBinding")
    (expr,) = binding["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"]
    assert (expr["key"], expr["operator"]) == ("kubernetes.io/metadata.name", "In")
    return list(expr["values"])


def test_default_watches_the_release_namespace_only() -> None:
    docs = render()
    # No cluster-scoped rights at all: kopf, given exact namespaces, neither lists Namespaces
    # nor watches CRDs, and the controller reads nothing cluster-scoped.
    assert not _kind(docs, "ClusterRole") and not _kind(docs, "ClusterRoleBinding")
    (role,) = _kind(docs, "Role", "kubetune-controller")
    (binding,) = _kind(docs, "RoleBinding", "kubetune-controller")
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "kubetune-system"
    # $(POD_NAMESPACE): the release namespace, and still right when kustomize moves it
    assert _env(_deployment(docs))["KUBETUNE_NAMESPACES"] == "$(POD_NAMESPACE)"
    assert _watched_by_policy(docs) == ["kubetune-system"]


def test_namespaced_rbac_grants_only_the_watched_namespaces() -> None:
    docs = render(values={"watchNamespaces": ["team-a", "team-b"]})
    assert not _kind(docs, "ClusterRole") and not _kind(docs, "ClusterRoleBinding")
    roles = _kind(docs, "Role", "kubetune-controller")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    bindings = _kind(docs, "RoleBinding", "kubetune-controller")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for b in bindings:
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": "kubetune-controller",
                                  "namespace": "kubetune-system"}]
    # The per-namespace rules are exactly the cluster-wide ones minus the cluster-only ones.
    cluster_wide = rule_permissions(
        _kind(render(values={"clusterWide": True}), "ClusterRole")[0]["rules"])
    cluster_only = {p for p in cluster_wide
                    if p[0] in ("namespaces", "customresourcedefinitions.apiextensions.k8s.io")}
    for role in roles:
        assert rule_permissions(role["rules"]) == cluster_wide - cluster_only
    assert _env(_deployment(docs))["KUBETUNE_NAMESPACES"] == "team-a,team-b"
    assert _watched_by_policy(docs) == ["team-a", "team-b"]
    # an explicit selector wins
    selector = {"matchLabels": {"kubetune.io/enabled": "true"}}
    (binding,) = _kind(render(values={"watchNamespaces": ["team-a"],
                                      "admissionPolicy.namespaceSelector": selector}),
                       "ValidatingAdmissionPolicyBinding")
    assert binding["spec"]["matchResources"] == {"namespaceSelector": selector}


def test_cluster_wide_with_a_namespace_list_is_refused() -> None:
    proc = helm("template", "kubetune", str(CHART),
                *set_args({"clusterWide": True, "watchNamespaces": ["team-a"]}), check=False)
    assert proc.returncode != 0 and "leave watchNamespaces empty" in proc.stderr, proc.stderr


def test_controller_egress_policy() -> None:
    # off by default: the API server's address is not known to the chart
    assert [n["metadata"]["name"] for n in _kind(render(), "NetworkPolicy")] == [
        "kubetune-controller"]
    proc = helm("template", "kubetune", str(CHART),
                *set_args({"networkPolicy.controllerEgress.enabled": True}), check=False)
    assert proc.returncode != 0 and "kubectl get endpoints kubernetes" in proc.stderr

    docs = render(values=CASES["cluster-wide-egress"])
    (np,) = _kind(docs, "NetworkPolicy", "kubetune-egress")
    assert np["spec"]["policyTypes"] == ["Egress"]
    assert np["spec"]["podSelector"]["matchLabels"] == \
        _deployment(docs)["spec"]["selector"]["matchLabels"]
    api, dns, storage = np["spec"]["egress"]
    assert api["to"] == [{"ipBlock": {"cidr": "10.0.0.10/32"}},
                         {"ipBlock": {"cidr": "10.0.0.11/32"}}]
    assert api["ports"] == [{"port": 443, "protocol": "TCP"}, {"port": 6443, "protocol": "TCP"}]
    assert dns["to"] == [{
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
        "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}]
    assert dns["ports"] == [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]
    assert storage == {"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}],
                       "ports": [{"port": 5432, "protocol": "TCP"}]}
    # independent of the ingress policy's switch; extra rules appended as given
    extra = {"to": [{"namespaceSelector": {"matchLabels": {"name": "storage"}}}],
             "ports": [{"port": 8333, "protocol": "TCP"}]}
    docs = render(values={"networkPolicy.enabled": False,
                          "networkPolicy.controllerEgress": {
                              "enabled": True, "apiServerCIDRs": ["192.0.2.1/32"],
                              "extraRules": [extra]}})
    (np,) = _kind(docs, "NetworkPolicy")
    assert np["metadata"]["name"] == "kubetune-egress"
    assert np["spec"]["egress"][-1] == extra and len(np["spec"]["egress"]) == 3


def test_service_monitor_only_when_enabled() -> None:
    assert not _kind(render(), "ServiceMonitor")
    docs = render(values=CASES["ha-monitoring"])
    (sm,) = _kind(docs, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "prom"
    (metrics,) = [s for s in _kind(docs, "Service") if s["metadata"]["name"].endswith("-metrics")]
    assert sm["spec"]["selector"]["matchLabels"].items() <= metrics["metadata"]["labels"].items()
    (report,) = [s for s in _kind(docs, "Service") if s["metadata"]["name"].endswith("-report")]
    assert not sm["spec"]["selector"]["matchLabels"].items() <= report["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"


def test_network_policy_guards_report_and_metrics_ports() -> None:
    (np,) = _kind(render(), "NetworkPolicy", "kubetune-controller")
    assert np["spec"]["policyTypes"] == ["Ingress"]
    report, metrics = np["spec"]["ingress"]
    assert report["ports"] == [{"port": 8081, "protocol": "TCP"}]
    assert report["from"] == [{
        "namespaceSelector": {},  # trainer pods run in the users' namespaces
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kubetune",
                                        "app.kubernetes.io/component": "trainer"}},
    }]
    assert metrics["ports"] == [{"port": 8080, "protocol": "TCP"}]
    assert metrics["from"] == [{"namespaceSelector": {
        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    assert not _kind(render(values={"networkPolicy.enabled": False}), "NetworkPolicy")


def test_long_release_names_still_give_valid_names() -> None:
    release = "a-very-long-release-name-for-the-kubetune-chart-x"
    for values in ({"watchNamespaces": ["team-a"]}, CASES["cluster-wide-egress"]):
        for doc in render(release=release, values=values):
            assert len(doc["metadata"]["name"]) <= 63, doc["metadata"]["name"]


@pytest.mark.parametrize(("replicas", "min_wait", "max_wait"), [(1, 60, 600),
                                                                (2, 86400, None)])
def test_standby_replicas_wait_for_leadership(
    replicas: int, min_wait: int, max_wait: int | None
) -> None:
    # /healthz answers only on the leader: a standby must not be killed by its probes while
    # it waits, yet a lone replica that never comes up must be restarted within minutes.
    values = {"replicas": replicas, "studyStorage.url": "postgresql://pg/optuna"}
    container = _deployment(render(values=values))["spec"]["template"]["spec"]["containers"][0]
    startup = container["startupProbe"]
    waits = startup["periodSeconds"] * startup["failureThreshold"]
    assert waits >= min_wait and (max_wait is None or waits <= max_wait), waits
    assert startup["httpGet"] == container["readinessProbe"]["httpGet"]


def test_trainer_pod_defaults_come_from_values() -> None:
    env = _env(_deployment(render(values={
        "trainer.serviceAccountName": "trainer-irsa",
        "trainer.priorityClassName": "training",
        "trainer.imagePullSecrets": [{"name": "regcred"}, {"name": "mirror"}],
        "trainer.env": {"NCCL_DEBUG": "WARN",
                        "HF_TOKEN": {"secretKeyRef": {"name": "hf", "key": "token"}}},
        "trainer.podLabels": {"example.com/team": "ml"},
        "trainer.extendedResources": {"vpc.amazonaws.com/efa": 4},
        "trainer.ephemeralStorage": "200Gi",
        "trainer.workspaceSize": "150Gi",
        "trainer.modelCacheClaim": "model-cache",
    })))
    assert env["KUBETUNE_TRAINER_SERVICE_ACCOUNT"] == "trainer-irsa"
    assert env["KUBETUNE_TRAINER_PRIORITY_CLASS"] == "training"
    assert env["KUBETUNE_TRAINER_IMAGE_PULL_SECRETS"] == "regcred,mirror"
    assert json.loads(env["KUBETUNE_TRAINER_ENV"]) == {
        "NCCL_DEBUG": "WARN", "HF_TOKEN": {"secretKeyRef": {"name": "hf", "key": "token"}}}
    assert env["KUBETUNE_TRAINER_POD_LABELS"] == '{"example.com/team":"ml"}'
    assert env["KUBETUNE_TRAINER_EXTENDED_RESOURCES"] == '{"vpc.amazonaws.com/efa":4}'
    assert env["KUBETUNE_TRAINER_EPHEMERAL_STORAGE"] == "200Gi"
    assert env["KUBETUNE_TRAINER_WORKSPACE_SIZE"] == "150Gi"
    assert env["KUBETUNE_TRAINER_MODEL_CACHE_CLAIM"] == "model-cache"
    # what the chart passes is what the controller accepts
    from orchestrator.controller.settings import ControllerSettings

    d = ControllerSettings.from_env({k: v for k, v in env.items() if isinstance(v, str)}
                                    ).render_defaults()
    assert d.extended_resources == {"vpc.amazonaws.com/efa": 4}
    assert d.image_pull_secrets == ("regcred", "mirror")
    assert d.env["NCCL_DEBUG"] == "WARN"
    assert d.env["HF_TOKEN"] == SecretKeySelector(name="hf", key="token")
