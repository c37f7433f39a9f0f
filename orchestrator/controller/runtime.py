"""Serialises reconciles per object and measures them.

Watch events for a FineTuneJob and for its child Job arrive on different kopf workers;
a per-object lock makes sure one object is reconciled by one thread at a time, always
from a fresh read (never from a possibly stale event body).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from orchestrator.controller import metrics

log = logging.getLogger("kubetune.controller")


class KeyedLocks:
    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[tuple[str, ...], threading.Lock] = defaultdict(threading.Lock)

    @contextmanager
    def hold(self, key: tuple[str, ...]) -> Iterator[None]:
        with self._guard:
            lock = self._locks[key]
        with lock:
            yield


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
