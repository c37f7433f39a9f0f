"""Tokens and FLOPs as a user reads them: tokens/s counts every non-padding token trained,
once, on every rank; MFU's FLOPs count what the model multiplies, as PEFT counts trainables."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from orchestrator.trainer import throughput
from tests.trainer import helpers

pytestmark = pytest.mark.trainer


def test_flops_model_counts_every_matmul_frozen_and_trainable(tokenizer_dir: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(helpers.model_config("llama", vocab, hidden=32))
    embed = base.get_input_embeddings().weight
    head = base.get_output_embeddings().weight
    # every 2-D weight but the input embedding is a matmul; a tied LM head is one too
    matmuls = sum(p.numel() for p in base.parameters() if p.dim() == 2 and p is not embed)
    if head is embed:
        matmuls += head.numel()
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable, _ = model.get_nb_trainable_parameters()

    fm = throughput.flops_model(model, context=64)
    assert fm.trainable == trainable  # PEFT's own count: LoRA A and B
    assert fm.frozen == matmuls
    assert (fm.layers, fm.hidden, fm.context) == (2, 32, 64)
    assert fm.per_token == 4 * matmuls + 6 * trainable + 12 * 2 * 32 * 64


def test_tokens_seen_is_every_non_padding_token_once_across_ranks(
    tmp_path: Path, tiny_models: dict[str, Path], data_dir: Path
) -> None:
    # One epoch over 128 examples of different lengths on 2 ranks: every example is trained
    # exactly once, so the count must equal the training set's tokens (padding would add
    # to it, a rank missing from the sum would halve it).
    cfg = helpers.trainer_config(
        tmp_path / "c.json", job="tokens", model_dir=tiny_models["llama"], data_dir=data_dir,
        output=f"file://{tmp_path}/store", nprocs=2,
        training={"maxSteps": None, "epochs": 1, "evalEvery": 1000})
    proc = helpers.run_trainer(cfg, tmp_path, nprocs=2, env=helpers.trainer_env(
        tmp_path, {"KUBETUNE_LOG_EVERY": "3", throughput.PEAK_ENV: "0.001"}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = re.search(r"train dataset \S+: 128 sequences, (\d+) tokens", proc.stderr)
    assert found, proc.stderr[-3000:]
    metrics = helpers.termination(tmp_path)["metrics"]
    assert metrics["tokensSeen"] == int(found.group(1))
    # the log line shows tokens/s and, with a known peak, MFU
    per_token = float(re.search(r"model FLOPs per token (\S+)", proc.stderr).group(1))
    line = re.search(r"tokens/s (\d+) MFU ([\d.]+)%", proc.stderr)
    assert per_token > 0 and line, proc.stderr[-3000:]
    tps, shown = float(line.group(1)), float(line.group(2))
    assert shown == pytest.approx(100 * tps * per_token / (1e9 * 2), rel=0.02, abs=0.06)
