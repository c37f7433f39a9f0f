"""Storage against a real S3-compatible server (moto over HTTP, from the ``s3`` fixture)."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from orchestrator import storage
from orchestrator.storage import (
    BucketNotFoundError,
    CredentialsError,
    EndpointUnreachableError,
    IntegrityError,
    ManifestError,
    ObjectNotFoundError,
    S3Config,
    S3Store,
)
from tests.seaweedfs import s3_config

pytestmark = pytest.mark.e2e

MiB = 1 << 20


def _config(s3: Any, **over: Any) -> S3Config:
    return s3_config(s3, **over)  # type: ignore[no-any-return]


def _store(s3: Any, **over: Any) -> S3Store:
    return S3Store(s3.bucket, _config(s3, **over), progress=False)


class _Calls:
    """Records S3 API calls made by a client (botocore event hooks), thread-safely."""

    def __init__(self, client: Any) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[str, dict[str, Any]]] = []
        client.meta.events.register("provide-client-params.s3.*", self._hook)

    def _hook(self, params: dict[str, Any], model: Any, **_: Any) -> None:
        with self.lock:
            self.calls.append((model.name, dict(params)))

    def named(self, name: str) -> list[dict[str, Any]]:
        return [p for n, p in self.calls if n == name]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_large_file_multipart_upload_and_ranged_download(s3: Any, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(64 * MiB))
    store = _store(
        s3,
        multipart_threshold=8 * MiB,
        multipart_chunksize=8 * MiB,
        download_part_size=8 * MiB,
    )
    calls = _Calls(store.client)

    info = store.upload_file(src, "models/big.bin")
    assert info.size == 64 * MiB
    assert len(calls.named("UploadPart")) == 8  # 64 MiB in 8 MiB parts
    assert len(calls.named("CompleteMultipartUpload")) == 1
    assert store.head("models/big.bin").sha256 == _sha(src)  # stored as object metadata

    dest = tmp_path / "dl" / "big.bin"
    store.download_file("models/big.bin", dest)
    assert store.stats.requests == 8
    ranges = [p.get("Range") for p in calls.named("GetObject")]
    assert len(ranges) == 8 and all(r and r.startswith("bytes=") for r in ranges)
    assert len(calls.named("HeadObject")) == 2  # ours above and download_file's: none per range
    assert _sha(dest) == _sha(src)
    assert store.stats.peak_buffered <= 2 * 8 * MiB * store.config.download_concurrency
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".kubetune-tmp-")]


def test_dir_round_trip_with_manifest(s3: Any, tmp_path: Path) -> None:
    src = tmp_path / "adapter"
    (src / "nested").mkdir(parents=True)
    (src / "adapter_model.safetensors").write_bytes(os.urandom(3 * MiB + 17))
    (src / "adapter_config.json").write_text('{"r": 16}')
    (src / "nested" / "metadata.json").write_text('{"trial": 7}')
    uri = f"s3://{s3.bucket}/adapters/support/trial-7/"
    opts: dict[str, Any] = {"s3": _config(s3), "progress": False}

    manifest = storage.upload_dir(src, uri, meta={"job": "support-lora"}, **opts)
    assert {f.path for f in manifest.files} == {
        "adapter_model.safetensors",
        "adapter_config.json",
        "nested/metadata.json",
    }
    keys = {o.key for o in storage.list_objects(uri, **opts)}
    assert "adapters/support/trial-7/manifest.json" in keys
    assert "adapters/support/trial-7/checksums.sha256" in keys
    assert storage.read_manifest(uri, **opts).digest == manifest.digest

    dest = tmp_path / "collected"
    got = storage.download_dir(
        uri, dest, require_manifest=True, expected_digest=manifest.digest, **opts
    )
    assert got is not None and got.meta == {"job": "support-lora"}
    for entry in manifest.files:
        assert _sha(dest / entry.path) == entry.sha256
    assert (dest / "manifest.json").read_bytes() == manifest.to_bytes()
    lines = (dest / "checksums.sha256").read_text().splitlines()
    assert f"{manifest.by_path()['nested/metadata.json'].sha256}  nested/metadata.json" in lines

    # A second collect re-uses the verified local copy: no object is fetched again.
    store, _ = storage.open_store(uri, **opts)
    assert isinstance(store, S3Store)
    calls = _Calls(store.client)
    store.download_dir("adapters/support/trial-7", dest, require_manifest=True)
    assert calls.named("GetObject") == [
        {"Bucket": s3.bucket, "Key": "adapters/support/trial-7/manifest.json"}
    ]

    # Tampering with the stored object is caught and names the file.
    store.write_bytes("adapters/support/trial-7/nested/metadata.json", b'{"trial": 8}')
    with pytest.raises(IntegrityError, match=r"nested/metadata.json"):
        store.download_dir("adapters/support/trial-7", tmp_path / "again", require_manifest=True)
    with pytest.raises(IntegrityError, match=r"manifest digest mismatch"):
        storage.download_dir(uri, tmp_path / "x", expected_digest="0" * 64, **opts)

    assert storage.delete_prefix(uri, **opts) == 5
    assert storage.list_objects(uri, **opts) == []
    with pytest.raises(ManifestError, match=r"no manifest.json"):
        storage.download_dir(uri, tmp_path / "y", require_manifest=True, **opts)


def test_fetch_caches_by_checksum(s3: Any, tmp_path: Path) -> None:
    store = _store(s3)
    src = tmp_path / "train.jsonl"
    src.write_text('{"text": "hello"}\n')
    store.upload_file(src, "datasets/train.jsonl")
    opts: dict[str, Any] = {"s3": _config(s3), "progress": False, "cache_dir": tmp_path / "cache"}
    first = storage.fetch(f"s3://{s3.bucket}/datasets/train.jsonl", **opts)
    assert first.read_text() == src.read_text()
    mtime = first.stat().st_mtime_ns
    again = storage.fetch(f"s3://{s3.bucket}/datasets/train.jsonl", **opts)
    assert again == first and again.stat().st_mtime_ns == mtime


def test_text_and_clear_errors(s3: Any, tmp_path: Path) -> None:
    store = _store(s3)
    store.write_text("status/trial-1.json", '{"evalLoss": 1.5}')
    assert store.read_text("status/trial-1.json") == '{"evalLoss": 1.5}'
    assert store.exists("status/trial-1.json")
    assert not store.exists("status/missing.json")

    with pytest.raises(ObjectNotFoundError, match=f"s3://{s3.bucket}/status/missing.json"):
        store.read_text("status/missing.json")
    with pytest.raises(ObjectNotFoundError, match=r"nothing found"):
        store.download_dir("no/such/prefix", tmp_path / "z")

    missing = S3Store("no-such-bucket-kt", _config(s3), progress=False)
    with pytest.raises(BucketNotFoundError, match=r"no-such-bucket-kt"):
        missing.read_text("a.txt")
    with pytest.raises(BucketNotFoundError, match=r"no-such-bucket-kt"):
        missing.head("a.txt")
    assert missing.bucket_exists() is False

    # A closed loopback port: refused at once, reported with the endpoint and the URI.
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dead = S3Store(
        s3.bucket,
        _config(s3, endpoint_url=f"http://127.0.0.1:{port}", max_attempts=1),
        progress=False,
    )
    with pytest.raises(EndpointUnreachableError, match=f"127.0.0.1:{port}.*s3://{s3.bucket}/x"):
        dead.read_text("x")


def test_missing_credentials_is_one_clear_line(
    s3: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    store = S3Store(s3.bucket, S3Config(endpoint_url=s3.endpoint, region=s3.region))
    with pytest.raises(CredentialsError, match=r"no S3 credentials for s3://"):
        store.read_text("anything")


def test_pods_sharing_a_model_cache_download_it_once(
    s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Two pods of a node (here: two threads, each with its own open of the lock file, which
    is what flock tells apart) fetch the same model into one cache volume at once: one
    downloads, the other waits and re-uses it; a later attempt does not hash it again."""
    src = tmp_path / "model"
    src.mkdir()
    for i in range(6):
        (src / f"shard-{i}.bin").write_bytes(os.urandom(3 * MiB + i))
    (src / "config.json").write_text("{}")
    _store(s3).upload_dir(src, "models/tiny")
    uri = f"s3://{s3.bucket}/models/tiny"
    opts: dict[str, Any] = {"s3": _config(s3), "progress": False, "cache_dir": tmp_path / "vol"}

    fetched: list[str] = []
    real = S3Store._download_one

    def counting(self: S3Store, info: Any, *args: Any, **kw: Any) -> None:
        fetched.append(info.key)
        real(self, info, *args, **kw)

    monkeypatch.setattr(S3Store, "_download_one", counting)
    caplog.set_level("INFO", logger="orchestrator.storage")
    results: list[Path] = []
    errors: list[BaseException] = []

    def pod() -> None:
        try:
            results.append(storage.fetch(uri, **opts))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    pods = [threading.Thread(target=pod) for _ in range(2)]
    for t in pods:
        t.start()
    for t in pods:
        t.join(120)
    assert not errors, errors
    assert len(results) == 2 and results[0] == results[1]
    assert sorted(fetched) == sorted(f"models/tiny/{p.name}" for p in src.iterdir())
    for p in src.iterdir():
        assert _sha(results[0] / p.name) == _sha(p)

    # The next attempt trusts the verified copy (same size and mtime): no download, no hash.
    def no_hashing(path: Any) -> str:
        raise AssertionError(f"re-hashed {path}")

    monkeypatch.setattr("orchestrator.storage.checksum.digest_file", no_hashing)
    fetched.clear()
    assert storage.fetch(uri, **opts) == results[0]
    assert fetched == []

    # A cached file changed on the volume is no longer trusted: hashed, found wrong, fetched.
    monkeypatch.undo()
    monkeypatch.setattr(S3Store, "_download_one", counting)
    bad = results[0] / "shard-2.bin"
    bad.write_bytes(b"x" * bad.stat().st_size)
    storage.fetch(uri, **opts)
    assert fetched == ["models/tiny/shard-2.bin"]
    assert _sha(bad) == _sha(src / "shard-2.bin")


