"""Graceful stop: SIGTERM (a pod deleted, drained or preempted) checkpoints, then exits.

The kubelet sends SIGTERM and waits ``terminationGracePeriodSeconds`` before SIGKILL. The
image's entrypoint passes it to torchrun, which passes it to every worker of its pod; this
module turns it into a flag. At the next optimizer-step boundary every rank learns whether any
rank was asked to stop (one tiny all-reduce per step: a deleted pod's ranks may be the only
ones signalled, and a checkpoint is a collective operation), all ranks save and upload a
checkpoint together (``callbacks.GracefulStopCallback``), and the run exits with
``ExitCode.STOPPED`` so the next attempt resumes from that step. No torch at import: the
handler is installed before the heavy imports.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from orchestrator.trainer.dist import sum_across_ranks

log = logging.getLogger("orchestrator.trainer")

_requested = threading.Event()


def install() -> None:
    """Turn SIGTERM into a stop request (workers only; torchrun handles its own)."""

    def handler(signum: int, frame: Any) -> None:
        if not _requested.is_set():
            log.warning("SIGTERM: saving a checkpoint at the next step boundary, then exiting")
        _requested.set()

    signal.signal(signal.SIGTERM, handler)


def requested() -> bool:
    return _requested.is_set()


def any_rank_requested() -> bool:
    """Whether any rank got SIGTERM: every rank must call it at the same step."""
    return sum_across_ranks([1.0 if _requested.is_set() else 0.0])[0] > 0
