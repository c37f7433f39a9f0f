"""Trainer exit codes and their condition reasons: one table, read by the trainer (which
exits with them), the controller and the local executor (which interpret them).

Codes follow sysexits(3) where one fits, so they never collide with Python's 1 (uncaught
exception), argparse's 2, shells' 126/127 or signal deaths (128+N). Under ``torchrun`` the
launcher exits 1 whatever its workers returned, so the termination message (see
``orchestrator.trainer.artifact``) carries the code too and is the authoritative record.
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
    #: Stopped by SIGTERM (pod deleted, drained, preempted) after saving a checkpoint; the
    #: next attempt resumes from it (sysexits' EX_TEMPFAIL). Retryable, never the cause.
    STOPPED = 75
    #: The trainer config is invalid or asks for something this environment cannot do
    #: (e.g. qlora without a GPU, batch sizes that do not divide). Not retryable.
    CONFIG = 78
    #: The sweep controller answered "prune": training stopped early on purpose.
    PRUNED = 80


#: Exit codes after which a retry cannot succeed (the controller fails the job at once).
PERMANENT = frozenset({ExitCode.DATA, ExitCode.MODEL, ExitCode.CONFIG, ExitCode.PRUNED})

#: Condition reasons reported in the termination message, one per exit code.
REASONS: dict[ExitCode, str] = {
    ExitCode.OK: "Succeeded",
    ExitCode.INTERNAL: "TrainerError",
    ExitCode.DATA: "InvalidData",
    ExitCode.MODEL: "ModelUnavailable",
    ExitCode.STORAGE: "StorageError",
    ExitCode.STOPPED: "Stopped",
    ExitCode.CONFIG: "InvalidConfig",
    ExitCode.PRUNED: "Pruned",
}

#: Reasons of PERMANENT codes, as the termination message spells them.
PERMANENT_REASONS = frozenset(REASONS[c] for c in PERMANENT)

#: SIGKILL / SIGTERM deaths (128+9, 128+15) and a graceful stop: a pod that was stopped,
#: not the cause.
KILLED = frozenset({137, 143, int(ExitCode.STOPPED)})
