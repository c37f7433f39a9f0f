"""The ObjectStore abstraction: backend primitives plus the shared, backend-independent
logic for directories, manifests, verification, caching, progress and retries."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import random
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from orchestrator.storage import cache
from orchestrator.storage.checksum import (
    CACHE_RECORD,
    CHECKSUMS_NAME,
    MANIFEST_NAME,
    RESERVED_NAMES,
    TEMP_PREFIX,
    VERIFIED_RECORD,
    Check,
    Manifest,
    build_manifest,
    digest_file,
    hash_file,
    is_temp_name,
    iter_files,
    sha256_bytes,
)
from orchestrator.storage.errors import (
    IntegrityError,
    ManifestError,
    ObjectNotFoundError,
    StorageError,
)
from orchestrator.storage.progress import TransferProgress
from orchestrator.storage.transfer import journal_path

log = logging.getLogger("orchestrator.storage")

T = TypeVar("T")
Callback = Callable[[int], None]


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str | None = None  # S3 ETag; for local files mtime+size (changes when the file does)
    sha256: str | None = None  # from S3 object metadata when we uploaded it
    xxh3: str | None = None  # likewise, from older uploads (see checksum.py)
    xxh3t: str | None = None  # likewise

    @property
    def check(self) -> Check | None:
        return Check.of(self.sha256, self.xxh3, self.xxh3t)

    def pinned(self, sha256: str) -> ObjectInfo:
        """Verified by this sha256 alone (a caller's digest, a pinned manifest), never by a
        faster checksum from the object's metadata or the manifest."""
        return dataclasses.replace(self, sha256=sha256, xxh3=None, xxh3t=None)


# (path relative to the download's root, the object) for each file a download still needs
Todo = list[tuple[str, ObjectInfo]]


def join_key(prefix: str, rel: str) -> str:
    return f"{prefix.strip('/')}/{rel}" if prefix.strip("/") else rel


def _safe_rel(rel: str, uri: str) -> str:
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"refusing unsafe object name {rel!r} under {uri}", uri)
    return rel


def temp_path(dest: Path) -> Path:
    """A temp file next to ``dest`` (same filesystem, so os.replace is atomic)."""
    return dest.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex[:12]}-{dest.name}")


def partial_path(dest: Path) -> Path:
    """Where a resumable download of ``dest`` collects its bytes (a temp name, so listings
    and uploads skip it); the journal of finished ranges sits beside it."""
    return dest.with_name(f"{TEMP_PREFIX}partial-{dest.name}")


def atomic_write_bytes(dest: Path, data: bytes) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(dest)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


