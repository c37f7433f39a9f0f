"""Bulk downloads through s5cmd, with kubetune keeping the manifest and the verification.

Why: on a 2-core pod the Python client is the limit (bench/storage_throughput.py measured
its ranged GETs at 0.3-0.5 of s5cmd, with or without hashing): every request goes through
botocore's Python layers and every byte through the interpreter at least once. s5cmd (Go,
MIT, in the trainer image) moves the bytes; kubetune decides what to fetch (the manifest,
the cache), verifies each file as soon as s5cmd reports it done (xxh3t or sha256, in a thread
pool, while the rest is still arriving) and only then renames it into place.

What s5cmd is given is narrow. Per object: one ``cp --raw`` line per object (no wildcards),
sources that kubetune listed, and destinations in a private staging directory with numbered
names (a hostile key never names a local path). A whole prefix (a fresh model download):
one wildcard ``cp`` into the staging directory, so s5cmd lists once instead of sending a
HEAD per object (on 2 cores, 200 HEADs are a sixth of a 400 MiB copy); any key with ``..``
in it is excluded (s5cmd would resolve it outside the directory), a file counts only where
kubetune expects it, and the copy is stopped (the per-object way takes over) as soon as
more than a little arrives that is not the download's (objects beside the manifest's).
Keys that would not survive s5cmd's line-based command file are left to the Python path,
as is every file s5cmd fails on: that path then retries, resumes by ranges and raises the
classified storage error. s5cmd is an accelerator, never the only way a file arrives.

Enabled by ``KUBETUNE_S3_ENGINE=s5cmd`` (the trainer image sets it) or ``S3Config.engine``;
the binary is ``KUBETUNE_S5CMD`` or ``s5cmd`` on PATH.
"""

from __future__ import annotations

import contextlib
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
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from orchestrator.storage.checksum import TEMP_PREFIX, Check

log = logging.getLogger("orchestrator.storage")

ENGINE_ENV = "KUBETUNE_S3_ENGINE"
BINARY_ENV = "KUBETUNE_S5CMD"
ENGINES = ("python", "s5cmd")
STAGING_PREFIX = f"{TEMP_PREFIX}s5cmd-"  # a temp name: listings and manifests skip it
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


@dataclass(frozen=True)
class WholePrefix:
    """Fetch the items as every object under ``key/`` with one wildcard command.

    ``exclude``: s5cmd ``--exclude`` patterns (matched against the key below the prefix, ``*``
    spans ``/``) for objects that are not the download's (the manifest, temp objects).
    """

    key: str
    exclude: tuple[str, ...] = ()


# Every key with ".." in it (s5cmd resolves the path of a listed key against the directory
# it copies into: "a/../../x" would land outside it). Such keys go the per-object way.
_NO_DOTDOT = "*..*"


def prefix_eligible(prefix: str) -> bool:
    """Can s5cmd copy ``prefix/*`` as a wildcard that means exactly this prefix?"""
    parts = prefix.split("/")
    return (
        bool(prefix)
        and eligible(prefix)
        and not set("*?") & set(prefix)
        and not any(p in ("", ".", "..") for p in parts)
    )


def download(
    items: list[Item],
    staging_root: Path,
    settings: Settings,
    advance: Callable[[int], None],
    on_verified: Callable[[Item], None] = lambda item: None,
    whole: WholePrefix | None = None,
) -> list[Item]:
    """Fetch ``items`` with s5cmd; each verified file is renamed to its ``dest``.

    ``whole``: the items are the whole prefix, copied with one wildcard command; whatever
    that copy did not deliver (it was stopped because the prefix holds more, the listing
    was refused, ...) goes the per-object way.
    Returns the items that did not arrive verified (s5cmd failed on them, or the file did
    not match its check): the caller fetches those its own way. Nothing unverified ever
    reaches a ``dest``.
    """
    if not items:
        return []
    staging_root.mkdir(parents=True, exist_ok=True)
    sweep_abandoned(staging_root)
    if whole is not None and prefix_eligible(whole.key):
        with _staging(staging_root) as staging:
            plan = _prefix_plan(items, staging, settings, whole)
            items = _run(items, plan, staging, settings, advance, on_verified)
        if not items:
            return []
    with _staging(staging_root) as staging:
        plan = _per_object_plan(items, staging, settings)
        return _run(items, plan, staging, settings, advance, on_verified)


# A staging directory untouched for this long belongs to a killed process: a live download
# touches its own every _POLL seconds (the watch thread), verification included.
ABANDONED_SECONDS = 15 * 60


