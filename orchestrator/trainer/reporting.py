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
