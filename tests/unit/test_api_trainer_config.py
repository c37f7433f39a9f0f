"""TrainerConfig: the JSON contract between render and the trainer pod."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.api import FineTuneJobSpec, SweepTrialRef, TrainerConfig

pytestmark = pytest.mark.unit

SPEC = FineTuneJobSpec.model_validate(
    {
        "model": {"uri": "pvc://models/llama"},
        "data": {"train": "file:///data/t.jsonl", "eval": "s3://d/e.jsonl"},
        "output": {"uri": "s3://adapters/support"},
        "storage": {"credentialsSecret": "s3-credentials"},
    }
)


def test_round_trip_through_a_file(tmp_path: Path) -> None:
    config = TrainerConfig(
        job_name="support-lora",
        namespace="ml",
        spec=SPEC,
        deepspeed={"train_batch_size": 16},
        attempt=2,
        sweep=SweepTrialRef(name="sweep", trial_number=3, report_url="http://c:8081"),
    )
    path = tmp_path / "config.json"
    path.write_text(config.to_json())
    again = TrainerConfig.from_file(path)
    assert again == config
    wire = json.loads(path.read_text())
    assert wire["jobName"] == "support-lora" and wire["attempt"] == 2
    assert wire["sweep"]["trialNumber"] == 3
    assert wire["spec"]["storage"] == {"credentialsSecret": "s3-credentials"}  # a name only


def test_artifact_and_checkpoint_locations_follow_the_job_name() -> None:
    config = TrainerConfig(job_name="support-lora", spec=SPEC)
    assert config.artifact_uri == "s3://adapters/support/support-lora/"
    assert config.checkpoint_uri == "s3://adapters/support/support-lora/checkpoints/"


def test_local_paths_for_pvc_and_file_uris() -> None:
    config = TrainerConfig(job_name="j", spec=SPEC)
    assert config.local_path("pvc://models/llama") == "/mnt/pvc/models/llama"
    assert config.local_path("file:///data/t.jsonl") == "/data/t.jsonl"
    assert config.local_path("s3://d/e.jsonl") is None


def test_unknown_keys_in_the_config_file_are_rejected(tmp_path: Path) -> None:
    wire = json.loads(TrainerConfig(job_name="j", spec=SPEC).to_json())
    wire["atempt"] = 3
    path = tmp_path / "config.json"
    path.write_text(json.dumps(wire))
    with pytest.raises(ValueError, match="atempt"):
        TrainerConfig.from_file(path)
