"""Ownership and artifacts, pure: an object holding a child's name is used only when its
controller ownerReference is this parent's uid; a reported artifact counts only under the
job's own output prefix; a cluster job never writes to file://."""

from __future__ import annotations

import copy
import datetime as dt
import json
from typing import Any

import pytest

from orchestrator.api import reasons as R
from orchestrator.api.conditions import get_condition
from orchestrator.controller.handlers import Controller
from orchestrator.controller.jobs import (
    Snapshot,
    artifact_problem,
    cluster_output_problem,
    decide,
    render_defaults,
    sweep_ref,
)
from orchestrator.controller.ownership import (
    NameConflict,
    PreviousOwner,
    blocked_condition,
    check,
    ownership,
)
from orchestrator.controller.settings import ControllerSettings
from tests.unit.test_controller_reconcile import SPEC, FakeKube

pytestmark = pytest.mark.unit

DEFAULTS = render_defaults(ControllerSettings())
OWNER = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "name": "j", "uid": "u1",
         "controller": True, "blockOwnerDeletion": True}


def _held_by(*refs: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "ConfigMap", "metadata": {"name": "j-a1-config", "ownerReferences": list(refs)}}


def test_only_the_parents_uid_as_controller_is_ours() -> None:
    assert ownership(_held_by(OWNER), OWNER) == "owned"
    # the same name and kind, another uid: an earlier FineTuneJob j, GC pending
    assert ownership(_held_by({**OWNER, "uid": "old"}), OWNER) == "previous"
    # no ownerReference, another owner, or our uid only as a non-controller reference
    assert ownership(_held_by(), OWNER) == "foreign"
    assert ownership(_held_by({**OWNER, "name": "other", "uid": "u9"}), OWNER) == "foreign"
    assert ownership(_held_by({**OWNER, "kind": "FineTuneSweep", "uid": "u9"}), OWNER) == "foreign"
    assert ownership(_held_by({**OWNER, "controller": False}), OWNER) == "foreign"
    evil = {**OWNER, "apiVersion": "evil.io/v1", "uid": "x"}
    assert ownership(_held_by(evil), OWNER) == "foreign"


def test_check_names_the_object_and_the_fix() -> None:
    check(_held_by(OWNER), OWNER, "ConfigMap")
    with pytest.raises(NameConflict) as conflict:
        check(_held_by(), OWNER, "ConfigMap")
    msg = conflict.value.message
    assert "ConfigMap j-a1-config" in msg and "no controller ownerReference" in msg
    assert "delete ConfigMap j-a1-config" in msg and "rename this FineTuneJob" in msg
    with pytest.raises(PreviousOwner) as previous:
        check(_held_by({**OWNER, "uid": "old"}), OWNER, "ConfigMap")
    assert "uid old" in previous.value.message and "garbage-collected" in previous.value.message


def test_the_blocked_condition_changes_once() -> None:
    exc = NameConflict("Job", "j-a1", OWNER, "it has no controller ownerReference")
    conds, changed = blocked_condition([], exc)
    assert changed
    cond = get_condition(conds, R.COND_CREATED)
    assert cond and cond["status"] == "False" and cond["reason"] == R.REASON_NAME_CONFLICT
    assert blocked_condition(conds, exc)[1] is False  # no second Warning Event
    waiting, changed = blocked_condition(conds, PreviousOwner("Job", "j-a1", OWNER, "old"))
    assert changed
    assert (get_condition(waiting, R.COND_CREATED) or {})["reason"] == R.REASON_WAITING_FOR_CLEANUP


@pytest.mark.parametrize("uri", [
    "s3://adapters/x/j/",
    "s3://adapters/x/j",
    "s3://adapters/x/j/final/",
])
def test_an_artifact_under_the_jobs_output_is_accepted(uri: str) -> None:
    assert artifact_problem(uri, "s3://adapters/x/", "j") is None
    assert artifact_problem(uri, "s3://adapters/x", "j") is None


@pytest.mark.parametrize("uri", [
    "s3://adapters/x/",  # the output itself, not the job's prefix
    "s3://adapters/x/j2/",  # a sibling job's artifact (same prefix as a string)
    "s3://adapters/x/other/",
    "s3://adapters/y/j/",
    "s3://other-bucket/x/j/",
    "pvc://adapters/x/j/",
    "file:///adapters/x/j/",
    "s3://adapters/x/j/../../y/j/",
    "s3://adapters/x/j/%2e%2e/%2e%2e/y/",
    "s3://adapters/x/j/./",
    "s3://adapters/x//j/",
    "s3://adapters/x/j//",
    "/adapters/x/j/",  # a plain path is no artifact URI
    "",
    42,
    None,
])
def test_an_artifact_elsewhere_is_refused(uri: Any) -> None:
    problem = artifact_problem(uri, "s3://adapters/x/", "j")
    assert problem and "s3://adapters/x/j/" in problem


