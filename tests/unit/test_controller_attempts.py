"""Failed attempts are kept for their logs, bounded, never running, never the current one:
`decide` alone (pure), plus the snapshot the controller builds from its caches."""

from __future__ import annotations

import copy
import datetime as dt
from typing import Any

import pytest

from orchestrator.controller.handlers import Controller
from orchestrator.controller.jobs import (
    STRAGGLER_SECONDS,
    CreateChildren,
    DeleteJob,
    Emit,
    PatchJob,
    Retention,
    Snapshot,
    Wait,
    decide,
    render_defaults,
)
from orchestrator.controller.settings import ControllerSettings
from tests.unit.test_controller_reconcile import SPEC, FakeKube

pytestmark = pytest.mark.unit

DEFAULTS = render_defaults(ControllerSettings())
TTL = {"spec": {"ttlSecondsAfterFinished": 86400}}


def _ago(seconds: float) -> str:
    t = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seconds)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _ftj(attempts: int, phase: str = "Running") -> dict[str, Any]:
    return {"kind": "FineTuneJob", "metadata": {"name": "j", "namespace": "ns", "uid": "u1"},
            "spec": SPEC, "status": {"attempts": attempts, "phase": phase, "conditions": [
                {"type": "Created", "status": "True",
                 "message": f"attempt {attempts}: Job j-a{attempts} created"}]}}


def _job(attempt: int, condition: str | None = "Failed", ttl: int | None = None,
         since: float = 600.0) -> dict[str, Any]:
    conds = ([{"type": condition, "status": "True", "lastTransitionTime": _ago(since)}]
             if condition else [])
    return {"metadata": {"name": f"j-a{attempt}", "namespace": "ns", "uid": f"uid-j-a{attempt}",
                         "labels": {"kubetune.io/job": "j", "kubetune.io/attempt": str(attempt)}},
            "spec": {"suspend": False, "ttlSecondsAfterFinished": ttl},
            "status": {"conditions": conds, **({"failed": 1} if condition else {"active": 1})}}


def _pod(attempt: int, index: int, phase: str, code: int | None = None,
         deleting: bool = False) -> dict[str, Any]:
    term = {"exitCode": code, "message": "boom"} if code is not None else None
    meta: dict[str, Any] = {
        "name": f"j-a{attempt}-{index}-x", "namespace": "ns",
        "labels": {"kubetune.io/job": "j", "kubetune.io/attempt": str(attempt)},
        "ownerReferences": [{"kind": "Job", "uid": f"uid-j-a{attempt}", "controller": True}],
        "annotations": {"batch.kubernetes.io/job-completion-index": str(index)}}
    if deleting:
        meta["deletionTimestamp"] = _ago(1)
    return {"metadata": meta, "status": {"phase": phase, "containerStatuses": [
        {"name": "trainer", "state": {"terminated": term} if term else {}}]}}


def _kinds(actions: list[Any]) -> list[str]:
    return [type(a).__name__ for a in actions]


def test_a_restart_keeps_the_failed_attempts_job_and_sets_its_ttl() -> None:
    snap = Snapshot(_ftj(1), {"j-a1": _job(1)}, [_pod(1, 0, "Failed", 1)])
    status, actions = decide(snap, DEFAULTS)
    assert status["attempts"] == 2
    assert not [a for a in actions if isinstance(a, DeleteJob)]
    assert PatchJob("j-a1", TTL) in actions
    assert [a.attempt for a in actions if isinstance(a, CreateChildren)] == [2]


def test_retention_zero_deletes_on_restart_as_before() -> None:
    snap = Snapshot(_ftj(1), {"j-a1": _job(1)}, [_pod(1, 0, "Failed", 1)])
    _, actions = decide(snap, DEFAULTS, retention=Retention(keep=0, ttl_seconds=86400))
    assert DeleteJob("j-a1") in actions and not [a for a in actions if isinstance(a, PatchJob)]


def test_only_the_newest_k_failed_attempts_are_kept() -> None:
    jobs = {f"j-a{n}": _job(n, ttl=86400) for n in range(1, 5)}
    jobs["j-a5"] = _job(5, condition=None)  # the current attempt, running
    snap = Snapshot(_ftj(5), jobs, [_pod(5, 0, "Running")])
    status, actions = decide(snap, DEFAULTS, retention=Retention(keep=2))
    assert [a for a in actions if isinstance(a, DeleteJob)] == [DeleteJob("j-a2"),
                                                               DeleteJob("j-a1")]
    assert status["phase"] == "Running"  # attempt 5 is the one observed
    # a Job already going away is not counted nor deleted twice
    jobs["j-a2"]["metadata"]["deletionTimestamp"] = _ago(1)
    _, actions = decide(snap, DEFAULTS, retention=Retention(keep=2))
    assert [a for a in actions if isinstance(a, DeleteJob)] == [DeleteJob("j-a1")]


def test_ttl_is_set_once_and_not_at_all_when_zero() -> None:
    jobs = {"j-a1": _job(1), "j-a2": _job(2, condition=None)}
    snap = Snapshot(_ftj(2), jobs, [_pod(2, 0, "Running")])
    _, actions = decide(snap, DEFAULTS, retention=Retention(keep=3, ttl_seconds=3600))
    assert PatchJob("j-a1", {"spec": {"ttlSecondsAfterFinished": 3600}}) in actions
    jobs["j-a1"]["spec"]["ttlSecondsAfterFinished"] = 3600
    _, actions = decide(snap, DEFAULTS, retention=Retention(keep=3, ttl_seconds=3600))
    assert actions == []
    _, actions = decide(snap, DEFAULTS, retention=Retention(keep=3, ttl_seconds=0))
    assert actions == []


