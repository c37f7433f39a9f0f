"""A download cache shared by processes and pods (``spec.model.cacheClaim`` is one volume
for every pod of a node, or of the cluster when it is ReadWriteMany).

- One downloader per destination: an advisory ``flock`` on a lock file beside it. The others
  wait, then find the files in place. The kernel (or the NFS server, when its lease lapses)
  drops the lock when its holder dies, so a killed pod never blocks the next attempt.
- Files verified once are not hashed again: the sha256 of each verified file is recorded
  with its size and mtime, and a copy whose size and mtime still match is trusted, as
  make and rsync's quick check do. Hashing a 140 GB model on every attempt of every local
  rank would take minutes each time.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from orchestrator.storage.checksum import VERIFIED_RECORD

log = logging.getLogger("orchestrator.storage")

#: How often a process waiting for another's download says so.
WAIT_LOG_SECONDS = 30.0


def lock_path(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.lock")


@contextmanager
def exclusive(dest: Path, what: str) -> Iterator[None]:
    """Hold the download lock of ``dest`` (waiting for another holder, with a log line
    every WAIT_LOG_SECONDS) for the duration of the block."""
    path = lock_path(dest)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        start = time.monotonic()
        said = 0.0
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
            waited = time.monotonic() - start
            if waited >= said:
                log.info("%s: another process is downloading it into %s; waiting (%.0f s)",
                         what, dest, waited)
                said += WAIT_LOG_SECONDS
            time.sleep(0.5)
        if time.monotonic() - start > 1:
            log.info("%s: the other download finished after %.0f s; re-using it", what,
                     time.monotonic() - start)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _stat_key(path: Path) -> list[int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def load_verified(out: Path) -> dict[str, list[object]]:
    try:
        data = json.loads((out / VERIFIED_RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): v for k, v in data.items() if isinstance(v, list)} if isinstance(
        data, dict) else {}


def still_verified(path: Path, digest: str, entry: object) -> bool:
    """Was ``path`` verified to have ``digest`` (sha256, xxh3t or xxh3: compared as values), and
    is it unchanged since (size, mtime)?"""
    key = _stat_key(path)
    return key is not None and isinstance(entry, list) and entry == [digest, *key]


def verified_record(out: Path, files: Mapping[str, str]) -> bytes:
    """The record saying that each ``rel -> digest`` of ``files`` (the digest the file was
    checked with) is verified as it now is on disk under ``out`` (written beside the files
    as VERIFIED_RECORD)."""
    record = {}
    for rel, sha in files.items():
        key = _stat_key(out / rel)
        if key is not None:
            record[rel] = [sha, *key]
    return json.dumps(record, sort_keys=True).encode()
