"""What a user sees when storage fails: the trainer's exit code and termination message
(reason and message, which `kubectl get ftj` / `kubectl describe` show). Missing buckets are
permanent and fail before any training; an overloaded store (503 SlowDown) and a full
workspace volume exit 74 so the controller retries the attempt."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import storage
from orchestrator.trainer.errors import ExitCode
from tests.s3_stub import error_server
from tests.support import S3Bucket
from tests.trainer import helpers

pytestmark = pytest.mark.trainer


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    return helpers.build_model(tmp_path_factory.mktemp("model") / "llama", "llama", tokenizer_dir)


def _run(tmp: Path, cfg: Path, env: dict[str, str], limit: int | None = None) -> tuple[
        subprocess.CompletedProcess[str], dict[str, object]]:
    def limited() -> None:  # a real EFBIG for every file that grows past `limit` bytes
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # type: ignore[arg-type]

    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.trainer", "--config", str(cfg)], cwd=helpers.REPO,
        env={**env, "PYTHONDONTWRITEBYTECODE": "1"}, capture_output=True, text=True,
        timeout=300, preexec_fn=limited if limit else None)
    return proc, helpers.termination(tmp)


def test_missing_data_bucket_is_permanent(tmp_path: Path, tiny_llama: Path, data_dir: Path,
                                          s3: S3Bucket) -> None:
    cfg = helpers.trainer_config(tmp_path / "c.json", job="no-bucket", model_dir=tiny_llama,
                                 data_dir=data_dir, output=f"file://{tmp_path}/out",
                                 data={"train": "s3://no-such-bucket-kt/train.jsonl"})
    proc, msg = _run(tmp_path, cfg, helpers.trainer_env(tmp_path, s3.env()))
    assert proc.returncode == ExitCode.DATA, proc.stderr[-3000:]
    assert msg["reason"] == "StorageNotFound" and msg["status"] == "Failed"
    assert msg["message"].startswith(  # type: ignore[union-attr]
        "cannot read data s3://no-such-bucket-kt/train.jsonl: bucket 'no-such-bucket-kt' does "
        f"not exist at {s3.endpoint}"), msg
    assert "fix spec.data or upload the data there first" in msg["message"]  # type: ignore


def test_missing_output_bucket_fails_before_training(tmp_path: Path, tiny_llama: Path,
                                                     data_dir: Path, s3: S3Bucket) -> None:
    cfg = helpers.trainer_config(tmp_path / "c.json", job="no-out", model_dir=tiny_llama,
                                 data_dir=data_dir, output="s3://no-such-output-kt/adapters")
    proc, msg = _run(tmp_path, cfg, helpers.trainer_env(tmp_path, s3.env()))
    assert proc.returncode == ExitCode.OUTPUT, proc.stderr[-3000:]
    assert msg["reason"] == "StorageNotFound"
    assert "cannot use the output location s3://no-such-output-kt/adapters/no-out/" in str(
        msg["message"])
    assert "fix spec.output.uri" in str(msg["message"])
    assert "budget plan" not in proc.stderr  # failed before the model was even read


def test_slowdown_exits_74_after_bounded_retries(tmp_path: Path, data_dir: Path) -> None:
    with error_server(503, "SlowDown") as server:
        cfg = helpers.trainer_config(tmp_path / "c.json", job="slow", data_dir=data_dir,
                                     model_dir="s3://models/tiny-llama",
                                     output=f"file://{tmp_path}/out")
        env = helpers.trainer_env(tmp_path, {"KUBETUNE_S3_ENDPOINT": server.endpoint,
                                             "AWS_ACCESS_KEY_ID": "a",
                                             "AWS_SECRET_ACCESS_KEY": "b"})
        proc, msg = _run(tmp_path, cfg, env)
    assert proc.returncode == ExitCode.STORAGE, proc.stderr[-3000:]
    assert msg["reason"] == "StorageUnavailable"
    assert "(SlowDown: Please reduce your request rate.)" in str(msg["message"])
    assert "transient: the attempt is retried" in str(msg["message"])
    # The probe: one request per try (botocore), three whole tries (the store), no more.
    assert len(server.requests) == 3, server.requests


def test_full_workspace_exits_74_naming_the_volume(tmp_path: Path, tiny_llama: Path,
                                                   data_dir: Path, s3: S3Bucket) -> None:
    cfg_s3 = storage.S3Config(endpoint_url=s3.endpoint, region=s3.region,
                              access_key_id=s3.access_key, secret_access_key=s3.secret_key)
    storage.upload_dir(tiny_llama, f"s3://{s3.bucket}/models/tiny-llama", s3=cfg_s3,
                       progress=False)
    biggest = max(p.stat().st_size for p in tiny_llama.iterdir())
    assert biggest > 64 * 1024
    cfg = helpers.trainer_config(tmp_path / "c.json", job="full", data_dir=data_dir,
                                 model_dir=f"s3://{s3.bucket}/models/tiny-llama",
                                 output=f"file://{tmp_path}/out")
    proc, msg = _run(tmp_path, cfg, helpers.trainer_env(tmp_path, s3.env()), limit=64 * 1024)
    assert proc.returncode == ExitCode.STORAGE, proc.stderr[-3000:]
    assert msg["reason"] == "WorkspaceFull"
    text = str(msg["message"])
    assert text.startswith(f"base model s3://{s3.bucket}/models/tiny-llama is unavailable: "), text
    assert "File too large" in text
    assert f"the disk holding the workspace {tmp_path / 'work'} (KUBETUNE_WORKDIR)" in text
