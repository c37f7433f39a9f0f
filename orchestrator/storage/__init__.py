"""Object storage for kubetune: ``s3://``, ``file://`` (or plain paths) and ``pvc://``.

Most callers need only the URI-level functions here::

    from orchestrator import storage

    manifest = storage.upload_dir("out/adapter", "s3://adapters/support/support-lora/")
    storage.download_dir("s3://adapters/support/support-lora/", "./adapter",
                         require_manifest=True, expected_digest=manifest.digest)
    path = storage.fetch("s3://models/llama-3.2-1b")   # cached local copy

Every function takes the same connection options (``s3=S3Config(...)``, ``progress``,
``pvc_root``, ``workers``); ``open_store`` gives the ObjectStore for repeated calls.
This package imports nothing else from the project.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from orchestrator.storage import cache
from orchestrator.storage.base import ObjectInfo, ObjectStore
from orchestrator.storage.checksum import (
    CHECKSUMS_NAME,
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    sha256_file,
)
from orchestrator.storage.errors import (
    PERMANENT_FAULTS,
    BucketNotFoundError,
    CredentialsError,
    EndpointUnreachableError,
    Fault,
    IntegrityError,
    InvalidURIError,
    LocalDiskError,
    ManifestError,
    ObjectNotFoundError,
    StorageError,
    StorageUnavailableError,
    fault_of,
)
from orchestrator.storage.local import LocalStore
from orchestrator.storage.progress import TransferProgress
from orchestrator.storage.s3 import S3Config, S3Store
from orchestrator.storage.uri import StorageURI, parse_uri, pvc_root

__all__ = [
    "CHECKSUMS_NAME",
    "MANIFEST_NAME",
    "PERMANENT_FAULTS",
    "BucketNotFoundError",
    "CredentialsError",
    "EndpointUnreachableError",
    "Fault",
    "FileEntry",
    "IntegrityError",
    "InvalidURIError",
    "LocalDiskError",
    "LocalStore",
    "Manifest",
    "ManifestError",
    "ObjectInfo",
    "ObjectNotFoundError",
    "ObjectStore",
    "S3Config",
    "S3Store",
    "StorageError",
    "StorageURI",
    "StorageUnavailableError",
    "TransferProgress",
    "default_cache_dir",
    "delete_prefix",
    "download_dir",
    "download_file",
    "exists",
    "fault_of",
    "fetch",
    "list_objects",
    "open_store",
    "parse_uri",
    "pvc_root",
    "read_manifest",
    "read_text",
    "sha256_file",
    "upload_dir",
    "upload_file",
    "write_text",
]

CACHE_DIR_ENV = "KUBETUNE_CACHE_DIR"

PathLike = str | os.PathLike[str]


def open_store(
    uri: PathLike | StorageURI,
    *,
    s3: S3Config | None = None,
    pvc_root: PathLike | None = None,
    progress: bool | None = None,
    workers: int | None = None,
) -> tuple[ObjectStore, str]:
    """The store behind ``uri`` and the key inside it. ``workers``: files moved at once
    (default 4 for local stores, ``S3Config.file_workers`` for S3)."""
    u = parse_uri(uri)
    if u.scheme == "s3":
        return S3Store(u.bucket, s3, progress=progress, workers=workers), u.key
    workers = workers or 4
    if u.scheme == "pvc":
        base = StorageURI("pvc", u.bucket, "")
        root = base.local_path(pvc_root)
        return LocalStore(
            root, base=base, must_exist=True, progress=progress, workers=workers
        ), u.key
    return LocalStore(
        "/", base=StorageURI("file", "", ""), progress=progress, workers=workers
    ), u.key


def upload_file(local: PathLike, uri: PathLike | StorageURI, **opts: object) -> ObjectInfo:
    store, key = open_store(uri, **opts)  # type: ignore[arg-type]
    return store.upload_file(local, key)


def download_file(
    uri: PathLike | StorageURI,
    dest: PathLike,
    *,
    expected_sha256: str | None = None,
    **opts: object,
) -> Path:
    store, key = open_store(uri, **opts)  # type: ignore[arg-type]
    return store.download_file(key, dest, expected_sha256=expected_sha256)


def upload_dir(
    local_dir: PathLike,
    uri: PathLike | StorageURI,
    *,
    meta: dict[str, object] | None = None,
    **opts: object,
) -> Manifest:
    """Upload a directory with ``manifest.json`` + ``checksums.sha256``; ``manifest.digest``
    is the artifact sha256 to record in status."""
    store, key = open_store(uri, **opts)  # type: ignore[arg-type]
    return store.upload_dir(local_dir, key, meta=meta)


def download_dir(
    uri: PathLike | StorageURI,
    dest: PathLike,
    *,
    require_manifest: bool = False,
    expected_digest: str | None = None,
    **opts: object,
) -> Manifest | None:
    """Download a prefix, verifying every file against its manifest (see
    ObjectStore.download_dir). ``collect`` passes ``require_manifest=True``."""
    store, key = open_store(uri, **opts)  # type: ignore[arg-type]
    return store.download_dir(
        key, dest, require_manifest=require_manifest, expected_digest=expected_digest
    )


def read_manifest(uri: PathLike | StorageURI, **opts: object) -> Manifest:
    store, key = open_store(uri, **opts)  # type: ignore[arg-type]
    return store.read_manifest(key)[0]


def read_text(uri: PathLike | StorageURI, **opts: object) -> str:
    store, key = open_store(uri, **opts)  # type: ignore[arg-type]
    return store.read_text(key)


def write_text(uri: PathLike | StorageURI, text: str, **opts: object) -> None:
    store, key = open_store(uri, **opts)  # type: ignore[arg-type]
    store.write_text(key, text)


def exists(uri: PathLike | StorageURI, **opts: object) -> bool:
    store, key = open_store(uri, **opts)  # type: ignore[arg-type]
    return store.exists(key)


def list_objects(uri: PathLike | StorageURI, **opts: object) -> list[ObjectInfo]:
    store, key = open_store(uri, **opts)  # type: ignore[arg-type]
    return store.list(key)


def delete_prefix(uri: PathLike | StorageURI, **opts: object) -> int:
    store, key = open_store(uri, **opts)  # type: ignore[arg-type]
    return store.delete_prefix(key)


def default_cache_dir() -> Path:
    """``KUBETUNE_CACHE_DIR``, else ``$XDG_CACHE_HOME/kubetune/objects`` (~/.cache/...)."""
    if env := os.environ.get(CACHE_DIR_ENV):
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "kubetune" / "objects"


def fetch(
    uri: PathLike | StorageURI,
    cache_dir: PathLike | None = None,
    **opts: object,
) -> Path:
    """A local path holding the object or prefix at ``uri``.

    ``file://`` and ``pvc://`` are already local and returned as they are (no copy). S3
    objects are downloaded once into ``cache_dir/s3/<bucket>/<key>`` and re-used while
    their sha256 (manifest or object metadata) or ETag still matches; processes (and pods
    sharing the cache volume) fetching the same URI take turns, so only one downloads.
    """
    u = parse_uri(uri)
    store, key = open_store(u, **opts)  # type: ignore[arg-type]
    if u.is_local:
        assert isinstance(store, LocalStore)
        path = store.path(key)
        if not path.exists():
            raise ObjectNotFoundError(f"nothing found at {u}", str(u))
        return path
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    dest = root / "s3" / u.bucket / (key or "_root")
    # One downloader per destination, also across the pods that share a cache volume: the
    # others wait for it and then find the files in place.
    with cache.exclusive(dest, str(u)):
        return _fetch_into(store, key, dest)


def _fetch_into(store: ObjectStore, key: str, dest: Path) -> Path:
    try:
        info = store.head(key) if key else None
    except ObjectNotFoundError:
        info = None
    if info is None:
        store.download_dir(key, dest)
        return dest
    stamp = dest.with_name(f"{dest.name}.etag")
    if dest.is_file() and dest.stat().st_size == info.size:
        check = info.check
        fresh = (
            check.matches_file(dest)
            if check is not None
            else stamp.is_file() and stamp.read_text() == _stamp(info)
        )
        if fresh:
            return dest
    store.download_file(key, dest)
    stamp.write_text(_stamp(info))
    return dest


def _stamp(info: ObjectInfo) -> str:
    return hashlib.sha256(f"{info.etag}:{info.size}".encode()).hexdigest()
