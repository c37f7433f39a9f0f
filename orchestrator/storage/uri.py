"""Object-store URIs: ``s3://bucket/prefix``, ``file:///abs/path`` (or a plain path) and
``pvc://claim/path``.

A PVC URI names a PersistentVolumeClaim and a path inside it; in a pod the claim is mounted
at ``<pvc_root>/<claim>`` (``/mnt/pvc`` by default, overridable with ``KUBETUNE_PVC_ROOT``),
so reading it is plain local I/O.
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from orchestrator.storage.errors import InvalidURIError

Scheme = Literal["s3", "file", "pvc"]

DEFAULT_PVC_ROOT = "/mnt/pvc"
PVC_ROOT_ENV = "KUBETUNE_PVC_ROOT"

# S3 bucket naming rules (lenient on dots; S3-compatible servers accept a superset).
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-_]{1,61}[a-z0-9]$")
# DNS-1123 subdomain: what Kubernetes allows for a PVC name.
_CLAIM_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


def pvc_root(override: str | os.PathLike[str] | None = None) -> Path:
    """Where PVCs are mounted: argument, then ``KUBETUNE_PVC_ROOT``, then ``/mnt/pvc``."""
    return Path(override or os.environ.get(PVC_ROOT_ENV) or DEFAULT_PVC_ROOT)


@dataclass(frozen=True)
class StorageURI:
    """A parsed location. ``bucket`` is the S3 bucket or PVC claim ("" for ``file``);
    ``key`` is the slash-separated path inside it, without leading or trailing slashes
    (for ``file`` it is the absolute path without its leading slash)."""

    scheme: Scheme
    bucket: str
    key: str

    def __str__(self) -> str:
        if self.scheme == "file":
            return f"file:///{self.key}"
        return f"{self.scheme}://{self.bucket}/{self.key}"

    @property
    def is_local(self) -> bool:
        return self.scheme in ("file", "pvc")

    @property
    def name(self) -> str:
        """Last path component ("" at the bucket root)."""
        return self.key.rsplit("/", 1)[-1]

    def join(self, *parts: str) -> StorageURI:
        """Append path components (``..`` is rejected: it would escape the prefix)."""
        key = _clean_key("/".join([self.key, *parts]), str(self))
        return StorageURI(self.scheme, self.bucket, key)

    @property
    def parent(self) -> StorageURI:
        return StorageURI(self.scheme, self.bucket, posixpath.dirname(self.key))

    def local_path(self, pvc_mount_root: str | os.PathLike[str] | None = None) -> Path:
        """The filesystem path of a ``file`` or ``pvc`` URI."""
        if self.scheme == "file":
            return Path("/" + self.key)
        if self.scheme == "pvc":
            root = pvc_root(pvc_mount_root) / self.bucket
            return root / self.key if self.key else root
        raise InvalidURIError(f"{self} is not a local URI", str(self))


def _clean_key(key: str, uri: str) -> str:
    parts = [p for p in key.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidURIError(f"'..' is not allowed in a storage URI: {uri}", uri)
    return "/".join(parts)


def parse_uri(uri: str | os.PathLike[str] | StorageURI) -> StorageURI:
    """Parse ``s3://``, ``file://``, ``pvc://`` or a plain (relative or absolute) path.

    Raises InvalidURIError with the offending URI for anything else (e.g. ``hf://``,
    which is a model source resolved by the trainer, not an object store).
    """
    if isinstance(uri, StorageURI):
        return uri
    text = os.fspath(uri).strip()
    if not text:
        raise InvalidURIError("empty storage URI", text)
    if "://" not in text:
        # A plain path: relative paths resolve against the current directory.
        path = Path(text).expanduser().absolute()
        return StorageURI("file", "", _clean_key(path.as_posix(), text))
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if parts.query or parts.fragment:
        raise InvalidURIError(f"storage URI must not have a query or fragment: {text}", text)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise InvalidURIError(
                f"file URI must be absolute (file:///path), got host '{parts.netloc}': {text}",
                text,
            )
        return StorageURI("file", "", _clean_key(unquote(parts.path), text))
    if scheme in ("s3", "pvc"):
        bucket = parts.netloc
        if not bucket:
            raise InvalidURIError(f"{scheme} URI needs a {_what(scheme)}: {text}", text)
        pattern = _BUCKET_RE if scheme == "s3" else _CLAIM_RE
        if not pattern.match(bucket):
            raise InvalidURIError(f"invalid {_what(scheme)} '{bucket}' in {text}", text)
        return StorageURI(scheme, bucket, _clean_key(unquote(parts.path), text))  # type: ignore[arg-type]
    raise InvalidURIError(
        f"unsupported storage scheme '{scheme}://' in {text} (use s3://, file:// or pvc://)", text
    )


def _what(scheme: str) -> str:
    return "bucket name" if scheme == "s3" else "claim name"