def test_a_cluster_job_never_writes_to_file() -> None:
    for uri in ("file:///tmp/out/", "FILE:///tmp/out", "/tmp/out"):
        problem = cluster_output_problem(uri)
        assert problem and "spec.output.uri" in problem and "s3://" in problem
        assert "pvc://" in problem
    assert cluster_output_problem("s3://adapters/x/") is None
    assert cluster_output_problem("pvc://claim/out/") is None

    ftj = {"kind": "FineTuneJob", "metadata": {"name": "j", "namespace": "ns", "uid": "u1"},
           "spec": {**SPEC, "output": {"uri": "file:///tmp/out/"}}}
    status, actions = decide(Snapshot(ftj), DEFAULTS)
    assert status["phase"] == "Failed"
    failed = get_condition(status["conditions"], R.COND_FAILED)
    assert failed and failed["reason"] == R.REASON_INVALID_SPEC
    assert "spec.output.uri" in failed["message"]
    assert not [a for a in actions if type(a).__name__ in ("CreateChildren", "CheckSecret")]


def _completed(artifact: str) -> Snapshot:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    ftj = {"kind": "FineTuneJob", "metadata": {"name": "j", "namespace": "ns", "uid": "u1"},
           "spec": SPEC, "status": {"attempts": 1, "phase": "Running", "conditions": [
               {"type": "Created", "status": "True", "message": "attempt 1: Job j-a1 created"}]}}
    job = {"metadata": {"name": "j-a1", "uid": "job-uid"}, "spec": {"suspend": False},
           "status": {"succeeded": 1, "conditions": [
               {"type": "Complete", "status": "True", "lastTransitionTime": now}]}}
    msg = json.dumps({"metrics": {"evalLoss": 0.5},
                      "artifact": {"uri": artifact, "sha256": "0" * 64}})
    pod = {"metadata": {"name": "j-a1-0-x", "annotations": {
        "batch.kubernetes.io/job-completion-index": "0"}}, "status": {
        "phase": "Succeeded", "containerStatuses": [
            {"name": "trainer", "state": {"terminated": {"exitCode": 0, "message": msg}}}]}}
    return Snapshot(ftj, {"j-a1": job}, [pod])


def test_success_is_recorded_only_with_an_artifact_under_the_output() -> None:
    # SPEC's output is s3://adapters/x/; the trainer writes under <output>/<job name>/
    status, _ = decide(_completed("s3://adapters/x/j/"), DEFAULTS)
    assert status["phase"] == "Succeeded" and status["artifact"]["uri"] == "s3://adapters/x/j/"
    status, _ = decide(_completed("s3://adapters/x/j/../../../elsewhere/"), DEFAULTS)
    assert status["phase"] == "Failed" and "artifact" not in status
    failed = get_condition(status["conditions"], R.COND_FAILED)
    assert failed and failed["reason"] == R.REASON_ARTIFACT_OUTSIDE_OUTPUT
    assert "s3://adapters/x/j/" in failed["message"]


def test_the_snapshot_takes_only_pods_of_the_current_jobs_uid() -> None:
    """A pod labelled as the job's (an earlier FineTuneJob of the same name, or anyone's
    labelled pod) never speaks for it: its termination message is not the job's result."""
    ctl = Controller(FakeKube(), ControllerSettings(), None)  # type: ignore[arg-type]
    ctl.ftjs.put({"kind": "FineTuneJob", "metadata": {
        "name": "j", "namespace": "ns", "uid": "u1", "resourceVersion": "1"},
        "spec": SPEC, "status": {"attempts": 1}})
    job = {"metadata": {"name": "j-a1", "namespace": "ns", "uid": "job-new",
                        "labels": {"kubetune.io/job": "j", "kubetune.io/attempt": "1"},
                        "ownerReferences": [{**OWNER, "kind": "FineTuneJob"}]}}
    ctl.child_jobs.put(job)
    pod = {"metadata": {"name": "j-a1-0-new", "namespace": "ns",
                        "labels": {"kubetune.io/job": "j", "kubetune.io/attempt": "1"},
                        "ownerReferences": [{"kind": "Job", "uid": "job-new", "controller": True}]},
           "status": {"phase": "Running"}}
    old = copy.deepcopy(pod)
    old["metadata"]["name"] = "j-a1-0-old"
    old["metadata"]["ownerReferences"][0]["uid"] = "job-old"
    bare = copy.deepcopy(pod)
    bare["metadata"]["name"] = "forged"
    del bare["metadata"]["ownerReferences"]
    for p in (pod, old, bare):
        ctl.pods.put(p)
    snap = ctl.snapshot(ctl.ftjs.get("ns", "j"))  # type: ignore[arg-type]
    assert [p["metadata"]["name"] for p in snap.pods] == ["j-a1-0-new"]


def test_a_trial_label_without_the_sweep_as_controller_is_no_trial() -> None:
    settings = ControllerSettings()
    meta: dict[str, Any] = {"name": "s-0", "namespace": "ns", "labels": {
        "kubetune.io/sweep": "s", "kubetune.io/trial": "0"}}
    assert sweep_ref({"metadata": meta}, settings) is None
    owned = copy.deepcopy(meta)
    owned["ownerReferences"] = [{**OWNER, "kind": "FineTuneSweep", "name": "s", "uid": "s1"}]
    ref = sweep_ref({"metadata": owned}, settings)
    assert ref is not None and ref.name == "s" and ref.trial_number == 0
    other = copy.deepcopy(owned)
    other["ownerReferences"][0]["name"] = "t"
    assert sweep_ref({"metadata": other}, settings) is None
