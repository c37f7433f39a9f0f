"""data.replay (rehearsal against forgetting): the API field, sweeping its fraction, and the
trainer's mixing rule (pure Python; training itself is in tests/trainer)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from pydantic import ValidationError

from orchestrator.api import FineTuneJobSpec, apply_overrides
from orchestrator.api.paths import sweepable_paths
from orchestrator.trainer.data import TokenDataset, mix_replay

pytestmark = pytest.mark.unit

SPEC: dict[str, Any] = {
    "model": {"uri": "s3://models/llama"},
    "data": {"train": "s3://d/train.jsonl", "eval": "s3://d/eval.jsonl",
             "general": "s3://d/general-eval.jsonl",
             "replay": {"uri": "s3://d/general-train.jsonl", "fraction": 0.2}},
    "output": {"uri": "s3://adapters/x/"},
}


def test_replay_field_defaults_and_bounds() -> None:
    spec = FineTuneJobSpec.model_validate(SPEC)
    assert spec.data.replay is not None
    assert (spec.data.replay.fraction, spec.data.replay.format) == (0.2, None)
    assert spec.to_wire()["data"]["replay"] == {"uri": "s3://d/general-train.jsonl",
                                                "fraction": 0.2}
    bad = copy.deepcopy(SPEC)
    bad["data"]["replay"]["fraction"] = 0.95
    with pytest.raises(ValidationError, match="fraction"):
        FineTuneJobSpec.model_validate(bad)
    bad["data"]["replay"] = {"uri": "http://x/general.jsonl"}
    with pytest.raises(ValidationError, match=r"replay\.uri"):
        FineTuneJobSpec.model_validate(bad)


def test_replay_fraction_can_be_swept() -> None:
    assert "data.replay.fraction" in sweepable_paths()
    spec = FineTuneJobSpec.model_validate(SPEC)
    assert apply_overrides(spec, {"data.replay.fraction": 0.0}).data.replay.fraction == 0.0  # type: ignore[union-attr]


def _ds(n: int, token: int, name: str) -> TokenDataset:
    return TokenDataset([{"input_ids": [token, i], "labels": [token, i]} for i in range(n)], name)


@pytest.mark.parametrize(("n_train", "n_replay", "fraction"),
                         [(80, 50, 0.2), (10, 3, 0.5), (30, 100, 0.1)])
def test_replay_makes_up_the_fraction_of_training(n_train: int, n_replay: int,
                                                  fraction: float) -> None:
    mixed = mix_replay(_ds(n_train, 1, "train"), _ds(n_replay, 2, "replay"), fraction, seed=7)
    replayed = [e for e in mixed.examples if e["input_ids"][0] == 2]
    assert len(mixed) - len(replayed) == n_train and mixed.name == "train"
    assert abs(len(replayed) / len(mixed) - fraction) <= 1 / len(mixed)
    # without replacement while the replay set lasts
    distinct = {e["input_ids"][1] for e in replayed}
    assert len(distinct) == min(len(replayed), n_replay)
    again = mix_replay(_ds(n_train, 1, "train"), _ds(n_replay, 2, "replay"), fraction, seed=7)
    assert again.examples == mixed.examples  # deterministic in the seed


def test_zero_fraction_is_no_replay() -> None:
    train = _ds(5, 1, "train")
    assert mix_replay(train, _ds(5, 2, "replay"), 0.0, seed=1) is train
