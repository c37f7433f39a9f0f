"""S3 settings and failure handling that need no S3 server."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from orchestrator.storage import (
    EndpointUnreachableError,
    LocalStore,
    S3Config,
    S3Store,
    StorageError,
    open_store,
)

pytestmark = pytest.mark.unit


def test_endpoint_and_region_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("KUBETUNE_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    assert S3Config().resolved_endpoint() is None
    assert S3Config().resolved_region() == "us-east-1"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:9000")
    assert S3Config().resolved_endpoint() == "http://generic:9000"
    monkeypatch.setenv("KUBETUNE_S3_ENDPOINT", "http://s3.storage:8333")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    assert S3Config().resolved_endpoint() == "http://s3.storage:8333"
    assert S3Config(endpoint_url="http://explicit:1").resolved_endpoint() == "http://explicit:1"
    store, key = open_store(
        "s3://adapters/support/job-1/", s3=S3Config(access_key_id="a", secret_access_key="b")
    )
    assert isinstance(store, S3Store) and key == "support/job-1"
    assert store.client.meta.endpoint_url == "http://s3.storage:8333"
    assert store.client.meta.region_name == "eu-west-1"
    assert store.client.meta.config.s3["addressing_style"] == "path"
    assert store.uri(key) == "s3://adapters/support/job-1"


def test_unreachable_endpoint_names_endpoint_and_uri() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = S3Store(
        "models",
        S3Config(
            endpoint_url=f"http://127.0.0.1:{port}",
            access_key_id="a",
            secret_access_key="b",
            max_attempts=1,
        ),
        progress=False,
    )
    with pytest.raises(EndpointUnreachableError) as err:
        store.read_text("llama/config.json")
    msg = str(err.value)
    assert f"http://127.0.0.1:{port}" in msg and "s3://models/llama/config.json" in msg
    assert "\n" not in msg


class _Flaky(LocalStore):
    """Fails the first ``fail`` whole-file uploads mid-way with a transient error."""

    def __init__(self, root: Path, fail: int) -> None:
        super().__init__(root, progress=False)
        self.retries, self.backoff, self.fail = 3, 0.0, fail

    def _is_transient(self, exc: BaseException) -> bool:
        return isinstance(exc, ConnectionResetError)

    def _put_file(self, local, key, callback, digests):  # type: ignore[no-untyped-def]
        if self.fail:
            self.fail -= 1
            callback(10)  # some bytes went out before the connection dropped
            raise ConnectionResetError("connection reset by peer")
        super()._put_file(local, key, callback, digests)


def test_whole_file_retry_with_honest_progress(tmp_path: Path) -> None:
    src = tmp_path / "f.bin"
    src.write_bytes(b"x" * 1000)
    store = _Flaky(tmp_path / "root", fail=2)
    seen: list[int] = []
    store._upload_one(src, "a/f.bin", seen.append, None)
    assert (tmp_path / "root" / "a" / "f.bin").read_bytes() == src.read_bytes()
    assert sum(seen) == 1000  # the bytes of failed attempts were taken back

    store = _Flaky(tmp_path / "root", fail=5)
    with pytest.raises(StorageError, match=r"file:///.*a/g\.bin"):
        store._upload_one(src, "a/g.bin", seen.append, None)


def test_credentials_never_appear_in_a_repr() -> None:
    """Configs end up in log lines and tracebacks: the secret parts stay out."""
    from orchestrator.controller.settings import ControllerSettings

    config = S3Config(access_key_id="AKIAEXAMPLE", secret_access_key="s3cr3t-value",
                      session_token="t0ken-value")
    assert "s3cr3t-value" not in repr(config) and "t0ken-value" not in repr(config)
    assert "AKIAEXAMPLE" in repr(config)  # the key id says which credentials, harmlessly
    settings = ControllerSettings(study_storage="postgresql://kt:hunter2@db:5432/optuna")
    assert "hunter2" not in repr(settings)