def sweep_abandoned(root: Path, now: float | None = None) -> int:
    """Remove the staging directories of killed processes under ``root``; returns how many."""
    now = time.time() if now is None else now
    swept = 0
    try:
        candidates = [e for e in os.scandir(root)
                      if e.name.startswith(STAGING_PREFIX) and e.is_dir(follow_symlinks=False)]
    except OSError:
        return 0
    for entry in candidates:
        try:
            touched = entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        if now - touched > ABANDONED_SECONDS:
            shutil.rmtree(entry.path, ignore_errors=True)
            swept += 1
    if swept:
        log.info("s5cmd: removed %d staging director%s left by killed downloads in %s",
                 swept, "y" if swept == 1 else "ies", root)
    return swept


@contextlib.contextmanager
def _staging(root: Path) -> Iterator[Path]:
    """A fresh private directory: processes (pods sharing a cache volume) never share one."""
    staging = Path(os.path.realpath(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=root)))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@dataclass(frozen=True)
class _Plan:
    """One s5cmd invocation: its argv, where item i lands, and how to recognise it."""

    argv: list[str]
    staged: list[Path]
    index_of: Callable[[dict[str, object]], int | None]  # the item a JSON result line names
    # the item a (partial) file in staging belongs to; AMBIGUOUS: one of ours, not sure which
    locate: Callable[[str], int | None]
    rest: str  # what happens to the files this invocation does not deliver
    how: str  # for the summary line
    foreign_allowance: int = 0  # bytes of finished objects that are not ours, before a stop


def _global_flags(settings: Settings) -> list[str]:
    argv = [settings.binary, "--json", "--numworkers", str(settings.workers),
            "--retry-count", str(settings.retries)]
    if settings.endpoint:
        argv += ["--endpoint-url", settings.endpoint]
    return argv


def _staged_name(index: int) -> str:
    # s5cmd writes into a temp file named <dest name> + random digits before renaming it:
    # the "_" ends the index so the progress poll can tell i1_... from i12_...
    return f"i{index}_"


def _per_object_plan(items: list[Item], staging: Path, settings: Settings) -> _Plan:
    staged = [staging / _staged_name(i) for i in range(len(items))]
    lines = [
        f"cp --raw --concurrency {settings.concurrency} --part-size {settings.part_size_mib} "
        f"{shlex.quote(f's3://{settings.bucket}/{item.key}')} {shlex.quote(str(dst))}\n"
        for item, dst in zip(items, staged, strict=True)
    ]
    commands = staging / "commands.txt"
    commands.write_text("".join(lines), encoding="utf-8")
    by_dest = {str(dst): i for i, dst in enumerate(staged)}

    def locate(rel: str) -> int | None:
        head, sep, _ = rel.partition("_")
        if sep and head.startswith("i") and head[1:].isdigit() and int(head[1:]) < len(items):
            return int(head[1:])
        return None

    return _Plan(
        argv=[*_global_flags(settings), "run", str(commands)],
        staged=staged,
        index_of=lambda doc: by_dest.get(str(doc.get("destination", ""))),
        locate=locate,
        rest="go through the Python client",
        how="object by object",
    )


_TEMP_SUFFIX_DIGITS = 10  # os.CreateTemp's random suffix: a uint32 in decimal


