"""Bulk downloads through s5cmd, with kubetune keeping the manifest and the verification.

Why: on a 2-core pod the Python client is the limit (bench/storage_throughput.py measured
its ranged GETs at 0.3-0.5 of s5cmd, with or without hashing): every request goes through
botocore's Python layers and every byte through the interpreter at least once. s5cmd (Go,
MIT, in the trainer image) moves the bytes; kubetune decides what to fetch (the manifest,
the cache), verifies each file as soon as s5cmd reports it done (xxh3 or sha256, in a thread
pool, while the rest is still arriving) and only then renames it into place.

What s5cmd is given is narrow: one ``cp --raw`` line per object (no wildcards), sources that
kubetune listed, and destinations in a private staging directory with numbered names (a
hostile key never names a local path). Keys that would not survive s5cmd's line-based
command file are left to the Python path, as is every file s5cmd fails on: that path then
retries, resumes by ranges and raises the classified storage error. s5cmd is an
accelerator, never the only way a file arrives.

Enabled by ``KUBETUNE_S3_ENGINE=s5cmd`` (the trainer image sets it) or ``S3Config.engine``;
the binary is ``KUBETUNE_S5CMD`` or ``s5cmd`` on PATH.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from orchestrator.storage.checksum import Check

log = logging.getLogger("orchestrator.storage")

ENGINE_ENV = "KUBETUNE_S3_ENGINE"
BINARY_ENV = "KUBETUNE_S5CMD"
ENGINES = ("python", "s5cmd")
STAGING_PREFIX = ".kubetune-tmp-s5cmd-"  # a temp name: listings and manifests skip it
_UNSAFE = frozenset("\n\r\x00")
_POLL = 0.5  # seconds between progress reads of the staging directory
_STDERR_LINES = 20
FILE_WORKERS = 64


def resolve_engine(configured: str | None) -> str:
    value = configured or os.environ.get(ENGINE_ENV) or "python"
    if value not in ENGINES:
        raise ValueError(
            f"{ENGINE_ENV} / S3Config.engine: {value!r} is not one of {', '.join(ENGINES)}"
        )
    return value


def find_binary() -> str | None:
    explicit = os.environ.get(BINARY_ENV)
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    return shutil.which("s5cmd")


@dataclass(frozen=True)
class Item:
    """One object to fetch: its key, size, the check it must pass and where it goes."""

    key: str
    size: int
    check: Check | None
    dest: Path
    label: str  # for messages: the file's path relative to the download


@dataclass
class Settings:
    binary: str
    bucket: str
    endpoint: str | None
    env: dict[str, str]  # credentials and region for the child, on top of os.environ
    part_size_mib: int = 64
    concurrency: int = 4  # ranged GETs in flight per file
    workers: int = FILE_WORKERS  # files at once
    retries: int = 3  # s5cmd's own per-request retries before the Python path takes over
    verifiers: int = 2
    # s5cmd's HTTP client has no read timeout: a server that stops sending would hang it.
    # No byte and no finished file for this long, and it is stopped (the Python path, with
    # its own timeouts, takes over).
    stall_seconds: float = 120.0


def eligible(key: str) -> bool:
    """Can this key go into s5cmd's line-based command file unchanged?"""
    return not (_UNSAFE & set(key))


def download(
    items: list[Item],
    staging_root: Path,
    settings: Settings,
    advance: Callable[[int], None],
    on_verified: Callable[[Item], None] = lambda item: None,
) -> list[Item]:
    """Fetch ``items`` with one s5cmd process; each verified file is renamed to its ``dest``.

    Returns the items that did not arrive verified (s5cmd failed on them, or the file did
    not match its check): the caller fetches those its own way. Nothing unverified ever
    reaches a ``dest``.
    """
    if not items:
        return []
    staging_root.mkdir(parents=True, exist_ok=True)
    # A fresh private directory: processes (pods sharing a cache volume) never share one.
    staging = Path(os.path.realpath(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=staging_root)))
    try:
        return _run(items, staging, settings, advance, on_verified)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _staged_name(index: int) -> str:
    # s5cmd writes into a temp file named <dest name> + random digits before renaming it:
    # the "_" ends the index so the progress poll can tell i1_... from i12_...
    return f"i{index}_"


def _command_file(items: list[Item], staging: Path, settings: Settings) -> Path:
    lines = []
    for i, item in enumerate(items):
        src = f"s3://{settings.bucket}/{item.key}"
        dst = str(staging / _staged_name(i))
        lines.append(
            f"cp --raw --concurrency {settings.concurrency} --part-size "
            f"{settings.part_size_mib} {shlex.quote(src)} {shlex.quote(dst)}\n"
        )
    path = staging / "commands.txt"
    path.write_text("".join(lines), encoding="utf-8")
    return path


def _argv(settings: Settings, commands: Path) -> list[str]:
    argv = [settings.binary, "--json", "--numworkers", str(settings.workers),
            "--retry-count", str(settings.retries)]
    if settings.endpoint:
        argv += ["--endpoint-url", settings.endpoint]
    return [*argv, "run", str(commands)]


