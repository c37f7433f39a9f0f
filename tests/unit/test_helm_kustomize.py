"""`kubectl apply -k manifests/` installs what `helm install kubetune helm/kubetune -n
kubetune-system` installs with default values: same objects, same specs, same RBAC (and
manifests/overlays/cluster-wide what `--set clusterWide=true` does). Only the Helm
bookkeeping labels differ, and kustomize also creates the namespace."""

from __future__ import annotations

import copy
import re
import subprocess
from typing import Any

import pytest
import yaml

from tests.cluster.deploy_helpers import CHART, MANIFESTS, render
from tests.support import tool

pytestmark = pytest.mark.unit

HELM_ONLY_LABELS = ("helm.sh/chart", "app.kubernetes.io/managed-by")


@pytest.fixture(scope="module", autouse=True)
def _binaries() -> None:
    try:
        tool("helm"), tool("kubectl")
    except RuntimeError as exc:
        pytest.skip(str(exc))


def _kustomize(path: str) -> list[dict[str, Any]]:
    proc = subprocess.run([tool("kubectl"), "kustomize", path], capture_output=True,
                          text=True, timeout=60, check=True)
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


# kubectl's kustomize does not know these kinds are cluster-scoped and gives them the
# kustomization's namespace; the API server drops it on create.
CLUSTER_SCOPED = ("ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")


def _key(doc: dict[str, Any]) -> tuple[str, str, str]:
    ns = "" if doc["kind"] in CLUSTER_SCOPED else doc["metadata"].get("namespace", "")
    return doc["kind"], ns, doc["metadata"]["name"]


def _normalize(doc: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    if doc["kind"] in CLUSTER_SCOPED:
        doc["metadata"].pop("namespace", None)
    labels = doc["metadata"].get("labels", {})
    for label in HELM_ONLY_LABELS:
        labels.pop(label, None)
    if doc["kind"] == "Deployment":
        # The overlay's strategic-merge patch moves the env entries it sets to the front;
        # order only matters for $(VAR) references, checked separately.
        for c in doc["spec"]["template"]["spec"]["containers"]:
            c["env"] = sorted(c["env"], key=lambda e: e["name"])
    return doc


def _env_references_resolve(deployment: dict[str, Any]) -> None:
    for c in deployment["spec"]["template"]["spec"]["containers"]:
        seen: set[str] = set()
        for e in c["env"]:
            for ref in re.findall(r"\$\((\w+)\)", str(e.get("value", ""))):
                assert ref in seen, f"{e['name']} uses $({ref}) before it is defined"
            seen.add(e["name"])


@pytest.mark.parametrize(("path", "values"), [
    # the default: the controller watches its own namespace, with a Role there
    ("", {}),
    # every namespace (the chart's clusterWide: true), a ClusterRole instead of the Role
    ("overlays/cluster-wide", {"clusterWide": True}),
])
def test_kustomize_equals_chart(path: str, values: dict[str, Any]) -> None:
    kustomized = {_key(d): d for d in _kustomize(str(MANIFESTS / path))}
    chart = {_key(d): d for d in render("kubetune", "kubetune-system", values=values)}
    for crd in sorted((CHART / "crds").glob("*.yaml")):
        doc = yaml.safe_load(crd.read_text())
        chart[_key(doc)] = doc

    namespace = kustomized.pop(("Namespace", "", "kubetune-system"), None)
    assert namespace is not None, "kubectl apply -k manifests/ must create kubetune-system"
    assert sorted(kustomized) == sorted(chart)
    for key, doc in chart.items():
        if key[0] == "CustomResourceDefinition":
            continue  # same files byte for byte: test_helm_crds.py
        assert _normalize(kustomized[key]) == _normalize(doc), f"{key} differs"
    _env_references_resolve(kustomized[("Deployment", "kubetune-system", "kubetune-controller")])
    assert all(d["metadata"].get("labels", {}).get("app.kubernetes.io/managed-by") == "kustomize"
               for k, d in kustomized.items() if k[0] != "CustomResourceDefinition")


def test_overlay_is_the_default_install() -> None:
    assert _kustomize(str(MANIFESTS / "overlays" / "default")) == _kustomize(str(MANIFESTS))


def test_default_kustomize_install_is_namespaced() -> None:
    docs = _kustomize(str(MANIFESTS))
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0][
        "env"]}
    assert env["KUBETUNE_NAMESPACES"] == "$(POD_NAMESPACE)"  # follows `namespace:` overlays
