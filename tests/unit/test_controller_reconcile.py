"""FineTuneJob reconciles from the caches with an in-memory API (kubeflow's fake-client
tier): what a reconcile reads, which calls it makes, and that nothing is called when
nothing changed."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import pytest

from orchestrator.api.conditions import get_condition
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
        obj["metadata"].setdefault("uid", f"uid-{obj['metadata']['name']}")
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

    def patch_job(self, ns: str, name: str, patch: dict[str, Any]) -> None:
        self.calls.append(f"patch Job {name} {patch}")
        job = self.objects[("Job", name)]
        for part, fields in patch.items():
            job.setdefault(part, {}).update(fields)
        self._store(job)

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
        "ownerReferences": [{"kind": "Job", "uid": "uid-j-a1", "controller": True}],
        "annotations": {"batch.kubernetes.io/job-completion-index": "0"}},
        "status": {"phase": phase, "containerStatuses": [
            {"name": "trainer", "state": {"terminated": term} if term else {}}]}}


def test_first_reconcile_creates_children_then_running_then_quiet() -> None:
    ctl, kube = _setup()
    _run(ctl)
    # the Job last: a ConfigMap or Service name held by someone else stops it (NameConflict)
    assert kube.calls[:4] == ["get Secret s3", "create ConfigMap j-a1-config",
                              "create Service j-workers", "create Job j-a1"]
    # one status write per launch, already saying what the new Job shows (no pod yet)
    assert [c for c in kube.calls if c.startswith("patch")] == [
        "patch status j ['attempts', 'conditions', 'message', 'observedGeneration', 'phase', "
        "'startTime']"]
    status = ctl.ftjs.get("ns", "j")["status"]  # type: ignore[index]
    assert status["phase"] == "Pending"
    assert status["message"] == "attempt 1: 0/1 pod(s) running"
    assert get_condition(status["conditions"], "Created")["status"] == "True"  # type: ignore[index]
    # the new Job's own watch event then finds nothing to write
    kube.calls.clear()
    ctl.on_child(None, ctl.child_jobs.get("ns", "j-a1"))
    _run(ctl)
    assert kube.calls == []
    # the Job came from the write-through; the pod's watch event arrives
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
    # the failed Job stays (its pods keep their logs), with the retention TTL
    assert "create Job j-a2" in kube.calls
    assert not [c for c in kube.calls if c.startswith("delete")], kube.calls
    assert "patch Job j-a1 {'spec': {'ttlSecondsAfterFinished': 86400}}" in kube.calls
    st = ctl.ftjs.get("ns", "j")["status"]  # type: ignore[index]
    assert st["attempts"] == 2 and st["phase"] == "Pending"
    # the patched Job's watch event: nothing more to do, attempt 1 is not taken for the
    # current one (its failed pod is still in the cache)
    patched = copy.deepcopy(job)
    patched["metadata"]["resourceVersion"] = "1000"
    patched["spec"]["ttlSecondsAfterFinished"] = 86400
    ctl.child_jobs.put(patched)
    kube.calls.clear()
    ctl.on_child(job, patched)
    _run(ctl)
    assert not [c for c in kube.calls if "Job" in c], kube.calls
    assert ctl.ftjs.get("ns", "j")["status"]["attempts"] == 2  # type: ignore[index]
    # its TTL passes: the deletion event creates nothing twice
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
        PatchJob,
        RecordStatus,
        decide,
        render_defaults,
    )

    defaults = render_defaults(ControllerSettings())
    # a retryable failure: record the attempt, then start the next one; the failed Job is
    # kept (no DeleteJob: its pods' logs stay readable) and gets the retention TTL
    status, actions = decide(_snap_with_failed_job(1, "NCCL timeout"), defaults)
    assert [type(a) for a in actions] == [Emit, RecordStatus, CreateChildren, PatchJob]
    assert status["attempts"] == 2 and status["phase"] == "Pending"
    assert actions[2].attempt == 2  # type: ignore[union-attr]
    assert actions[3] == PatchJob("j-a1", {"spec": {"ttlSecondsAfterFinished": 86400}})
    assert not any(isinstance(a, DeleteJob) for a in actions)
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


def _evicted(pod: dict, reason: str = "EvictionByEvictionAPI") -> dict:
    pod["status"]["conditions"] = [{"type": "DisruptionTarget", "status": "True", "reason": reason,
                                    "message": "Eviction API: evicting"}]
    return pod


def test_an_evicted_rank_restarts_the_gang_without_using_a_retry() -> None:
    from orchestrator.controller.jobs import CreateChildren, DeleteJob, Snapshot, decide
    from orchestrator.controller.jobs import render_defaults as rd

    defaults = rd(ControllerSettings())
    spec = {**SPEC, "backoffLimit": 0}
    # the eviction is seen while the pod terminates: recorded at once, with a Warning
    snap = _snap_with_failed_job(0, "")
    snap.obj["spec"] = spec
    snap.jobs["j-a1"]["status"] = {"active": 1}
    running = _evicted(_pod("Running"))
    status, actions = decide(Snapshot(snap.obj, snap.jobs, [running]), defaults)
    cond = get_condition(status["conditions"], "Disrupted")
    assert cond and cond["status"] == "True" and "EvictionByEvictionAPI" in cond["message"]
    assert cond["message"].startswith("attempt 1: pod j-a1-0-x")
    # the attempt ends (the evicted pod already gone from the cache, a survivor stopped at
    # its checkpoint with 75): a new attempt although backoffLimit is 0
    snap.obj["status"] = status
    snap.jobs["j-a1"]["status"] = {"failed": 1, "conditions": [
        {"type": "Failed", "status": "True", "reason": "PodFailurePolicy"}]}
    survivor = _pod("Failed", 75, '{"status": "Stopped"}')
    status, actions = decide(Snapshot(snap.obj, snap.jobs, [survivor]), defaults)
    assert status["attempts"] == 2 and status["disruptions"] == 1
    assert status["phase"] == "Pending" and "disrupted" in status["message"]
    assert "do not count against backoffLimit 0" in status["message"]
    assert not any(isinstance(a, DeleteJob) for a in actions)  # kept, for its logs
    assert any(isinstance(a, CreateChildren) and a.attempt == 2 for a in actions)
    # a real failure on attempt 2 is still judged by backoffLimit 0
    snap2 = _snap_with_failed_job(1, "boom", attempts=2)
    snap2.obj["spec"] = spec
    snap2.obj["status"]["disruptions"] = 1
    status, _ = decide(snap2, defaults)
    assert status["phase"] == "Failed" and "1 disruption(s) not counted" in status["message"]


def test_a_job_failed_by_its_disruption_rule_counts_as_a_disruption() -> None:
    """The evicted pod may vanish before the controller ever saw its condition: the Job's
    own PodFailurePolicy condition still says why it failed."""
    from orchestrator.controller.jobs import decide
    from orchestrator.controller.jobs import render_defaults as rd

    snap = _snap_with_failed_job(143, "")
    snap.obj["spec"] = {**SPEC, "backoffLimit": 0}
    snap.jobs["j-a1"]["status"]["conditions"] = [{
        "type": "Failed", "status": "True", "reason": "PodFailurePolicy",
        "message": "Pod ns/j-a1-1-x has condition DisruptionTarget matching FailJob rule at "
                   "index 0"}]
    status, _ = decide(snap, rd(ControllerSettings()))
    assert status["attempts"] == 2 and status["disruptions"] == 1


def test_oom_killed_rank_is_the_cause_not_the_collateral_kills() -> None:
    from orchestrator.controller.jobs import decide
    from orchestrator.controller.jobs import render_defaults as rd

    snap = _snap_with_failed_job(137, "")
    oom, killed = snap.pods[0], copy.deepcopy(snap.pods[0])
    oom["metadata"]["name"] = "j-a1-1-y"
    oom["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] = "1"
    oom["status"]["containerStatuses"][0]["state"]["terminated"].update(
        reason="OOMKilled", finishedAt="2026-01-01T00:00:05Z")
    killed["status"]["containerStatuses"][0]["state"]["terminated"].update(
        exitCode=143, reason="Error", finishedAt="2026-01-01T00:00:01Z")
    snap.pods[:] = [killed, oom]
    status, _ = decide(snap, rd(ControllerSettings()))
    assert "pod j-a1-1-y (node rank 1) was OOMKilled" in status["message"]
    assert "spec.resources.memory" in status["message"]


@pytest.mark.parametrize("reason", ["ErrImagePull", "ImagePullBackOff",
                                    "CreateContainerConfigError"])
def test_a_pod_that_cannot_start_says_why(reason: str) -> None:
    from orchestrator.controller.jobs import Emit, Snapshot, decide
    from orchestrator.controller.jobs import render_defaults as rd

    snap = _snap_with_failed_job(0, "")
    snap.jobs["j-a1"]["status"] = {"active": 1}
    pod = _pod("Pending")
    pod["status"]["containerStatuses"][0]["state"] = {
        "waiting": {"reason": reason, "message": "the kubelet's own words"}}
    status, actions = decide(Snapshot(snap.obj, snap.jobs, [pod]), rd(ControllerSettings()))
    running = get_condition(status["conditions"], "Running")
    assert running and running["status"] == "False" and running["reason"] == reason
    assert status["phase"] == "Pending"
    assert "pod j-a1-0-x container trainer" in status["message"]
    assert "the kubelet's own words" in status["message"]
    assert [a.reason for a in actions if isinstance(a, Emit)] == [reason]
    # said once: the next reconcile with the same problem emits nothing new
    snap.obj["status"] = status
    _, actions = decide(Snapshot(snap.obj, snap.jobs, [pod]), rd(ControllerSettings()))
    assert not [a for a in actions if isinstance(a, Emit)]


def test_a_child_the_api_server_refuses_fails_the_job_with_its_message() -> None:
    from orchestrator.controller.kube import Rejected

    ctl, kube = _setup()

    def refuse(body: dict) -> dict | None:
        kube.calls.append(f"create {body['kind']} {body['metadata']['name']}")
        raise Rejected("Job", body["metadata"]["name"],
                       'Job.batch "j-a1" is invalid: spec.template.spec.affinity.nodeAffinity.'
                       "requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms: "
                       "Required value: must have at least one node selector term")

    kube.create = refuse  # type: ignore[method-assign]
    _run(ctl)
    st = ctl.ftjs.get("ns", "j")["status"]  # type: ignore[index]
    assert st["phase"] == "Failed"
    failed = get_condition(st["conditions"], "Failed")
    assert failed and failed["reason"] == "InvalidSpec"
    assert "nodeSelectorTerms: Required value" in failed["message"]
    assert "spec.resources" in failed["message"]
    created = get_condition(st["conditions"], "Created")
    assert created and created["status"] == "False"
    # terminal: no create is tried again
    kube.calls.clear()
    ctl.queue.add((JOB, "ns", "j"))
    _run(ctl)
    assert not [c for c in kube.calls if c.startswith("create")]


def test_the_controllers_pod_defaults_reach_the_trainer_pods() -> None:
    """Helm's trainer.* values arrive as settings; the Job the controller creates has them."""
    kube = FakeKube()
    settings = ControllerSettings(resync_seconds=30, trainer_priority_class="batch-low",
                                  trainer_env={"NCCL_DEBUG": "WARN"})
    ctl = Controller(kube, settings, None)  # type: ignore[arg-type]
    ftj = kube._store({"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
                       "metadata": {"name": "j", "namespace": "ns", "uid": "u1",
                                    "generation": 1}, "spec": SPEC})
    ctl.on_custom(JOB, "ADDED", ftj)
    _run(ctl)
    pod = kube.objects[("Job", "j-a1")]["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "batch-low"
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["NCCL_DEBUG"] == "WARN"


def test_what_the_kubelet_says_survives_the_pod_cache() -> None:
    """The controller's pod cache trims pods: the waiting reason and the DisruptionTarget
    condition must reach the decision through it."""
    ctl, _ = _setup()
    _run(ctl)
    pod = _pod("Pending")
    pod["status"]["containerStatuses"][0]["state"] = {
        "waiting": {"reason": "ErrImagePull", "message": "connection refused"}}
    pod["status"]["conditions"] = [{"type": "DisruptionTarget", "status": "True",
                                    "reason": "PreemptionByScheduler", "message": "preempted"}]
    ctl.pods.put(pod)
    ctl.on_child(None, ctl.pods.get("ns", "j-a1-0-x"))
    _run(ctl)
    st = ctl.ftjs.get("ns", "j")["status"]  # type: ignore[index]
    assert get_condition(st["conditions"], "Running")["reason"] == "ErrImagePull"  # type: ignore[index]
    assert "PreemptionByScheduler" in get_condition(st["conditions"], "Disrupted")["message"]  # type: ignore[index]


def test_a_terminating_namespace_is_quiet_and_keeps_the_workers_alive() -> None:
    """Creating children in a namespace being deleted is refused (403 NamespaceTerminating):
    nothing to do, no retry, and above all no worker thread lost (a controller whose workers
    all died reconciles nothing while looking healthy)."""
    from kubernetes.client.exceptions import ApiException

    ctl, kube = _setup()

    def refuse(body: dict) -> dict | None:
        exc = ApiException(status=403, reason="Forbidden")
        exc.body = '{"reason": "Forbidden", "message": "NamespaceTerminating"}'
        raise exc

    kube.create = refuse  # type: ignore[method-assign]
    _run(ctl)  # processes quietly
    assert ctl.queue.get(timeout=0) is None  # and requeues nothing

    calls = []

    def broken(key: Any) -> None:
        calls.append(key)
        raise RuntimeError("a bug")

    ctl.process = broken  # type: ignore[method-assign]
    ctl.queue.add((JOB, "ns", "j"))
    import threading

    t = threading.Thread(target=ctl._work, daemon=True)
    t.start()
    try:
        import time

        deadline = time.monotonic() + 5
        while len(calls) < 2 and time.monotonic() < deadline:  # retried: the worker lives on
            time.sleep(0.05)
        assert len(calls) >= 2 and t.is_alive()
    finally:
        ctl._stop.set()
        t.join(timeout=5)
