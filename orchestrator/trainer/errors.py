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

from collections.abc import Callable

from orchestrator.api import exit_codes as X

# One table for the trainer, the controller and local mode (re-exported here).
from orchestrator.api.exit_codes import PERMANENT, REASONS, ExitCode
from orchestrator.api.trainer_config import WORKDIR
from orchestrator.storage.errors import PERMANENT_FAULTS, Fault, fault_of

__all__ = ["FAULT_REASONS", "PERMANENT", "REASONS", "ExitCode", "storage_failure"]


class TrainerError(Exception):
    """An error with a precise, user-facing message and an exit code."""

    exit_code: ExitCode = ExitCode.INTERNAL
    #: Set where the default reason of the exit code says too little (storage faults).
    reason_override: str | None = None

    @property
    def reason(self) -> str:
        return self.reason_override or REASONS[self.exit_code]


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
    """The object store failed transiently, or the workspace volume is full: retryable."""

    exit_code = ExitCode.STORAGE


class OutputError(TrainerError):
    """An artifact or checkpoint cannot be written for good (no bucket, access denied)."""

    exit_code = ExitCode.OUTPUT


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


# --- storage faults -> exit code and reason ---------------------------------------------------
#: The reason each storage fault reports (the exit code: see storage_failure).
FAULT_REASONS: dict[Fault, str] = {
    Fault.NOT_FOUND: X.STORAGE_NOT_FOUND,
    Fault.ACCESS_DENIED: X.STORAGE_ACCESS_DENIED,
    Fault.UNAVAILABLE: X.STORAGE_UNAVAILABLE,
    Fault.LOCAL_DISK: X.WORKSPACE_FULL,
    Fault.OTHER: X.STORAGE_ERROR,
}

#: Where this process runs: the credentials Secret and workspace named in messages
#: (set by ``__main__`` from the trainer config).
SITE: dict[str, str | None] = {"secret": None, "workdir": WORKDIR}


def configure(secret: str | None, workdir: str) -> None:
    SITE.update(secret=secret, workdir=workdir)


def _fix(fault: Fault, field: str) -> str:
    """What the user should do about ``fault``; ``field`` names the spec field involved."""
    if fault is Fault.NOT_FOUND:
        return f"fix {field} or upload the data there first; retrying cannot help"
    if fault is Fault.ACCESS_DENIED:
        secret = SITE["secret"]
        who = (f"the credentials Secret '{secret}' (spec.storage.credentialsSecret)" if secret
               else "the credentials (spec.storage.credentialsSecret, or the pod's ServiceAccount "
                    "role)")
        return (f"check {who}: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY must be valid and "
                f"allowed to use {field}; retrying cannot help")
    if fault is Fault.LOCAL_DISK:
        workdir = SITE["workdir"] or WORKDIR
        if workdir == WORKDIR:
            return (f"the pod's workspace volume ('workspace', an emptyDir at {WORKDIR} that holds "
                    "the model cache and checkpoints) is full or failing: raise its sizeLimit "
                    "(spec.resources.workspaceSize) and the pod's ephemeral-storage request "
                    "(spec.resources.ephemeralStorage), or free the node's disk; the attempt is "
                    "retried")
        return (f"the disk holding the workspace {workdir} (KUBETUNE_WORKDIR) is full or "
                "failing: free space there or point KUBETUNE_WORKDIR at a bigger disk")
    if fault is Fault.UNAVAILABLE:
        return "transient: the attempt is retried"
    return "the attempt is retried"


def storage_failure(exc: BaseException, context: str, field: str,
                    permanent: Callable[[str], TrainerError] = OutputError) -> TrainerError:
    """The TrainerError for a storage (or local disk) failure, by its fault: a permanent
    fault (not found, access denied) becomes ``permanent(message)`` — ModelError, DataError
    or OutputError, all permanent exit codes — anything else StorageFailure (74, retried).
    The reason names the fault; the message says where (``context``) and what to do."""
    fault = disk_fault_in(exc) or fault_of(exc)
    text = f"{context}: {exc}; {_fix(fault, field)}"
    err = permanent(text) if fault in PERMANENT_FAULTS else StorageFailure(text)
    err.reason_override = FAULT_REASONS[fault]
    return err


def disk_fault_in(exc: BaseException) -> Fault | None:
    """LOCAL_DISK when ``exc`` or anything in its cause chain is a disk-full / I/O OSError
    (libraries such as torch.save wrap it in a RuntimeError), else None."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and fault_of(cur) is Fault.LOCAL_DISK:
            return Fault.LOCAL_DISK
        cur = cur.__cause__ or cur.__context__
    return None
