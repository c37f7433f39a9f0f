"""Unreachable or invalid inputs fail within seconds with a precise message and exit code."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from orchestrator.trainer.errors import ExitCode
from tests.trainer import helpers

pytestmark = pytest.mark.trainer


def _closed_port() -> int:
    return helpers._free_port()  # bound then released: nothing listens there


# An unreachable endpoint may come back (exit 74, retried); a missing model will not.
CASES = [
    ("s3://models/tiny-llama", 74, "StorageUnavailable",
     r"base model s3://models/tiny-llama is unavailable: cannot reach "
     r"S3 endpoint http://127\.0\.0\.1:\d+"),
    ("file:///nonexistent/model", 66, "StorageNotFound",
     r"base model file:///nonexistent/model is unavailable: "
     r"nothing found at file:///nonexistent/model; fix spec\.model\.uri"),
    ("hf://org/does-not-exist", 66, "ModelUnavailable",
     r"cannot fetch hf://org/does-not-exist from the Hugging Face Hub \(HF_HUB_OFFLINE is set\)"),
]


@pytest.mark.parametrize(("uri", "code", "reason", "pattern"), CASES,
                         ids=["s3-unreachable", "file-missing", "hf-offline"])
def test_unreachable_model_fails_fast(tmp_path: Path, data_dir: Path, uri: str, code: int,
                                      reason: str, pattern: str) -> None:
    import re

    cfg = helpers.trainer_config(tmp_path / "c.json", job="no-model", model_dir=uri,
                                 data_dir=data_dir, output=f"file://{tmp_path}/out")
    env = helpers.trainer_env(tmp_path, {
        "KUBETUNE_S3_ENDPOINT": f"http://127.0.0.1:{_closed_port()}",
        "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"})
    t0 = time.monotonic()
    proc = helpers.run_trainer(cfg, tmp_path, env=env)
    elapsed = time.monotonic() - t0
    assert proc.returncode == code, proc.stderr[-3000:]
    assert elapsed < 30, elapsed
    msg = helpers.termination(tmp_path)
    assert msg["reason"] == reason and msg["exitCode"] == code
    assert re.search(pattern, msg["message"]), msg["message"]


def test_invalid_config_exit_code(tmp_path: Path) -> None:
    bad = tmp_path / "c.json"
    bad.write_text('{"jobName": "x", "spec": {"model": {"uri": "ftp://nope"}}}')
    proc = helpers.run_trainer(bad, tmp_path)
    assert proc.returncode == ExitCode.CONFIG, proc.stderr[-2000:]
    msg = helpers.termination(tmp_path)
    assert msg["reason"] == "InvalidConfig"
    assert "spec.model.uri" in msg["message"] and "spec.data" in msg["message"]


def test_termination_message_stays_under_4k() -> None:
    from orchestrator.trainer.artifact import MAX_TERMINATION_BYTES, termination_message

    raw = termination_message(ExitCode.DATA, "x" * 10_000, metrics={"evalLoss": 1.0})
    assert len(raw) <= MAX_TERMINATION_BYTES
    import json

    doc = json.loads(raw)
    assert doc["exitCode"] == 65 and doc["metrics"] == {"evalLoss": 1.0}


def test_gpu_job_without_visible_gpus_refuses_to_train_on_cpu(
    tmp_path: Path, tiny_models: dict[str, Path], data_dir: Path
) -> None:
    import json

    cfg = helpers.trainer_config(tmp_path / "c.json", job="no-gpu", model_dir=tiny_models["llama"],
                                 data_dir=data_dir, output=f"file://{tmp_path}/out")
    doc = json.loads(cfg.read_text())
    doc["spec"]["distributed"]["gpusPerNode"] = 1  # what the pod holds; this machine has none
    cfg.write_text(json.dumps(doc))
    proc = helpers.run_trainer(cfg, tmp_path)
    assert proc.returncode == ExitCode.CONFIG, proc.stderr[-2000:]
    msg = helpers.termination(tmp_path)
    assert msg["exitCode"] == ExitCode.CONFIG
    assert "distributed.gpusPerNode is 1" in msg["message"]
    assert "sees 0 CUDA device(s)" in msg["message"]
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


ENTRYPOINT = helpers.REPO / "trainer_image" / "entrypoint.sh"


def _gang_of_one(tmp_path: Path, node_rank: int, master: str) -> tuple[int, dict, str]:
    """The image's entrypoint running the rendered torchrun line for node `node_rank` of a
    two-node gang whose other node never comes (rendezvous timeout 3 s)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "KUBETUNE_TERMINATION_LOG": str(tmp_path / "termination-log"),
           "KUBETUNE_WORKDIR": str(tmp_path), "JOB_COMPLETION_INDEX": str(node_rank),
           "POD_NAME": f"gang-{node_rank}", "KUBETUNE_JOB": "gang",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    (tmp_path / "termination-log").write_text("")  # the kubelet creates it empty
    proc = subprocess.run(
        ["bash", str(ENTRYPOINT), "torchrun", "--nnodes=2", "--nproc-per-node=1",
         f"--node-rank={node_rank}", f"--master-addr={master}",
         f"--master-port={helpers._free_port()}", "--rdzv-conf=timeout=3",
         "-m", "orchestrator.trainer", "--config", str(tmp_path / "never-read.json")],
        env=env, capture_output=True, text=True, timeout=120, cwd=helpers.REPO)
    return proc.returncode, helpers.termination(tmp_path), proc.stderr


def test_gang_that_never_forms_says_so(tmp_path: Path) -> None:
    """Pod 0 waits out the rendezvous timeout alone: not 'exit code 1' but the reason, how
    many nodes came, and where to look."""
    code, message, stderr = _gang_of_one(tmp_path, 0, "127.0.0.1")
    assert code == ExitCode.RENDEZVOUS == message["exitCode"], stderr[-2000:]
    assert message["reason"] == "RendezvousTimeout"
    assert "1 of 2 nodes joined the rendezvous on gang-0 (node rank 0) within 3 s" in (
        message["message"])
    assert "kubectl describe pods -l kubetune.io/job=gang" in message["message"]
    assert "rendezvousTimeoutSeconds" in message["message"]


def test_node_that_cannot_reach_pod_0_says_so(tmp_path: Path) -> None:
    code, message, stderr = _gang_of_one(tmp_path, 1, "gang-0.gang.invalid")
    assert code == ExitCode.RENDEZVOUS == message["exitCode"], stderr[-2000:]
    assert message["reason"] == "RendezvousUnreachable"
    assert "gang-1 (node rank 1) could not reach pod 0's rendezvous at gang-0.gang.invalid:" in (
        message["message"])
