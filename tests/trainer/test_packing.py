"""Packing without bleed: whole examples bin-packed with their own position ids, so every
example's loss in a packed batch equals its loss alone (fp32, 1e-4), for rotary (Llama,
Qwen2) and absolute-position (GPT-2) models."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from orchestrator.trainer.data import IGNORE, Collator, Fields, build_dataset, load_examples

pytestmark = pytest.mark.trainer


def _token_losses(model: Any, batch: dict[str, Any]) -> Any:
    """Per-token cross-entropy (0 where not scored), aligned with batch["labels"][:, 1:]."""
    import torch
    import torch.nn.functional as F

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits[:, :-1].float()  # as in training
    target = batch["labels"][:, 1:]
    return F.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE,
                           reduction="none")


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_each_example_loss_packed_equals_unpacked(tiny_models: dict[str, Path],
                                                   data_dir: Path, arch: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tiny_models[arch]
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    payloads, where = load_examples(data_dir / "eval.jsonl", "eval", "text", Fields())
    plain = build_dataset(payloads[:12], where[:12], "eval", "text", tok, 64, False, 0, "t")
    packed = build_dataset(payloads[:12], where[:12], "eval", "text", tok, 64, True, 0, "t")
    assert len(packed) < len(plain)  # several examples share a sequence

    alone = {}
    for ex in plain.examples:
        batch = Collator(tok.pad_token_id)([ex])
        alone[tuple(ex["input_ids"])] = float(_token_losses(model, batch).sum())

    batch = Collator(tok.pad_token_id)(packed.examples[:3])  # padded rows too
    assert "attention_mask" not in batch
    losses = _token_losses(model, batch)
    found = 0
    for row, ex in enumerate(packed.examples[:3]):
        starts = [i for i, p in enumerate(ex["position_ids"]) if p == 0] + [
            len(ex["position_ids"])]
        for a, b in itertools.pairwise(starts):
            ids = tuple(ex["input_ids"][a:b])
            # labels[:, 1:] alignment: token t's loss sits at index t - 1
            got = float(losses[row, a:b - 1].sum())
            assert got == pytest.approx(alone[ids], abs=1e-4), (arch, row, a)
            found += 1
    assert found > 3
