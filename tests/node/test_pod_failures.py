"""What real pods do when something outside the trainer goes wrong: an eviction restarts the
gang without using a retry, and a pod that cannot start says why in the FineTuneJob's status.
The controller is the Helm-installed pod; the kubelet, containerd and the API server are real.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from orchestrator.api.conditions import get_condition
from tests.node.pods import RealNode
from tests.node.test_training_pods import (
    LONG,
    apply_job,
    describe,
    get_job,
    job_spec,
    pod_of,
    resumed_run,
    trainer_pods,
    wait_job_phase,
    wait_training_step,
)
from tests.support import Cluster, wait_for

pytestmark = pytest.mark.node


def evict(cluster: Cluster, namespace: str, pod: str) -> None:
    """The Eviction API, as `kubectl drain` and the cluster autoscaler use it."""
    body = {
        "apiVersion": "policy/v1",
        "kind": "Eviction",
        "metadata": {"name": pod, "namespace": namespace},
    }
    cluster.kubectl(
        "create",
        "--raw",
        f"/api/v1/namespaces/{namespace}/pods/{pod}/eviction",
        "-f",
        "-",
        input=json.dumps(body),
    )


def test_evicted_rank_restarts_the_gang_without_using_a_retry(
    cluster: Cluster, real_node: RealNode, job_ns: str, inputs: dict[str, Any], tmp_path: Path
) -> None:
    namespace = job_ns
    # backoffLimit 0: if the eviction were counted as a failure, the job would fail
    spec = job_spec(inputs["bucket"], training={**LONG, "checkpointEvery": 1000}, backoffLimit=0)
    apply_job(cluster, namespace, "evicted", spec)
    wait_training_step(cluster, namespace, "evicted", 10)
    rank1 = pod_of(trainer_pods(cluster, namespace, "evicted"), 1, 1)
    assert rank1 is not None
    evicted_at = time.monotonic()
    evict(cluster, namespace, rank1["metadata"]["name"])

    # The survivor (rank 0) does not wait in a collective for a rank that cannot come back:
    # the whole gang stops and attempt 2 starts within the grace period, not after a
    # rendezvous or NCCL timeout (minutes).
    grace = int(rank1["spec"]["terminationGracePeriodSeconds"])

    def second_attempt() -> bool:
        return pod_of(trainer_pods(cluster, namespace, "evicted"), 0, 2) is not None

    try:
        wait_for(second_attempt, timeout=grace + 90, interval=1, what="attempt 2's pods")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{describe(cluster, namespace)}") from None
    print(f"eviction -> attempt 2 created in {time.monotonic() - evicted_at:.0f}s (grace {grace}s)")

    job = wait_job_phase(cluster, namespace, "evicted", {"Succeeded", "Failed"})
    st = job["status"]
    assert st["phase"] == "Succeeded", describe(cluster, namespace)
    assert (st["attempts"], st["disruptions"]) == (2, 1)
    disrupted = get_condition(st["conditions"], "Disrupted")
    assert disrupted and "EvictionByEvictionAPI" in disrupted["message"]
    assert disrupted["message"].startswith(f"attempt 1: pod {rank1['metadata']['name']}")
    events = cluster.kubectl(
        "get", "events", "-n", namespace, "--field-selector", "involvedObject.name=evicted"
    ).stdout
    assert "Disrupted" in events and "do not count against backoffLimit 0" in events
    # the evicted rank checkpointed on SIGTERM; the new gang resumed there
    meta = resumed_run(cluster, namespace, "evicted", tmp_path / "collected", inputs["s3"])
    assert meta["resumedFromStep"] and 10 <= meta["resumedFromStep"] < LONG["maxSteps"]


def wait_condition(
    cluster: Cluster, namespace: str, name: str, type_: str, *reasons: str, timeout: float = 60
) -> dict[str, Any]:
    def seen() -> dict[str, Any] | None:
        status = get_job(cluster, namespace, name).get("status", {})
        cond = get_condition(status.get("conditions") or [], type_)
        return cond if cond and cond.get("reason") in reasons else None

    try:
        return wait_for(seen, timeout=timeout, interval=1, what=f"{name}: {type_} in {reasons}")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{describe(cluster, namespace)}") from None


def test_why_a_pod_does_not_start_is_in_status(
    cluster: Cluster, real_node: RealNode, job_ns: str, inputs: dict[str, Any]
) -> None:
    namespace = job_ns
    one_pod = {"nodes": 1, "gpusPerNode": 0}
    # 1. an image that does not exist
    apply_job(
        cluster,
        namespace,
        "no-image",
        job_spec(inputs["bucket"], image="kubetune/does-not-exist:dev", distributed=one_pod),
    )
    # 2. a credentials Secret without the secret key
    cluster.kubectl(
        "create",
        "secret",
        "generic",
        "half-creds",
        "-n",
        namespace,
        "--from-literal=AWS_ACCESS_KEY_ID=kubetune-test",
    )
    spec = job_spec(inputs["bucket"], distributed=one_pod)
    spec["storage"] = {"credentialsSecret": "half-creds"}
    apply_job(cluster, namespace, "half-creds", spec)
    # 3. a pod template the API server refuses (the CRD passes affinity through as is)
    spec = job_spec(inputs["bucket"], distributed=one_pod)
    spec["resources"]["affinity"] = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}
        }
    }
    apply_job(cluster, namespace, "bad-affinity", spec)

    t0 = time.monotonic()
    pulled = wait_condition(
        cluster, namespace, "no-image", "Running", "ErrImagePull", "ImagePullBackOff"
    )
    print(f"ErrImagePull in status after {time.monotonic() - t0:.0f}s")
    assert "docker.io/kubetune/does-not-exist:dev" in pulled["message"]
    assert "container trainer" in pulled["message"]

    config = wait_condition(
        cluster, namespace, "half-creds", "Running", "CreateContainerConfigError"
    )
    assert "AWS_SECRET_ACCESS_KEY" in config["message"] and "half-creds" in config["message"]

    failed = wait_condition(cluster, namespace, "bad-affinity", "Failed", "InvalidSpec")
    assert "nodeSelectorTerms" in failed["message"] and "spec.resources" in failed["message"]
    assert get_job(cluster, namespace, "bad-affinity")["status"]["phase"] == "Failed"

    events = cluster.kubectl("get", "events", "-n", namespace).stdout
    for reason in ("ImagePull", "CreateContainerConfigError", "InvalidSpec"):
        assert reason in events, events
    # the pods that cannot start still wait (a pushed image or a fixed Secret lets them run)
    for name in ("no-image", "half-creds"):
        assert get_job(cluster, namespace, name)["status"]["phase"] == "Pending"


def _quantity_bytes(q: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "k": 1000, "M": 10**6, "G": 10**9}
    for suffix, factor in units.items():
        if q.endswith(suffix):
            return int(float(q[: -len(suffix)]) * factor)
    return int(q)


def test_a_gang_that_never_forms_says_why(
    cluster: Cluster, real_node: RealNode, job_ns: str, inputs: dict[str, Any]
) -> None:
    """Each pod asks for 60 % of the node's memory: one runs, the other stays Pending. The
    running one's torchrun gives up after rendezvousTimeoutSeconds, and the job says that
    the gang never formed and why — not 'exit code 1'."""
    namespace = job_ns
    node = json.loads(cluster.kubectl("get", "node", real_node.name, "-o", "json").stdout)
    share = _quantity_bytes(node["status"]["allocatable"]["memory"]) * 6 // 10
    spec = job_spec(inputs["bucket"], backoffLimit=0)
    spec["resources"] = {**spec["resources"], "memory": f"{share // (1 << 20)}Mi"}
    spec["distributed"] = {**spec["distributed"], "rendezvousTimeoutSeconds": 30}
    apply_job(cluster, namespace, "half-gang", spec)

    def pending_reported() -> str | None:
        msg = str(get_job(cluster, namespace, "half-gang").get("status", {}).get("message", ""))
        return msg if "unschedulable" in msg and "Insufficient memory" in msg else None

    wait_for(pending_reported, timeout=120, interval=2, what="the Pending pod reported")
    job = wait_job_phase(cluster, namespace, "half-gang", {"Failed", "Succeeded"}, timeout=300)
    status = job["status"]
    assert status["phase"] == "Failed", describe(cluster, namespace)
    failed = get_condition(status["conditions"], "Failed")
    assert failed is not None
    assert "the gang never formed" in failed["message"], failed
    assert "within 30 s" in failed["message"] and "rendezvousTimeoutSeconds" in failed["message"]
    pods = trainer_pods(cluster, namespace, "half-gang")
    ran = [p for p in pods if p["status"].get("containerStatuses")]
    assert ran, describe(cluster, namespace)
    term = ran[0]["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 69
    assert json.loads(term["message"])["reason"] in ("RendezvousTimeout", "RendezvousUnreachable")


def test_a_pod_out_of_memory_is_named_with_what_to_change(
    cluster: Cluster, real_node: RealNode, job_ns: str, inputs: dict[str, Any]
) -> None:
    """The kernel's OOM killer (a real cgroup limit, not a kwok stage) ends the pod: the job
    says OOMKilled and which spec fields to change, not 'exit code 137'."""
    namespace = job_ns
    spec = job_spec(inputs["bucket"], backoffLimit=0)
    spec["distributed"] = {**spec["distributed"], "nodes": 1}
    spec["resources"] = {**spec["resources"], "memory": "200Mi"}  # less than torch needs
    apply_job(cluster, namespace, "oom", spec)
    job = wait_job_phase(cluster, namespace, "oom", {"Failed", "Succeeded"}, timeout=300)
    assert job["status"]["phase"] == "Failed", describe(cluster, namespace)
    failed = get_condition(job["status"]["conditions"], "Failed")
    assert failed is not None
    assert "was OOMKilled" in failed["message"], failed
    assert "raise spec.resources.memory" in failed["message"], failed
    (pod,) = trainer_pods(cluster, namespace, "oom")
    term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["reason"] == "OOMKilled", term
