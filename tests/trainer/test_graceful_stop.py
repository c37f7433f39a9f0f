"""SIGTERM to torchrun (what the kubelet sends through the image's entrypoint when a pod is
deleted or drained): every rank stops at the same step with a checkpoint, the run exits with
the STOPPED code, and the next run resumes from exactly that step."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.trainer.errors import ExitCode
from tests.trainer import helpers

pytestmark = pytest.mark.trainer

TRAINING = {"maxSteps": 40, "evalEvery": 40, "checkpointEvery": 1000, "learningRate": 5e-3}


def test_sigterm_checkpoints_then_the_next_run_resumes_there(
    tmp_path: Path, tiny_models: dict[str, Path], data_dir: Path
) -> None:
    cfg = helpers.trainer_config(tmp_path / "job.json", job="job", model_dir=tiny_models["llama"],
                                 data_dir=data_dir, output=f"file://{tmp_path}/store", nprocs=2,
                                 zero_stage=2, training=TRAINING)
    latest = tmp_path / "store/job/checkpoints/latest.json"
    env = helpers.trainer_env(tmp_path, {"KUBETUNE_LOG_EVERY": "1"})
    torchrun = str(Path(sys.executable).parent / "torchrun")
    log = tmp_path / "first.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [torchrun, "--nproc-per-node=2", f"--master-port={helpers._free_port()}", "-m",
             "orchestrator.trainer", "--config", str(cfg)],
            cwd=helpers.REPO, env=env, stdout=subprocess.DEVNULL,
            stderr=err, start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while not re.search(r"step [2-9]/40", log.read_text()):
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "training did not start within 300 s"
                time.sleep(0.05)
            # Only torchrun is signalled, as the entrypoint does: it must reach the workers.
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                helpers.kill_tree(proc.pid)
    first = log.read_text()
    message = helpers.termination(tmp_path)
    assert message["exitCode"] == ExitCode.STOPPED, first[-3000:]
    stopped_at = message["progress"]["step"]
    assert 2 <= stopped_at < 40
    # Checkpoints were off (checkpointEvery 1000): this one exists because of the SIGTERM.
    assert json.loads(latest.read_text())["step"] == stopped_at

    again = helpers.run_trainer(cfg, tmp_path, nprocs=2, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from checkpoint-{stopped_at} (step {stopped_at})" in again.stderr
    meta = json.loads((tmp_path / "store/job/kubetune.json").read_text())
    assert meta["resumedFromStep"] == stopped_at
    # the controller copies this into status.progress: where the attempt resumed
    assert helpers.termination(tmp_path)["progress"] == {
        "step": 40, "totalSteps": 40, "resumedFromStep": stopped_at}
