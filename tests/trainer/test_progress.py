"""Live progress from a real training run: rank 0 posts step, losses, tokens/s and ETA to
the controller's report endpoint (status.progress) with the job's token, at most once per
interval and never blocking training; an unreachable endpoint costs nothing but a warning."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import pytest

from tests.trainer import helpers

pytestmark = pytest.mark.trainer


def _with_progress(cfg: Path, url: str, interval: float) -> Path:
    doc = json.loads(cfg.read_text())
    doc["progress"] = {"url": url, "tokenEnv": "KT_JOB_TOKEN", "intervalSeconds": interval}
    cfg.write_text(json.dumps(doc))
    return cfg


def test_rank0_posts_live_progress_with_the_job_token(
    tmp_path: Path, tiny_models: dict[str, Path], data_dir: Path
) -> None:
    cfg = helpers.trainer_config(
        tmp_path / "c.json", job="live", model_dir=tiny_models["llama"], data_dir=data_dir,
        output=f"file://{tmp_path}/store", training={"maxSteps": 24, "evalEvery": 12})
    with helpers.report_endpoint() as (url, seen):
        proc = helpers.run_trainer(
            _with_progress(cfg, url, 0.001), tmp_path,
            env=helpers.trainer_env(tmp_path, {"KT_JOB_TOKEN": "kt1.job", "KUBETUNE_LOG_EVERY":
                                               "4"}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    posts = [s["body"] for s in seen]
    assert len(posts) >= 2  # every 4 steps, minus those skipped while one was in flight
    assert all(s["auth"] == "Bearer kt1.job" for s in seen)
    assert {p["job"] for p in posts} == {"live"} and all("metrics" not in p for p in posts)
    steps = [p["step"] for p in posts]
    assert steps == sorted(steps) and len(set(steps)) == len(steps) and steps[-1] <= 24
    for p in posts:
        prog = p["progress"]
        assert prog["step"] == p["step"] and prog["totalSteps"] == 24
        assert math.isfinite(prog["trainLoss"]) and prog["tokensPerSecond"] > 0
        assert prog["etaSeconds"] >= 0 and prog["epoch"] > 0


def test_an_unreachable_endpoint_never_fails_training(
    tmp_path: Path, tiny_models: dict[str, Path], data_dir: Path
) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = helpers.trainer_config(
        tmp_path / "c.json", job="deaf", model_dir=tiny_models["llama"], data_dir=data_dir,
        output=f"file://{tmp_path}/store", training={"maxSteps": 8, "evalEvery": 8})
    proc = helpers.run_trainer(
        _with_progress(cfg, f"http://127.0.0.1:{port}/report", 0.001), tmp_path,
        env=helpers.trainer_env(tmp_path, {"KT_JOB_TOKEN": "kt1.job", "KUBETUNE_LOG_EVERY": "2"}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("progress post to") == 1  # warned once, not per step
