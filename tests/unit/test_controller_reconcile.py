"""FineTuneJob reconciles from the caches with an in-memory API (kubeflow's fake-client
tier): what a reconcile reads, which calls it makes, and that nothing is called when
nothing changed."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import pytest

from orchestrator.controller.handlers import JOB, Controller
from orchestrator.controller.settings import ControllerSettings

pytestmark = pytest.mark.unit

SPEC = {
    "model": {"uri": "s3://models/m"},
    "data": {"train": "s3://d/train.jsonl", "eval": "s3://d/eval.jsonl"},
    "method": {"type": "lora", "rank": 8},
    "training": {"globalBatchSize": 8, "microBatchSize": 8},
    "distributed": {"nodes": 1, "gpusPerNode": 1},
    "output": {"uri": "s3://adapters/x/"},
    "storage": {"credentialsSecret": "s3"},
    "backoffLimit": 1,
}


class FakeKube:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.rv = itertools.count(100)

    def _store(self, obj: dict[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(next(self.rv))
        self.objects[(obj["kind"], obj["metadata"]["name"])] = obj
        return copy.deepcopy(obj)

    def create(self, body: dict[str, Any]) -> dict[str, Any] | None:
        self.calls.append(f"create {body['kind']} {body['metadata']['name']}")
        if (body["kind"], body["metadata"]["name"]) in self.objects:
            return None
        return self._store(body)

    def patch_status(self, plural: str, ns: str, name: str, patch: dict) -> dict | None:
        self.calls.append(f"patch status {name} {sorted(patch)}")
        obj = self.objects[("FineTuneJob", name)]
        status = dict(obj.get("status") or {})
        for k, v in patch.items():
            if v is None:
                status.pop(k, None)
            else:
                status[k] = v
        obj["status"] = status
        return self._store(obj)

    def delete_job(self, ns: str, name: str) -> None:
        self.calls.append(f"delete Job {name}")
        self.objects.pop(("Job", name), None)

    def secret_exists(self, ns: str, name: str) -> bool:
        self.calls.append(f"get Secret {name}")
        return True

    def event(self, obj: dict, type_: str, reason: str, message: str) -> None:
        self.calls.append(f"event {reason}")


def _setup() -> tuple[Controller, FakeKube]:
    kube = FakeKube()
    ctl = Controller(kube, ControllerSettings(resync_seconds=30), None)  # type: ignore[arg-type]
    ftj = kube._store({"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
                       "metadata": {"name": "j", "namespace": "ns", "uid": "u1",
                                    "generation": 1}, "spec": SPEC})
    ctl.on_custom(JOB, "ADDED", ftj)
    return ctl, kube


def _run(ctl: Controller) -> None:
    while (key := ctl.queue.get(timeout=0)) is not None:
        ctl.process(key)  # type: ignore[arg-type]
        ctl.queue.done(key)


def _pod(phase: str, code: int | None = None, message: str = "") -> dict:
    term = {"exitCode": code, "message": message} if code is not None else None
    return {"kind": "Pod", "metadata": {
        "name": "j-a1-0-x", "namespace": "ns", "resourceVersion": "1",
        "labels": {"kubetune.io/job": "j", "kubetune.io/attempt": "1"},
        "annotations": {"batch.kubernetes.io/job-completion-index": "0"}},
        "status": {"phase": phase, "containerStatuses": [
            {"name": "trainer", "state": {"terminated": term} if term else {}}]}}


def test_first_reconcile_creates_children_then_running_then_quiet() -> None:
    ctl, kube = _setup()
    _run(ctl)
    assert kube.calls[:4] == ["get Secret s3", "create Job j-a1", "create ConfigMap j-a1-config",
                              "create Service j-workers"]
    assert any(c.startswith("patch status j") for c in kube.calls)
    assert ctl.ftjs.get("ns", "j")["status"]["phase"] == "Pending"  # type: ignore[index]
    # the Job came from the write-through; the pod's watch event arrives
    kube.calls.clear()
    ctl.pods.put(_pod("Running"))
    ctl.on_child(None, ctl.pods.get("ns", "j-a1-0-x"))
    _run(ctl)
    assert [c for c in kube.calls if c.startswith("patch")] == [
        "patch status j ['conditions', 'message', 'phase']"]
    assert ctl.ftjs.get("ns", "j")["status"]["phase"] == "Running"  # type: ignore[index]
    # a resync (or any event) with nothing changed costs no API call at all
    kube.calls.clear()
    ctl.queue.add((JOB, "ns", "j"))
    _run(ctl)
    assert kube.calls == []


def test_a_failed_pod_restarts_the_gang_once_per_failure() -> None:
    ctl, kube = _setup()
    _run(ctl)
    ctl.pods.put(_pod("Failed", 1, "RuntimeError: NCCL timeout"))
    job = copy.deepcopy(kube.objects[("Job", "j-a1")])
    job["status"] = {"failed": 1, "conditions": [{"type": "Failed", "status": "True"}]}
    job["metadata"]["resourceVersion"] = "999"
    ctl.child_jobs.put(job)
    kube.calls.clear()
    ctl.on_child(None, job)
    _run(ctl)
    assert "delete Job j-a1" in kube.calls and "create Job j-a2" in kube.calls
    st = ctl.ftjs.get("ns", "j")["status"]  # type: ignore[index]
    assert st["attempts"] == 2 and st["phase"] == "Pending"
    # the old Job's deletion event arrives after the restart: nothing is created twice
    ctl.child_jobs.delete("ns", "j-a1")
    kube.calls.clear()
    ctl.on_child(job, None)
    _run(ctl)
    assert not [c for c in kube.calls if c.startswith("create")], kube.calls


def _snap_with_failed_job(code: int, message: str, attempts: int = 1) -> Any:
    from orchestrator.controller.jobs import Snapshot

    ftj = {"kind": "FineTuneJob", "metadata": {"name": "j", "namespace": "ns", "uid": "u1"},
           "spec": SPEC, "status": {"attempts": attempts, "phase": "Running", "conditions": [
               {"type": "Created", "status": "True",
                "message": f"attempt {attempts}: Job j-a{attempts} created"}]}}
    job = {"metadata": {"name": f"j-a{attempts}"}, "spec": {"suspend": False},
           "status": {"conditions": [{"type": "Failed", "status": "True"}]}}
    pod = _pod("Failed", code, message)
    pod["metadata"]["labels"]["kubetune.io/attempt"] = str(attempts)
    return Snapshot(ftj, {f"j-a{attempts}": job}, [pod])


def test_decide_is_pure_and_names_its_actions() -> None:
    from orchestrator.controller.jobs import (
        CreateChildren,
        DeleteJob,
        Emit,
        RecordStatus,
        decide,
        render_defaults,
    )

    defaults = render_defaults(ControllerSettings())
    # a retryable failure: record the attempt, then replace the Job
    status, actions = decide(_snap_with_failed_job(1, "NCCL timeout"), defaults)
    assert [type(a) for a in actions] == [Emit, RecordStatus, DeleteJob, CreateChildren]
    assert status["attempts"] == 2 and status["phase"] == "Pending"
    assert actions[2] == DeleteJob("j-a1") and actions[3].attempt == 2  # type: ignore[union-attr]
    # bad data cannot go away on retry: fail, no child touched
    bad = '{"exitCode":65,"reason":"InvalidData","message":"train.jsonl:3: not JSON"}'
    status, actions = decide(_snap_with_failed_job(65, bad), defaults)
    assert status["phase"] == "Failed" and [type(a) for a in actions] == [Emit]
    assert "train.jsonl:3" in status["message"]
    # backoffLimit 1 used up on attempt 2
    status, actions = decide(_snap_with_failed_job(1, "boom", attempts=2), defaults)
    assert status["phase"] == "Failed" and "gave up after 2 attempt(s)" in status["message"]


def test_a_finished_job_waits_for_its_pods_termination_messages() -> None:
    import datetime as dt

    from orchestrator.controller.jobs import Snapshot, Wait, decide, render_defaults

    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    snap = _snap_with_failed_job(0, "")
    job = snap.jobs["j-a1"]
    job["status"] = {"succeeded": 1, "conditions": [
        {"type": "Complete", "status": "True", "lastTransitionTime": now}]}
    running_pod = _pod("Running")  # the pod's last update has not reached the cache yet
    status, actions = decide(Snapshot(snap.obj, snap.jobs, [running_pod]),
                             render_defaults(ControllerSettings()))
    assert status["phase"] == "Running" and [type(a) for a in actions] == [Wait]
    done_pod = _pod("Succeeded", 0, '{"metrics": {"evalLoss": 0.5}}')
    status, _ = decide(Snapshot(snap.obj, snap.jobs, [done_pod]),
                       render_defaults(ControllerSettings()))
    assert status["phase"] == "Succeeded" and status["metrics"] == {"evalLoss": 0.5}
