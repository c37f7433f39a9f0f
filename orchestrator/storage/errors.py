"""Storage errors: one clear line each, always naming the URI involved.

Every error carries a :class:`Fault`, the one fact callers act on: ``NOT_FOUND`` and
``ACCESS_DENIED`` are permanent (the same request fails again until a person fixes the URI,
the bucket or the credentials); ``UNAVAILABLE`` (5xx, throttling, timeouts, connection
errors) and ``LOCAL_DISK`` (the local volume is full or failing) are transient: retried in
process first (``UNAVAILABLE`` only), then by a new attempt. The tables below are the whole
classification; ``s3.py`` adds the botocore transport exceptions, which it alone imports.
"""

from __future__ import annotations

import errno
from enum import StrEnum


class Fault(StrEnum):
    """What kind of failure a storage error is; decides retries and exit codes."""

    #: No such bucket, object or prefix. Permanent.
    NOT_FOUND = "NotFound"
    #: Credentials missing, invalid or not allowed. Permanent.
    ACCESS_DENIED = "AccessDenied"
    #: The server is down, overloaded or slow (5xx, SlowDown, timeouts, resets). Transient.
    UNAVAILABLE = "Unavailable"
    #: Writing a local file failed: disk full, quota, file-size limit, I/O error. Transient
    #: (the next attempt starts on a fresh volume, perhaps on another node).
    LOCAL_DISK = "LocalDisk"
    #: Anything else (a malformed request, a checksum mismatch). Not retried in process;
    #: a new attempt may help, so not permanent either.
    OTHER = "Other"


#: Faults after which a retry cannot succeed.
PERMANENT_FAULTS = frozenset({Fault.NOT_FOUND, Fault.ACCESS_DENIED})

#: S3 error codes (botocore's ``Error.Code``; a body-less answer such as HEAD's gives the
#: HTTP status as the code) and what they mean. Other 5xx codes are UNAVAILABLE, other
#: codes OTHER (see :func:`s3_code_fault`).
S3_ERROR_CODES: dict[str, Fault] = {
    # not found
    "NoSuchBucket": Fault.NOT_FOUND,
    "NoSuchKey": Fault.NOT_FOUND,
    "NotFound": Fault.NOT_FOUND,
    "404": Fault.NOT_FOUND,
    # access denied / bad credentials
    "AccessDenied": Fault.ACCESS_DENIED,
    "Forbidden": Fault.ACCESS_DENIED,
    "403": Fault.ACCESS_DENIED,
    "401": Fault.ACCESS_DENIED,
    "AllAccessDisabled": Fault.ACCESS_DENIED,
    "InvalidAccessKeyId": Fault.ACCESS_DENIED,
    "SignatureDoesNotMatch": Fault.ACCESS_DENIED,
    "ExpiredToken": Fault.ACCESS_DENIED,
    "InvalidToken": Fault.ACCESS_DENIED,
    "TokenRefreshRequired": Fault.ACCESS_DENIED,
    "AuthorizationHeaderMalformed": Fault.ACCESS_DENIED,
    # server trouble, throttling, timeouts
    "InternalError": Fault.UNAVAILABLE,
    "ServiceUnavailable": Fault.UNAVAILABLE,
    "SlowDown": Fault.UNAVAILABLE,
    "Throttling": Fault.UNAVAILABLE,
    "ThrottlingException": Fault.UNAVAILABLE,
    "RequestThrottled": Fault.UNAVAILABLE,
    "TooManyRequests": Fault.UNAVAILABLE,
    "TooManyRequestsException": Fault.UNAVAILABLE,
    "RequestLimitExceeded": Fault.UNAVAILABLE,
    "BandwidthLimitExceeded": Fault.UNAVAILABLE,
    "RequestTimeout": Fault.UNAVAILABLE,
    "RequestTimeoutException": Fault.UNAVAILABLE,
    "RequestTimeTooSkewed": Fault.UNAVAILABLE,  # the next attempt may run on a synced node
    "OperationAborted": Fault.UNAVAILABLE,  # a conflicting operation is in progress
    "408": Fault.UNAVAILABLE,
    "429": Fault.UNAVAILABLE,
}

