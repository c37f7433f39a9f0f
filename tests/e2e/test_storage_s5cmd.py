"""Downloads through s5cmd (the trainer image's engine) against SeaweedFS: every file is
verified (xxh3t from the manifest or the object's metadata, else sha256) before it gets its
name, whatever s5cmd could not deliver goes through the Python client, and a server killed
mid-transfer leaves only verified files, with the next call fetching only what is missing.

s5cmd and weed are built from their Go modules into the testbin by tools/build-testbin.sh.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator import storage
from orchestrator.storage import S3Store, StorageError
from orchestrator.storage import s3 as s3_module
from orchestrator.storage import s5cmd as engine
from orchestrator.storage.checksum import VERIFIED_RECORD, Check
from tests.seaweedfs import TESTBIN, SeaweedFS, s3_config, serve, sha256_of
from tests.support import S3Bucket

pytestmark = pytest.mark.e2e

MiB = 1 << 20
BIG_MIB = int(os.environ.get("KUBETUNE_TEST_BIG_MIB", "256"))
S5CMD = TESTBIN / "s5cmd"


@pytest.fixture(scope="module")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    if not os.access(S5CMD, os.X_OK):
        raise RuntimeError("s5cmd not found in the testbin; run `make testbin`")
    yield from serve(tmp_path_factory.mktemp("weed"), "models")


@pytest.fixture(autouse=True)
def _s5cmd_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(engine.BINARY_ENV, str(S5CMD))


@pytest.fixture(autouse=True)
def _server_alive(weed: SeaweedFS) -> Iterator[None]:
    yield
    if weed.process is None or weed.process.poll() is not None:  # a test killed it
        weed.restart()


class _OneAtATime(S3Store):
    """s5cmd with one file and one part in flight: slow enough to be killed mid-way."""

    def _s5cmd_settings(self) -> engine.Settings | None:
        settings = super()._s5cmd_settings()
        assert settings is not None
        settings.workers, settings.concurrency = 1, 1
        return settings


def _store(weed: SeaweedFS, **over: Any) -> S3Store:
    retries = over.pop("retries", 3)
    return S3Store("models", s3_config(weed, **{"engine": "s5cmd", **over}), progress=False,
                   retries=retries)


def _shards(root: Path, n: int, size: int) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        (root / f"shard-{i:03d}.bin").write_bytes(os.urandom(size + i))
    return root


def test_a_directory_comes_through_s5cmd_verified_with_progress(
    weed: SeaweedFS, tmp_path: Path
) -> None:
    src = _shards(tmp_path / "src", 120, 256 * 1024)
    (src / "sub dir").mkdir()
    (src / "sub dir" / "odd*name?.json").write_text('{"a": 1}')  # no wildcard, no quoting bug
    manifest = _store(weed).upload_dir(src, "tiny")
    assert all(e.xxh3t for e in manifest.files)  # downloads verify with xxh3t

    store = _store(weed)
    dest = tmp_path / "dl"
    seen: list[int] = []
    left = store._bulk_download(
        [(e.path, storage.ObjectInfo(f"tiny/{e.path}", e.size, None, e.sha256, xxh3t=e.xxh3t))
         for e in manifest.files],
        dest,
        seen.append,
    )
    assert left == []
    assert store.stats.requests == 0  # not one byte through the Python client
    assert sum(seen) == manifest.total_size  # the bar ends full, never above
    manifest.verify_dir(dest)

    # The public API: a second copy through download_dir, then a no-op re-download.
    dest2 = tmp_path / "dl2"
    got = store.download_dir("tiny", dest2, require_manifest=True, expected_digest=manifest.digest)
    assert got is not None and store.stats.requests == 0
    manifest.verify_dir(dest2)
    assert not [p for p in dest2.rglob("*") if p.name.startswith(".kubetune-tmp-")]
    assert (dest2 / VERIFIED_RECORD).is_file()


def _said(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("s5cmd")]


def test_a_fresh_directory_is_copied_with_one_listing_and_only_its_files_are_kept(
    weed: SeaweedFS, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = _shards(tmp_path / "src", 60, 64 * 1024)
    (src / "sub").mkdir()
    (src / "sub" / "deep.bin").write_bytes(os.urandom(1000))
    manifest = _store(weed).upload_dir(src, "fresh")

    store = _store(weed)
    seen: list[int] = []
    with caplog.at_level(logging.INFO, logger="orchestrator.storage"):
        left = store._bulk_download(
            [(e.path, storage.ObjectInfo(f"fresh/{e.path}", e.size, None, e.sha256,
                                         xxh3t=e.xxh3t))
             for e in manifest.files],
            tmp_path / "a", seen.append, "fresh")
    assert left == [] and store.stats.requests == 0
    manifest.verify_dir(tmp_path / "a")
    assert sum(seen) == manifest.total_size
    assert _said(caplog)[-1].startswith("s5cmd: 61 file(s)")
    assert _said(caplog)[-1].endswith("one listing of the prefix)")
    # the manifest and the checksums file stay out of the copy (s5cmd was told to skip them)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(
        [e.path for e in manifest.files if "/" not in e.path] + ["sub"])

    # Objects beside the manifest's files, listed first, more than 1 % of the download:
    # the copy stops at the first of them and the rest goes object by object, still s5cmd.
    for i in range(5):
        store.client.put_object(Bucket="models", Key=f"fresh/a-extra-{i}.bin",
                                Body=os.urandom(256 * 1024))
    slow = _OneAtATime("models", store.config, progress=False)
    caplog.clear()
    seen.clear()
    with caplog.at_level(logging.INFO, logger="orchestrator.storage"):
        slow.download_dir("fresh", tmp_path / "b", require_manifest=True)
    manifest.verify_dir(tmp_path / "b")
    assert not list((tmp_path / "b").glob("a-extra-*"))  # never placed
    assert slow.stats.requests == 0
    said = _said(caplog)
    assert any("not part of the download" in m for m in said), said
    assert said[-1].startswith("s5cmd: 61 file(s)") and said[-1].endswith("object by object)")
    assert not [p for p in (tmp_path / "b").rglob("*") if p.name.startswith(".kubetune-tmp-")]


def test_keys_that_climb_out_of_the_prefix_are_never_written(
    s3: S3Bucket, tmp_path: Path
) -> None:
    """s5cmd resolves a listed key's path against the directory it copies into: a key
    with ``..`` would land outside it. Such keys are excluded from the whole-prefix copy."""
    store = S3Store(s3.bucket, s3_config(s3, engine="s5cmd"), progress=False)
    manifest = store.upload_dir(_shards(tmp_path / "src", 3, 4096), "m/model")
    hostile = ["m/model/../../escape.bin", "m/model/a/../../../escape2.bin",
               "m/model/sub/../../../../../escape3.bin"]
    for key in hostile:
        store.client.put_object(Bucket=s3.bucket, Key=key, Body=b"evil")
    listed = {o.key for o in store.list("m/model")}
    assert set(hostile) <= listed  # the server keeps them as they are: the test means something
    dest = tmp_path / "x" / "y" / "dl"
    store.download_dir("m/model", dest, require_manifest=True)
    manifest.verify_dir(dest)
    assert store.stats.requests == 0  # the manifest's files came through s5cmd
    assert not list(tmp_path.rglob("escape*"))


def test_a_file_that_does_not_match_is_never_placed(weed: SeaweedFS, tmp_path: Path) -> None:
    store = _store(weed)
    src = _shards(tmp_path / "src", 3, MiB)
    store.upload_dir(src, "swapped")
    # The object changes after its manifest was written (same size, other bytes): s5cmd
    # fetches it, the check refuses it, the Python client fetches it again and refuses it too.
    store.client.put_object(Bucket="models", Key="swapped/shard-001.bin",
                            Body=os.urandom(MiB + 1))
    dest = tmp_path / "dl"
    with pytest.raises(storage.IntegrityError, match=r"checksum mismatch for shard-001\.bin"):
        store.download_dir("swapped", dest, require_manifest=True)
    assert not (dest / "shard-001.bin").exists()
    assert not [p for p in dest.rglob("*") if p.name.startswith(".kubetune-tmp-s5cmd")]

    # A wrong digest given by the caller wins over the object's own metadata.
    with pytest.raises(storage.IntegrityError, match="expected sha256 0000"):
        store.download_file("swapped/shard-000.bin", tmp_path / "one" / "f.bin",
                            expected_sha256="0" * 64)
    assert list((tmp_path / "one").iterdir()) == []


def test_hostile_keys_reach_s5cmd_intact(weed: SeaweedFS, tmp_path: Path) -> None:
    store = _store(weed)
    names = ["it's.txt", 'say "hi".txt', "back\\slash.txt", "$HOME.txt", "a #b.txt",
             "-rf.txt", "line\u2028sep.txt", "tab\tname.txt"]
    for i, name in enumerate(names):
        store.client.put_object(Bucket="models", Key=f"hostile/{name}", Body=f"{i}".encode())
    dest = tmp_path / "dl"
    items = [engine.Item(f"hostile/{name}", len(f"{i}"), None, dest / f"f{i}", name)
             for i, name in enumerate(names)]
    settings = store._s5cmd_settings()
    assert settings is not None
    assert engine.download(items, tmp_path / "stage", settings, lambda n: None) == []
    for i, _ in enumerate(names):  # each key fetched as itself, placed only where we said
        assert (dest / f"f{i}").read_bytes() == f"{i}".encode()
    assert list((tmp_path / "stage").iterdir()) == []  # the staging directory is gone


def test_keys_s5cmd_cannot_take_go_through_the_python_client(
    weed: SeaweedFS, tmp_path: Path
) -> None:
    store = _store(weed)
    store.client.put_object(Bucket="models", Key="odd/line\nbreak.txt", Body=b"one")
    store.client.put_object(Bucket="models", Key="odd/plain.txt", Body=b"two")
    dest = tmp_path / "dl"
    store.download_dir("odd", dest)
    assert (dest / "line\nbreak.txt").read_bytes() == b"one"
    assert (dest / "plain.txt").read_bytes() == b"two"
    assert store.stats.requests == 1  # only the key with a newline went through Python


def test_large_file_download_survives_a_server_kill(weed: SeaweedFS, tmp_path: Path) -> None:
    src = tmp_path / "model.safetensors"
    with open(src, "wb") as f:
        for _ in range(BIG_MIB):
            f.write(os.urandom(MiB))
    digest = sha256_of(src)
    info = _store(weed).upload_file(src, "llama/model.safetensors")
    assert info.xxh3t is not None
    dest = tmp_path / "dl" / "model.safetensors"

    killer = threading.Thread(target=_kill_when_written, args=(weed, dest.parent, 32 * MiB))
    killer.start()
    # One attempt of everything: s5cmd gives up, the Python client finds the server down.
    slow = _OneAtATime("models", _store(
        weed, max_attempts=1, multipart_chunksize=8 * MiB).config, progress=False, retries=1)
    with pytest.raises(StorageError):
        slow.download_file("llama/model.safetensors", dest)
    killer.join()
    assert not dest.exists()  # nothing unverified under the real name
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".kubetune-tmp-s5cmd")]

    weed.restart()
    store = _store(weed)
    store.download_file("llama/model.safetensors", dest)
    assert sha256_of(dest) == digest
    assert store.stats.requests == 0  # s5cmd fetched it this time
    assert [p.name for p in dest.parent.iterdir() if not p.name.startswith(".kubetune-tmp-")] \
        == ["model.safetensors"]


def test_directory_download_survives_a_server_kill_and_fetches_only_what_is_missing(
    weed: SeaweedFS, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    src = _shards(tmp_path / "src", 200, 512 * 1024)
    manifest = _store(weed).upload_dir(src, "shards")
    names = {e.path for e in manifest.files}
    dest = tmp_path / "dl"

    # Killed as the 40th file is verified, while s5cmd (one file at a time) is on the next.
    verified = 0
    forget = s3_module._forget_partial

    def count_and_kill(item: engine.Item) -> None:
        nonlocal verified
        forget(item)
        verified += 1
        if verified == 40:
            weed.kill()

    monkeypatch.setattr(s3_module, "_forget_partial", count_and_kill)
    slow = _OneAtATime("models", _store(weed, max_attempts=1).config, progress=False,
                        retries=1)
    with pytest.raises(StorageError):
        slow.download_dir("shards", dest, require_manifest=True)
    monkeypatch.setattr(s3_module, "_forget_partial", forget)
    placed = {p.name for p in dest.iterdir() if not p.name.startswith(".kubetune-tmp-")}
    assert 40 <= len(placed) < 200
    for name in placed:  # whatever got its name is whole and verified
        assert name in names
        assert sha256_of(dest / name) == manifest.by_path()[name].sha256

    weed.restart()
    store = _store(weed)
    with caplog.at_level(logging.INFO, logger="orchestrator.storage"):
        store.download_dir("shards", dest, require_manifest=True, expected_digest=manifest.digest)
    manifest.verify_dir(dest)
    assert store.stats.requests == 0
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("s5cmd:")]
    assert said and said[-1].startswith(f"s5cmd: {200 - len(placed)} file(s)")


def _kill_when_written(weed: SeaweedFS, where: Path, nbytes: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        written = 0
        for p in where.rglob("*") if where.exists() else []:
            with contextlib.suppress(OSError):
                written += p.stat().st_blocks * 512
        if written >= nbytes:
            break
        time.sleep(0.01)
    weed.kill()


def test_engine_setting_is_checked_and_a_missing_binary_falls_back(
    weed: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with pytest.raises(ValueError, match=r"KUBETUNE_S3_ENGINE / S3Config\.engine: 'go'"):
        _store(weed, engine="go")
    monkeypatch.setenv(engine.BINARY_ENV, str(tmp_path / "no-such-s5cmd"))
    store = _store(weed)
    store.client.put_object(Bucket="models", Key="fallback/a.txt", Body=b"a")
    with caplog.at_level(logging.WARNING, logger="orchestrator.storage"):
        store.download_dir("fallback", tmp_path / "dl")
        store.download_dir("fallback", tmp_path / "dl2")
    assert (tmp_path / "dl" / "a.txt").read_bytes() == b"a"
    warnings = [r.getMessage() for r in caplog.records if "no s5cmd binary" in r.getMessage()]
    assert len(warnings) == 1  # said once per store, not per download


def test_check_prefers_xxh3t_then_xxh3_then_sha256(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"kubetune")
    sha = hashlib.sha256(b"kubetune").hexdigest()
    assert Check.of(sha, None) == Check("sha256", sha)
    assert Check.of(None, None) is None
    fast = Check.of(sha, "0" * 32)
    assert fast is not None and fast.algorithm == "xxh3" and not fast.matches_file(f)
    assert Check.of(sha, "0" * 32, "1" * 32) == Check("xxh3t", "1" * 32)
    assert Check("sha256", sha).matches_file(f)


def test_a_manifest_of_an_older_upload_still_verifies_by_its_xxh3(
    weed: SeaweedFS, tmp_path: Path
) -> None:
    """Manifests written before xxh3t carry the whole file's xxh3: still the check used."""
    import xxhash

    src = _shards(tmp_path / "src", 4, 300 * 1024)
    store = _store(weed)
    manifest = store.upload_dir(src, "older")
    old = storage.Manifest(files=[
        storage.FileEntry(e.path, e.size, e.sha256,
                          xxh3=xxhash.xxh3_128((src / e.path).read_bytes()).hexdigest())
        for e in manifest.files])
    store.client.put_object(Bucket="models", Key="older/manifest.json", Body=old.to_bytes())
    assert b'"xxh3t"' not in old.to_bytes()
    dest = tmp_path / "dl"
    store.download_dir("older", dest, require_manifest=True)
    old.verify_dir(dest)
    assert all(e.check.algorithm == "xxh3" for e in old.files)
    # and a wrong one is refused, as before
    bad = storage.Manifest(files=[dataclasses.replace(old.files[0], xxh3="0" * 32)])
    store.client.put_object(Bucket="models", Key="older/manifest.json", Body=bad.to_bytes())
    with pytest.raises(storage.IntegrityError, match="expected xxh3 0000"):
        store.download_dir("older", tmp_path / "dl2", require_manifest=True)
