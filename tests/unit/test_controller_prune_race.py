"""A pruning decision and a reconcile never race on a trial's status (issue 12, "Status
writes race"): the prune is written inside the trial's own reconcile, the work queue never
hands one key to two workers, and the cache ignores a watch event older than the prune's
write. Here the interleaving the issue describes is injected at the worst moment — a stale
`Running` version of the trial and the Job's deletion arrive right after the prune's status
write — and the pruned trial's Job is never created again."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from orchestrator.controller.handlers import JOB, Controller, Report
from orchestrator.controller.jobs import Result
from orchestrator.controller.settings import ControllerSettings
from tests.unit.test_controller_reconcile import SPEC, FakeKube

pytestmark = pytest.mark.unit

SWEEP_UID = "sweep-uid"


class PruningSweeps:
    """The sweep side, reduced to its answer: every intermediate value means 'prune'."""

    written: Any = None

    def record(self, sweep: dict, number: int, step: int, values: dict) -> bool:
        return True

    def tell_pruned(self, sweep: dict, number: int, step: int) -> None:
        pass

    def was_pruned(self, obj: dict) -> bool:
        return True

    def reconcile(self, obj: dict, children: list[dict]) -> Result:
        return Result()

    def forget(self, namespace: str, name: str) -> None:
        pass

    def collect_deleted(self, namespace: str, name: str, uid: str | None) -> None:
        pass

    def trial_token(self, sweep: dict, number: int) -> str:
        return f"kt1.token-{number}"

    def job_token(self, job_uid: str) -> str:
        return f"kt1.job-{job_uid}"


def _run(ctl: Controller) -> None:
    while (key := ctl.queue.get(timeout=0)) is not None:
        ctl.process(key)  # type: ignore[arg-type]
        ctl.queue.done(key)


def test_a_pruned_trials_job_is_never_recreated_by_a_racing_reconcile() -> None:
    kube = FakeKube()
    ctl = Controller(kube, ControllerSettings(resync_seconds=30), PruningSweeps())  # type: ignore[arg-type]
    ctl.ftss.put({"kind": "FineTuneSweep", "metadata": {
        "name": "s", "namespace": "ns", "uid": SWEEP_UID, "resourceVersion": "1"}, "spec": {}})
    trial = kube._store({"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
                         "metadata": {"name": "s-0", "namespace": "ns", "uid": "t0",
                                      "generation": 1,
                                      "labels": {"kubetune.io/sweep": "s",
                                                 "kubetune.io/trial": "0"},
                                      "ownerReferences": [{
                                          "apiVersion": "kubetune.io/v1alpha1",
                                          "kind": "FineTuneSweep", "name": "s",
                                          "uid": SWEEP_UID, "controller": True}]},
                         "spec": SPEC})
    ctl.on_custom(JOB, "ADDED", trial)
    _run(ctl)
    assert ("Job", "s-0-a1") in kube.objects
    pod = {"kind": "Pod", "metadata": {
        "name": "s-0-a1-0-x", "namespace": "ns", "resourceVersion": "1",
        "labels": {"kubetune.io/job": "s-0", "kubetune.io/attempt": "1"},
        "ownerReferences": [{"kind": "Job", "uid": "uid-s-0-a1", "controller": True}],
        "annotations": {"batch.kubernetes.io/job-completion-index": "0"}},
        "status": {"phase": "Running", "containerStatuses": [{"name": "trainer", "state": {}}]}}
    ctl.pods.put(pod)
    ctl.on_child(None, pod)
    _run(ctl)
    running = copy.deepcopy(kube.objects[("FineTuneJob", "s-0")])
    assert running["status"]["phase"] == "Running"

    # the injected interleaving: after the prune's status write (and its write-through to
    # the cache), while it deletes the Job, the watch delivers the trial's older Running
    # version and a resync fires
    delete_job = kube.delete_job
    injected: list[str] = []

    def delete_then_race(ns: str, name: str) -> None:
        delete_job(ns, name)
        if not injected:
            injected.append("stale Running event")
            ctl.on_custom(JOB, "MODIFIED", copy.deepcopy(running))
            ctl.queue.add((JOB, ns, "s-0"))

    kube.delete_job = delete_then_race  # type: ignore[method-assign]
    report = Report(step=10, metrics={"evalLoss": 9.0}, progress=None)
    assert ctl.submit_report("ns", "s-0", report) is not None
    key = ctl.queue.get(timeout=0)
    assert key == (JOB, "ns", "s-0")
    # while this worker holds the key, no other worker can take it (events only re-queue it)
    ctl.queue.add(key)
    assert ctl.queue.get(timeout=0) is None
    kube.calls.clear()
    ctl.process(key)  # type: ignore[arg-type]
    ctl.queue.done(key)
    assert injected and report.answer.result(timeout=1) == "prune"
    assert "delete Job s-0-a1" in kube.calls
    job = ctl.child_jobs.get("ns", "s-0-a1")
    if job is not None:  # the informer reports the deletion
        ctl.child_jobs.delete("ns", "s-0-a1")
        ctl.on_child(job, None)
    ctl.pods.delete("ns", "s-0-a1-0-x")
    ctl.on_child(pod, None)
    for _ in range(3):  # the re-queued key, the deletion events, resyncs
        ctl.queue.add(key)
        _run(ctl)

    assert not [c for c in kube.calls if c.startswith("create")], kube.calls
    assert ("Job", "s-0-a1") not in kube.objects
    cached = ctl.ftjs.get("ns", "s-0")
    assert cached is not None and cached["status"]["phase"] == "Failed"
    assert kube.objects[("FineTuneJob", "s-0")]["status"]["phase"] == "Failed"