class _Progress:
    """Turns s5cmd's partial files and finished files into ``advance`` calls."""

    def __init__(self, items: list[Item], staging: Path, advance: Callable[[int], None]) -> None:
        self._items, self._staging, self._advance = items, staging, advance
        self._shown = [0] * len(items)
        self._finished = [False] * len(items)
        self._lock = threading.Lock()

    def _set(self, index: int, nbytes: int, *, polled: bool = False) -> None:
        with self._lock:
            if polled and self._finished[index]:  # a stale read after the file was settled
                return
            delta = nbytes - self._shown[index]
            self._shown[index] = nbytes
        if delta:
            self._advance(delta)

    def finished(self, index: int) -> None:
        with self._lock:
            self._finished[index] = True
        self._set(index, self._items[index].size)

    def failed(self, index: int) -> None:
        """Take back what the bar showed for a file the Python path fetches again."""
        with self._lock:
            self._finished[index] = True
        self._set(index, 0)

    def poll(self) -> tuple[int, str | None]:
        """Read s5cmd's partial files: (bytes written so far, the label of a file that has
        grown beyond its expected size, if any)."""
        try:
            entries = list(os.scandir(self._staging))
        except OSError:
            return 0, None
        total = 0
        for entry in entries:
            head, sep, _ = entry.name.partition("_")
            if not sep or not head.startswith("i") or not head[1:].isdigit():
                continue
            index = int(head[1:])
            if index >= len(self._items):
                continue
            try:
                st = entry.stat()
            except OSError:
                continue
            item = self._items[index]
            if st.st_size > item.size:  # not the object the manifest describes: stop now
                return total, item.label
            written = st.st_blocks * 512  # parts land out of order: count blocks
            total += written
            self._set(index, min(written, item.size), polled=True)
        return total, None


def _run(
    items: list[Item],
    staging: Path,
    settings: Settings,
    advance: Callable[[int], None],
    on_verified: Callable[[Item], None],
) -> list[Item]:
    commands = _command_file(items, staging, settings)
    by_dest = {str(staging / _staged_name(i)): i for i in range(len(items))}
    progress = _Progress(items, staging, advance)
    verified: set[int] = set()
    stderr_tail: deque[str] = deque(maxlen=_STDERR_LINES)
    env = {**os.environ, **settings.env}
    started = time.monotonic()

    def verify(index: int) -> None:
        item = items[index]
        staged = staging / _staged_name(index)
        try:
            ok = staged.stat().st_size == item.size and (
                item.check is None or item.check.matches_file(staged)
            )
        except OSError:
            ok = False
        if not ok:
            log.warning("s5cmd: %s did not match its %s; fetching it again", item.label,
                        item.check.algorithm if item.check else "size")
            staged.unlink(missing_ok=True)
            progress.failed(index)
            return
        try:
            item.dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, item.dest)
        except OSError as exc:  # e.g. a file where a directory should be: the Python path
            log.warning("s5cmd: could not place %s (%s); fetching it again", item.label, exc)
            progress.failed(index)
            return
        verified.add(index)
        on_verified(item)

    proc = subprocess.Popen(
        _argv(settings, commands),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        encoding="utf-8",
        errors="replace",
        bufsize=1,
    )
    assert proc.stdout is not None and proc.stderr is not None
    stop = threading.Event()

    def drain_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            stderr_tail.append(line.rstrip())

    stopped_because: list[str] = []
    futures: list[Future[None]] = []

    def watch() -> None:
        """Progress, and a stop for a stalled transfer or an object larger than expected."""
        last, last_change = (-1, -1), time.monotonic()
        while not stop.wait(_POLL):
            written, oversized = progress.poll()
            if oversized is not None:
                stopped_because.append(f"{oversized} is larger than its expected size")
            now = (written, len(verified) + len(futures))
            if now != last:
                last, last_change = now, time.monotonic()
            elif time.monotonic() - last_change > settings.stall_seconds:
                stopped_because.append(f"no progress for {settings.stall_seconds:.0f} s")
            if stopped_because:
                proc.kill()
                return

    helpers = [threading.Thread(target=drain_stderr, daemon=True, name="kt-s5cmd-stderr"),
               threading.Thread(target=watch, daemon=True, name="kt-s5cmd-watch")]
    for t in helpers:
        t.start()
    pool = ThreadPoolExecutor(settings.verifiers, thread_name_prefix="kt-verify")
    try:
        for index, ok in _results(proc.stdout, by_dest):
            if ok:
                progress.finished(index)
                futures.append(pool.submit(verify, index))
        proc.wait()
        pool.shutdown(wait=True)
    finally:
        stop.set()
        if proc.poll() is None:  # interrupted (SIGTERM, an exception): leave nothing behind
            proc.kill()
            proc.wait()
        pool.shutdown(wait=True, cancel_futures=True)  # no hashing of GBs after a Ctrl-C
    for f in futures:
        f.result()
    for t in helpers:
        t.join(timeout=5)
    left = [i for i in range(len(items)) if i not in verified]
    for i in left:
        progress.failed(i)
    nbytes = sum(items[i].size for i in verified)
    elapsed = max(time.monotonic() - started, 1e-9)
    if left:
        why = f"stopped: {stopped_because[0]}" if stopped_because else f"exit {proc.returncode}"
        log.warning(
            "s5cmd fetched %d of %d file(s) (%s); the other %d go through the Python "
            "client. s5cmd said: %s",
            len(verified), len(items), why, len(left), " | ".join(stderr_tail) or "nothing",
        )
    else:
        log.info("s5cmd: %d file(s), %.1f MiB verified in %.1f s (%.0f MiB/s)", len(items),
                 nbytes / 2**20, elapsed, nbytes / 2**20 / elapsed)
    return [items[i] for i in left]


def _results(lines: Iterable[str], by_dest: dict[str, int]) -> Iterable[tuple[int, bool]]:
    """(item index, success) for each of s5cmd's JSON result lines naming one of ours."""
    for line in lines:
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if not isinstance(doc, dict) or doc.get("operation") != "cp":
            continue
        index = by_dest.get(str(doc.get("destination", "")))
        if index is not None:
            yield index, doc.get("success") is True