def test_an_earlier_attempts_job_that_never_finished_is_deleted() -> None:
    jobs = {"j-a1": _job(1, condition=None), "j-a2": _job(2, condition=None)}
    snap = Snapshot(_ftj(2), jobs, [_pod(2, 0, "Running")], old_pods={1: [_pod(1, 0, "Running")]})
    _, actions = decide(snap, DEFAULTS)
    assert DeleteJob("j-a1") in actions
    emitted = [a for a in actions if isinstance(a, Emit)]
    assert emitted and emitted[0].reason == "AttemptStopped" and emitted[0].warning
    assert DeleteJob("j-a2") not in actions


def test_an_earlier_attempts_straggling_pods_are_waited_for_then_stopped() -> None:
    """A FailureTarget Job's survivors are deleted by the Job controller at once; a pod of it
    that is still active (not terminating) after STRAGGLER_SECONDS gets the Job deleted."""
    current = _job(2, condition=None)
    failing = _job(1, condition="FailureTarget", since=5)
    old_pods = {1: [_pod(1, 0, "Running"), _pod(1, 1, "Failed", 1)]}
    snap = Snapshot(_ftj(2), {"j-a1": failing, "j-a2": current}, [_pod(2, 0, "Running")],
                    old_pods=old_pods)
    _, actions = decide(snap, DEFAULTS)
    assert DeleteJob("j-a1") not in actions
    waits = [a.seconds for a in actions if isinstance(a, Wait)]
    assert waits and 0 < waits[0] <= STRAGGLER_SECONDS
    # terminating (deletionTimestamp) is ended enough: nothing to do but the TTL
    old_pods[1][0] = _pod(1, 0, "Running", deleting=True)
    _, actions = decide(snap, DEFAULTS)
    assert _kinds(actions) == ["PatchJob"]
    # still running, not being deleted, long after: the Job goes (logs with it), loudly
    old_pods[1][0] = _pod(1, 0, "Running")
    failing["status"]["conditions"][0]["lastTransitionTime"] = _ago(STRAGGLER_SECONDS + 5)
    _, actions = decide(snap, DEFAULTS)
    assert DeleteJob("j-a1") in actions
    assert any(isinstance(a, Emit) and "j-a1-0-x" in a.message for a in actions)


def test_nothing_of_an_earlier_attempt_counts_as_the_current_one() -> None:
    # attempt 1 failed, attempt 2 is recorded as created but its Job is not in the cache
    # yet: attempt 1's Job is not observed in its place (no second restart, no failure)
    jobs = {"j-a1": _job(1, ttl=86400)}
    snap = Snapshot(_ftj(2), jobs, [], old_pods={1: [_pod(1, 1, "Failed", 1)]})
    status, actions = decide(snap, DEFAULTS, {"s3": True})
    assert status["attempts"] == 2 and status["phase"] == "Running"
    assert _kinds(actions) == ["CreateChildren"] and actions[0].again  # type: ignore[union-attr]
    # attempt 2 runs: its one running pod makes the job Running, attempt 1's failure is old
    jobs["j-a2"] = _job(2, condition=None)
    status, actions = decide(Snapshot(_ftj(2), jobs, [_pod(2, 0, "Running")],
                                      old_pods={1: [_pod(1, 1, "Failed", 1)]}), DEFAULTS)
    assert status["phase"] == "Running" and "attempt 2: all 1 pod(s) running" in status["message"]
    assert actions == []


def test_a_finished_job_still_looks_after_its_earlier_attempts() -> None:
    jobs = {"j-a1": _job(1), "j-a2": _job(2, condition="Complete")}
    _, actions = decide(Snapshot(_ftj(2, phase="Succeeded"), jobs, []), DEFAULTS)
    assert actions == [PatchJob("j-a1", TTL)]


def test_the_snapshot_keeps_earlier_attempts_pods_apart() -> None:
    kube = FakeKube()
    ctl = Controller(kube, ControllerSettings(), None)  # type: ignore[arg-type]
    ftj = _ftj(2)
    ftj["metadata"]["generation"] = 1
    ctl.ftjs.put(ftj)
    for attempt in (1, 2):
        job = copy.deepcopy(_job(attempt, condition="Failed" if attempt == 1 else None))
        job["metadata"]["ownerReferences"] = [{"uid": "u1"}]
        ctl.child_jobs.put(job)
    ctl.pods.put(_pod(1, 1, "Failed", 1))
    ctl.pods.put(_pod(2, 0, "Running"))
    snap = ctl.snapshot(ctl.ftjs.get("ns", "j"))  # type: ignore[arg-type]
    assert sorted(snap.jobs) == ["j-a1", "j-a2"]
    assert [p["metadata"]["name"] for p in snap.pods] == ["j-a2-0-x"]
    assert {n: [p["metadata"]["name"] for p in ps] for n, ps in snap.old_pods.items()} == {
        1: ["j-a1-1-x"]}


def test_retention_settings_come_from_the_environment() -> None:
    s = ControllerSettings.from_env({"KUBETUNE_FAILED_ATTEMPTS_KEPT": "5",
                                     "KUBETUNE_FAILED_ATTEMPT_TTL_SECONDS": "0"})
    assert Retention.of(s) == Retention(keep=5, ttl_seconds=0)
    assert Retention.of(ControllerSettings()) == Retention(keep=3, ttl_seconds=86400)
    with pytest.raises(ValueError, match="KUBETUNE_FAILED_ATTEMPTS_KEPT must be 0 or more"):
        ControllerSettings.from_env({"KUBETUNE_FAILED_ATTEMPTS_KEPT": "-1"})
