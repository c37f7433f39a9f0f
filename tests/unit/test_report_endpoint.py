"""The report endpoint (aiohttp) in front of the controller's caches and queue: every auth
failure is the same 403, decided from memory before any API call; old steps are replays."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from orchestrator.controller import report_server
from orchestrator.controller.handlers import Controller
from orchestrator.controller.settings import ControllerSettings
from orchestrator.controller.sweeps import SweepReconciler
from orchestrator.sweep import derive_sweep_key, mint_job_token, mint_token

pytestmark = pytest.mark.unit

UID = "sweep-uid-1"
MASTER = b"m" * 32
KEY = derive_sweep_key(MASTER, UID)


class NoApi:
    """Any attribute access is an API call: counted, and answered with an error."""

    def __init__(self) -> None:
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        self.calls += 1
        raise AssertionError(f"API call {name} on the report path")


def _controller() -> tuple[Controller, NoApi]:
    api = NoApi()
    settings = ControllerSettings(leader_election=False)
    ctl = Controller(api, settings, SweepReconciler(api, settings))  # type: ignore[arg-type]
    api.calls = 0
    ctl.ftss.put({"kind": "FineTuneSweep", "metadata": {
        "name": "s", "namespace": "ns", "uid": UID, "resourceVersion": "1"}, "spec": {}})
    for n, owner in ((0, UID), (1, "someone-else")):
        ctl.ftjs.put({"kind": "FineTuneJob", "metadata": {
            "name": f"s-{n}", "namespace": "ns", "uid": f"t{n}", "resourceVersion": "1",
            "labels": {"kubetune.io/sweep": "s", "kubetune.io/trial": str(n)},
            "ownerReferences": [{"uid": owner, "controller": True}]}, "spec": {}})
    ctl.ftjs.put({"kind": "FineTuneJob", "metadata": {
        "name": "plain", "namespace": "ns", "uid": "p", "resourceVersion": "1"}, "spec": {}})
    ctl.sweeps._master = MASTER  # loaded at startup (no call on the report path)
    return ctl, api


def _answer_reports(ctl: Controller, stop: threading.Event) -> None:
    """Stands in for the workers: answers every queued report with 'continue'."""
    while not stop.is_set():
        key = ctl.queue.get(timeout=0.05)
        if key is None:
            continue
        for rep in ctl._take_reports(key):  # type: ignore[arg-type]
            rep.answer.set_result("continue")
        ctl.queue.done(key)


async def _post(client: TestClient, job: str, step: int, token: str | None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = {"namespace": "ns", "job": job, "step": step, "metrics": {"evalLoss": 1.0}}
    resp = await client.post("/report", data=json.dumps(body), headers=headers)
    return resp.status, await resp.json()


async def _send(client: TestClient, job: str, step: int, token: str, **fields: Any) -> int:
    """POSTs a report body with ``fields`` (progress, model, ...) as a trainer would."""
    body = {"namespace": "ns", "job": job, "step": step, **fields}
    resp = await client.post("/report", data=json.dumps(body),
                             headers={"Authorization": f"Bearer {token}"})
    return resp.status


def test_forged_foreign_and_replayed_reports_get_one_403_without_api_calls() -> None:
    ctl, api = _controller()
    stop = threading.Event()
    threading.Thread(target=_answer_reports, args=(ctl, stop), daemon=True).start()
    good = mint_token(KEY, UID, 0)

    async def scenario() -> list[tuple[int, Any]]:
        async with TestClient(TestServer(report_server.make_app(ctl))) as client:
            return [
                await _post(client, "s-0", 10, good),  # accepted
                await _post(client, "s-0", 10, good),  # replay of step 10
                await _post(client, "s-0", 5, good),  # an older step
                await _post(client, "s-0", 20, mint_token(KEY, UID, 1)),  # another trial's
                await _post(client, "s-0", 20, mint_token("x" * 32, UID, 0)),  # forged
                await _post(client, "s-0", 20, None),  # no token
                await _post(client, "s-1", 20, mint_token(KEY, UID, 1)),  # label, not owner
                await _post(client, "plain", 20, good),  # not a trial
                await _post(client, "missing", 20, good),  # no such job
                await _post(client, "s-0", 20, good),  # accepted again
            ]

    try:
        answers = asyncio.run(scenario())
    finally:
        stop.set()
    assert answers[0] == (200, {"action": "continue"})
    assert answers[-1] == (200, {"action": "continue"})
    assert set(map(json.dumps, answers[1:-1])) == {json.dumps([403, {"error": "forbidden"}])}
    assert api.calls == 0


def test_a_plain_job_posts_its_progress_with_its_own_token_only() -> None:
    """Any FineTuneJob's pods may post live progress with the job's token (HKDF of the
    master key and the job uid); its metrics never reach a study, and a progress post and an
    evaluation of the same step are two streams, not a replay."""
    ctl, api = _controller()
    stop = threading.Event()
    threading.Thread(target=_answer_reports, args=(ctl, stop), daemon=True).start()
    plain, trial = mint_job_token(MASTER, "p"), mint_token(KEY, UID, 0)

    async def progress(client: TestClient, job: str, step: int, token: str) -> int:
        return await _send(client, job, step, token,
                           progress={"totalSteps": 100, "trainLoss": 2.0})

    async def scenario() -> list[int]:
        async with TestClient(TestServer(report_server.make_app(ctl))) as client:
            return [
                await progress(client, "plain", 5, plain),  # accepted
                await progress(client, "plain", 5, plain),  # replay
                await progress(client, "plain", 6, mint_job_token(MASTER, "t0")),  # other job's
                await progress(client, "plain", 6, trial),  # a trial token is no job token
                await progress(client, "plain", 6, mint_job_token(b"x" * 32, "p")),  # forged
                (await _post(client, "plain", 7, plain))[0],  # metrics: progress only
                await progress(client, "s-0", 10, trial),  # a trial's progress ...
                (await _post(client, "s-0", 10, trial))[0],  # ... and its eval, same step
            ]

    try:
        answers = asyncio.run(scenario())
    finally:
        stop.set()
    assert answers == [200, 403, 403, 403, 403, 200, 200, 200]
    assert api.calls == 0


def test_oversized_and_malformed_bodies_are_refused_without_detail() -> None:
    ctl, _ = _controller()

    async def scenario() -> list[tuple[int, str]]:
        async with TestClient(TestServer(report_server.make_app(ctl))) as client:
            out = []
            for data in (b"x" * (report_server.MAX_BODY + 1), b"{not json", b"[1, 2]"):
                resp = await client.post("/report", data=data)
                out.append((resp.status, await resp.text()))
            return out

    answers = asyncio.run(scenario())
    assert [code for code, _ in answers] == [413, 400, 400]
    assert all("Traceback" not in text and "Error(" not in text for _, text in answers)


def test_progress_keeps_the_known_fields_and_drops_the_rest() -> None:
    body = {"progress": {"totalSteps": 100, "tokensPerSecond": 1234.56, "mfu": 0.4131,
                         "etaSeconds": -1, "secret": "x", "trainLoss": "nan"}}
    assert report_server._progress(body, 7) == {
        "step": 7, "totalSteps": 100, "tokensPerSecond": 1234.56, "mfu": 0.4131}


def test_a_trial_teaches_its_sweep_the_model_and_a_plain_job_cannot() -> None:
    """A trial posts its base model's config.json (read in its pod with its own credentials)
    on a stream of its own; its sweep's later trials are then checked before launch. A plain
    job's post carries no such thing into any sweep."""
    from tests.unit.test_controller_feasibility import CONFIG, _spec

    ctl, api = _controller()
    model = _spec(64).model.uri
    for name in ("s-0", "plain"):
        obj = ctl.ftjs.get("ns", name)
        assert obj is not None
        ctl.ftjs.put({**obj, "spec": {"model": {"uri": model}}})
    stop = threading.Event()

    def worker() -> None:  # the trial's reconcile applies its reports
        while not stop.is_set():
            key = ctl.queue.get(timeout=0.05)
            if key is None:
                continue
            obj = ctl.ftjs.get(key[1], key[2])
            assert obj is not None
            ctl._apply_reports(obj, ctl._take_reports(key))  # type: ignore[arg-type]
            ctl.queue.done(key)

    threading.Thread(target=worker, daemon=True).start()

    trial = mint_token(KEY, UID, 0)

    async def scenario() -> list[int]:
        async with TestClient(TestServer(report_server.make_app(ctl))) as client:
            return [
                await _send(client, "plain", 1, mint_job_token(MASTER, "p"), model=CONFIG),
                await _send(client, "s-0", 1, trial, model=CONFIG),
                await _send(client, "s-0", 1, trial, model=CONFIG),  # replay
                await _send(client, "s-0", 1, trial, progress={"trainLoss": 2.0}),  # own stream
            ]

    try:
        answers = asyncio.run(scenario())
    finally:
        stop.set()
    assert answers == [200, 200, 403, 200]
    reason = ctl.sweeps.budget.infeasible(UID, _spec(64))
    assert reason and "not reachable" in reason
    # what the plain job posted went nowhere: no other sweep knows the model
    assert ctl.sweeps.budget.infeasible("another-sweep", _spec(64)) is None
    assert api.calls == 0
