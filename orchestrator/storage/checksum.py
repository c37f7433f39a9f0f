"""Checksums and the artifact manifest.

Every directory kubetune uploads gets two files next to the artifacts:

- ``manifest.json`` — the source of truth: format version, creation time and, per file, its
  relative path, size and sha256. It is written *last*, so its presence marks a complete
  upload; the sha256 of its exact bytes is the artifact digest recorded in job status.
- ``checksums.sha256`` — the same checksums in ``sha256sum`` format, so a user can run
  ``sha256sum -c checksums.sha256`` on a downloaded copy without kubetune.

Each file also gets a fast digest, computed in the same read as its sha256: ``xxh3t``, the
xxh3-128 of the xxh3-128 digests of the file's consecutive 64 MiB windows. Downloads verify
with it when it is known: xxh3 runs at ~8 GiB/s on one core against sha256's ~1 GiB/s, and
the windows of a large file are hashed on all cores at once (a verification that must wait
for the whole file comes straight after the download, so its wall time is the user's).
Manifests written before it carry ``xxh3`` (the whole file's xxh3-128), still honoured. It
guards against what a checksum can (truncation, corruption, a changed object); the sha256
stays the published identity of every file and of the manifest (whoever can rewrite objects
can rewrite the manifest too, so a cryptographic hash per file adds no protection there).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import xxhash

from orchestrator.storage.errors import IntegrityError, ManifestError

MANIFEST_NAME = "manifest.json"
CHECKSUMS_NAME = "checksums.sha256"
MANIFEST_FORMAT = "kubetune.manifest/v1"
# Remembers the remote version (ETag) of each file fetched into a directory, so a cache
# re-use check does not need a manifest (datasets and base models usually have none).
CACHE_RECORD = ".kubetune-cache.json"
# Files that describe an upload or a download rather than belong to it.
# sha256, size and mtime of each verified file (orchestrator.storage.cache).
VERIFIED_RECORD = ".kubetune-verified.json"
RESERVED_NAMES = frozenset({MANIFEST_NAME, CHECKSUMS_NAME, CACHE_RECORD, VERIFIED_RECORD})
# Files and objects in the making (temp files, partial downloads, staging directories).
TEMP_PREFIX = ".kubetune-tmp-"

_CHUNK = 1 << 20
_WINDOW = 64 << 20  # a multiple of mmap.ALLOCATIONGRANULARITY


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (hashlib drops the GIL on big updates,
    so hashing several files from a thread pool runs in parallel)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


SHA256 = "sha256"
XXH3 = "xxh3"  # xxh3-128 of the whole file, hex (manifests and objects of older uploads)
XXH3T = "xxh3t"  # xxh3-128 over the xxh3-128 digests of the 64 MiB windows, hex
ALGORITHMS = (SHA256, XXH3, XXH3T)


class WindowedXXH3:
    """The ``xxh3t`` digest fed in order, in pieces of any size (uploads, the Python
    download path); ``digest_file`` computes the same value with the windows in parallel."""

    name = XXH3T

    def __init__(self) -> None:
        self._outer = xxhash.xxh3_128()
        self._window = xxhash.xxh3_128()
        self._filled = 0

    def update(self, data: Any) -> None:
        with memoryview(data) as view:
            flat = view.cast("B") if view.format != "B" or view.ndim != 1 else view
            pos, n = 0, flat.nbytes
            while pos < n:
                take = min(_WINDOW - self._filled, n - pos)
                with flat[pos:pos + take] as piece:
                    self._window.update(piece)
                self._filled += take
                pos += take
                if self._filled == _WINDOW:
                    self._outer.update(self._window.digest())
                    self._window.reset()
                    self._filled = 0
            if flat is not view:
                flat.release()

    def hexdigest(self) -> str:
        outer = self._outer.copy()
        if self._filled:
            outer.update(self._window.digest())
        return str(outer.hexdigest())


def new_hasher(algorithm: str) -> Any:
    if algorithm == XXH3T:
        return WindowedXXH3()
    if algorithm == XXH3:
        return xxhash.xxh3_128()
    if algorithm == SHA256:
        return hashlib.sha256()
    raise ValueError(f"unknown checksum algorithm {algorithm!r}")


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _window_pool() -> ThreadPoolExecutor:
    """Threads for the windows of large files (xxhash drops the GIL while it hashes)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max(2, os.cpu_count() or 2),
                                       thread_name_prefix="kt-hash")
        return _pool


