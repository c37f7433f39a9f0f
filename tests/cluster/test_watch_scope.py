"""The default install is namespaced: a controller with exactly the chart's default RBAC (a
Role in its own namespace, no ClusterRole at all) starts, serves the FineTuneJobs of its
namespace, and leaves a FineTuneJob in a namespace it does not watch alone.

It runs as its ServiceAccount's own token with the chart's default environment, so a
cluster-scoped request (kopf listing Namespaces or watching CRDs, an informer across all
namespaces) would be refused and fail the test. The session's cluster-wide controller is
stopped meanwhile (cluster_to_ourselves): it would reconcile the unwatched job itself."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.controller_support import (  # noqa: F401 (a fixture)
    ControllerProcess,
    cluster_to_ourselves,
    get,
    wait_phase,
)
from tests.cluster.deploy_helpers import (
    chart_controller_env,
    finetunejob,
    install_rbac,
    service_account_kubeconfig,
)
from tests.support import Cluster

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("cluster_to_ourselves")]


def _ftj(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    return json.loads(cluster.kubectl("get", "ftj", name, "-n", namespace, "-o",
                                      "json").stdout)


def test_default_install_serves_its_namespace_and_leaves_others_alone(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    other = f"{namespace}-unwatched"
    cluster.kubectl("create", "namespace", other)
    controller: ControllerProcess | None = None
    try:
        user = install_rbac(cluster, namespace)  # the chart's default: this namespace only
        kubeconfig = service_account_kubeconfig(cluster, namespace, user, tmp_path / "kc")
        env = chart_controller_env(namespace)  # no values: the chart's defaults
        assert env["KUBETUNE_NAMESPACES"] == namespace  # $(POD_NAMESPACE), expanded
        for ns in (namespace, other):
            cluster.kubectl("create", "secret", "generic", "s3-credentials", "-n", ns,
                            "--from-literal=AWS_ACCESS_KEY_ID=test",
                            "--from-literal=AWS_SECRET_ACCESS_KEY=test-secret")
        job = finetunejob("scoped")
        job["spec"]["storage"] = {"endpoint": "http://s3.local:9000",
                                  "credentialsSecret": "s3-credentials"}
        # created before the controller starts, and after: neither is picked up elsewhere
        cluster.kubectl("apply", "-n", other, "-f", "-", input=json.dumps(job))

        controller = ControllerProcess(kubeconfig, tmp_path, {
            "KUBETUNE_NAMESPACES": env["KUBETUNE_NAMESPACES"],
            "KUBETUNE_LEASE_NAMESPACE": namespace,
            "KUBETUNE_STUDY_STORAGE": f"sqlite:///{tmp_path}/optuna.db",
        })
        controller.start()  # returns once it leads and kopf's watches run
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(job))
        wait_phase(cluster, "ftj", namespace, "scoped", "Running", timeout=60)
        assert get(cluster, "job", namespace, "scoped-a1")
        job["metadata"]["name"] = "scoped-late"
        cluster.kubectl("apply", "-n", other, "-f", "-", input=json.dumps(job))
        time.sleep(5)  # resync is 3 s (ControllerProcess): more than one pass

        # The unwatched namespace: no status, no finalizer, no children, no Events.
        for name in ("scoped", "scoped-late"):
            obj = _ftj(cluster, other, name)
            assert not obj.get("status"), obj.get("status")
            assert not obj["metadata"].get("finalizers"), obj["metadata"]
            assert not any(k.startswith("kopf.zalando.org")
                           for k in obj["metadata"].get("annotations") or {})
        for kind in ("jobs", "configmaps,services", "events"):
            listed = json.loads(cluster.kubectl("get", kind, "-n", other, "-o",
                                                "json").stdout)["items"]
            ours = [i["metadata"]["name"] for i in listed
                    if i["metadata"]["name"] != "kube-root-ca.crt"]
            assert not ours, (kind, ours)
        # ... and the controller never asked for anything it may not have.
        log = controller.tail(400)
        assert "403" not in log and "Forbidden" not in log, log
        assert controller.running(), controller.tail()
    finally:
        if controller is not None:
            controller.stop()
        cluster.kubectl("delete", "namespace", other, "--wait=false", check=False)
