"""xxh3t: the xxh3-128 of the xxh3-128 digests of a file's 64 MiB windows. Fed in pieces of
any size (uploads, the Python download path) or hashed window by window in parallel
(verification), it is the same value, and it is exactly its definition."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import xxhash

from orchestrator.storage import checksum

WINDOW = 64 * 1024  # small windows (a multiple of mmap's granularity) keep the test quick


@pytest.fixture(autouse=True)
def _small_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checksum, "_WINDOW", WINDOW)


def _definition(data: bytes) -> str:
    outer = xxhash.xxh3_128()
    for start in range(0, len(data), WINDOW):
        outer.update(xxhash.xxh3_128(data[start:start + WINDOW]).digest())
    return str(outer.hexdigest())


@pytest.mark.parametrize("size", [0, 1, WINDOW - 1, WINDOW, WINDOW + 1, 5 * WINDOW + 12345])
def test_streamed_parallel_and_defined_values_agree(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    f = tmp_path / "f"
    f.write_bytes(data)
    streamed = checksum.WindowedXXH3()
    for start in range(0, size, 7777):  # pieces that straddle window edges
        streamed.update(data[start:start + 7777])
    expected = _definition(data)
    assert streamed.hexdigest() == expected
    assert checksum.digest_file(f, checksum.XXH3T) == expected  # windows in parallel
    sha, fast = checksum.hash_file(f)  # an upload's one pass: sha256 and xxh3t
    assert fast == expected and checksum.Check.of(sha, None, fast).matches_file(f)


def test_a_changed_byte_in_any_window_is_caught(tmp_path: Path) -> None:
    data = bytearray(os.urandom(3 * WINDOW))
    f = tmp_path / "f"
    f.write_bytes(data)
    good = checksum.Check(checksum.XXH3T, checksum.digest_file(f, checksum.XXH3T))
    for offset in (0, WINDOW + 5, 3 * WINDOW - 1):
        changed = bytearray(data)
        changed[offset] ^= 1
        f.write_bytes(changed)
        assert not good.matches_file(f)
    # and it is not the whole file's xxh3 (an older manifest's value never passes for it)
    assert good.value != xxhash.xxh3_128(bytes(data)).hexdigest()
