"""Exit codes and the errors that map to them.

Pure Python (no torch), so the controller and the local executor can interpret a trainer's
exit code or termination message without importing the training stack.

Codes follow sysexits(3) where one fits, so they never collide with Python's 1 (uncaught
exception), argparse's 2, shells' 126/127 or signal deaths (128+N). Under ``torchrun`` the
launcher exits 1 whatever its workers returned, so the termination message (see
``orchestrator.trainer.artifact``) carries the code too and is the authoritative record;
``trainer_image/entrypoint.sh`` re-raises it as the container's exit status.
"""

from __future__ import annotations

# One table for the trainer, the controller and local mode (re-exported here).
from orchestrator.api.exit_codes import PERMANENT, REASONS, ExitCode

__all__ = ["PERMANENT", "REASONS", "ExitCode"]


class TrainerError(Exception):
    """An error with a precise, user-facing message and an exit code."""

    exit_code: ExitCode = ExitCode.INTERNAL

    @property
    def reason(self) -> str:
        return REASONS[self.exit_code]


class DataError(TrainerError):
    exit_code = ExitCode.DATA

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        where = ""
        if file:
            where = file + (f":{line}" if line is not None else "")
        text = f"{where}: {message}" if where else message
        if field:
            text += f" (field '{field}')"
        super().__init__(text)
        self.file, self.line, self.field = file, line, field


class ModelError(TrainerError):
    exit_code = ExitCode.MODEL


class StorageFailure(TrainerError):
    exit_code = ExitCode.STORAGE


class ConfigError(TrainerError):
    exit_code = ExitCode.CONFIG


class Stopped(TrainerError):
    """SIGTERM: a checkpoint was saved and the run stops (orchestrator.trainer.graceful)."""

    exit_code = ExitCode.STOPPED

    def __init__(self, message: str, **parts: object) -> None:
        super().__init__(message)
        self.parts = parts


class Pruned(TrainerError):
    exit_code = ExitCode.PRUNED

    def __init__(self, message: str, **parts: object) -> None:
        super().__init__(message)
        self.parts = parts  # extra termination-message fields (metrics, progress)