@pytest.mark.parametrize("mode", ["when_supported", "when_required"])
def test_uploads_carry_s3_checksums_unless_turned_off(
    s3: Any, tmp_path: Path, mode: str
) -> None:
    """By default every upload sends S3's CRC32 (the server checks the body it receives and
    keeps the checksum); `when_required` is the switch for servers that reject them."""
    import base64
    import zlib

    body = os.urandom(3 * MiB + 17)
    src = tmp_path / "weights.bin"
    src.write_bytes(body)
    store = _store(s3, checksums=mode, multipart_threshold=64 * MiB)
    store.upload_file(src, f"ck/{mode}/weights.bin")
    head = store.client.head_object(
        Bucket=s3.bucket, Key=f"ck/{mode}/weights.bin", ChecksumMode="ENABLED"
    )
    crc = base64.b64encode(zlib.crc32(body).to_bytes(4, "big")).decode()
    if mode == "when_supported":
        assert head.get("ChecksumCRC32") == crc
    else:
        assert "ChecksumCRC32" not in head
    dest = tmp_path / "back.bin"
    store.download_file(f"ck/{mode}/weights.bin", dest)
    assert dest.read_bytes() == body


def test_an_unknown_checksum_mode_names_the_setting(s3: Any) -> None:
    with pytest.raises(ValueError, match="KUBETUNE_S3_CHECKSUMS"):
        _store(s3, checksums="always").client  # noqa: B018


def test_asking_whether_a_prefix_holds_anything_lists_one_page(s3: Any) -> None:
    """The trainer's probe of its data and model URIs: a prefix of many shards is answered by
    one small page, not by listing every shard; folder placeholders are not objects."""
    store = _store(s3)
    for i in range(40):
        store.write_bytes(f"data/shards/part-{i:05d}.parquet", b"x")
    s3.client().put_object(Bucket=s3.bucket, Key="data/empty/", Body=b"")
    calls = _Calls(store.client)

    assert store.has_objects("data/shards")
    assert [p.get("MaxKeys") for p in calls.named("ListObjectsV2")] == [8]
    assert store.has_objects("data/shards/")  # a trailing slash means the same prefix
    assert not store.has_objects("data/empty")  # only a "folder" placeholder
    assert not store.has_objects("data/none")
    assert not store.has_objects("data/shards/part-00001.parquet")  # an object, not a prefix
    assert len(store.list("data/shards")) == 40  # the full listing is unchanged
