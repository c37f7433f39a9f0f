"""The trainer pod options of spec.pod, resources.extendedResources and model.cacheClaim in
real pods: the pods run as the named ServiceAccount with the pull Secret, are scheduled only
where the extended resource is, and the two pods of a job and a later job share one model
cache volume — the model is downloaded once."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.node.pods import RealNode
from tests.node.test_training_pods import (
    apply_job,
    describe,
    job_spec,
    trainer_pods,
    wait_job_phase,
)
from tests.support import Cluster, wait_for

pytestmark = pytest.mark.node

DONGLE = "example.com/dongle"


@pytest.fixture
def dongles(cluster: Cluster, real_node: RealNode) -> Iterator[None]:
    """The real node advertises 2 of an extended resource (as a device plugin or an admin
    would), removed again afterwards."""
    path = "/status/{}/" + DONGLE.replace("/", "~1")

    def patch(ops: list[dict[str, Any]]) -> None:
        cluster.kubectl("patch", "node", real_node.name, "--subresource=status",
                        "--type=json", "-p", json.dumps(ops))

    patch([{"op": "add", "path": path.format(k), "value": "2"}
           for k in ("capacity", "allocatable")])
    try:
        yield
    finally:
        patch([{"op": "remove", "path": path.format("capacity")}])
        # the kubelet copies capacity into allocatable; drop ours if it has not yet
        node = json.loads(cluster.kubectl("get", "node", real_node.name, "-o", "json").stdout)
        if DONGLE in node["status"].get("allocatable", {}):
            patch([{"op": "remove", "path": path.format("allocatable")}])


@pytest.fixture
def cache_claim(cluster: Cluster, real_node: RealNode, job_ns: str) -> Iterator[Path]:
    """A ReadWriteMany claim bound to a hostPath volume of the real node; yields the host
    directory behind it."""
    host = Path(f"/var/tmp/kubetune-model-cache-{uuid.uuid4().hex[:8]}")
    host.mkdir(mode=0o777)
    host.chmod(0o777)  # the trainer runs as uid 1000
    pv = f"{job_ns}-model-cache"
    objects = [
        {"apiVersion": "v1", "kind": "PersistentVolume",
         "metadata": {"name": pv},
         "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"],
                  "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
                  "hostPath": {"path": str(host), "type": "Directory"},
                  "claimRef": {"namespace": job_ns, "name": "model-cache"},
                  "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                      {"key": "kubernetes.io/hostname", "operator": "In",
                       "values": [real_node.name]}]}]}}}},
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
         "metadata": {"name": "model-cache", "namespace": job_ns},
         "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": pv,
                  "resources": {"requests": {"storage": "1Gi"}}}},
    ]
    cluster.kubectl("apply", "-f", "-", input=json.dumps({"kind": "List", "apiVersion": "v1",
                                                          "items": objects}))
    try:
        wait_for(lambda: json.loads(cluster.kubectl(
            "get", "pvc", "-n", job_ns, "model-cache", "-o", "json").stdout)["status"].get(
            "phase") == "Bound", timeout=60, what="the model cache claim Bound")
        yield host
    finally:
        cluster.kubectl("delete", "pvc", "-n", job_ns, "model-cache", "--wait=false",
                        check=False)
        cluster.kubectl("delete", "pv", pv, "--wait=false", check=False)
        shutil.rmtree(host, ignore_errors=True)


def _logs(cluster: Cluster, namespace: str, pods: list[dict[str, Any]]) -> dict[str, str]:
    return {p["metadata"]["name"]: cluster.kubectl(
        "logs", "-n", namespace, p["metadata"]["name"]).stdout for p in pods}


UP_TO_DATE = "file(s) already up to date in /var/cache/kubetune/objects/s3/"


def weight_gets(real_node: RealNode, bucket: str) -> int:
    """GET requests the node's S3 server answered for the base model's weights."""
    log = Path(real_node.env["S3_LOG"]).read_text(errors="replace")
    return log.count(f"GET /{bucket}/models/llama/model.safetensors")


def test_pod_options_and_one_model_download_per_cache_volume(
    cluster: Cluster, real_node: RealNode, job_ns: str, inputs: dict[str, Any],
    dongles: None, cache_claim: Path,
) -> None:
    namespace, bucket = job_ns, inputs["bucket"]
    cluster.kubectl("create", "serviceaccount", "-n", namespace, "trainer-sa")
    cluster.kubectl("create", "secret", "docker-registry", "-n", namespace, "regcred",
                    "--docker-server=registry.invalid", "--docker-username=u",
                    "--docker-password=p")
    spec = job_spec(bucket)
    spec["model"]["cacheClaim"] = "model-cache"
    spec["pod"] = {"serviceAccountName": "trainer-sa",
                   "imagePullSecrets": [{"name": "regcred"}],
                   "annotations": {"example.com/owner": "node-tier"}}
    spec["resources"] = {**spec["resources"], "extendedResources": {DONGLE: 1}}
    apply_job(cluster, namespace, "knobs", spec)
    job = wait_job_phase(cluster, namespace, "knobs", {"Succeeded", "Failed"})
    assert job["status"]["phase"] == "Succeeded", describe(cluster, namespace)

    pods = trainer_pods(cluster, namespace, "knobs")
    assert len(pods) == 2
    for p in pods:
        s = p["spec"]
        assert s["nodeName"] == real_node.name
        assert s["serviceAccountName"] == "trainer-sa"
        assert s["automountServiceAccountToken"] is False  # the trainer never needs the API
        assert s["imagePullSecrets"] == [{"name": "regcred"}]
        assert p["metadata"]["annotations"]["example.com/owner"] == "node-tier"
        limits = s["containers"][0]["resources"]["limits"]
        assert limits[DONGLE] == "1"
        assert not any(m["mountPath"].startswith("/var/run/secrets/kubernetes.io")
                       for m in s["containers"][0].get("volumeMounts", []))

    # One pod downloaded the model into the shared volume; the other waited for it or found
    # it there, verified, without fetching it again: the S3 server served the weights once.
    assert weight_gets(real_node, bucket) == 1, _logs(cluster, namespace, pods)
    # ... through the image's s5cmd (KUBETUNE_S3_ENGINE=s5cmd), every file verified by
    # kubetune before it got its name.
    logs = _logs(cluster, namespace, pods)
    assert sum("s5cmd: " in t and " verified in " in t for t in logs.values()) == 1, logs
    # Nothing was cached yet: the whole model prefix came through one listing of it, not
    # object by object (s5cmd sends a HEAD before each object it is given by name). The
    # server's log says so whichever rank downloaded (only rank 0 logs the summary line).
    s3_log = Path(real_node.env["S3_LOG"]).read_text(errors="replace").splitlines()
    listings = [ln for ln in s3_log if f"GET /{bucket}?list-type=2&prefix=models/llama/" in ln]
    assert listings, [ln for ln in s3_log if "list-type" in ln or "HEAD" in ln]
    assert not [ln for ln in s3_log if f"HEAD /{bucket}/models/llama/" in ln], s3_log
    model = cache_claim / "objects" / "s3" / bucket / "models" / "llama"
    assert (model / "config.json").is_file() and (model / ".kubetune-verified.json").is_file()
    verified_at = (model / ".kubetune-verified.json").stat().st_mtime_ns

    # Each node has 2 dongles: a job asking for 3 per pod cannot be placed; the controller
    # says so instead of waiting silently.
    over = job_spec(bucket)
    over["resources"] = {**over["resources"], "extendedResources": {DONGLE: 3}}
    over["distributed"] = {**over["distributed"], "nodes": 1}
    apply_job(cluster, namespace, "too-many", over)

    def unschedulable() -> str | None:
        status = json.loads(cluster.kubectl(
            "get", "ftj", "-n", namespace, "too-many", "-o", "json").stdout).get("status", {})
        msg = str(status.get("message", ""))
        return msg if "unschedulable" in msg and DONGLE in msg else None

    wait_for(unschedulable, timeout=120, interval=2, what="too-many reported unschedulable")
    cluster.kubectl("delete", "ftj", "-n", namespace, "too-many", "--wait=false")

    # A later job on the same volume re-uses the verified copy: no download at all.
    again = job_spec(bucket)
    again["model"]["cacheClaim"] = "model-cache"
    again["distributed"] = {**again["distributed"], "nodes": 1}
    apply_job(cluster, namespace, "knobs-again", again)
    job = wait_job_phase(cluster, namespace, "knobs-again", {"Succeeded", "Failed"})
    assert job["status"]["phase"] == "Succeeded", describe(cluster, namespace)
    (text,) = _logs(cluster, namespace, trainer_pods(cluster, namespace, "knobs-again")).values()
    assert UP_TO_DATE in text, text[-3000:]
    assert weight_gets(real_node, bucket) == 1
    assert (model / ".kubetune-verified.json").stat().st_mtime_ns >= verified_at
