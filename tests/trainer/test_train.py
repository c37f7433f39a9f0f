"""Every method trains under torchrun (2 processes, gloo) with DeepSpeed ZeRO-2 and ZeRO-3 on
CPU: eval loss decreases, the artifact is uploaded with checksums, and the downloaded copy
reloads (PeftModel / bottleneck loader / plain transformers) to the trained model's logits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from orchestrator import storage
from tests.trainer import helpers

pytestmark = pytest.mark.trainer

METHODS: dict[str, dict[str, Any]] = {
    "lora": {"type": "lora", "rank": 4, "useRslora": True},
    "dora": {"type": "dora", "rank": 4},
    "ia3": {"type": "ia3"},
    "adapter": {"type": "adapter", "bottleneck": 8},
    "prefix": {"type": "prefix", "numVirtualTokens": 4},
    "prompt": {"type": "prompt", "numVirtualTokens": 4},
    "full": {"type": "full"},
}
# Random-init tiny base models: the small methods need a larger step to move the loss.
LR = {"ia3": 3e-2, "prefix": 2e-2, "prompt": 3e-2, "full": 2e-3}
# Spread the four architectures over the matrix.
ARCH = {"lora": "qwen2", "dora": "mistral", "ia3": "gpt2", "adapter": "gpt2", "prefix": "llama",
        "prompt": "mistral", "full": "llama"}


def reload_logits(method: str, model_dir: Path, art: Path, input_ids: list[int]) -> list[float]:
    import torch
    from transformers import AutoModelForCausalLM

    if method == "full":
        model = AutoModelForCausalLM.from_pretrained(str(art))
    else:
        base = AutoModelForCausalLM.from_pretrained(str(model_dir))
        if method == "adapter":
            from orchestrator.trainer.bottleneck import load_adapter

            model = load_adapter(base, art)
        else:
            from peft import PeftModel

            model = PeftModel.from_pretrained(base, str(art))
    model.eval()
    with torch.no_grad():
        x = torch.tensor([input_ids])
        out = model(input_ids=x, attention_mask=torch.ones_like(x))
    return [float(v) for v in out.logits[0, -1, :8]]


@pytest.mark.parametrize("zero", [2, 3], ids=["zero2", "zero3"])
@pytest.mark.parametrize("method", list(METHODS))
def test_method_trains_and_round_trips(tmp_path: Path, tiny_models: dict[str, Path],
                                       data_dir: Path, method: str, zero: int) -> None:
    model_dir = tiny_models[ARCH[method]]
    job = f"{method}-z{zero}"
    out = f"file://{tmp_path}/store"
    # Bottleneck adapters also keep a mid-run checkpoint, to check what it holds.
    keep = method == "adapter"
    cfg = helpers.trainer_config(
        tmp_path / "c.json", job=job, model_dir=model_dir, data_dir=data_dir, output=out,
        method=METHODS[method], nprocs=2, zero_stage=zero,
        training={"maxSteps": 16, "evalEvery": 8, "learningRate": LR.get(method, 5e-3),
                  "checkpointEvery": 8 if keep else 1000},
        data={"general": f"file://{data_dir}/general.jsonl"})
    env = helpers.trainer_env(tmp_path, {"KUBETUNE_KEEP_CHECKPOINTS": "1"} if keep else None)
    proc = helpers.run_trainer(cfg, tmp_path, nprocs=2, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    msg = helpers.termination(tmp_path)
    assert msg["status"] == "Succeeded", msg
    m = msg["metrics"]
    assert m["evalLoss"] < m["initialEvalLoss"], m
    assert "generalLossDelta" in m and m["steps"] == 16
    assert msg["progress"] == {"step": 16, "totalSteps": 16}

    # Collect the way a user does: manifest-verified download of the artifact prefix.
    dl = tmp_path / "collected"
    storage.download_dir(msg["artifact"]["uri"], dl, require_manifest=True,
                         expected_digest=msg["artifact"]["sha256"])
    meta = json.loads((dl / "kubetune.json").read_text())
    assert meta["specFingerprint"] and meta["baseModel"]["sha256"]
    assert meta["trainableParams"] == m["trainableParams"]
    assert {"torch", "transformers", "peft", "deepspeed"} <= set(meta["libraries"])
    assert meta["zeroStage"] == zero and meta["worldSize"] == 2
    # output.samples (default 2): every method generates, also under ZeRO-3 (collective)
    assert len(meta["samples"]) == 2 and "samplesError" not in meta, meta.get("samplesError")
    if method == "adapter":  # own file names: PEFT/vLLM must not mistake it for theirs
        assert (dl / "bottleneck_config.json").is_file()
        assert (dl / "bottleneck_model.safetensors").is_file()
        assert not (dl / "adapter_config.json").exists()
    elif method != "full":
        assert (dl / "adapter_config.json").is_file()
        assert (dl / "adapter_model.safetensors").is_file()
        doc = json.loads((dl / "adapter_config.json").read_text())
        assert doc["base_model_name_or_path"] == model_dir.name  # not a URI PEFT can't open
        assert meta["adaptedModules"] or method in ("prefix", "prompt")
    probe = meta["probe"]
    got = reload_logits(method, model_dir, dl, probe["inputIds"])
    assert got == pytest.approx(probe["lastTokenLogits"], abs=1e-4)
    if keep:
        # The trainer-level save in a checkpoint is the adapter, not the whole base model.
        ckpt = tmp_path / "store" / job / "checkpoints" / "checkpoint-8"
        names = {p.name for p in ckpt.rglob("*") if p.is_file()}
        assert "bottleneck_model.safetensors" in names and "model.safetensors" not in names
    else:  # checkpoints are removed once the artifact is safely stored
        assert not storage.exists(f"{out}/{job}/checkpoints/latest.json")
