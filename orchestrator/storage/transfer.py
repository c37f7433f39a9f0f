"""Parallel ranged downloads that hash while they write, and resume where they stopped.

Why this exists: on a 2-core pod the client's CPU is the limit, not the network. s3transfer
copies every byte through Python in 256 KiB pieces, sends a HEAD before each GET, and then
kubetune read every file a second time to hash it. Here a file is cut into ``part_size``
ranges fetched by ``concurrency`` threads (one GET each, read into one buffer in C with the
GIL released); the buffers are written with one ``os.pwrite`` each and fed to sha256 in
file order, by one thread at a time, while still in memory, so the bytes cross Python once
and are never read back.

Memory is bounded: a range (or a small file) is only requested while fewer than
``2 * concurrency`` buffers are in flight or waiting for their turn to be hashed, and one
``Budget`` is shared by all the files a store fetches at once, so at most
``2 * part_size * concurrency`` bytes are held, whatever the file size and however many files
run in parallel. (A file waits only for its own lowest unhashed range, which already holds
its slot: slots are taken in file order, so sharing them cannot deadlock.)

Resume: the data goes to a partial file next to the destination (the caller's temp path),
and every finished range is recorded in a small journal beside it. A transfer that stops
(the server died, the pod was killed) leaves both; the next attempt checks that the journal
describes the same remote object (size and sha256 or ETag), fetches only the missing ranges
and hashes the finished ones from disk. Nothing reaches the destination name before the
whole file has been verified.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.storage.checksum import new_hasher
from orchestrator.storage.errors import StorageError

# fetch(start, end) -> a buffer with bytes [start, end) of the object.
Fetch = Callable[[int, int], Any]
Callback = Callable[[int], None]

_READ_BACK = 4 << 20  # resumed ranges are hashed from disk in pieces of this size


@dataclass
class TransferStats:
    """Counters for one store (all transfers), for logs, tests and the benchmark."""

    bytes_fetched: int = 0
    bytes_resumed: int = 0
    requests: int = 0
    peak_buffered: int = 0  # most bytes held in memory at once by one transfer
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, fetched: int = 0, resumed: int = 0, requests: int = 0) -> None:
        with self._lock:
            self.bytes_fetched += fetched
            self.bytes_resumed += resumed
            self.requests += requests

    def buffered(self, n: int) -> None:
        with self._lock:
            self.peak_buffered = max(self.peak_buffered, n)


class Budget:
    """Slots for buffers in memory, shared by every concurrent transfer of one store."""

    def __init__(self, slots: int, stats: TransferStats | None = None) -> None:
        self._sem = threading.Semaphore(max(1, slots))
        self._lock = threading.Lock()
        self._held = 0
        self._stats = stats

    def acquire(self, nbytes: int, abort: threading.Event | None = None) -> bool:
        """Wait for a slot; False when ``abort`` was set meanwhile."""
        while not self._sem.acquire(timeout=0.5):
            if abort is not None and abort.is_set():
                return False
        with self._lock:
            self._held += nbytes
            if self._stats is not None:
                self._stats.buffered(self._held)
        return True

    def release(self, nbytes: int) -> None:
        with self._lock:
            self._held -= nbytes
        self._sem.release()


def journal_path(partial: Path) -> Path:
    return partial.with_name(partial.name + ".parts")


class _Journal:
    """Which ranges of ``partial`` are already on disk, for one remote object version."""

    def __init__(self, partial: Path, identity: dict[str, Any]) -> None:
        self.path = journal_path(partial)
        self.identity = identity
        self.done: set[int] = set()
        self._lock = threading.Lock()

    def load(self, partial: Path) -> set[int]:
        try:
            doc = json.loads(self.path.read_text())
            if doc.get("object") == self.identity and partial.is_file():
                self.done = {int(i) for i in doc.get("done", [])}
        except (OSError, ValueError, TypeError):
            self.done = set()
        return set(self.done)

    def mark(self, index: int) -> None:
        with self._lock:
            self.done.add(index)
            doc = {"object": self.identity, "done": sorted(self.done)}
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(doc))
            os.replace(tmp, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class _OrderedWriter:
    """Writes (and hashes) buffers in file order, whichever thread delivers them.

    The thread that delivers the next expected range writes it, hashes it, records it in
    the journal and does the same for every range queued behind it; others just leave
    their buffer and go back to fetching. One writer at a time, in order: parallel
    ``pwrite``s into one file contend for its inode lock, which cost more CPU than the
    copy itself on 2 cores. ``None`` stands for a range already on disk from an earlier
    attempt (hashed by reading it back).
    """

    def __init__(
        self,
        fd: int,
        parts: list[tuple[int, int]],
        release: Callable[[int], None],
        journal: _Journal | None,
        callback: Callback,
        algorithm: str | None,
    ) -> None:
        self.h = new_hasher(algorithm) if algorithm else None
        self._fd = fd
        self._parts = parts
        self._release = release
        self._journal = journal
        self._callback = callback
        self._lock = threading.Lock()
        self._pending: dict[int, Any] = {}
        self._next = 0
        self._draining = False

    def deliver(self, index: int, buf: Any) -> None:
        with self._lock:
            self._pending[index] = buf
            if self._draining:
                return
            self._draining = True
        while True:
            with self._lock:
                if self._next not in self._pending:
                    self._draining = False
                    return
                i = self._next
                item = self._pending.pop(i)
                self._next += 1
            start, end = self._parts[i]
            if item is None:
                if self.h is not None:
                    self._hash_from_disk(start, end)
                continue
            try:
                _pwrite_all(self._fd, item, start)
                if self._journal is not None:
                    self._journal.mark(i)
                self._callback(end - start)
                if self.h is not None:
                    self.h.update(item)
            finally:
                self._release(end - start)

    def _hash_from_disk(self, start: int, end: int) -> None:
        assert self.h is not None
        pos = start
        while pos < end:
            chunk = os.pread(self._fd, min(_READ_BACK, end - pos), pos)
            if not chunk:
                raise StorageError(f"resumed data ended early at byte {pos}")
            self.h.update(chunk)
            pos += len(chunk)

    def drop(self) -> None:
        """After a failure: keep what was fetched (written and journalled, so a later
        attempt need not fetch it again) and release every slot."""
        with self._lock:
            left = [(i, b) for i, b in self._pending.items() if b is not None]
            self._pending.clear()
        for i, buf in left:
            start, end = self._parts[i]
            try:
                # best effort: a failed save only means a later attempt fetches it again
                with contextlib.suppress(OSError):
                    if self._journal is not None:
                        _pwrite_all(self._fd, buf, start)
                        self._journal.mark(i)
            finally:
                self._release(end - start)

    @property
    def complete(self) -> bool:
        return self._next == len(self._parts)


def _pwrite_all(fd: int, buf: Any, offset: int) -> None:
    view = memoryview(buf).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def ranged_download(
    fetch: Fetch,
    size: int,
    partial: Path,
    *,
    part_size: int,
    concurrency: int,
    callback: Callback,
    algorithm: str | None,
    identity: dict[str, Any] | None = None,
    stats: TransferStats | None = None,
    budget: Budget | None = None,
    what: str = "",
) -> str | None:
    """Download ``size`` bytes into ``partial``; its digest when ``algorithm`` is given.

    With ``identity`` (a description of the remote object version) ranges finished by an
    earlier, interrupted call are kept and not fetched again. The caller renames
    ``partial`` into place after checking the digest, and removes it on a mismatch.
    """
    stats = stats or TransferStats()
    budget = budget or Budget(2 * max(1, concurrency), stats)
    part_size = max(1, part_size)
    parts = [(s, min(s + part_size, size)) for s in range(0, size, part_size)] or [(0, 0)]
    journal = _Journal(partial, identity) if identity is not None and len(parts) > 1 else None
    done = journal.load(partial) if journal is not None else set()
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(partial, flags, 0o644)
    try:
        if not done:  # start over (the caller may hold a lock on this inode: keep it)
            os.ftruncate(fd, 0)
        resumed = sum(e - s for i, (s, e) in enumerate(parts) if i in done)
        if resumed:
            stats.add(resumed=resumed)
            callback(resumed)
        if len(parts) == 1:
            start, end = parts[0]
            budget.acquire(end - start)
            try:
                buf = fetch(start, end) if end > start else b""
                _check_len(buf, end - start, what)
                stats.add(fetched=end - start, requests=1 if end > start else 0)
                _pwrite_all(fd, buf, start)
                callback(end - start)
                if not algorithm:
                    return None
                h = new_hasher(algorithm)
                h.update(buf)
                return str(h.hexdigest())
            finally:
                budget.release(end - start)
        return _parallel(
            fetch, fd, parts, done, journal, concurrency, callback, algorithm, stats, budget, what
        )
    finally:
        os.close(fd)


def _check_len(buf: Any, expected: int, what: str) -> None:
    got = memoryview(buf).nbytes
    if got != expected:
        raise StorageError(f"{what}: expected {expected} bytes, the server sent {got}")


def _parallel(
    fetch: Fetch,
    fd: int,
    parts: list[tuple[int, int]],
    done: set[int],
    journal: _Journal | None,
    concurrency: int,
    callback: Callback,
    algorithm: str | None,
    stats: TransferStats,
    budget: Budget,
    what: str,
) -> str | None:
    failed = threading.Event()
    writer = _OrderedWriter(fd, parts, budget.release, journal, callback, algorithm)

    def one(index: int) -> None:
        start, end = parts[index]
        handed_over = False
        try:
            if failed.is_set():
                return
            buf = fetch(start, end)
            _check_len(buf, end - start, what)
            stats.add(fetched=end - start, requests=1)
            handed_over = True  # the writer releases the slot once it has written it
            writer.deliver(index, buf)
        except BaseException:
            failed.set()
            raise
        finally:
            if not handed_over:
                budget.release(end - start)

    pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="kt-range")
    futures: list[Future[None]] = []
    try:
        for index in range(len(parts)):
            if index in done:
                writer.deliver(index, None)
                continue
            start, end = parts[index]
            if not budget.acquire(end - start, failed):
                break
            futures.append(pool.submit(one, index))
        wait(futures)
        for f in futures:
            if (exc := f.exception()) is not None:
                raise exc
    finally:
        failed.set()  # queued ranges return at once, giving their slots back
        pool.shutdown(wait=True)
        writer.drop()  # a failed transfer gives back the slots of unwritten buffers
    if not writer.complete:  # pragma: no cover - every part delivered without an error
        raise StorageError(f"{what}: internal error, not every range was written")
    return writer.h.hexdigest() if writer.h is not None else None
