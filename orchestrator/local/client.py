"""LocalClient: the SDK's reads (get, trials, wait, collect, logs) over the local state of
``kubetune run/sweep --local``, so local and cluster runs are inspected the same way."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from orchestrator.api import labels as L
from orchestrator.api import reasons as R
from orchestrator.client import (
    JOB,
    KIND_NAMES,
    PLURALS,
    BaseClient,
    KubetuneError,
    NotFoundError,
    kind_of,
)
from orchestrator.local.state import LocalState


class LocalClient(BaseClient):
    def __init__(self, state: LocalState | str | os.PathLike[str] | None = None) -> None:
        self.state = state if isinstance(state, LocalState) else LocalState(state)
        self.namespace = "local"

    def _where(self) -> str:
        return f"the local state {self.state.root}"

    def _get(self, kind: str, name: str) -> dict[str, Any] | None:
        return self.state.load(PLURALS[kind], name)

    def _list(self, kind: str, labels: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        out = []
        for obj in self.state.list(PLURALS[kind]):
            have = obj["metadata"].get("labels") or {}
            if all(have.get(k) == v for k, v in (labels or {}).items()):
                out.append(obj)
        return out

    def running(self, name: str) -> int | None:
        """pid of the local runner of ``name`` (a job or sweep), if it is running."""
        return self.state.runner_pid(name)

    def cancel(self, name: str, kind: str | None = None, timeout: float = 60.0
               ) -> dict[str, Any]:
        """Stop a running local job or sweep (SIGTERM to its runner, which stops every
        trainer process group). The sweep stays resumable: run it again to continue."""
        obj = self.get_raw(name, kind)
        runner = name
        sweep = (obj["metadata"].get("labels") or {}).get(L.LABEL_SWEEP)
        if kind_of(obj) == JOB and sweep:
            raise KubetuneError(f"{name} is trial of sweep {sweep}: cancel the sweep")
        pid = self.running(runner)
        if pid is None:
            phase = (obj.get("status") or {}).get("phase") or "Pending"
            raise KubetuneError(f"{KIND_NAMES[kind_of(obj)]} {name} is not running locally "
                                f"(phase {phase})")
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.running(runner) is not None and time.monotonic() < deadline:
            time.sleep(0.2)
        return self.get_raw(name, kind)

    def log_path(self, name: str, attempt: int | None = None) -> Path:
        """The log of ``attempt`` (default: the latest) of a local job: one file per attempt,
        all ranks together (torchrun's output)."""
        obj = self.get_raw(name, JOB)
        if attempt is not None:
            wanted = self.state.log_path(name, attempt)
            if wanted.is_file():
                return wanted
            have = sorted(int(p.parent.name.split("-", 1)[1]) for p in
                          (self.state.root / "runs" / name).glob("attempt-*/trainer.log"))
            raise NotFoundError(
                f"FineTuneJob {name} has no local log of attempt {attempt}; "
                + (f"attempts with logs: {', '.join(map(str, have))}" if have
                   else "no attempt has a log yet"))
        latest = self.state.latest_log(name)
        if latest is None:
            phase = (obj.get("status") or {}).get("phase") or "Pending"
            raise NotFoundError(f"FineTuneJob {name} has no local log yet (phase {phase})")
        return latest

    def logs(self, name: str, *, attempt: int | None = None, rank: int | None = None,
             follow: bool = False, tail: int | None = None) -> Iterator[str]:
        if rank:
            raise KubetuneError("a local run writes one log for all ranks: --rank applies to "
                                "jobs in a cluster")
        path = self.log_path(name, attempt)
        lines = path.read_text(errors="replace").splitlines()
        yield from lines[-tail:] if tail else lines
        if not follow:
            return
        pos = path.stat().st_size
        owner = (self.get_raw(name, JOB)["metadata"].get("labels") or {}).get(
            L.LABEL_SWEEP) or name
        buf = ""
        while True:
            newest = self.state.latest_log(name) if attempt is None else None
            if newest is not None and newest != path:  # a new attempt started
                path, pos = newest, 0
            with path.open("rb") as fh:
                fh.seek(pos)
                chunk = fh.read()
            pos += len(chunk)
            buf += chunk.decode("utf-8", errors="replace")
            *done, buf = buf.split("\n")
            yield from done
            phase = (self.get_raw(name, JOB).get("status") or {}).get("phase")
            superseded = attempt is not None and self.state.latest_log(name) != path
            if not chunk and (phase in R.TERMINAL_PHASES or superseded
                              or self.running(owner) is None):
                if buf:
                    yield buf
                return
            time.sleep(0.5)
