from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.storage import InvalidURIError, StorageURI, parse_uri

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("text", "scheme", "bucket", "key"),
    [
        ("s3://adapters/support/", "s3", "adapters", "support"),
        ("s3://adapters/support/support-lora/", "s3", "adapters", "support/support-lora"),
        ("s3://models", "s3", "models", ""),
        ("file:///data/x/train.jsonl", "file", "", "data/x/train.jsonl"),
        ("file://localhost/tmp/a", "file", "", "tmp/a"),
        ("/abs/path/", "file", "", "abs/path"),
        ("pvc://shared-data/models/llama", "pvc", "shared-data", "models/llama"),
        ("s3://b-1/a%20b/c", "s3", "b-1", "a b/c"),
    ],
)
def test_parse(text: str, scheme: str, bucket: str, key: str) -> None:
    assert parse_uri(text) == StorageURI(scheme, bucket, key)  # type: ignore[arg-type]


def test_relative_path_is_absolute_file_uri(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    u = parse_uri("out/adapter")
    assert u.scheme == "file"
    assert u.local_path() == tmp_path / "out" / "adapter"
    assert str(u) == f"file://{tmp_path}/out/adapter"


def test_round_trip_join_and_pvc_root(monkeypatch: pytest.MonkeyPatch) -> None:
    u = parse_uri("s3://adapters/support/")
    assert str(u) == "s3://adapters/support"
    assert str(u.join("job-1", "manifest.json")) == "s3://adapters/support/job-1/manifest.json"
    assert u.join("x").parent == u
    assert parse_uri(str(u)) == u
    p = parse_uri("pvc://claim/models/m1")
    assert p.local_path() == Path("/mnt/pvc/claim/models/m1")
    assert p.local_path("/mounts") == Path("/mounts/claim/models/m1")
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", "/elsewhere")
    assert p.local_path() == Path("/elsewhere/claim/models/m1")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("hf://org/model", "unsupported storage scheme 'hf://'"),
        ("s3:///key", "needs a bucket name"),
        ("s3://Bad_Bucket/x", "invalid bucket name 'Bad_Bucket'"),
        ("pvc://UPPER/x", "invalid claim name"),
        ("file://host/x", "must be absolute"),
        ("s3://bucket/a/../../etc", "'..' is not allowed"),
        ("s3://bucket/a?x=1", "query"),
        ("", "empty"),
    ],
)
def test_invalid(text: str, message: str) -> None:
    with pytest.raises(InvalidURIError, match=message) as err:
        parse_uri(text)
    assert "\n" not in str(err.value)


def test_join_rejects_escape() -> None:
    with pytest.raises(InvalidURIError):
        parse_uri("s3://b/prefix").join("../other")
