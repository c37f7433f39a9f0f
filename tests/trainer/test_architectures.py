"""The controller's torch-free model shapes (from config.json) equal what the trainer reads
from a meta-device model, so the sweep's budget check and the trainer agree exactly."""

from __future__ import annotations

import pytest

from orchestrator.api.architectures import shape_from_config
from orchestrator.api.budget import plan

pytestmark = pytest.mark.trainer


def _configs():  # type: ignore[no-untyped-def]
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    return {
        "llama": LlamaConfig(
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=500,
        ),
        "llama-tied-bias": LlamaConfig(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=300,
            tie_word_embeddings=True,
            attention_bias=True,
            mlp_bias=True,
        ),
        "mistral": MistralConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=2,
            vocab_size=400,
            head_dim=16,
        ),
        "qwen2": Qwen2Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=600,
        ),
        "gpt2": GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=300, n_positions=64),
    }


@pytest.mark.parametrize("name", list(_configs()))
def test_shape_from_config_equals_meta_model(name: str) -> None:
    from orchestrator.trainer.arch import meta_model, shape_of

    config = _configs()[name]
    want = shape_of(meta_model(config), config)
    got = shape_from_config(config.to_dict())
    assert got is not None
    assert got.total_params == want.total_params
    assert [(m.name, m.in_features, m.out_features, m.role) for m in got.linears] == [
        (m.name, m.in_features, m.out_features, m.role) for m in want.linears
    ]
    assert got.prompt_params_per_token == want.prompt_params_per_token
    assert got.prefix_params_per_token == want.prefix_params_per_token
    # hence the same budget decision on both sides
    for method, size, pct in (("lora", 8, 1.0), ("lora", None, 2.0), ("prefix", None, 0.5)):
        a = plan(got, method, size=size, target_percent=pct)
        b = plan(want, method, size=size, target_percent=pct)
        assert (a.size, a.modules, a.trainable_params) == (b.size, b.modules, b.trainable_params)


def test_unknown_architecture_is_left_to_the_trainer() -> None:
    assert shape_from_config({"model_type": "mamba", "hidden_size": 64}) is None
