"""output.merged: the artifact also carries the base model with the adapter merged into its
weights, under merged/ (sharded safetensors, config, tokenizer), covered by the manifest.

What a user notices: plain ``AutoModelForCausalLM.from_pretrained(<artifact>/merged)`` — no
PEFT — gives the logits of base + adapter (fp32, 1e-4), for LoRA, DoRA and IA³, and under
ZeRO-3 with two processes (the adapter is gathered before the merge)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from orchestrator import storage
from orchestrator.trainer import merge
from tests.trainer import helpers

pytestmark = pytest.mark.trainer

CASES = {
    "lora": ({"type": "lora", "rank": 4}, 1, None),
    "dora": ({"type": "dora", "rank": 4}, 1, None),
    "ia3": ({"type": "ia3"}, 1, None),
    "lora-zero3": ({"type": "lora", "rank": 4}, 2, 3),
}


def _logits(model: Any, ids: Any) -> Any:
    import torch

    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.mark.parametrize("case", list(CASES))
def test_merged_model_loads_without_peft_and_matches_base_plus_adapter(
        tmp_path: Path, tiny_models: dict[str, Path], data_dir: Path, case: str) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    method, nprocs, zero = CASES[case]
    model_dir = tiny_models["llama"]
    cfg = helpers.trainer_config(
        tmp_path / "c.json", job="merge", model_dir=model_dir, data_dir=data_dir,
        output=f"file://{tmp_path}/store", method=method, nprocs=nprocs, zero_stage=zero,
        output_options={"merged": True, "samples": 0},
        training={"maxSteps": 6, "evalEvery": 6, "learningRate": 2e-2})
    # small shards, so the tiny model is really split (index + several files)
    env = helpers.trainer_env(tmp_path, {merge.SHARD_SIZE_ENV: "40KB"})
    proc = helpers.run_trainer(cfg, tmp_path, nprocs=nprocs, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]

    art = tmp_path / "collected"
    storage.download_dir(helpers.termination(tmp_path)["artifact"]["uri"], art)  # verified
    manifest = json.loads((art / storage.MANIFEST_NAME).read_text())
    listed = json.dumps(manifest)
    merged_dir = art / "merged"
    shards = sorted(p.name for p in merged_dir.glob("*.safetensors"))
    assert len(shards) > 1 and (merged_dir / "model.safetensors.index.json").is_file()
    assert all(f"merged/{s}" in listed for s in shards)  # in the manifest and its sha256
    assert not (merged_dir / "adapter_config.json").exists()
    doc = json.loads((art / "kubetune.json").read_text())
    assert doc["merged"]["path"] == "merged/"
    assert doc["merged"]["weights"] == shards and doc["merged"]["dtype"] == "float32"

    ids = torch.tensor([[5, 17, 40, 33, 9, 60, 21, 11]])
    plain = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32)
    assert not any("lora" in n or "ia3" in n for n, _ in plain.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    base_logits = _logits(base, ids)
    adapted = PeftModel.from_pretrained(base, str(art))
    want, got = _logits(adapted, ids), _logits(plain, ids)
    assert float((want - base_logits).abs().max()) > 1e-3  # the adapter did change the model
    assert float((got - want).abs().max()) < 1e-4, case
    tok = AutoTokenizer.from_pretrained(str(merged_dir))
    assert tok.chat_template == helpers.CHAT_TEMPLATE
