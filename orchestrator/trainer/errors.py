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

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    #: Unexpected failure (a bug or a crash); retrying may help.
    INTERNAL = 1
    #: The data is invalid: empty file, bad JSON, missing or mistyped field. Not retryable.
    DATA = 65
    #: The base model cannot be found, reached or loaded. Not retryable as such.
    MODEL = 66
    #: Writing checkpoints or the artifact failed after retries. Retryable.
    STORAGE = 74
    #: The trainer config is invalid or asks for something this environment cannot do
    #: (e.g. qlora without a GPU, batch sizes that do not divide). Not retryable.
    CONFIG = 78
    #: The sweep controller answered "prune": training stopped early on purpose.
    PRUNED = 80


#: Exit codes after which a retry cannot succeed (the controller should fail the job at once).
PERMANENT = frozenset({ExitCode.DATA, ExitCode.MODEL, ExitCode.CONFIG, ExitCode.PRUNED})

#: Condition reasons reported in the termination message, one per exit code.
REASONS: dict[ExitCode, str] = {
    ExitCode.OK: "Succeeded",
    ExitCode.INTERNAL: "TrainerError",
    ExitCode.DATA: "InvalidData",
    ExitCode.MODEL: "ModelUnavailable",
    ExitCode.STORAGE: "StorageError",
    ExitCode.CONFIG: "InvalidConfig",
    ExitCode.PRUNED: "Pruned",
}


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


class Pruned(TrainerError):
    exit_code = ExitCode.PRUNED

    def __init__(self, message: str, **parts: object) -> None:
        super().__init__(message)
        self.parts = parts  # extra termination-message fields (metrics, progress)