def _windowed_xxh3_parallel(path: str | os.PathLike[str]) -> str | None:
    """``xxh3t`` of a file with its windows hashed at once; None where it cannot be mapped."""
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size

        def window(offset: int) -> bytes:
            n = min(_WINDOW, size - offset)
            with mmap.mmap(fd, n, offset=offset, access=mmap.ACCESS_READ) as view:
                return bytes(xxhash.xxh3_128(view).digest())

        offsets = range(0, size, _WINDOW)
        try:
            if len(offsets) > 1:
                digests = list(_window_pool().map(window, offsets))
            else:
                digests = [window(o) for o in offsets]
        except (OSError, ValueError):  # a filesystem without mmap
            return None
    outer = xxhash.xxh3_128()
    for d in digests:
        outer.update(d)
    return str(outer.hexdigest())


def _feed(path: str | os.PathLike[str], *hashers: Any) -> None:
    """Hash a file's bytes straight from the page cache (mmap: no copy into Python, half the
    CPU of reading it in chunks), or by chunks where a file cannot be mapped. Mapped in
    64 MiB windows, so a 5 GB shard never shows as 5 GB of resident memory. Only for files
    nobody truncates meanwhile (a truncated mapping is SIGBUS): kubetune's own staged and
    cached files (under the cache lock) and finished outputs about to be uploaded."""
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        offset = 0
        while offset < size:
            n = min(_WINDOW, size - offset)
            try:
                view = mmap.mmap(fd, n, offset=offset, access=mmap.ACCESS_READ)
            except (OSError, ValueError):
                if offset:  # mapped before, not now: nothing sensible left to do
                    raise
                break  # a filesystem without mmap: read it
            with view:
                for h in hashers:
                    h.update(view)
            offset += n
        if offset >= size:
            return
        while chunk := f.read(_CHUNK):
            for h in hashers:
                h.update(chunk)


def digest_file(path: str | os.PathLike[str], algorithm: str) -> str:
    if algorithm == XXH3T and (digest := _windowed_xxh3_parallel(path)) is not None:
        return digest
    h = new_hasher(algorithm)
    _feed(path, h)
    return str(h.hexdigest())


def hash_file(path: str | os.PathLike[str]) -> tuple[str, str]:
    """(sha256, xxh3t) of a file, both from one mapping of it."""
    sha, fast = hashlib.sha256(), WindowedXXH3()
    _feed(path, sha, fast)
    return sha.hexdigest(), fast.hexdigest()


@dataclass(frozen=True)
class Check:
    """The digest a download is verified against: the fastest one known (xxh3t, the older
    xxh3, else sha256)."""

    algorithm: str
    value: str

    @classmethod
    def of(
        cls, sha256: str | None, xxh3: str | None = None, xxh3t: str | None = None
    ) -> Check | None:
        if xxh3t:
            return cls(XXH3T, xxh3t)
        if xxh3:
            return cls(XXH3, xxh3)
        # an empty sha256 is a check that fails, not none at all
        return cls(SHA256, sha256) if sha256 is not None else None

    def matches_file(self, path: str | os.PathLike[str]) -> bool:
        return digest_file(path, self.algorithm) == self.value


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative, slash-separated
    size: int
    sha256: str
    xxh3: str | None = None  # manifests of older uploads
    xxh3t: str | None = None  # absent in manifests written before it existed

    @property
    def check(self) -> Check:
        check = Check.of(self.sha256, self.xxh3, self.xxh3t)
        assert check is not None
        return check


