"""Measures reconciles (Prometheus counters and latency histogram, by kind and outcome)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from orchestrator.controller import metrics


def measured(kind: str, fn: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    try:
        result = fn()
    except Exception:
        metrics.RECONCILES.labels(kind, "error").inc()
        raise
    finally:
        metrics.RECONCILE_SECONDS.labels(kind).observe(time.perf_counter() - t0)
    metrics.RECONCILES.labels(kind, "ok").inc()
    return result
