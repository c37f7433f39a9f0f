"""Cluster-tier fixtures: CRDs installed from the generated manifests and the controller
running as a local process with exactly the deploy manifests' RBAC."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.cluster.controller_support import (
    CONTROLLER_NS,
    CONTROLLER_SA,
    ControllerProcess,
    sa_kubeconfig,
)
from tests.support import REPO, Cluster


@pytest.fixture(scope="session")
def crds(cluster: Cluster) -> None:
    for crd in sorted((REPO / "manifests" / "crds").glob("kubetune.io_*.yaml")):
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd))
    cluster.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/finetunejobs.kubetune.io",
        "crd/finetunesweeps.kubetune.io",
    )


RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")


@pytest.fixture(scope="session")
def controller_rbac(cluster: Cluster) -> str:
    """The ServiceAccount and RBAC of manifests/overlays/cluster-wide — what `kubectl apply
    -k` installs for a controller that serves every namespace (each test has its own)."""
    cluster.kubectl("apply", "-f", str(REPO / "manifests" / "base" / "namespace.yaml"))
    overlay = REPO / "manifests" / "overlays" / "cluster-wide"
    docs = yaml.safe_load_all(cluster.kubectl("kustomize", str(overlay)).stdout)
    rbac = [d for d in docs if d and d["kind"] in RBAC_KINDS]
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(rbac))
    return f"system:serviceaccount:{CONTROLLER_NS}:{CONTROLLER_SA}"


# Package scope: it stops after the last cluster-tier test, so the node tier's controller (a
# pod installed by the Helm chart) is the only one reconciling the jobs there.
@pytest.fixture(scope="package")
def controller(
    cluster: Cluster,
    crds: None,
    controller_rbac: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ControllerProcess]:
    work: Path = tmp_path_factory.mktemp("controller")
    kubeconfig = sa_kubeconfig(cluster, CONTROLLER_NS, CONTROLLER_SA, work / "kubeconfig")
    proc = ControllerProcess(kubeconfig, work)
    proc.start()
    yield proc
    proc.stop()