@dataclass
class Manifest:
    files: list[FileEntry]
    created_at: str = field(
        default_factory=lambda: datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    )
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def by_path(self) -> dict[str, FileEntry]:
        return {f.path: f for f in self.files}

    def to_bytes(self) -> bytes:
        """Canonical serialisation: the digest is over exactly these bytes."""
        doc = {
            "format": MANIFEST_FORMAT,
            "algorithm": "sha256",
            "createdAt": self.created_at,
            "totalSize": self.total_size,
            "files": [_entry_doc(f) for f in sorted(self.files, key=lambda e: e.path)],
        }
        if self.meta:
            doc["meta"] = self.meta
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()

    @property
    def digest(self) -> str:
        """sha256 of the serialised manifest: one value that pins every file."""
        return sha256_bytes(self.to_bytes())

    def checksums_text(self) -> str:
        return "".join(f"{f.sha256}  {f.path}\n" for f in sorted(self.files, key=lambda e: e.path))

    @classmethod
    def from_bytes(cls, data: bytes, uri: str | None = None) -> Manifest:
        where = f" at {uri}" if uri else ""
        try:
            doc = json.loads(data)
            if doc.get("format") != MANIFEST_FORMAT or doc.get("algorithm") != "sha256":
                raise ValueError(f"unknown format {doc.get('format')!r}")
            files = [
                FileEntry(
                    path=_safe_rel(str(e["path"])),
                    size=int(e["size"]),
                    sha256=str(e["sha256"]),
                    xxh3=_hex(e["xxh3"], 32) if e.get("xxh3") is not None else None,
                    xxh3t=_hex(e["xxh3t"], 32) if e.get("xxh3t") is not None else None,
                )
                for e in doc["files"]
            ]
            return cls(
                files=files, created_at=str(doc.get("createdAt", "")), meta=doc.get("meta") or {}
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ManifestError(f"malformed manifest{where}: {exc}", uri) from exc

    def verify_file(self, rel: str, path: str | os.PathLike[str], uri: str | None = None) -> None:
        """Raise IntegrityError naming the file when size or sha256 differ."""
        entry = self.by_path().get(rel)
        if entry is None:
            raise IntegrityError(f"{rel} is not listed in the manifest", uri, str(path))
        _check(entry, Path(path), uri)

    def verify_dir(self, root: str | os.PathLike[str], uri: str | None = None) -> None:
        """Check every listed file under ``root``; extra files are allowed."""
        base = Path(root)
        for entry in self.files:
            _check(entry, base / entry.path, uri)


def _entry_doc(f: FileEntry) -> dict[str, Any]:
    doc: dict[str, Any] = {"path": f.path, "size": f.size, "sha256": f.sha256}
    if f.xxh3:
        doc["xxh3"] = f.xxh3
    if f.xxh3t:
        doc["xxh3t"] = f.xxh3t
    return doc


def _hex(value: object, length: int) -> str:
    """A lowercase hex digest of ``length`` digits from a (possibly hostile) manifest."""
    text = str(value)
    if len(text) != length or any(c not in "0123456789abcdef" for c in text):
        raise ValueError(f"not a {length}-digit lowercase hex digest: {text[:80]!r}")
    return text


def _check(entry: FileEntry, path: Path, uri: str | None) -> None:
    src = f" (from {uri.rstrip('/')}/{entry.path})" if uri else ""
    if not path.is_file():
        raise IntegrityError(f"missing file {entry.path}{src}", uri, str(path))
    size = path.stat().st_size
    if size != entry.size:
        raise IntegrityError(
            f"size mismatch for {entry.path}{src}: expected {entry.size} bytes, got {size}",
            uri,
            str(path),
        )
    check = entry.check
    actual = digest_file(path, check.algorithm)
    if actual != check.value:
        raise IntegrityError(
            f"checksum mismatch for {entry.path}{src}: expected {check.algorithm} "
            f"{check.value}, got {actual}",
            uri,
            str(path),
        )


def _safe_rel(rel: str) -> str:
    """Reject absolute or escaping paths from a (possibly hostile) remote manifest."""
    parts = rel.split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"unsafe path {rel!r}")
    return rel


def iter_files(root: str | os.PathLike[str]) -> Iterator[tuple[str, Path]]:
    """(relative slash path, absolute path) for every regular file under root, sorted,
    skipping the manifest files themselves and our own temporary files."""
    base = Path(root)
    for dirpath, dirnames, filenames in os.walk(base):
        # never into a download's staging directory (s5cmd.py) left by a killed process
        dirnames[:] = sorted(d for d in dirnames if not is_temp_name(d))
        for name in sorted(filenames):
            full = Path(dirpath) / name
            rel = full.relative_to(base).as_posix()
            if rel in RESERVED_NAMES or is_temp_name(name):
                continue
            if full.is_file():
                yield rel, full


def is_temp_name(name: str) -> bool:
    return name.startswith(TEMP_PREFIX)


def build_manifest(
    entries: Iterable[tuple[str, Path]],
    hasher: Any = None,
    meta: dict[str, Any] | None = None,
) -> Manifest:
    """Hash each (rel, path); ``hasher`` may be an Executor to hash files in parallel."""
    items = list(entries)
    if hasher is not None:
        digests = list(hasher.map(lambda item: hash_file(item[1]), items))
    else:
        digests = [hash_file(p) for _, p in items]
    files = [
        FileEntry(rel, p.stat().st_size, sha, xxh3t=fast)
        for (rel, p), (sha, fast) in zip(items, digests, strict=True)
    ]
    return Manifest(files=files, meta=dict(meta or {}))