#: errno of a failed local write (a download's target, the model cache, a checkpoint).
LOCAL_ERRNOS: dict[int, Fault] = {
    errno.ENOSPC: Fault.LOCAL_DISK,  # no space left on device (emptyDir sizeLimit, node disk)
    errno.EDQUOT: Fault.LOCAL_DISK,  # disk quota exceeded
    errno.EFBIG: Fault.LOCAL_DISK,  # file too large (RLIMIT_FSIZE, filesystem limit)
    errno.EIO: Fault.LOCAL_DISK,  # I/O error from the device
    errno.EROFS: Fault.LOCAL_DISK,  # the volume went read-only (ext4 errors=remount-ro)
}


def s3_code_fault(code: str) -> Fault:
    """The fault of an S3 error code (the table above; other 5xx are UNAVAILABLE)."""
    if (fault := S3_ERROR_CODES.get(code)) is not None:
        return fault
    if code.isdigit() and code.startswith("5"):
        return Fault.UNAVAILABLE
    return Fault.OTHER


def local_fault(exc: OSError) -> Fault | None:
    """The fault of a failed local write, or None when the errno is not a disk problem."""
    return LOCAL_ERRNOS.get(exc.errno) if exc.errno is not None else None


def fault_of(exc: BaseException) -> Fault:
    """The fault of any exception a storage call or a local write may raise."""
    if isinstance(exc, StorageError):
        return exc.fault
    if isinstance(exc, OSError) and (fault := local_fault(exc)) is not None:
        return fault
    if isinstance(exc, ConnectionError | TimeoutError):
        return Fault.UNAVAILABLE
    return Fault.OTHER


class StorageError(Exception):
    """Base class for every object-store failure surfaced to users."""

    fault: Fault = Fault.OTHER

    def __init__(self, message: str, uri: str | None = None, *, fault: Fault | None = None) -> None:
        super().__init__(message)
        self.uri = uri
        if fault is not None:
            self.fault = fault

    @property
    def permanent(self) -> bool:
        """True when retrying cannot help (not found, access denied)."""
        return self.fault in PERMANENT_FAULTS


class InvalidURIError(StorageError, ValueError):
    """The URI cannot be parsed or uses an unsupported scheme."""


class BucketNotFoundError(StorageError):
    """The bucket (or PVC mount / local root) does not exist."""

    fault = Fault.NOT_FOUND


class ObjectNotFoundError(StorageError, FileNotFoundError):
    """No object at this key."""

    fault = Fault.NOT_FOUND


class CredentialsError(StorageError, PermissionError):
    """Credentials are missing, invalid, or not allowed to perform the operation."""

    fault = Fault.ACCESS_DENIED


class StorageUnavailableError(StorageError):
    """The store answered 5xx / throttled / timed out on every retry: try again later."""

    fault = Fault.UNAVAILABLE


class EndpointUnreachableError(StorageUnavailableError, ConnectionError):
    """The S3 endpoint could not be reached (DNS, refused connection, timeout)."""


class LocalDiskError(StorageError):
    """Writing a local file failed (disk full, quota, file-size limit, I/O error)."""

    fault = Fault.LOCAL_DISK

    def __init__(self, message: str, uri: str | None = None, *, errno: int | None = None,
                 path: str | None = None) -> None:
        super().__init__(message, uri)
        self.errno, self.path = errno, path


class IntegrityError(StorageError):
    """A downloaded file does not match the checksum recorded in the manifest."""

    def __init__(self, message: str, uri: str | None = None, path: str | None = None) -> None:
        super().__init__(message, uri)
        self.path = path


class ManifestError(StorageError):
    """The manifest is missing (when required) or malformed."""
