"""Storage faults against real servers: moto's S3 server for a missing bucket and a real
download, a stub answering 503 SlowDown for an overloaded store, and a real file-size limit
(RLIMIT_FSIZE: the kernel's EFBIG, as a full volume's ENOSPC) for a full workspace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from orchestrator.storage import (
    BucketNotFoundError,
    Fault,
    S3Config,
    S3Store,
    StorageUnavailableError,
)
from tests.s3_stub import error_server

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def _config(s3: Any, **over: Any) -> S3Config:
    return S3Config(**{"endpoint_url": s3.endpoint, "region": s3.region,
                       "access_key_id": s3.access_key, "secret_access_key": s3.secret_key,
                       **over})


def test_missing_bucket_is_permanent_and_not_retried(s3: Any) -> None:
    calls: list[str] = []
    store = S3Store("no-such-bucket-kt", _config(s3), progress=False, backoff=5.0)
    store.client.meta.events.register("before-call.s3.*",
                                      lambda model, **_: calls.append(model.name))
    t0 = time.monotonic()
    with pytest.raises(BucketNotFoundError) as err:
        store.read_text("data/train.jsonl")
    assert time.monotonic() - t0 < 5  # no backoff: never retried
    assert err.value.fault is Fault.NOT_FOUND and err.value.permanent
    assert str(err.value) == (f"bucket 'no-such-bucket-kt' does not exist at {s3.endpoint} "
                              "(s3://no-such-bucket-kt/data/train.jsonl)")
    assert calls == ["GetObject"]  # one request: NoSuchBucket says it all


def test_slowdown_is_transient_after_bounded_retries() -> None:
    with error_server(503, "SlowDown") as server:
        store = S3Store("models", S3Config(endpoint_url=server.endpoint, access_key_id="a",
                                           secret_access_key="b", max_attempts=3),
                        progress=False, retries=2, backoff=0.01)
        with pytest.raises(StorageUnavailableError) as err:
            store.read_text("llama/config.json")
    # botocore's 3 attempts per request, times the store's 2 whole-operation attempts.
    assert len(server.requests) == 6, server.requests
    assert err.value.fault is Fault.UNAVAILABLE and not err.value.permanent
    assert f"S3 endpoint {server.endpoint} is unavailable for s3://models/llama/config.json " \
           "(SlowDown: Please reduce your request rate.) after 6 attempts" in str(err.value)


_FULL_DISK = """
import json, sys
from orchestrator import storage
from orchestrator.storage import S3Config
cfg = S3Config(**json.loads(sys.argv[1]))
try:
    storage.fetch(sys.argv[2], cache_dir=sys.argv[3], s3=cfg, progress=False)
except storage.StorageError as exc:
    print(json.dumps({"type": type(exc).__name__, "fault": str(exc.fault),
                      "errno": getattr(exc, "errno", None), "message": str(exc)}))
"""


def _limited(limit: int) -> None:
    """In the child: files may grow to ``limit`` bytes; a bigger write fails with EFBIG
    (SIGXFSZ ignored, as a full disk's ENOSPC fails the write and nothing else)."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_full_workspace_is_a_local_disk_fault(s3: Any, tmp_path: Path) -> None:
    s3.client().put_object(Bucket=s3.bucket, Key="models/tiny/model.safetensors",
                           Body=os.urandom(1 << 20))
    cfg = {"endpoint_url": s3.endpoint, "region": s3.region, "access_key_id": s3.access_key,
           "secret_access_key": s3.secret_key}
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, json.dumps(cfg), f"s3://{s3.bucket}/models/tiny",
         str(tmp_path / "cache")],
        env=env, capture_output=True, text=True, timeout=120,
        preexec_fn=lambda: _limited(64 * 1024))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["type"] == "LocalDiskError" and out["fault"] == "LocalDisk", out
    assert out["errno"] == 27  # EFBIG
    assert "local write failed: File too large" in out["message"], out
