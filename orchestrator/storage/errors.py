"""Storage errors: one clear line each, always naming the URI involved."""

from __future__ import annotations


class StorageError(Exception):
    """Base class for every object-store failure surfaced to users."""

    def __init__(self, message: str, uri: str | None = None) -> None:
        super().__init__(message)
        self.uri = uri


class InvalidURIError(StorageError, ValueError):
    """The URI cannot be parsed or uses an unsupported scheme."""


class BucketNotFoundError(StorageError):
    """The bucket (or PVC mount / local root) does not exist."""


class ObjectNotFoundError(StorageError, FileNotFoundError):
    """No object at this key."""


class CredentialsError(StorageError, PermissionError):
    """Credentials are missing, invalid, or not allowed to perform the operation."""


class EndpointUnreachableError(StorageError, ConnectionError):
    """The S3 endpoint could not be reached (DNS, refused connection, timeout)."""


class IntegrityError(StorageError):
    """A downloaded file does not match the checksum recorded in the manifest."""

    def __init__(self, message: str, uri: str | None = None, path: str | None = None) -> None:
        super().__init__(message, uri)
        self.path = path


class ManifestError(StorageError):
    """The manifest is missing (when required) or malformed."""