class ObjectStore(ABC):
    """A bucket-like namespace of objects addressed by slash-separated keys.

    Subclasses implement the primitives (``head``, ``list``, ``read_bytes``,
    ``write_bytes``, ``delete_prefix``, ``_put_file``, ``_get_file``) and say which errors
    are transient and how to phrase them; everything else lives here so S3 and local
    stores behave identically.
    """

    def __init__(
        self,
        *,
        progress: bool | None = None,
        workers: int = 4,
        retries: int = 3,
        backoff: float = 0.5,
    ) -> None:
        self.progress = progress
        self.workers = max(1, workers)
        self.retries = max(1, retries)  # whole-file attempts, on top of the backend's own
        self.backoff = backoff

    # ---- primitives -------------------------------------------------------------------
    @abstractmethod
    def uri(self, key: str = "") -> str:
        """The user-facing URI of a key (used in every message)."""

    @abstractmethod
    def head(self, key: str) -> ObjectInfo:
        """Metadata of one object; ObjectNotFoundError when absent."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object under ``prefix`` treated as a directory (recursive), sorted by key."""

    def has_objects(self, prefix: str) -> bool:
        """Is there any object under ``prefix`` treated as a directory? (Stores that can,
        answer without listing all of them.)"""
        return bool(self.list(prefix))

    @abstractmethod
    def read_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None:
        """Replace the object atomically: readers see the old or the new content."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete the object at ``prefix`` and everything under ``prefix/``; returns count."""

    @abstractmethod
    def _put_file(
        self, local: Path, key: str, callback: Callback, digests: dict[str, str]
    ) -> None: ...

    @abstractmethod
    def _get_file(self, key: str, dest: Path, callback: Callback, size: int) -> None:
        """Write the object to ``dest`` (a temp path the caller renames)."""

    # Downloads into a partial file that a later attempt continues (see transfer.py).
    resumable = False

    def _download_to(
        self, info: ObjectInfo, tmp: Path, callback: Callback, algorithm: str | None
    ) -> str | None:
        """Write the object to ``tmp``; return its digest in ``algorithm`` when it was
        computed on the way (so the caller need not read the file again), else None."""
        self._get_file(info.key, tmp, callback, info.size)
        return None

    def _bulk_download(
        self, todo: Todo, out: Path, advance: Callback, prefix: str | None = None
    ) -> Todo:
        """Fetch what a faster engine can into ``out`` (each file verified before it is
        placed); returns the (rel, info) pairs left for the per-file path. None here.
        ``prefix``: ``todo`` is everything the download wants from under this prefix."""
        return todo

    def _is_transient(self, exc: BaseException) -> bool:
        return False

    def _translate(self, exc: BaseException, key: str) -> BaseException:
        """Turn a backend exception into a one-line StorageError naming the URI."""
        return exc

    # ---- helpers ----------------------------------------------------------------------
    def _retrying(self, fn: Callable[[], T], key: str, what: str) -> T:
        """Run ``fn`` with exponential backoff on transient errors; translate the rest."""
        for attempt in range(1, self.retries + 1):
            try:
                return fn()
            except StorageError:
                raise
            except Exception as exc:
                if attempt < self.retries and self._is_transient(exc):
                    delay = min(self.backoff * 2 ** (attempt - 1), 8.0) * (0.5 + random.random())
                    log.warning(
                        "%s %s failed (%s), retry %d/%d in %.1fs",
                        what,
                        self.uri(key),
                        exc,
                        attempt,
                        self.retries - 1,
                        delay,
                    )
                    time.sleep(delay)
                    continue
                raise self._translate(exc, key) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _run_parallel(self, tasks: Iterable[Callable[[], None]]) -> None:
        """Run tasks on the worker pool; the first error (or Ctrl-C) cancels every task
        that has not started, and is raised once the running ones have stopped."""
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="kt-xfer")
        try:
            futures: list[Future[None]] = [pool.submit(t) for t in tasks]
            wait(futures, return_when="FIRST_EXCEPTION")
            for f in futures:
                if f.done() and not f.cancelled() and (exc := f.exception()) is not None:
                    raise exc
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    # ---- single objects ---------------------------------------------------------------
    def exists(self, key: str) -> bool:
        try:
            self.head(key)
        except ObjectNotFoundError:
            return False
        return True

    def read_text(self, key: str, encoding: str = "utf-8") -> str:
        return self.read_bytes(key).decode(encoding)

    def write_text(self, key: str, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(key, text.encode(encoding))

    def upload_file(
        self, local: str | os.PathLike[str], key: str, *, progress: bool | None = None
    ) -> ObjectInfo:
        """Upload one file (multipart and parallel for large files on S3); its sha256 and
        xxh3t are stored with the object where the backend supports metadata."""
        path = Path(local)
        if not path.is_file():
            raise StorageError(f"no such local file: {path}", self.uri(key))
        size = path.stat().st_size
        sha256, xxh3t = hash_file(path)
        with TransferProgress(
            f"upload {path.name} → {self.uri(key)}", size, progress=self._flag(progress)
        ) as bar:
            self._upload_one(path, key, bar.advance, _metadata(sha256, xxh3t))
        return ObjectInfo(key, size, None, sha256, xxh3t=xxh3t)

    def download_file(
        self,
        key: str,
        dest: str | os.PathLike[str],
        *,
        expected_sha256: str | None = None,
        progress: bool | None = None,
    ) -> Path:
        """Download one object to ``dest`` atomically (parallel ranged GETs on S3).

        Verified against ``expected_sha256``, or the checksum stored with the object.
        """
        info = self.head(key)
        if expected_sha256:  # the caller's word over the object's own metadata
            info = info.pinned(expected_sha256)
        check = info.check
        out = Path(dest)
        with TransferProgress(
            f"download {self.uri(key)}", info.size, progress=self._flag(progress)
        ) as bar:
            if self._bulk_download([(out.name, info)], out.parent, bar.advance):
                self._download_one(info, out, bar.advance, check, key)
        return out

    def _flag(self, progress: bool | None) -> bool | None:
        return self.progress if progress is None else progress

    def _upload_one(
        self, path: Path, key: str, advance: Callback, digests: dict[str, str]
    ) -> None:
        def attempt() -> None:
            sent = 0

            def cb(n: int) -> None:
                nonlocal sent
                sent += n
                advance(n)

            try:
                self._put_file(path, key, cb, digests)
            except BaseException:
                advance(-sent)  # a retry starts over: keep the bar honest
                raise

        self._retrying(attempt, key, "upload")

    def _download_one(
        self,
        info: ObjectInfo,
        out: Path,
        advance: Callback,
        expected: Check | None,
        key: str,
        rel: str | None = None,
    ) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp, lock_fd = self._claim_temp(out)
        digest: str | None = None

        def attempt() -> None:
            nonlocal digest
            got = 0

            def cb(n: int) -> None:
                nonlocal got
                got += n
                advance(n)

            try:
                digest = self._download_to(
                    info, tmp, cb, expected.algorithm if expected is not None else None
                )
            except BaseException:
                advance(-got)
                raise

        keep = False
        try:
            try:
                self._retrying(attempt, key, "download")
            except BaseException:
                # A later call resumes from the ranges this one finished.
                keep = lock_fd is not None and journal_path(tmp).exists()
                raise
            if expected is not None:
                actual = digest or digest_file(tmp, expected.algorithm)
                if actual != expected.value:
                    name = rel or info.key.rsplit("/", 1)[-1]
                    raise IntegrityError(
                        f"checksum mismatch for {name} ({self.uri(info.key)}): expected "
                        f"{expected.algorithm} {expected.value}, got {actual}",
                        self.uri(info.key),
                        str(out),
                    )
            os.replace(tmp, out)
        finally:
            if not keep:
                tmp.unlink(missing_ok=True)
                journal_path(tmp).unlink(missing_ok=True)
            if lock_fd is not None:
                os.close(lock_fd)

    def _claim_temp(self, out: Path) -> tuple[Path, int | None]:
        """The file a download writes before it is verified and renamed into place.

        Resumable stores use a fixed partial name, locked so that two processes fetching
        the same file never write into one partial; the second gets a private temp file.
        """
        if not self.resumable:
            return temp_path(out), None
        tmp = partial_path(out)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return temp_path(out), None
        return tmp, fd

    # ---- directories ------------------------------------------------------------------
    def upload_dir(
        self,
        local_dir: str | os.PathLike[str],
        prefix: str,
        *,
        meta: dict[str, object] | None = None,
        progress: bool | None = None,
    ) -> Manifest:
        """Upload every file under ``local_dir`` to ``prefix/``, files in parallel, then
        ``checksums.sha256`` and finally ``manifest.json`` (its presence = complete)."""
        root = Path(local_dir)
        if not root.is_dir():
            raise StorageError(f"no such local directory: {root}", self.uri(prefix))
        files = list(iter_files(root))
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            manifest = build_manifest(files, hasher=pool, meta=dict(meta or {}))
        digests = {e.path: _metadata(e.sha256, e.xxh3t) for e in manifest.files}
        with TransferProgress(
            f"upload {root} → {self.uri(prefix)}",
            manifest.total_size,
            files=len(files),
            progress=self._flag(progress),
        ) as bar:
            self._run_parallel(
                _bind(self._upload_one, path, join_key(prefix, rel), bar.advance, digests[rel])
                for rel, path in files
            )
        self.write_text(join_key(prefix, CHECKSUMS_NAME), manifest.checksums_text())
        self.write_bytes(join_key(prefix, MANIFEST_NAME), manifest.to_bytes())
        return manifest

    def read_manifest(self, prefix: str) -> tuple[Manifest, bytes]:
        key = join_key(prefix, MANIFEST_NAME)
        data = self.read_bytes(key)
        return Manifest.from_bytes(data, self.uri(key)), data

    def download_dir(
        self,
        prefix: str,
        dest: str | os.PathLike[str],
        *,
        require_manifest: bool = False,
        expected_digest: str | None = None,
        progress: bool | None = None,
    ) -> Manifest | None:
        """Download ``prefix/`` into ``dest``, re-using files already there.

        With a ``manifest.json`` (what upload_dir writes) exactly the listed files are
        fetched and each is verified by sha256 before it is moved into place; a local file
        that already matches is kept. ``expected_digest`` pins the manifest itself (the
        artifact sha256 recorded in job status). Without a manifest every object under the
        prefix is fetched, or ManifestError when ``require_manifest``. Returns the manifest.
        """
        out = Path(dest)
        base_uri = self.uri(prefix)
        try:
            manifest, raw = self.read_manifest(prefix)
        except ObjectNotFoundError:
            if require_manifest:
                raise ManifestError(
                    f"no {MANIFEST_NAME} at {base_uri.rstrip('/')}/: the upload is incomplete "
                    "or was not made by kubetune",
                    base_uri,
                ) from None
            manifest, raw = None, b""
        if manifest is not None and expected_digest and sha256_bytes(raw) != expected_digest:
            raise IntegrityError(
                f"manifest digest mismatch for {base_uri.rstrip('/')}/{MANIFEST_NAME}: expected "
                f"sha256 {expected_digest}, got {sha256_bytes(raw)}",
                base_uri,
            )

        if manifest is not None:
            # A manifest pinned by its sha256 (collect) pins every file by sha256: the
            # chain from job status to each byte stays cryptographic. Otherwise the faster
            # xxh3t (or an older manifest's xxh3) where the manifest has one.
            wanted = []
            for e in manifest.files:
                info = ObjectInfo(join_key(prefix, e.path), e.size, None, e.sha256, e.xxh3,
                                  e.xxh3t)
                wanted.append((e.path, info.pinned(e.sha256) if expected_digest else info))
        else:
            strip = len(prefix.strip("/")) + 1 if prefix.strip("/") else 0
            wanted = [
                (o.key[strip:], o)
                for o in self.list(prefix)
                if o.key[strip:] not in RESERVED_NAMES
                and not is_temp_name(o.key.rsplit("/", 1)[-1])
            ]
            if not wanted:
                if prefix.strip("/") and self.exists(prefix):
                    raise StorageError(
                        f"{base_uri} is a single object, not a directory prefix", base_uri
                    )
                if not self._dir_exists(prefix):
                    raise ObjectNotFoundError(f"nothing found at {base_uri}", base_uri)
        for rel, _ in wanted:
            _safe_rel(rel, base_uri)

        out.mkdir(parents=True, exist_ok=True)
        record = _load_record(out)
        verified = cache.load_verified(out)
        todo = [
            (rel, info)
            for rel, info in wanted
            if not _cached(out / rel, info, record.get(rel), verified.get(rel))
        ]
        total = sum(info.size for _, info in todo)
        if todo:
            with TransferProgress(
                f"download {base_uri} → {out}",
                total,
                files=len(todo),
                progress=self._flag(progress),
            ) as bar:
                whole = prefix if len(todo) == len(wanted) else None  # nothing cached
                todo = self._bulk_download(todo, out, bar.advance, whole)
                self._run_parallel(
                    _bind(
                        self._download_one, info, out / rel, bar.advance, info.check, info.key, rel
                    )
                    for rel, info in todo
                )
        if manifest is not None:
            # Keep the manifest with the files: the copy is self-verifying.
            atomic_write_bytes(out / MANIFEST_NAME, raw)
            atomic_write_bytes(out / CHECKSUMS_NAME, manifest.checksums_text().encode())
            # every listed file is verified now: the next download here need not hash them
            # (the digest each was checked with: a later download that needs the sha256
            # does not trust a file that was only checked by xxh3)
            atomic_write_bytes(out / VERIFIED_RECORD, cache.verified_record(
                out, {rel: c.value for rel, info in wanted if (c := info.check) is not None}))
        else:
            record.update({rel: info.etag for rel, info in wanted if info.etag})
            atomic_write_bytes(out / CACHE_RECORD, json.dumps(record, sort_keys=True).encode())
        skipped = len(wanted) - len(todo)
        if skipped:
            log.info("%s: %d file(s) already up to date in %s", base_uri, skipped, out)
        return manifest

    def _dir_exists(self, prefix: str) -> bool:
        """An empty directory prefix exists only where directories are real (local fs)."""
        return False


def _metadata(sha256: str | None, xxh3t: str | None) -> dict[str, str]:
    """The checksums stored with an uploaded object (S3 user metadata)."""
    return {k: v for k, v in (("sha256", sha256), ("xxh3t", xxh3t)) if v}


def _bind(fn: Callable[..., None], *args: object) -> Callable[[], None]:
    return lambda: fn(*args)


def _load_record(out: Path) -> dict[str, str]:
    try:
        data = json.loads((out / CACHE_RECORD).read_text())
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _cached(path: Path, info: ObjectInfo, recorded_etag: str | None,
            verified: object = None) -> bool:
    """Is the local copy already the remote object? sha256 when known (trusting an earlier
    verification while size and mtime are unchanged), else size + ETag."""
    try:
        if path.stat().st_size != info.size:
            return False
    except OSError:
        return False
    check = info.check
    if check is not None:
        return cache.still_verified(path, check.value, verified) or check.matches_file(path)
    return info.etag is not None and recorded_etag == info.etag
