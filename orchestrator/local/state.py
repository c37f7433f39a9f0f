"""The local state directory (``.kubetune/`` by default): what a cluster keeps in etcd and
the controller's volume, kept in files so that ``kubetune get/status/collect --local`` show
local runs with the same tables as cluster runs, and a re-run resumes a sweep.

Layout::

    .kubetune/
      studies.db                                   Optuna studies (SQLite), one per sweep
      objects/finetunejobs/<name>.json             FineTuneJob objects with status
      objects/finetunesweeps/<name>.json           FineTuneSweep objects with status
      runs/<job>/attempt-<n>/                      config.json, trainer.log, termination.json
      runs/<name>.pid                              the runner process of a job or sweep
      work/                                        the trainer's scratch dir (KUBETUNE_WORKDIR)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

STATE_DIR_ENV = "KUBETUNE_STATE_DIR"
DEFAULT_STATE_DIR = ".kubetune"
JOB_PLURAL = "finetunejobs"
SWEEP_PLURAL = "finetunesweeps"


def default_state_dir() -> Path:
    return Path(os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)


class LocalState:
    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root if root is not None else default_state_dir()).absolute()

    # --- paths ------------------------------------------------------------------------------
    @property
    def study_url(self) -> str:
        return f"sqlite:///{self.root / 'studies.db'}"

    @property
    def work_dir(self) -> Path:
        return self.root / "work"

    def run_dir(self, job: str, attempt: int) -> Path:
        return self.root / "runs" / job / f"attempt-{attempt}"

    def log_path(self, job: str, attempt: int) -> Path:
        return self.run_dir(job, attempt) / "trainer.log"

    def latest_log(self, job: str) -> Path | None:
        attempts = sorted(
            (self.root / "runs" / job).glob("attempt-*/trainer.log"),
            key=lambda p: int(p.parent.name.split("-", 1)[1]),
        )
        return attempts[-1] if attempts else None

    def pid_path(self, name: str) -> Path:
        return self.root / "runs" / f"{name}.pid"

    def _object_path(self, plural: str, name: str) -> Path:
        return self.root / "objects" / plural / f"{name}.json"

    # --- objects ----------------------------------------------------------------------------
    def save(self, plural: str, obj: dict[str, Any]) -> None:
        """Atomic write: a reader never sees half an object."""
        path = self._object_path(plural, obj["metadata"]["name"])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
        os.replace(tmp, path)

    def load(self, plural: str, name: str) -> dict[str, Any] | None:
        try:
            doc = json.loads(self._object_path(plural, name).read_text())
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None

    def list(self, plural: str) -> list[dict[str, Any]]:
        out = []
        for path in sorted((self.root / "objects" / plural).glob("*.json")):
            doc = self.load(plural, path.stem)
            if doc is not None:
                out.append(doc)
        return out

    def delete(self, plural: str, name: str) -> bool:
        try:
            self._object_path(plural, name).unlink()
        except FileNotFoundError:
            return False
        return True

    # --- runner processes ---------------------------------------------------------------------
    def claim(self, name: str) -> None:
        """Record this process as the runner of ``name``; refuse a second live runner (two
        runners would launch the same trials twice)."""
        other = self.runner_pid(name)
        if other is not None and other != os.getpid():
            raise RuntimeError(
                f"{name} is already running locally (pid {other}); stop it with "
                f"`kubetune cancel {name} --local` or wait for it"
            )
        path = self.pid_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(str(os.getpid()))

    def release(self, name: str) -> None:
        if self.runner_pid(name) == os.getpid():
            self.pid_path(name).unlink(missing_ok=True)

    def runner_pid(self, name: str) -> int | None:
        """The pid of the live runner of ``name``, or None."""
        try:
            pid = int(self.pid_path(name).read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        return pid
