"""Leader election against the real API server: two controller processes share a Lease; the
leader is paused with SIGSTOP (a GC pause, a frozen VM), the standby takes over, and the old
leader, resumed, exits without writing anything.

The two controllers serve only the test's namespace, with the chart's namespaced RBAC and a
Lease there, so no other controller of this session competes; the session's cluster-wide
controller (the package fixture) is stopped for the duration, since it would reconcile the
test's jobs as well, and the test waits for (or, after 90 s, skips because of) any other
kubetune controller active on the shared test cluster."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from orchestrator.controller.leader import EXIT_LOST_LEADERSHIP
from tests.cluster.controller_support import (  # noqa: F401 (a fixture)
    ControllerProcess,
    cluster_to_ourselves,
    get,
    wait_phase,
)
from tests.cluster.deploy_helpers import install_rbac, remove_rbac, service_account_kubeconfig
from tests.support import Cluster, wait_for

pytestmark = pytest.mark.cluster

LEASE = "kubetune-controller"
LEASE_DURATION, RENEW_DEADLINE, RETRY_PERIOD = 15.0, 10.0, 2.0  # the controller's defaults


def _job(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": "s3://models/tiny-llama"},
            "data": {"train": "s3://data/train.jsonl", "eval": "s3://data/eval.jsonl",
                     "format": "chat"},
            "method": {"type": "lora", "rank": 8, "alpha": 16},
            "training": {"globalBatchSize": 8, "microBatchSize": 4},
            "distributed": {"nodes": 1, "gpusPerNode": 1},
            "output": {"uri": "s3://adapters/test/"},
            "storage": {"endpoint": "http://s3.local:9000",
                        "credentialsSecret": "s3-credentials"},
        },
    }


def _sweep(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneSweep",
        "metadata": {"name": name},
        "spec": {
            "template": _job("template")["spec"],
            "parameters": [{"name": "method.rank", "int": {"low": 2, "high": 64, "log": True}}],
            "objectives": [{"metric": "evalLoss", "direction": "minimize"}],
            "algorithm": {"sampler": "random", "seed": 1},
            "maxTrials": 4,
            "parallelism": 2,
        },
    }


def _trials(cluster: Cluster, namespace: str, sweep: str) -> list[str]:
    docs = json.loads(cluster.kubectl("get", "ftj", "-n", namespace, "-l",
                                      f"kubetune.io/sweep={sweep}", "-o", "json").stdout)
    return sorted(d["metadata"]["name"] for d in docs["items"])


def _apply(cluster: Cluster, namespace: str, obj: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj))


def _lease(cluster: Cluster, namespace: str, name: str = LEASE) -> dict[str, Any] | None:
    proc = cluster.kubectl("get", "lease", name, "-n", namespace, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def _holder(cluster: Cluster, namespace: str) -> str:
    lease = _lease(cluster, namespace) or {}
    return str((lease.get("spec") or {}).get("holderIdentity") or "")


def _snapshot(cluster: Cluster, namespace: str) -> dict[str, Any]:
    """Everything in the namespace the controller writes, in the form a write would change:
    FineTuneSweeps and FineTuneJobs (status, trials), ConfigMaps, Services, Secrets and the
    Lease by resourceVersion; Jobs by what the controller sets (their status belongs to the
    Job controller); the controller's Events by name."""
    kinds = "finetunesweeps,finetunejobs,configmaps,services,secrets,leases,jobs,events"
    docs = json.loads(cluster.kubectl("get", kinds, "-n", namespace, "-o", "json").stdout)
    snap: dict[str, Any] = {}
    for obj in docs["items"]:
        kind, meta = obj["kind"], obj["metadata"]
        key = f"{kind}/{meta['name']}"
        if kind == "Job":
            snap[key] = (meta["uid"], meta.get("generation"), meta.get("labels"),
                         meta.get("annotations"), meta.get("deletionTimestamp"),
                         obj["spec"].get("suspend"))
        elif kind == "Event":
            if obj.get("reportingComponent") == "kubetune.io/controller":
                snap[key] = meta["resourceVersion"]
        elif not (kind == "ConfigMap" and meta["name"] == "kube-root-ca.crt"):
            snap[key] = (meta["uid"], meta["resourceVersion"])
    return snap


