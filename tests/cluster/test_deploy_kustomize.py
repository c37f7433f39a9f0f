"""`kubectl apply -k manifests/` against the real control plane: it installs a running
controller, and its ServiceAccount holds exactly the permissions the Helm chart grants by
default (its own namespace only).

The test applies manifests/ through a throw-away overlay that moves everything into the test
namespace and suffixes names, so it neither collides with other tests nor with a real
kubetune-system install; everything else is the default overlay, unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.deploy_helpers import (
    MANIFESTS,
    delete_test_volumes,
    granted,
    install_rbac,
    kubectl_json,
    prebound_volume,
    remove_rbac,
    rule_permissions,
)
from tests.support import Cluster

pytestmark = pytest.mark.cluster


@pytest.fixture
def applied(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[str]:
    """Runs `kubectl apply -k` on manifests/ relocated into `namespace`; yields the suffix."""
    suffix = f"-{namespace}"
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": namespace,
        "nameSuffix": suffix,
        # kustomize accepts other kustomizations by relative path only
        "resources": [os.path.relpath(MANIFESTS, overlay)],
    }))
    prebound_volume(cluster, namespace, f"kubetune-study{suffix}")
    try:
        cluster.kubectl("apply", "-k", str(overlay))
        yield suffix
    finally:
        cluster.kubectl("delete", "clusterrolebinding,clusterrole", f"kubetune-controller{suffix}",
                        "--ignore-not-found", "--wait=false", check=False)
        # cluster-scoped too: other tests' FineTuneJobs must not meet this copy's policy
        cluster.kubectl("delete", "validatingadmissionpolicybinding,validatingadmissionpolicy",
                        f"kubetune-job-specs{suffix}", "--ignore-not-found", "--wait=false",
                        check=False)
        remove_rbac(cluster, namespace)
        delete_test_volumes(cluster, namespace)


def _get(cluster: Cluster, *args: str) -> Any:
    return kubectl_json(cluster, "get", *args)


def test_apply_k_runs_the_controller(cluster: Cluster, namespace: str, applied: str) -> None:
    for crd in ("finetunejobs.kubetune.io", "finetunesweeps.kubetune.io"):
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=30s")
    cluster.kubectl("rollout", "status", f"deployment/kubetune-controller{applied}",
                    "-n", namespace, "--timeout=120s")
    dep = _get(cluster, "deployment", f"kubetune-controller{applied}", "-n", namespace)
    assert dep["status"]["availableReplicas"] == 1
    assert _get(cluster, "pvc", f"kubetune-study{applied}", "-n", namespace)["status"]["phase"] \
        == "Bound"
    for svc in ("kubetune-metrics", "kubetune-report"):
        assert _get(cluster, "service", f"{svc}{applied}", "-n", namespace)


def test_apply_k_grants_the_same_rbac_as_the_chart(
    cluster: Cluster, namespace: str, applied: str
) -> None:
    # The chart's default RBAC (its own namespace only) for a second ServiceAccount in the
    # same namespace.
    chart_user = install_rbac(cluster, namespace)
    kustomize_user = f"system:serviceaccount:{namespace}:kubetune-controller{applied}"

    # As the authorizer sees them: in the install namespace (with the Lease), and nothing
    # elsewhere.
    kustomize = granted(cluster, kustomize_user, namespace)
    assert kustomize, f"the kustomize ServiceAccount may do nothing in {namespace}"
    assert kustomize == granted(cluster, chart_user, namespace)
    assert granted(cluster, kustomize_user, "default") == set()
    assert granted(cluster, chart_user, "default") == set()
    # no cluster-scoped rights at all
    for kind in ("clusterrole", "clusterrolebinding"):
        assert cluster.kubectl("get", kind, f"kubetune-controller{applied}",
                               check=False).returncode != 0, kind

    # And as written: the stored rules, normalized, are the same.
    chart_prefix = chart_user.rsplit(":", 1)[1].removesuffix("-controller")
    for chart_name, kustomize_name in (
        (f"{chart_prefix}-controller", f"kubetune-controller{applied}"),
        (f"{chart_prefix}-leader-election", f"kubetune-leader-election{applied}"),
        (f"{chart_prefix}-report-key", f"kubetune-report-key{applied}"),
    ):
        chart_rules = _get(cluster, "role", chart_name, "-n", namespace)["rules"]
        kustomize_rules = _get(cluster, "role", kustomize_name, "-n", namespace)["rules"]
        assert rule_permissions(kustomize_rules) == rule_permissions(chart_rules), chart_name
