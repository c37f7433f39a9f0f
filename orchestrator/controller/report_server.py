"""HTTP endpoint where trainer pods report intermediate values and progress (POST /report).

Why our own small endpoint rather than Optuna's GrpcStorageProxy: a storage proxy would give
every trial pod write access to every study; here a pod can only add values to its own
trial (HMAC token bound to sweep uid and trial number), and the answer carries the pruning
decision, so the trainer learns "stop" in the same round trip. Any other FineTuneJob's pods
post only their live progress, with a token bound to the job's uid. A trial also posts its
base model's config.json once per attempt (``model``: the sweep's budget pre-check, see
``orchestrator.controller.feasibility``), on a step stream of its own.

It is an aiohttp server on kopf's event loop: no thread per connection, so idle or slow
clients cost a few KB each, never a thread. Every request is bounded (body size cap, a
deadline for reading the body, a deadline for the answer), and a request is authenticated
before it costs anything: the token is checked from memory (the caches and keys derived
from the master key loaded at start), with no API call; every failure — unknown job, forged
or foreign token, replayed step — gets the same 403, and no answer carries exception text. An
authenticated report is handed to its trial's reconcile through the work queue (the study
write and a pruning decision happen there, under the trial's key); the handler awaits it. A
plain job's progress has nothing to decide: it is kept in memory (the newest wins) and
answered at once, and the job's reconcile writes it at most once per 30 s.

TLS: set KUBETUNE_REPORT_TLS_CERT / KUBETUNE_REPORT_TLS_KEY to the files of a mounted
`kubernetes.io/tls` Secret; trainers then use an https:// report URL.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import ssl
from typing import Any

from aiohttp import web

from orchestrator.controller import metrics
from orchestrator.controller.handlers import Report
from orchestrator.sweep import bearer_token, verify_token

log = logging.getLogger("kubetune.report")
MAX_BODY = 64 * 1024
BODY_TIMEOUT = 10.0  # seconds to send the whole body
ANSWER_TIMEOUT = 20.0  # seconds for the trial's reconcile to take the report
FORBIDDEN = {"error": "forbidden"}
PROGRESS_FIELDS = (
    "step",
    "totalSteps",
    "epoch",
    "trainLoss",
    "evalLoss",
    "tokensPerSecond",
    "mfu",
    "etaSeconds",
)


def _json(code: int, doc: dict[str, Any]) -> web.Response:
    return web.json_response(doc, status=code)


def _forbidden() -> web.Response:
    metrics.INTERMEDIATE_REPORTS.labels("unauthorized").inc()
    return _json(403, FORBIDDEN)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _progress(body: dict[str, Any], step: int) -> dict[str, Any] | None:
    raw = body.get("progress")
    if not isinstance(raw, dict):
        return None
    values = body.get("metrics")
    raw = {"evalLoss": values.get("evalLoss") if isinstance(values, dict) else None, **raw}
    out: dict[str, Any] = {"step": step}
    for k in PROGRESS_FIELDS:
        v = _number(raw.get(k))
        if v is not None and v >= 0:
            out[k] = int(v) if k in ("step", "totalSteps") else round(v, 6)
    return out


def make_app(controller: Any) -> web.Application:
    async def report(request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > MAX_BODY:
            return _json(413, {"error": "body too large (at most 64 KiB)"})
        try:
            raw = await asyncio.wait_for(request.read(), timeout=BODY_TIMEOUT)
        except TimeoutError:
            return _json(408, {"error": "body not received in time"})
        except web.HTTPRequestEntityTooLarge:
            return _json(413, {"error": "body too large (at most 64 KiB)"})
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return _json(400, {"error": "body must be a JSON object"})
        token = bearer_token(request.headers.get("Authorization"))
        ns, job, step = body.get("namespace"), body.get("job"), body.get("step")
        if not (isinstance(ns, str) and isinstance(job, str) and token):
            return _forbidden()
        trial = controller.trial_of(ns, job)
        if trial is not None:
            _, sweep, number = trial
            key = controller.sweeps.cached_key(sweep["metadata"]["uid"])
            if not key or not verify_token(key, token, sweep["metadata"]["uid"], number):
                return _forbidden()
        else:
            # any FineTuneJob may post its own live progress (its job token), nothing else
            obj = controller.progress_job(ns, job)
            uid = (obj or {}).get("metadata", {}).get("uid", "")
            sweeps = controller.sweeps
            if obj is None or sweeps is None or not sweeps.job_token_ok(token, uid):
                return _forbidden()
        # authenticated from here on
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            return _json(400, {"error": "step must be a non-negative integer"})
        values = (
            {
                k: v
                for k, v in ((k, _number(v)) for k, v in (body.get("metrics") or {}).items())
                if v is not None
            }
            if isinstance(body.get("metrics"), dict) and trial is not None
            else {}
        )
        progress = _progress(body, step)
        # a trial's base-model config (its budget pre-check for later trials): trials only
        model = body.get("model") if trial is not None else None
        model = model if isinstance(model, dict) else None
        stream = "metrics" if values else "progress" if progress or model is None else "model"
        if not controller.accept_step(ns, job, step, stream):
            return _forbidden()  # a replay of an old step
        if trial is None:
            # a plain job's progress: nothing to decide, so no wait for a worker (a slow API
            # server must not time its trainers out); written coalesced by its reconcile
            controller.note_progress(ns, job, _progress(body, step))
            return _json(200, {"action": "continue"})
        answer = controller.submit_report(ns, job, Report(step, values, progress, model))
        if answer is None:
            return _json(429, {"error": "too many reports waiting for this job"})
        try:
            action = await asyncio.wait_for(asyncio.wrap_future(answer), ANSWER_TIMEOUT)
        except TimeoutError:
            return _json(503, {"error": "busy; try again"})
        return _json(200, {"action": action})

    async def healthz(_: web.Request) -> web.Response:
        return _json(200, {"ok": True})

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post("/report", report)
    app.router.add_post("/report/", report)
    app.router.add_get("/healthz", healthz)
    return app


async def start(
    controller: Any,
    port: int,
    host: str = "0.0.0.0",
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> web.AppRunner:
    """Starts the endpoint on the running loop (kopf's); returns the runner to clean up."""
    runner = web.AppRunner(
        make_app(controller),
        access_log=None,
        handle_signals=False,
        keepalive_timeout=15.0,
        shutdown_timeout=2.0,
    )
    await runner.setup()
    ctx = None
    if tls_cert and tls_key:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(tls_cert, tls_key)
    site = web.TCPSite(runner, host, port, ssl_context=ctx, backlog=1024)
    await site.start()
    log.info("report endpoint listening on :%d/report", port, extra={"tls": bool(ctx)})
    return runner
