"""Pure decisions of the controller: conditions, failure attribution, retry policy, settings."""

from __future__ import annotations

import pytest

from orchestrator.api.conditions import get_condition, is_true, set_condition
from orchestrator.controller.jobs import _describe, _failure, _is_permanent, _outcomes
from orchestrator.controller.settings import ControllerSettings

pytestmark = pytest.mark.unit


def _pod(name: str, index: str, code: int, message: str, finished: str) -> dict:
    return {
        "metadata": {"name": name,
                     "annotations": {"batch.kubernetes.io/job-completion-index": index}},
        "status": {"containerStatuses": [{"state": {"terminated": {
            "exitCode": code, "message": message, "finishedAt": finished}}}]},
    }


def test_condition_transition_time_changes_only_with_status() -> None:
    conds = set_condition([], "Running", True, "Running", "all pods running")
    first = get_condition(conds, "Running")
    assert first and is_true(conds, "Running")
    again = set_condition(conds, "Running", True, "Running", "still running")
    assert get_condition(again, "Running")["lastTransitionTime"] == first["lastTransitionTime"]
    assert get_condition(again, "Running")["message"] == "still running"
    flipped = set_condition(again, "Running", False, "Restarting", "pod failed")
    assert not is_true(flipped, "Running") and len(flipped) == 1


def test_failure_blames_the_real_error_not_the_collateral_kill() -> None:
    pods = [
        _pod("j-a1-0-x", "0", 137, "killed: the pod was deleted", "2026-01-01T00:00:05Z"),
        _pod("j-a1-1-y", "1", 1, "RuntimeError: NCCL watchdog timeout", "2026-01-01T00:00:05Z"),
        _pod("j-a1-2-z", "2", 0, "", "2026-01-01T00:00:06Z"),
    ]
    failed = _failure(_outcomes(pods))
    assert failed is not None and failed.index == "1"
    assert "node rank 1" in _describe(failed) and "NCCL watchdog" in _describe(failed)


def test_earliest_real_error_wins_between_ranks() -> None:
    pods = [
        _pod("j-0", "0", 1, "broken pipe (after rank 3 died)", "2026-01-01T00:00:09Z"),
        _pod("j-3", "3", 1, "CUDA error: an illegal memory access", "2026-01-01T00:00:02Z"),
    ]
    assert _failure(_outcomes(pods)).index == "3"  # type: ignore[union-attr]


@pytest.mark.parametrize(("code", "message", "permanent"), [
    (65, '{"exitCode":65,"reason":"InvalidData","message":"train.jsonl:3"}', True),
    (1, '{"exitCode":78,"reason":"InvalidConfig","message":"qlora needs a GPU"}', True),
    (66, "model not found", True),
    (1, "Traceback ... RuntimeError: NCCL timeout", False),
    (74, '{"exitCode":74,"reason":"StorageError","message":"S3 503"}', False),
    (137, "OOMKilled", False),
])
def test_only_errors_that_cannot_go_away_skip_the_retry(code: int, message: str,
                                                         permanent: bool) -> None:
    # torchrun exits 1 whatever its worker returned: the termination message decides
    outcome = _outcomes([_pod("p", "0", code, message, "2026-01-01T00:00:00Z")])[0]
    assert _is_permanent(outcome) is permanent


def test_settings_from_env() -> None:
    s = ControllerSettings.from_env({
        "KUBETUNE_NAMESPACES": "team-a, team-b,", "KUBETUNE_S3_ENDPOINT": "http://s3:8333",
        "KUBETUNE_LEADER_ELECTION": "false", "KUBETUNE_RESYNC_SECONDS": "2.5",
        "POD_NAMESPACE": "kubetune-system", "POD_NAME": "ctl-0"})
    assert s.namespaces == ["team-a", "team-b"]
    assert s.s3_endpoint == "http://s3:8333" and s.s3_credentials_secret is None
    assert s.leader_election is False and s.resync_seconds == 2.5
    assert s.lease_namespace == "kubetune-system" and s.identity == "ctl-0"
