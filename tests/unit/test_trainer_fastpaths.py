"""Which GPU fast paths a run takes (trainer/fastpaths.py): FlashAttention-2 and Liger
kernels only on CUDA, when installed and applicable; otherwise transformers' default
attention and no Liger, with a note saying why an installed one was not used."""

from __future__ import annotations

import dataclasses

import pytest

from orchestrator.trainer.fastpaths import FLASH, FastPaths, Flags, decide

pytestmark = pytest.mark.unit

GPU = Flags(cuda=True, precision="bf16", method="lora", model_type="llama",
            flash_attn_installed=True, arch_supports_flash=True, liger_installed=True,
            liger_model_types=frozenset({"llama", "qwen2", "mistral"}))


def _with(**kw: object) -> FastPaths:
    return decide(dataclasses.replace(GPU, **kw))  # type: ignore[arg-type]


def test_everything_installed_and_applicable() -> None:
    fast = decide(GPU)
    assert fast == FastPaths(FLASH, True, ())
    assert fast.summary() == {"flashAttention2": True, "liger": True, "notes": []}
    assert fast.describe() == "flash-attention 2, liger kernels"


def test_cpu_takes_none_even_when_installed() -> None:
    assert _with(cuda=False) == FastPaths()
    assert _with(cuda=False).describe() == "none"


def test_nothing_installed_takes_none_silently() -> None:
    assert _with(flash_attn_installed=False, liger_installed=False) == FastPaths()


@pytest.mark.parametrize(("change", "note"), [
    ({"precision": "fp32"}, "needs bf16/fp16, precision is fp32"),
    ({"method": "full"}, "method full"),
    ({"arch_supports_flash": False, "model_type": "gpt2"}, "not supported by model type gpt2"),
])
def test_no_flash_attention(change: dict[str, object], note: str) -> None:
    fast = _with(**change)
    assert fast.attn_implementation is None  # the load keeps transformers' default
    assert any(note in n for n in fast.why_not), fast.why_not
    assert fast.liger == (change.get("model_type") != "gpt2")


def test_fp16_takes_flash_attention() -> None:
    assert _with(precision="fp16").attn_implementation == FLASH


@pytest.mark.parametrize(("change", "note"), [
    ({"model_type": "gpt2", "arch_supports_flash": True}, "do not support model type gpt2"),
    ({"zero_stage": 3}, "ZeRO-3"),
])
def test_no_liger(change: dict[str, object], note: str) -> None:
    fast = _with(**change)
    assert not fast.liger and fast.attn_implementation == FLASH
    assert any(note in n for n in fast.why_not), fast.why_not
    assert "flash-attention 2 (" in fast.describe()


def test_zero2_keeps_liger() -> None:
    assert _with(zero_stage=2).liger
