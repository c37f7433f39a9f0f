"""The ranged download engine on its own: hashing in file order while ranges finish out of
order, the memory bound, and resuming from the journal of finished ranges."""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from pathlib import Path

import pytest

from orchestrator.storage import StorageError
from orchestrator.storage.transfer import (
    Budget,
    TransferStats,
    journal_path,
    ranged_download,
)

pytestmark = pytest.mark.unit

KiB = 1 << 10


class _Source:
    """An in-memory object whose ranges arrive after random delays (out of order)."""

    def __init__(self, data: bytes, fail_after: int | None = None) -> None:
        self.data = data
        self.fail_after = fail_after
        self.calls: list[tuple[int, int]] = []
        self.lock = threading.Lock()

    def __call__(self, start: int, end: int) -> bytes:
        with self.lock:
            if self.fail_after is not None and len(self.calls) >= self.fail_after:
                raise ConnectionError("server went away")
            self.calls.append((start, end))
        time.sleep(random.random() * 0.01)
        return self.data[start:end]


def _identity(data: bytes) -> dict[str, object]:
    return {"key": "k", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_hash_in_file_order_and_memory_bound(tmp_path: Path) -> None:
    data = os.urandom(1000 * KiB + 7)  # 63 ranges of 16 KiB, the last one short
    src, stats, seen = _Source(data), TransferStats(), []
    digest = ranged_download(
        src,
        len(data),
        tmp_path / "part",
        part_size=16 * KiB,
        concurrency=4,
        callback=seen.append,
        algorithm="sha256",
        stats=stats,
    )
    assert digest == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "part").read_bytes() == data
    assert sum(seen) == len(data) and stats.requests == 63
    assert 0 < stats.peak_buffered <= 2 * 16 * KiB * 4


def test_shared_budget_bounds_concurrent_files(tmp_path: Path) -> None:
    stats = TransferStats()
    budget = Budget(4, stats)
    files = [os.urandom(200 * KiB + i) for i in range(6)]

    def one(i: int) -> None:
        got = ranged_download(
            _Source(files[i]),
            len(files[i]),
            tmp_path / f"f{i}",
            part_size=16 * KiB,
            concurrency=2,
            callback=lambda n: None,
            algorithm="sha256",
            stats=stats,
            budget=budget,
        )
        assert got == hashlib.sha256(files[i]).hexdigest()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert stats.peak_buffered <= 4 * 16 * KiB  # six files at once, one budget


def test_resume_fetches_only_missing_ranges(tmp_path: Path) -> None:
    data = os.urandom(256 * KiB)
    partial = tmp_path / ".kubetune-tmp-partial-f"
    failing = _Source(data, fail_after=5)
    with pytest.raises(ConnectionError):
        ranged_download(
            failing,
            len(data),
            partial,
            part_size=16 * KiB,
            concurrency=2,
            callback=lambda n: None,
            algorithm="sha256",
            identity=_identity(data),
        )
    done = json.loads(journal_path(partial).read_text())["done"]
    assert 1 <= len(done) <= 5

    again, stats = _Source(data), TransferStats()
    digest = ranged_download(
        again,
        len(data),
        partial,
        part_size=16 * KiB,
        concurrency=2,
        callback=lambda n: None,
        algorithm="sha256",
        identity=_identity(data),
        stats=stats,
    )
    assert digest == hashlib.sha256(data).hexdigest()
    assert partial.read_bytes() == data
    assert len(again.calls) == 16 - len(done)
    assert stats.bytes_resumed == len(done) * 16 * KiB


def test_journal_of_another_object_version_is_ignored(tmp_path: Path) -> None:
    old, new = os.urandom(64 * KiB), os.urandom(64 * KiB)
    partial = tmp_path / ".kubetune-tmp-partial-f"
    with pytest.raises(ConnectionError):
        ranged_download(
            _Source(old, fail_after=2),
            len(old),
            partial,
            part_size=16 * KiB,
            concurrency=1,
            callback=lambda n: None,
            algorithm="sha256",
            identity=_identity(old),
        )
    src = _Source(new)
    digest = ranged_download(
        src,
        len(new),
        partial,
        part_size=16 * KiB,
        concurrency=2,
        callback=lambda n: None,
        algorithm="sha256",
        identity=_identity(new),
    )
    assert digest == hashlib.sha256(new).hexdigest() and len(src.calls) == 4


def test_short_answer_is_an_error(tmp_path: Path) -> None:
    def short(start: int, end: int) -> bytes:
        return b"x" * (end - start - 1)

    with pytest.raises(StorageError, match=r"s3://b/k: expected 16384 bytes, the server sent"):
        ranged_download(
            short,
            64 * KiB,
            tmp_path / "p",
            part_size=16 * KiB,
            concurrency=2,
            callback=lambda n: None,
            algorithm="sha256",
            what="s3://b/k",
        )
