"""Live progress of plain FineTuneJobs: the report endpoint answers without waiting for a
worker, and the controller writes status.progress at most once per PROGRESS_INTERVAL,
counted from when the previous write returned."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from orchestrator.controller import report_server
from orchestrator.controller.handlers import JOB, Controller
from orchestrator.controller.jobs import Result
from orchestrator.controller.settings import ControllerSettings
from orchestrator.controller.sweeps import SweepReconciler
from orchestrator.sweep import mint_job_token

pytestmark = pytest.mark.unit

MASTER = b"m" * 32
KEY = (JOB, "ns", "plain")


class NoApi:
    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"API call {name}")


class SlowWrites:
    """Stands in for JobReconciler: each reconcile 'writes' the progress it is given, taking
    `seconds`; `fail` makes the next one raise (an API error)."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds, self.fail = seconds, False
        self.writes: list[tuple[float, float, dict[str, Any]]] = []  # (start, end, progress)

    def reconcile(self, snap: Any) -> Result:
        if self.fail:
            self.fail = False
            raise RuntimeError("API server said 500")
        if snap.progress:
            t0 = time.monotonic()
            time.sleep(self.seconds)
            self.writes.append((t0, time.monotonic(), dict(snap.progress)))
        return Result(requeue_after=60.0)


def _controller(writes: SlowWrites | None = None) -> Controller:
    settings = ControllerSettings(leader_election=False)
    ctl = Controller(NoApi(), settings, SweepReconciler(NoApi(), settings))  # type: ignore[arg-type]
    ctl.ftjs.put({"kind": "FineTuneJob", "metadata": {
        "name": "plain", "namespace": "ns", "uid": "p", "resourceVersion": "1"},
        "spec": {}, "status": {"phase": "Running", "attempts": 1}})
    ctl.sweeps._master = MASTER
    if writes is not None:
        ctl.jobs = writes  # type: ignore[assignment]
    return ctl


def test_a_plain_jobs_progress_is_answered_without_waiting_for_a_worker() -> None:
    """No worker runs here: before, the answer waited for the job's reconcile (and timed out
    the trainer when the workers were busy with a slow API server); now it is immediate and
    the progress waits, merged, for the reconcile."""
    ctl = _controller()
    token = mint_job_token(MASTER, "p")

    async def post(step: int, progress: dict[str, Any]) -> tuple[int, Any, float]:
        async with TestClient(TestServer(report_server.make_app(ctl))) as client:
            t0 = time.monotonic()
            resp = await client.post("/report", data=json.dumps(
                {"namespace": "ns", "job": "plain", "step": step, "progress": progress}),
                headers={"Authorization": f"Bearer {token}"})
            return resp.status, await resp.json(), time.monotonic() - t0

    first = asyncio.run(post(10, {"totalSteps": 100, "trainLoss": 2.0, "mfu": 0.4}))
    second = asyncio.run(post(20, {"totalSteps": 100, "trainLoss": 1.5}))
    for code, answer, seconds in (first, second):
        assert (code, answer) == (200, {"action": "continue"})
        assert seconds < report_server.ANSWER_TIMEOUT / 4
    assert ctl._reports == {}  # nothing waits for an answer
    # the newest fields win; a field only the older post had stays
    assert ctl._progress[KEY] == {"step": 20, "totalSteps": 100, "trainLoss": 1.5, "mfu": 0.4}
    assert ctl.queue.get(timeout=1) == KEY
    # a replayed step is still refused
    assert asyncio.run(post(20, {"trainLoss": 1.0}))[0] == 403


def test_progress_writes_are_an_interval_apart_from_when_the_last_one_returned(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    writes = SlowWrites(seconds=0.3)
    ctl = _controller(writes)
    monkeypatch.setattr(Controller, "PROGRESS_INTERVAL", 0.5)
    ctl.note_progress("ns", "plain", {"step": 1})
    ctl.reconcile_job("ns", "plain")  # written at once (never written before)
    ctl.note_progress("ns", "plain", {"step": 2})
    while ctl._progress.get(KEY):
        result = ctl.reconcile_job("ns", "plain")
        assert result is not None and result.requeue_after is not None
        time.sleep(result.requeue_after)
    assert [w[2]["step"] for w in writes.writes] == [1, 2]
    # the second write started a full interval after the first one returned (not after it
    # started: a slow write must not bring the next one closer)
    assert writes.writes[1][0] - writes.writes[0][1] >= 0.5


def test_a_failed_write_keeps_its_progress_for_the_retry() -> None:
    writes = SlowWrites()
    ctl = _controller(writes)
    ctl.note_progress("ns", "plain", {"step": 1, "trainLoss": 2.0})
    writes.fail = True
    with pytest.raises(RuntimeError):
        ctl.reconcile_job("ns", "plain")
    ctl.note_progress("ns", "plain", {"step": 2})  # a newer post meanwhile
    ctl.reconcile_job("ns", "plain")  # the retry: not held back by an interval
    assert [w[2] for w in writes.writes] == [{"step": 2, "trainLoss": 2.0}]
    assert KEY not in ctl._progress
