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
    #: An output (artifact, checkpoint) cannot be written for good: its bucket does not
    #: exist, or the credentials may not write there (sysexits' EX_CANTCREAT). Not retryable.
    OUTPUT = 73
    #: The gang never formed: torchrun's rendezvous timed out waiting for the other pods,
    #: or could not reach pod 0 (sysexits' EX_UNAVAILABLE). Retryable; written by the image's
    #: entrypoint, since no trainer process ran (``orchestrator.trainer.launch_failure``).
    RENDEZVOUS = 69
    #: The object store failed transiently (5xx, throttling, timeouts, unreachable) after the
    #: in-process retries, or the pod's workspace volume is full (sysexits' EX_IOERR).
    #: Retryable.
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
PERMANENT = frozenset(
    {ExitCode.DATA, ExitCode.MODEL, ExitCode.OUTPUT, ExitCode.CONFIG, ExitCode.PRUNED}
)

# Storage failures say what went wrong in their reason, whichever exit code they carry (the
# stage that failed: 65 data, 66 model, 73 output, 74 anything transient).
#: No such bucket / object (permanent).
STORAGE_NOT_FOUND = "StorageNotFound"
#: Credentials missing, invalid or not allowed (permanent).
STORAGE_ACCESS_DENIED = "StorageAccessDenied"
#: 5xx, throttling, timeouts, unreachable endpoint after the in-process retries (transient).
STORAGE_UNAVAILABLE = "StorageUnavailable"
#: The pod's workspace volume is full or failing: ENOSPC, EDQUOT, EFBIG, EIO (transient).
WORKSPACE_FULL = "WorkspaceFull"
#: Any other storage failure, e.g. a checksum mismatch (not permanent).
STORAGE_ERROR = "StorageError"
#: Pod 0 waited rendezvousTimeoutSeconds and not every node joined (transient).
RENDEZVOUS_TIMEOUT = "RendezvousTimeout"
#: A node rank > 0 could not reach pod 0's rendezvous endpoint in time (transient).
RENDEZVOUS_UNREACHABLE = "RendezvousUnreachable"

#: Condition reasons reported in the termination message: the default one per exit code.
REASONS: dict[ExitCode, str] = {
    ExitCode.OK: "Succeeded",
    ExitCode.INTERNAL: "TrainerError",
    ExitCode.DATA: "InvalidData",
    ExitCode.MODEL: "ModelUnavailable",
    ExitCode.OUTPUT: STORAGE_NOT_FOUND,
    ExitCode.RENDEZVOUS: RENDEZVOUS_TIMEOUT,
    ExitCode.STORAGE: STORAGE_UNAVAILABLE,
    ExitCode.STOPPED: "Stopped",
    ExitCode.CONFIG: "InvalidConfig",
    ExitCode.PRUNED: "Pruned",
}

#: Reasons that mean "a retry cannot succeed", whatever the exit code: the reasons of the
#: PERMANENT codes plus the permanent storage reasons. StorageUnavailable and WorkspaceFull
#: (like the older StorageError) are not in it: those attempts are retried.
PERMANENT_REASONS = frozenset(
    {REASONS[c] for c in PERMANENT} | {STORAGE_NOT_FOUND, STORAGE_ACCESS_DENIED}
)

#: SIGKILL / SIGTERM deaths (128+9, 128+15) and a graceful stop: a pod that was stopped,
#: not the cause.
KILLED = frozenset({137, 143, int(ExitCode.STOPPED)})
