"""The trainer honours spec.distributed.collectiveTimeoutSeconds (the process group's timeout,
so a dead peer fails the attempt in minutes) and downloads the base model into the model
cache volume when the pod has one (spec.model.cacheClaim)."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.api import FineTuneJobSpec, TrainerConfig
from orchestrator.api.trainer_config import MODEL_CACHE_ENV
from orchestrator.trainer.run import Run

pytestmark = pytest.mark.trainer


def _run(tmp_path: Path, **distributed: int) -> Run:
    spec = FineTuneJobSpec.model_validate({
        "model": {"uri": "file:///nonexistent/model"},
        "data": {"train": "file:///d/t.jsonl", "eval": "file:///d/e.jsonl"},
        "output": {"uri": f"file://{tmp_path}/out/"},
        "training": {"precision": "fp32", "globalBatchSize": 1},
        "distributed": {"gpusPerNode": 0, **distributed},
    })
    return Run(TrainerConfig(job_name="j", spec=spec, workdir=str(tmp_path / "work")))


def test_collective_timeout_sets_ddp_timeout(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBETUNE_WORKDIR", raising=False)
    args = _run(tmp_path, collectiveTimeoutSeconds=300).training_args(cuda=False, ds=None)
    assert args.ddp_timeout == 300


def test_model_downloads_go_to_the_cache_volume(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBETUNE_WORKDIR", raising=False)
    monkeypatch.delenv(MODEL_CACHE_ENV, raising=False)
    run = _run(tmp_path)
    assert run.model_cache == run.cache  # no volume: this attempt's scratch
    monkeypatch.setenv(MODEL_CACHE_ENV, str(tmp_path / "cache-volume"))
    assert _run(tmp_path).model_cache == tmp_path / "cache-volume" / "objects"
