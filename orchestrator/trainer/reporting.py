"""Publishing intermediate evaluation metrics (sweeps prune on them).

A :class:`MetricsReporter` gets every evaluation and may answer ``"prune"``; the trainer then
stops, skips the artifact and exits with ``ExitCode.PRUNED``. Only global rank 0 talks to the
reporter; its decision is broadcast to every rank.

The default :class:`HttpMetricsReporter` POSTs to ``sweep.reportUrl``::

    POST <reportUrl>
    Authorization: Bearer <value of env var sweep.tokenEnv>   (when set)
    {"job": "<jobName>", "namespace": "...", "sweep": "...", "trial": 3, "attempt": 0,
     "step": 40, "metrics": {"evalLoss": 1.23, ...}}

and reads an optional JSON answer ``{"action": "prune"}`` (``{"prune": true}`` and
``{"shouldPrune": true}`` are accepted too). Anything else, including a network error, means
continue: an unreachable sweep controller must not kill a healthy trial.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any, Literal, Protocol, runtime_checkable

log = logging.getLogger("orchestrator.trainer")

Decision = Literal["continue", "prune"]


@runtime_checkable
class MetricsReporter(Protocol):
    def report(self, step: int, metrics: Mapping[str, float]) -> Decision:
        """Publish metrics at ``step``; return "prune" to stop training."""
        ...

    def close(self) -> None: ...


class LogReporter:
    """Logs evaluations; never prunes (the default outside sweeps)."""

    def report(self, step: int, metrics: Mapping[str, float]) -> Decision:
        log.info("eval at step %d: %s", step,
                 ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        return "continue"

    def close(self) -> None:
        pass


class HttpMetricsReporter(LogReporter):
    def __init__(self, url: str, *, token: str | None = None, identity: Mapping[str, Any],
                 timeout: float = 5.0, attempts: int = 2) -> None:
        self.url = url
        self.token = token
        self.identity = dict(identity)
        self.timeout = timeout
        self.attempts = attempts

    def report(self, step: int, metrics: Mapping[str, float]) -> Decision:
        super().report(step, metrics)
        body = json.dumps({**self.identity, "step": step, "metrics": dict(metrics)}).encode()
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        for attempt in range(1, self.attempts + 1):
            req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
                return parse_decision(raw)
            except urllib.error.HTTPError as exc:
                log.warning("metrics report to %s failed: HTTP %d (attempt %d/%d)", self.url,
                            exc.code, attempt, self.attempts)
                if exc.code < 500:
                    break
            except (urllib.error.URLError, OSError) as exc:
                log.warning("metrics report to %s failed: %s (attempt %d/%d)", self.url,
                            getattr(exc, "reason", exc), attempt, self.attempts)
        return "continue"


    def announce_model(self, config: Mapping[str, Any], step: int) -> None:
        """Tells the controller the base model's config.json (scalar entries: what the
        budget solver reads), so it can refuse this sweep's unreachable trials before
        launch. One short attempt; a failure only costs later trials that check."""
        facts = {k: v for k, v in config.items()
                 if isinstance(v, bool | int | float) or (isinstance(v, str) and len(v) <= 128)}
        body = json.dumps({**self.identity, "step": step, "model": facts}).encode()
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                resp.read()
        except (urllib.error.URLError, OSError) as exc:
            log.warning("model announcement to %s failed: %s (later trials are checked in "
                        "their own pods)", self.url, getattr(exc, "reason", exc))


def parse_decision(raw: bytes) -> Decision:
    if not raw.strip():
        return "continue"
    try:
        doc = json.loads(raw)
    except ValueError:
        return "continue"
    if isinstance(doc, dict) and (doc.get("action") == "prune" or doc.get("prune") is True
                                  or doc.get("shouldPrune") is True):
        return "prune"
    return "continue"


def reporter_for(sweep: Any, job: str, namespace: str | None, attempt: int) -> MetricsReporter:
    """The reporter a trainer config asks for: HTTP when ``sweep.reportUrl`` is set."""
    url = getattr(sweep, "report_url", None) if sweep is not None else None
    if not url:
        return LogReporter()
    token_env = getattr(sweep, "token_env", None)
    token = os.environ.get(token_env) if token_env else None
    if token_env and not token:
        log.warning("sweep.tokenEnv names %s but it is not set; reporting without a token",
                    token_env)
    identity = {"job": job, "namespace": namespace, "sweep": getattr(sweep, "name", None),
                "trial": getattr(sweep, "trial_number", None), "attempt": attempt}
    return HttpMetricsReporter(url, token=token, identity=identity)


class ProgressPoster:
    """Posts live progress (``{"job", "namespace", "step", "progress": {...}}``) to the
    controller's report endpoint from a background thread, at most once per interval, so
    training never waits on the network. A post still in flight makes the next one be
    skipped; failures are logged once and otherwise ignored (progress is best effort)."""

    def __init__(self, url: str, *, token: str | None, identity: Mapping[str, Any],
                 interval: float, timeout: float = 5.0) -> None:
        import threading

        self.url = url
        self.token = token
        self.identity = dict(identity)
        self.interval = interval
        self.timeout = timeout
        self.last = -1e18
        self.posted = 0
        self._busy = threading.Lock()
        self._warned = False

    def due(self, now: float) -> bool:
        return now - self.last >= self.interval

    def post(self, now: float, step: int, progress: Mapping[str, Any]) -> bool:
        """Starts a post unless one is in flight or the interval has not passed."""
        import threading

        if not self.due(now) or not self._busy.acquire(blocking=False):
            return False
        self.last = now
        body = json.dumps({**self.identity, "step": step, "progress": dict(progress)}).encode()
        threading.Thread(target=self._send, args=(body,), name="progress-post",
                         daemon=True).start()
        return True

    def _send(self, body: bytes) -> None:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                resp.read()
            self.posted += 1
        except (urllib.error.URLError, OSError) as exc:
            if not self._warned:
                self._warned = True
                log.warning("progress post to %s failed: %s (status.progress will lag; "
                            "training goes on)", self.url, getattr(exc, "reason", exc))
        finally:
            self._busy.release()


def progress_poster_for(cfg: Any) -> ProgressPoster | None:
    """Rank 0's poster when the trainer config has a progress link."""
    ref = getattr(cfg, "progress", None)
    if ref is None or not ref.url:
        return None
    token = os.environ.get(ref.token_env) if ref.token_env else None
    identity = {"job": cfg.job_name, "namespace": cfg.namespace, "attempt": cfg.attempt}
    return ProgressPoster(ref.url, token=token, identity=identity,
                          interval=float(ref.interval_seconds))
