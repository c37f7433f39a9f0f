"""training.earlyStopping: a learning rate that makes the eval loss worsen stops the run
`patience` evaluations after its best one, and the stop is reported (termination message,
status metrics, kubetune.json); a run that keeps improving trains to the end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator import storage
from tests.trainer import helpers

pytestmark = pytest.mark.trainer


def test_worsening_eval_loss_stops_after_patience_evaluations(
        tmp_path: Path, tiny_models: dict[str, Path], data_dir: Path) -> None:
    every, patience, max_steps = 2, 2, 40
    cfg = helpers.trainer_config(
        tmp_path / "c.json", job="early", model_dir=tiny_models["llama"], data_dir=data_dir,
        output=f"file://{tmp_path}/store",
        # Adam's first steps move every LoRA weight by ~lr: 0.5 wrecks the model at once
        training={"maxSteps": max_steps, "evalEvery": every, "learningRate": 0.5,
                  "earlyStopping": {"patience": patience, "minDelta": 0.0}})
    proc = helpers.run_trainer(cfg, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    msg = helpers.termination(tmp_path)
    m = msg["metrics"]
    stop = m["stoppedEarlyAtStep"]
    assert stop < max_steps and m["steps"] == stop, m
    # exactly `patience` evaluations after the best one, none of them better
    assert stop == m["bestEvalStep"] + patience * every, m
    assert m["evalLoss"] > m["bestEvalLoss"], m
    assert msg["progress"]["step"] == stop
    assert f"stopped early at step {stop}" in msg["message"]

    meta = json.loads(storage.read_text(msg["artifact"]["uri"] + "kubetune.json"))
    assert meta["earlyStopping"] == {
        "patience": patience, "minDelta": 0.0, "stoppedEarly": True, "step": stop,
        "bestEvalLoss": m["bestEvalLoss"], "bestStep": m["bestEvalStep"]}


def test_improving_run_trains_to_the_end(tmp_path: Path, tiny_models: dict[str, Path],
                                         data_dir: Path) -> None:
    cfg = helpers.trainer_config(
        tmp_path / "c.json", job="improving", model_dir=tiny_models["llama"], data_dir=data_dir,
        output=f"file://{tmp_path}/store",
        training={"maxSteps": 12, "evalEvery": 4, "earlyStopping": {"patience": 1}})
    proc = helpers.run_trainer(cfg, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    msg = helpers.termination(tmp_path)
    m = msg["metrics"]
    assert "stoppedEarlyAtStep" not in m and m["steps"] == 12, m
    assert m["bestEvalStep"] == 12 and m["bestEvalLoss"] == pytest.approx(m["evalLoss"])
    assert not msg["message"]
