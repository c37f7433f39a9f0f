"""The sweep's budget pre-check without the controller reading users' models: the controller
is the most privileged pod, so it never decodes a user's credentials Secret nor sends a
request to storage for them. A trial pod reads config.json with its own credentials and
reports the sizes; the controller learns them for that sweep only, bounded."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.api import FineTuneJobSpec
from orchestrator.controller.feasibility import MAX_KEYS, BudgetChecker, model_facts

pytestmark = pytest.mark.unit

CONFIG = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
          "vocab_size": 256}
MODEL = "s3://models/llama"


def _spec(rank: int, percent: float = 0.5, model: str = MODEL) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate({
        "model": {"uri": model},
        "data": {"train": "s3://d/train.jsonl", "eval": "s3://d/eval.jsonl"},
        "method": {"type": "lora", "rank": rank, "trainableParamPercent": percent},
        "output": {"uri": "s3://out/"},
        "storage": {"credentialsSecret": "creds", "endpoint": "http://169.254.169.254"},
    })


@pytest.fixture(autouse=True)
def no_storage(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("the controller read from object storage")

    for name in ("read_text", "read_bytes", "open_store", "fetch"):
        monkeypatch.setattr(f"orchestrator.storage.{name}", refuse, raising=False)


def test_nothing_is_refused_before_a_trial_reported_the_model() -> None:
    checker = BudgetChecker()
    # rank 64 on this 64-wide model is far above 0.5 %: unknown until a trial says so
    assert checker.infeasible("sweep-a", _spec(64)) is None


def test_a_trials_report_teaches_its_own_sweep_only() -> None:
    checker = BudgetChecker()
    assert checker.learn("sweep-a", MODEL + "/", model_facts(CONFIG))
    reason = checker.infeasible("sweep-a", _spec(64))
    assert reason and "not reachable" in reason and MODEL in reason
    assert checker.infeasible("sweep-a", _spec(64, percent=40.0)) is None  # reachable
    assert checker.infeasible("sweep-a", _spec(64, model="s3://models/other")) is None
    # another sweep (another tenant, maybe) learns nothing from sweep-a's pods
    assert checker.infeasible("sweep-b", _spec(64)) is None


@pytest.mark.parametrize("change", [
    {"num_hidden_layers": 10**9},  # a layer loop the controller must never run
    {"hidden_size": -64},
    {"hidden_size": True},
    {"num_attention_heads": 0},
    {"vocab_size": 1.5},
    {"intermediate_size": "128"},
    {"model_type": "unknown-arch"},
])
def test_a_forged_or_malformed_config_teaches_nothing(change: dict[str, Any]) -> None:
    checker = BudgetChecker()
    assert not checker.learn("sweep-a", MODEL, model_facts({**CONFIG, **change}))
    assert checker.infeasible("sweep-a", _spec(64)) is None


def test_reported_facts_keep_bounded_scalars_only() -> None:
    raw: dict[Any, Any] = {**CONFIG, "architectures": ["LlamaForCausalLM"],
                           "rope_scaling": {"type": "linear"}, "name": "x" * 10_000,
                           "nan": float("nan"), "big": 1 << 80}
    facts = model_facts(raw)
    assert facts == CONFIG
    assert model_facts([1, 2]) is None and model_facts({}) is None
    many = {f"k{i}": i for i in range(10 * MAX_KEYS)}
    assert len(model_facts(many) or {}) == MAX_KEYS


def test_the_cache_is_bounded() -> None:
    checker = BudgetChecker(capacity=8)
    for i in range(100):
        checker.learn(f"sweep-{i}", MODEL, CONFIG)
    assert len(checker._shapes) == 8
