"""Kill a 2-process DeepSpeed run after a checkpoint reached the store, start it again: it
resumes (the step count continues) and ends where an uninterrupted run ends."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from orchestrator import storage
from tests.trainer import helpers

pytestmark = pytest.mark.trainer

TRAINING = {"maxSteps": 40, "evalEvery": 20, "checkpointEvery": 8, "learningRate": 5e-3}


def _config(tmp: Path, job: str, model: Path, data: Path) -> Path:
    return helpers.trainer_config(tmp / f"{job}.json", job=job, model_dir=model, data_dir=data,
                                  output=f"file://{tmp}/store", nprocs=2, zero_stage=2,
                                  training=TRAINING)


def test_kill_after_checkpoint_and_resume(tmp_path: Path, tiny_models: dict[str, Path],
                                          data_dir: Path) -> None:
    model = tiny_models["llama"]
    # Uninterrupted reference run.
    ref_tmp = tmp_path / "ref"
    ref_tmp.mkdir()
    ref = helpers.run_trainer(_config(ref_tmp, "ref", model, data_dir), ref_tmp, nprocs=2)
    assert ref.returncode == 0, ref.stderr[-3000:]
    ref_metrics = helpers.termination(ref_tmp)["metrics"]

    # Interrupted run: SIGKILL the whole torchrun process group once a checkpoint is complete.
    cfg = _config(tmp_path, "job", model, data_dir)
    latest = tmp_path / "store/job/checkpoints/latest.json"
    torchrun = str(Path(sys.executable).parent / "torchrun")
    proc = subprocess.Popen(
        [torchrun, "--nproc-per-node=2", f"--master-port={helpers._free_port()}", "-m",
         "orchestrator.trainer", "--config", str(cfg)],
        cwd=helpers.REPO, env=helpers.trainer_env(tmp_path), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not latest.exists():
            assert proc.poll() is None, "the run ended before any checkpoint was published"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.02)
        # torchrun starts its workers in sessions of their own: kill the whole tree, the way
        # a node failure or an evicted pod would.
        tree = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    killed_at = json.loads(latest.read_text())["step"]
    assert 8 <= killed_at < 40
    assert not storage.exists(f"file://{tmp_path}/store/job/manifest.json")

    again = helpers.run_trainer(cfg, tmp_path, nprocs=2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from checkpoint-{killed_at} (step {killed_at})" in again.stderr
    msg = helpers.termination(tmp_path)
    assert msg["progress"] == {"step": 40, "totalSteps": 40, "resumedFromStep": killed_at}
    meta = json.loads((tmp_path / "store/job/kubetune.json").read_text())
    assert meta["resumedFromStep"] == killed_at
    m = msg["metrics"]
    assert m["evalLoss"] == pytest.approx(ref_metrics["evalLoss"], rel=2e-3)
    assert m["trainLoss"] == pytest.approx(ref_metrics["trainLoss"], rel=2e-3)
