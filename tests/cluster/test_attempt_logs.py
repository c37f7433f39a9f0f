"""Failed attempts keep their pods (and so their logs) after a gang restart, bounded by the
controller's retention; `kubetune logs --attempt N` finds them. kwok pods have no real logs:
the tests assert which pod the CLI reads and the messages it gives, not log content."""

from __future__ import annotations

import pytest

from orchestrator.client import Client
from tests.cluster.controller_support import ControllerProcess, end_pod, get, items, wait_phase
from tests.cluster.test_cli_cluster import kubetune, one_error
from tests.cluster.test_finetunejob import _apply, _job, _running_pods, _secret
from tests.support import Cluster, wait_for

pytestmark = pytest.mark.cluster

INDEX = "batch.kubernetes.io/job-completion-index"
ENDED = ("Succeeded", "Failed")


def _fail_rank(cluster: Cluster, namespace: str, job: str, attempt: int, nodes: int,
               rank: int) -> str:
    pods = _running_pods(cluster, namespace, job, attempt, nodes)
    victim = next(p for p in pods if p["metadata"]["annotations"][INDEX] == str(rank))
    end_pod(cluster, namespace, victim["metadata"]["name"], 1,
            f"RuntimeError: NCCL watchdog timeout (attempt {attempt})")
    wait_for(lambda: (get(cluster, "ftj", namespace, job).get("status") or {}).get("attempts")
             == attempt + 1, timeout=30, what=f"attempt {attempt + 1}")
    return str(victim["metadata"]["name"])


def _attempt_pods(cluster: Cluster, namespace: str, job: str, attempt: int) -> list[dict]:
    return items(cluster, "pods", namespace, f"kubetune.io/job={job},kubetune.io/attempt={attempt}")


def test_a_restart_keeps_the_failed_attempts_job_and_pods_for_logs(
    cluster: Cluster, namespace: str, controller: ControllerProcess
) -> None:
    _secret(cluster, namespace)
    _apply(cluster, namespace, _job("keeplogs", nodes=2, backoff=2))
    failed = _fail_rank(cluster, namespace, "keeplogs", 1, 2, rank=1)
    _running_pods(cluster, namespace, "keeplogs", 2, 2)

    # attempt 1's Job stays, failed, with the retention TTL
    old = wait_for(
        lambda: (j := get(cluster, "job", namespace, "keeplogs-a1"))["spec"].get(
            "ttlSecondsAfterFinished") == 86400 and j,
        timeout=30, what="keeplogs-a1 with its TTL")
    conds = {c["type"] for c in old["status"].get("conditions") or [] if c["status"] == "True"}
    assert conds & {"Failed", "FailureTarget"}, old["status"]
    # its failed pod is kept; nothing of attempt 1 still runs (the survivor was stopped)
    wait_for(lambda: all(
        p["status"].get("phase") in ENDED or p["metadata"].get("deletionTimestamp")
        for p in _attempt_pods(cluster, namespace, "keeplogs", 1)), timeout=30,
        what="attempt 1's pods ended")
    kept = {p["metadata"]["name"]: p for p in _attempt_pods(cluster, namespace, "keeplogs", 1)}
    assert failed in kept and kept[failed]["status"]["phase"] == "Failed"

    # the job is Running on attempt 2: attempt 1's failed pod is not the current gang's
    obj = wait_phase(cluster, "ftj", namespace, "keeplogs", "Running", timeout=30)
    assert obj["status"]["attempts"] == 2 and obj["status"]["message"].startswith("attempt 2")

    # the CLI reads attempt 1's failed rank, and by default rank 0 of attempt 2
    client = Client(namespace, kubeconfig=cluster.kubeconfig)
    assert client.log_pod("keeplogs", attempt=1, rank=1)["name"] == failed
    current = client.log_pod("keeplogs")
    assert (current["attempt"], current["rank"]) == (2, 0)
    assert current["name"].startswith("keeplogs-a2-0-")
    assert sorted(client.attempt_pods("keeplogs")) == [1, 2]

    # `kubetune logs --attempt 1 --rank 1` reads that pod: kwok's fake kubelet may or may not
    # serve a log; either way no other pod is read
    proc = kubetune(cluster, namespace, "logs", "keeplogs", "--attempt", "1", "--rank", "1",
                    ok=False)
    if proc.returncode != 0:
        assert f"cannot read the log of pod {failed} (attempt 1, rank 1)" in one_error(proc)
    # an attempt that never was: one clear line naming the attempts that have logs
    line = one_error(kubetune(cluster, namespace, "logs", "keeplogs", "--attempt", "5",
                              ok=False))
    assert "FineTuneJob keeplogs has no attempt 5: it has had 2 attempt(s); attempts with " \
           "logs: 1, 2" in line
    # `kubectl tune` is the same program
    line = one_error(kubetune(cluster, namespace, "logs", "keeplogs", "--attempt", "1",
                              "--rank", "7", ok=False))
    assert "attempt 1 of FineTuneJob keeplogs has no pod of rank 7; ranks with logs:" in line


def test_only_the_last_failed_attempts_are_kept(
    cluster: Cluster, namespace: str, controller: ControllerProcess
) -> None:
    """The controller keeps 3 failed attempts (the default): after the 4th failure, attempt
    1's Job and pods are deleted and the CLI says which attempts still have logs."""
    _secret(cluster, namespace)
    _apply(cluster, namespace, _job("churn", nodes=1, backoff=5))
    for attempt in (1, 2, 3, 4):
        _fail_rank(cluster, namespace, "churn", attempt, 1, rank=0)
    _running_pods(cluster, namespace, "churn", 5, 1)

    def jobs() -> list[str]:
        return sorted(j["metadata"]["name"] for j in items(cluster, "jobs", namespace,
                                                           "kubetune.io/job=churn"))

    wait_for(lambda: jobs() == ["churn-a2", "churn-a3", "churn-a4", "churn-a5"], timeout=30,
             what=f"attempt 1's Job pruned (jobs: {jobs()})")
    wait_for(lambda: not _attempt_pods(cluster, namespace, "churn", 1), timeout=30,
             what="attempt 1's pods gone")
    line = one_error(kubetune(cluster, namespace, "logs", "churn", "--attempt", "1", ok=False))
    assert "attempt 1 of FineTuneJob churn has no pods left" in line
    assert "attempts with logs: 2, 3, 4, 5" in line
    assert get(cluster, "ftj", namespace, "churn")["status"]["phase"] in ("Pending", "Running")
