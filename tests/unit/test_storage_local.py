"""The local-filesystem store end to end: directories, manifests, verification, caching."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pytest

from orchestrator import storage
from orchestrator.storage import (
    BucketNotFoundError,
    IntegrityError,
    LocalStore,
    Manifest,
    ManifestError,
    ObjectNotFoundError,
    StorageError,
)

pytestmark = pytest.mark.unit


def _tree(root: Path) -> dict[str, bytes]:
    files = {
        "adapter_model.safetensors": os.urandom(300_000),
        "adapter_config.json": b'{"r": 8, "target_modules": ["q_proj", "v_proj"]}',
        "tokenizer/tokenizer.json": b'{"version": "1.0"}',
        "metadata.json": b'{"trainableParamPercent": 0.98}',
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_dir_round_trip_writes_and_verifies_manifest(tmp_path: Path) -> None:
    src = tmp_path / "adapter"
    files = _tree(src)
    remote = f"file://{tmp_path}/bucket/adapters/job-1/"

    manifest = storage.upload_dir(src, remote, meta={"job": "job-1"}, progress=False)

    assert {f.path: f.sha256 for f in manifest.files} == {k: _sha(v) for k, v in files.items()}
    stored = tmp_path / "bucket/adapters/job-1"
    assert (stored / "manifest.json").read_bytes() == manifest.to_bytes()
    assert _sha((stored / "manifest.json").read_bytes()) == manifest.digest
    doc = json.loads((stored / "manifest.json").read_text())
    assert doc["format"] == "kubetune.manifest/v1" and doc["meta"] == {"job": "job-1"}
    assert doc["totalSize"] == sum(len(v) for v in files.values())
    # sha256sum-compatible listing
    lines = (stored / "checksums.sha256").read_text().splitlines()
    assert sorted(lines) == sorted(f"{_sha(v)}  {k}" for k, v in files.items())

    dest = tmp_path / "collected"
    got = storage.download_dir(
        remote, dest, require_manifest=True, expected_digest=manifest.digest, progress=False
    )
    assert got is not None and got.digest == manifest.digest
    for rel, data in files.items():
        assert (dest / rel).read_bytes() == data
    Manifest.from_bytes((dest / "manifest.json").read_bytes()).verify_dir(dest)
    assert not list(dest.rglob(".kubetune-tmp-*"))


def test_tampered_object_is_detected_and_named(tmp_path: Path) -> None:
    src = tmp_path / "adapter"
    _tree(src)
    remote = tmp_path / "remote"
    storage.upload_dir(src, remote, progress=False)
    (remote / "tokenizer" / "tokenizer.json").write_bytes(b'{"version": "2.0"}')

    dest = tmp_path / "dl"
    with pytest.raises(IntegrityError, match=r"checksum mismatch for tokenizer/tokenizer\.json"):
        storage.download_dir(remote, dest, progress=False)
    # The bad copy never lands under its real name.
    assert not (dest / "tokenizer" / "tokenizer.json").exists()
    assert not list(dest.rglob(".kubetune-tmp-*"))

    # A truncated file fails too (size differs), still naming the file.
    (remote / "tokenizer" / "tokenizer.json").write_bytes(b'{"version": "1.0"}')
    (remote / "adapter_model.safetensors").write_bytes(b"short")
    with pytest.raises(IntegrityError, match=r"adapter_model.safetensors"):
        storage.download_dir(remote, tmp_path / "dl2", progress=False)


def test_manifest_digest_pins_the_artifact(tmp_path: Path) -> None:
    src = tmp_path / "a"
    _tree(src)
    m = storage.upload_dir(src, tmp_path / "r", progress=False)
    with pytest.raises(IntegrityError, match=r"manifest digest mismatch"):
        storage.download_dir(tmp_path / "r", tmp_path / "d", expected_digest="0" * 64)
    storage.download_dir(tmp_path / "r", tmp_path / "d", expected_digest=m.digest, progress=False)


def test_cached_files_are_reused_and_corrupt_ones_replaced(tmp_path: Path) -> None:
    src = tmp_path / "a"
    files = _tree(src)
    storage.upload_dir(src, tmp_path / "r", progress=False)
    dest = tmp_path / "cache"
    storage.download_dir(tmp_path / "r", dest, progress=False)
    keep = dest / "adapter_model.safetensors"
    before = keep.stat().st_mtime_ns
    (dest / "metadata.json").write_bytes(b"{}")  # corrupted local copy

    storage.download_dir(tmp_path / "r", dest, progress=False)

    assert keep.stat().st_mtime_ns == before  # verified by sha256, not copied again
    assert (dest / "metadata.json").read_bytes() == files["metadata.json"]


def test_prefix_without_manifest(tmp_path: Path) -> None:
    data = tmp_path / "datasets" / "support"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text('{"text": "a"}\n')
    (data / "eval.jsonl").write_text('{"text": "b"}\n')
    with pytest.raises(ManifestError, match=r"no manifest.json at file://"):
        storage.download_dir(data, tmp_path / "x", require_manifest=True, progress=False)
    assert storage.download_dir(data, tmp_path / "x", progress=False) is None
    assert (tmp_path / "x" / "eval.jsonl").read_text() == '{"text": "b"}\n'
    # fetch() on a local URI is the path itself: no copy.
    assert storage.fetch(f"file://{data}") == data
    with pytest.raises(ObjectNotFoundError, match=r"nothing found"):
        storage.fetch(tmp_path / "missing")


def test_file_ops_list_exists_delete(tmp_path: Path) -> None:
    store, key = storage.open_store(tmp_path / "root", progress=False)
    assert isinstance(store, LocalStore)
    store.write_text(f"{key}/a/status.json", '{"ok": true}')
    store.write_text(f"{key}/a/status.json", '{"ok": false}')  # atomic replace
    assert store.read_text(f"{key}/a/status.json") == '{"ok": false}'
    assert store.exists(f"{key}/a/status.json") and not store.exists(f"{key}/a/nope")
    assert not store.exists(f"{key}/a")  # a directory is not an object
    store.upload_file(__file__, f"{key}/a/b/test.py")
    assert [o.key.removeprefix(key + "/") for o in store.list(f"{key}/a")] == [
        "a/b/test.py",
        "a/status.json",
    ]
    assert [o.size for o in store.list(f"{key}/a/b")] == [Path(__file__).stat().st_size]
    out = store.download_file(f"{key}/a/b/test.py", tmp_path / "copy.py")
    assert out.read_bytes() == Path(__file__).read_bytes()
    assert storage.delete_prefix(tmp_path / "root" / "a") == 2
    assert store.list(f"{key}/a") == []
    with pytest.raises(ObjectNotFoundError, match=f"file://{tmp_path}/root/a/status.json"):
        store.read_text(f"{key}/a/status.json")
    with pytest.raises(StorageError, match=r"refusing to delete the root"):
        storage.delete_prefix("file:///")


def test_download_file_verifies_expected_sha(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"payload")
    with pytest.raises(IntegrityError, match=r"checksum mismatch for f"):
        storage.download_file(tmp_path / "f", tmp_path / "g", expected_sha256="0" * 64)
    assert not (tmp_path / "g").exists()
    storage.download_file(tmp_path / "f", tmp_path / "g", expected_sha256=_sha(b"payload"))
    assert (tmp_path / "g").read_bytes() == b"payload"


def test_unmounted_pvc_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BucketNotFoundError, match=r"pvc://models/ is not mounted"):
        storage.open_store("pvc://models/llama", pvc_root=tmp_path)
    (tmp_path / "models" / "llama").mkdir(parents=True)
    (tmp_path / "models" / "llama" / "config.json").write_text("{}")
    assert storage.fetch("pvc://models/llama", pvc_root=tmp_path) == tmp_path / "models" / "llama"
    assert storage.exists("pvc://models/llama/config.json", pvc_root=tmp_path)


def test_progress_logs_without_tty_and_bar_when_forced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = tmp_path / "a"
    _tree(src)
    with caplog.at_level(logging.INFO, logger="orchestrator.storage"):
        storage.upload_dir(src, tmp_path / "r", progress=False)
    msgs = [r.getMessage() for r in caplog.records]
    assert any("4 file(s)" in m for m in msgs) and any(": done," in m for m in msgs)
    # progress=True draws a rich bar (on stderr) and must not break the transfer.
    storage.download_dir(tmp_path / "r", tmp_path / "d", progress=True)
    assert (tmp_path / "d" / "metadata.json").exists()


def test_malformed_manifest(tmp_path: Path) -> None:
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "manifest.json").write_text('{"format": "kubetune.manifest/v1"}')
    with pytest.raises(ManifestError, match=r"malformed manifest"):
        storage.download_dir(tmp_path / "r", tmp_path / "d")
    evil = {
        "format": "kubetune.manifest/v1",
        "algorithm": "sha256",
        "files": [{"path": "../../etc/passwd", "size": 1, "sha256": "0" * 64}],
    }
    (tmp_path / "r" / "manifest.json").write_text(json.dumps(evil))
    with pytest.raises(ManifestError, match=r"unsafe path"):
        storage.download_dir(tmp_path / "r", tmp_path / "d")
