"""Transfer progress: a rich bar on a terminal, periodic log lines everywhere else.

Pods and CI have no TTY, and a redrawn bar there turns into noise, so outside a terminal
(or with ``progress=False``) we log a start line, a line every ``log_every`` seconds for
long transfers, and a summary line.
"""

from __future__ import annotations

import logging
import threading
import time
from types import TracebackType
from typing import Any

log = logging.getLogger("orchestrator.storage")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def progress_enabled(progress: bool | None) -> bool:
    """Explicit flag wins; otherwise show bars only when stderr is a terminal."""
    if progress is not None:
        return progress
    from rich.console import Console

    return Console(stderr=True).is_terminal


class TransferProgress:
    """Thread-safe byte counter for one upload/download operation.

    Use as a context manager; pass ``advance`` as the per-chunk callback from worker threads.
    """

    def __init__(
        self,
        description: str,
        total_bytes: int,
        *,
        files: int = 1,
        progress: bool | None = None,
        log_every: float = 10.0,
    ) -> None:
        self.description = description
        self.total = total_bytes
        self.files = files
        self.done = 0
        self._lock = threading.Lock()
        self._bar_enabled = progress_enabled(progress)
        self._log_every = log_every
        self._started = 0.0
        self._last_log = 0.0
        self._bar: Any = None  # rich.progress.Progress when enabled (imported lazily)
        self._task: Any = None

    def __enter__(self) -> TransferProgress:
        self._started = self._last_log = time.monotonic()
        if self._bar_enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                DownloadColumn(binary_units=True),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total or None)
        else:
            log.info("%s: %d file(s), %s", self.description, self.files, human_bytes(self.total))
        return self

    def advance(self, n: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.done += n
            if self._bar is not None:
                self._bar.update(self._task, completed=self.done)
            elif now - self._last_log >= self._log_every and self.total:
                self._last_log = now
                log.info(
                    "%s: %s / %s (%.0f%%)",
                    self.description,
                    human_bytes(self.done),
                    human_bytes(self.total),
                    100.0 * self.done / self.total,
                )

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.stop()
        if exc is None:
            elapsed = max(time.monotonic() - self._started, 1e-6)
            log.info(
                "%s: done, %s in %.1fs (%s/s)",
                self.description,
                human_bytes(self.done),
                elapsed,
                human_bytes(self.done / elapsed),
            )