def _prefix_plan(
    items: list[Item], staging: Path, settings: Settings, whole: WholePrefix
) -> _Plan:
    base = whole.key.strip("/")
    rels = [item.key[len(base) + 1:] for item in items]
    staged = [staging / rel for rel in rels]
    by_source = {f"s3://{settings.bucket}/{item.key}": i for i, item in enumerate(items)}
    by_rel = {rel: i for i, rel in enumerate(rels)}

    def index_of(doc: dict[str, object]) -> int | None:
        i = by_source.get(str(doc.get("source", "")))
        # a file counts only where kubetune put it in the plan, nowhere else
        return i if i is not None and str(doc.get("destination")) == str(staged[i]) else None

    def locate(rel: str) -> int | None:
        if rel in by_rel:
            return by_rel[rel]
        # a partial file: <name><random digits> ("shard1" + "23" or "shard12" + "3"?)
        found = {
            by_rel[rel[:-k]]
            for k in range(1, _TEMP_SUFFIX_DIGITS + 1)
            if len(rel) > k and rel[-k:].isdigit() and rel[:-k] in by_rel
        }
        return found.pop() if len(found) == 1 else AMBIGUOUS if found else None

    excludes = [flag for pattern in (_NO_DOTDOT, *whole.exclude)
                for flag in ("--exclude", pattern)]
    return _Plan(
        argv=[*_global_flags(settings), "cp", "--concurrency", str(settings.concurrency),
              "--part-size", str(settings.part_size_mib), *excludes,
              f"s3://{settings.bucket}/{base}/*", f"{staging}/"],
        staged=staged,
        index_of=index_of,
        locate=locate,
        rest="go to s5cmd one by one",
        how="one listing of the prefix",
        foreign_allowance=min(FOREIGN_BYTES, sum(item.size for item in items) // 100),
    )


class _Progress:
    """Turns s5cmd's partial files and finished files into ``advance`` calls."""

    def __init__(
        self,
        items: list[Item],
        staging: Path,
        advance: Callable[[int], None],
        locate: Callable[[str], int | None],
    ) -> None:
        self._items, self._staging, self._advance, self._locate = items, staging, advance, locate
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
        """Read s5cmd's partial files: (bytes written so far, why s5cmd must stop, if it
        must: a file grown beyond its expected size, or too much that is not ours)."""
        total = foreign = 0
        for rel, st in _files(self._staging):
            written = st.st_blocks * 512  # parts land out of order: count blocks
            total += written
            index = self._locate(rel)
            if index is None:
                foreign += written
                if foreign > FOREIGN_BYTES:
                    return total, _foreign(FOREIGN_BYTES)
                continue
            if index == AMBIGUOUS:  # shown when it is finished
                continue
            item = self._items[index]
            if st.st_size > item.size:  # not the object the manifest describes: stop now
                return total, f"{item.label} is larger than its expected size"
            self._set(index, min(written, item.size), polled=True)
        return total, None


# What may land in staging that is not one of the items (another object under a whole
# prefix) before s5cmd is stopped; finished ones count against the plan's allowance.
FOREIGN_BYTES = 64 * 2**20
AMBIGUOUS = -1


def _foreign(limit: int) -> str:
    return (f"more than {limit / 2**20:.1f} MiB of objects that are not part of the "
            "download (the prefix holds more than its manifest lists)")


def _files(root: Path) -> Iterable[tuple[str, os.stat_result]]:
    """(path relative to root, stat) of every file below root; vanishing ones skipped."""
    stack = [("", str(root))]
    while stack:
        rel_dir, path = stack.pop()
        try:
            entries = list(os.scandir(path))
        except OSError:
            continue
        for entry in entries:
            rel = f"{rel_dir}{entry.name}"
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append((f"{rel}/", entry.path))
                elif entry.is_file(follow_symlinks=False):
                    yield rel, entry.stat(follow_symlinks=False)
            except OSError:
                continue


def _run(
    items: list[Item],
    plan: _Plan,
    staging: Path,
    settings: Settings,
    advance: Callable[[int], None],
    on_verified: Callable[[Item], None],
) -> list[Item]:
    """One s5cmd process; returns the items it did not deliver verified."""
    progress = _Progress(items, staging, advance, plan.locate)
    verified: set[int] = set()
    stderr_tail: deque[str] = deque(maxlen=_STDERR_LINES)
    env = {**os.environ, **settings.env}
    started = time.monotonic()
    made: set[Path] = set()  # destination directories that exist

    def verify(index: int) -> None:
        item = items[index]
        staged = plan.staged[index]
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
            if item.dest.parent not in made:
                item.dest.parent.mkdir(parents=True, exist_ok=True)
                made.add(item.dest.parent)
            os.replace(staged, item.dest)
        except OSError as exc:  # e.g. a file where a directory should be: the Python path
            log.warning("s5cmd: could not place %s (%s); fetching it again", item.label, exc)
            progress.failed(index)
            return
        verified.add(index)
        on_verified(item)

    proc = subprocess.Popen(
        plan.argv,
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
            with contextlib.suppress(OSError):
                os.utime(staging)  # alive: sweep_abandoned leaves it alone
            written, wrong = progress.poll()
            if wrong is not None:
                stopped_because.append(wrong)
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
        foreign = 0
        for index, ok, size in _results(proc.stdout, plan.index_of):
            if index is None:
                foreign += size
                if foreign > plan.foreign_allowance and not stopped_because:
                    stopped_because.append(_foreign(plan.foreign_allowance))
                    proc.kill()
            elif ok:
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
            "s5cmd fetched %d of %d file(s) (%s); the other %d %s. s5cmd said: %s",
            len(verified), len(items), why, len(left), plan.rest,
            " | ".join(stderr_tail) or "nothing",
        )
    else:
        log.info("s5cmd: %d file(s), %.1f MiB verified in %.1f s (%.0f MiB/s, %s)",
                 len(items), nbytes / 2**20, elapsed, nbytes / 2**20 / elapsed, plan.how)
    return [items[i] for i in left]


def _results(
    lines: Iterable[str], index_of: Callable[[dict[str, object]], int | None]
) -> Iterable[tuple[int | None, bool, int]]:
    """(item index or None for an object not ours, success, size) for each of s5cmd's
    JSON result lines."""
    for line in lines:
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if not isinstance(doc, dict) or doc.get("operation") != "cp":
            continue
        obj = doc.get("object")
        size = obj.get("size") if isinstance(obj, dict) else None
        yield index_of(doc), doc.get("success") is True, size if isinstance(size, int) else 0