@pytest.mark.usefixtures("cluster_to_ourselves")
def test_paused_leader_is_replaced_and_exits_on_resume_without_writing(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    user = install_rbac(cluster, namespace)  # the chart's RBAC: this namespace and its Lease
    kubeconfig = service_account_kubeconfig(cluster, namespace, user, tmp_path / "kubeconfig")
    cluster.kubectl("create", "secret", "generic", "s3-credentials", "-n", namespace,
                    "--from-literal=AWS_ACCESS_KEY_ID=test",
                    "--from-literal=AWS_SECRET_ACCESS_KEY=test-secret")
    env = {"KUBETUNE_NAMESPACES": namespace, "KUBETUNE_LEASE_NAMESPACE": namespace,
           # one study database for both (a local file: same host, never used at once)
           "KUBETUNE_STUDY_STORAGE": f"sqlite:///{tmp_path}/optuna.db"}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = ControllerProcess(kubeconfig, tmp_path / "a", {**env, "POD_NAME": "replica-a"})
    b = ControllerProcess(kubeconfig, tmp_path / "b", {**env, "POD_NAME": "replica-b"})
    try:
        a.start()  # returns once it leads
        assert _holder(cluster, namespace) == "replica-a"
        _apply(cluster, namespace, _job("first"))
        wait_for(lambda: get(cluster, "job", namespace, "first-a1"), timeout=30,
                 what="Job of the first FineTuneJob, by the leader")

        b.start(wait=False)
        wait_for(lambda: "waiting for leadership" in b.tail(), timeout=60,
                 what="the second replica waiting as a standby")
        time.sleep(2 * RETRY_PERIOD)  # it watches the leader renew: no takeover
        assert b.running() and _holder(cluster, namespace) == "replica-a"

        assert a.proc is not None and b.proc is not None
        a.proc.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        _apply(cluster, namespace, _job("second"))  # only a live leader can launch them
        _apply(cluster, namespace, _sweep("sweep"))
        wait_for(lambda: _holder(cluster, namespace) == "replica-b",
                 timeout=LEASE_DURATION + 4 * RETRY_PERIOD + 10, what="the standby taking over")
        took_over = time.monotonic() - stopped_at
        # Not before the paused leader's fence closed (its last renewal was at most a retry
        # period before SIGSTOP), and within lease duration + a few seconds.
        assert RENEW_DEADLINE <= took_over <= LEASE_DURATION + 2 * RETRY_PERIOD + 5, took_over
        second = wait_phase(cluster, "ftj", namespace, "second", "Running", timeout=60)
        assert get(cluster, "job", namespace, "second-a1")
        wait_phase(cluster, "ftj", namespace, "first", "Running", timeout=60)
        trials = wait_for(lambda: (t := _trials(cluster, namespace, "sweep")) and len(t) == 2
                          and t, timeout=60, what="the sweep's first two trials")
        for trial in trials:
            wait_phase(cluster, "ftj", namespace, trial, "Running", timeout=60)
        time.sleep(3)  # let the new leader's status writes and events settle

        # Resume the old leader while the new one is paused too: whatever changes in the
        # namespace meanwhile was written by the old leader.
        b.proc.send_signal(signal.SIGSTOP)
        time.sleep(0.5)
        before = _snapshot(cluster, namespace)
        a.proc.send_signal(signal.SIGCONT)
        try:
            code = a.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        after = _snapshot(cluster, namespace)
        b.proc.send_signal(signal.SIGCONT)

        assert code == EXIT_LOST_LEADERSHIP, a.tail()
        log = a.tail(200)
        assert "lost leadership" in log and "renew deadline" in log, log
        assert after == before, {k: (before.get(k), after.get(k))
                                 for k in set(before) | set(after)
                                 if before.get(k) != after.get(k)}

        # The new leader was paused for a moment only (less than its renew deadline): it
        # still leads and keeps working; every child exists once.
        _apply(cluster, namespace, _job("third"))
        wait_for(lambda: get(cluster, "job", namespace, "third-a1"), timeout=30,
                 what="Job of a FineTuneJob created after the old leader exited")
        assert b.running() and _holder(cluster, namespace) == "replica-b"
        jobs = json.loads(cluster.kubectl("get", "jobs", "-n", namespace, "-o", "json").stdout)
        # no trial launched twice: parallelism 2, two trials, one Job each
        assert _trials(cluster, namespace, "sweep") == trials
        assert sorted(j["metadata"]["name"] for j in jobs["items"]) == sorted(
            ["first-a1", "second-a1", "third-a1", *(f"{t}-a1" for t in trials)])
        sweep = get(cluster, "fts", namespace, "sweep")["status"]
        assert sweep["trials"]["created"] == 2, sweep
        # and the study asked for exactly those: no trial proposed by the old leader
        import optuna

        (study,) = optuna.get_all_study_summaries(f"sqlite:///{tmp_path}/optuna.db")
        assert study.n_trials == 2, study
        assert (second["status"].get("attempts") or 1) == 1
        assert get(cluster, "ftj", namespace, "second")["status"].get("attempts", 1) == 1

        # A clean shutdown hands the Lease over: a standby would not wait out the lease.
        b.stop()
        assert b.proc.returncode == 0, b.tail()
        assert _holder(cluster, namespace) == "" and "released the Lease" in b.tail()
    finally:
        for proc in (a, b):
            if proc.running():
                assert proc.proc is not None
                proc.proc.send_signal(signal.SIGCONT)
                proc.kill()
        remove_rbac(cluster, namespace)
