"""LoRA initialisations (method.init) and LoRA+ (method.loraPlusLrRatio).

What a user notices: PiSSA/OLoRA start with non-zero adapters yet the model's outputs at step 0
are the base model's (the base keeps the residual); their artifact is a plain LoRA adapter that
loads on the *original* base and reproduces the trained model; LoRA+ trains B with a larger
learning rate than A, also through DeepSpeed ZeRO-2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from orchestrator import storage
from orchestrator.api.job import FineTuneJobSpec
from orchestrator.trainer import arch, budget, methods
from tests.trainer import helpers

pytestmark = pytest.mark.trainer


def _method(**fields: Any) -> Any:
    return FineTuneJobSpec.model_validate({
        "model": {"uri": "s3://models/m"},
        "data": {"train": "s3://d/t.jsonl", "eval": "s3://d/e.jsonl"},
        "method": {"type": "lora", "rank": 4, **fields}, "output": {"uri": "s3://out/"},
        "distributed": {"gpusPerNode": 0}, "training": {"globalBatchSize": 8}}).method


def _adapted(model_dir: Path, init: str | None) -> tuple[Any, Any]:
    """(base logits, (peft model, its logits)) on a fixed input, fp32."""
    import torch
    from transformers import AutoModelForCausalLM, set_seed

    x = torch.tensor([[5, 17, 40, 33, 9, 60, 21]])
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        before = base(input_ids=x).logits
    config = arch.load_config(model_dir)
    shape = arch.shape_of(arch.meta_model(config), config)
    plan = budget.plan(shape, "lora", size=4)
    set_seed(0)
    model = methods.apply(base, plan, _method(**({"init": init} if init else {})), shape)
    model.eval()
    with torch.no_grad():
        after = model(input_ids=x).logits
    return before, (model, after)


def _b_matrices(model: Any) -> list[Any]:
    return [p.detach() for n, p in model.named_parameters() if "lora_B" in n]


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_start_nonzero_yet_output_the_base_model(
        tiny_models: dict[str, Path], init: str) -> None:
    before, (model, after) = _adapted(tiny_models["llama"], init)
    assert all(float(b.abs().max()) > 1e-3 for b in _b_matrices(model)), init
    # the base weights hold the residual W - scale*B0*A0: step 0 is still the base model
    assert float((after - before).abs().max()) < 1e-4, init


@pytest.mark.parametrize("init", [None, "gaussian"])
def test_default_and_gaussian_start_with_zero_b(tiny_models: dict[str, Path],
                                                init: str | None) -> None:
    before, (model, after) = _adapted(tiny_models["qwen2"], init)
    assert all(float(b.abs().max()) == 0.0 for b in _b_matrices(model))
    assert float((after - before).abs().max()) < 1e-6
    a = next(p for n, p in model.named_parameters() if "lora_A" in n)
    r = a.shape[0]
    if init == "gaussian":  # PEFT: A ~ N(0, 1/r)
        assert float(a.std()) == pytest.approx(1 / r, rel=0.25)


def test_loraplus_gives_b_a_larger_learning_rate(tiny_models: dict[str, Path],
                                                  tmp_path: Path) -> None:
    from transformers import TrainingArguments

    from orchestrator.trainer.hf import trainer_class

    _, (model, _) = _adapted(tiny_models["llama"], None)
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, weight_decay=0.01,
                             use_cpu=True, report_to="none")
    trainer = trainer_class()(model=model, args=args)
    trainer.loraplus_lr_ratio = 16.0
    opt = trainer.create_optimizer()
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    names = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(id(p) in lr_of for p in names.values())  # every trainable one
    for n, p in names.items():
        expected = 16e-3 if "lora_B" in n else 1e-3
        assert lr_of[id(p)] == pytest.approx(expected), n
    assert all(g["params"] for g in opt.param_groups)  # no empty groups (ZeRO flattens them)


def test_pissa_with_loraplus_under_zero2_reloads_on_the_original_base(
        tmp_path: Path, tiny_models: dict[str, Path], data_dir: Path) -> None:
    model_dir = tiny_models["llama"]
    cfg = helpers.trainer_config(
        tmp_path / "c.json", job="pissa", model_dir=model_dir, data_dir=data_dir,
        output=f"file://{tmp_path}/store", nprocs=2, zero_stage=2,
        method={"type": "lora", "rank": 4, "init": "pissa", "loraPlusLrRatio": 16},
        training={"maxSteps": 8, "evalEvery": 8})
    proc = helpers.run_trainer(cfg, tmp_path, nprocs=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    msg = helpers.termination(tmp_path)
    assert msg["metrics"]["evalLoss"] < msg["metrics"]["initialEvalLoss"], msg

    art = tmp_path / "collected"
    storage.download_dir(msg["artifact"]["uri"], art)
    meta = json.loads((art / "kubetune.json").read_text())
    # LoRA+ reached the optimizer DeepSpeed stepped: B's groups at 16 x the learning rate
    lrs = sorted({g["lr"] for g in meta["optimizer"]["paramGroups"]})
    assert lrs == pytest.approx([5e-3, 16 * 5e-3]), meta["optimizer"]
    # stored as plain LoRA of twice the rank, for the original (unmodified) base model
    adapter_cfg = json.loads((art / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 8 and adapter_cfg["init_lora_weights"] is True
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(art)).eval()
    probe = meta["probe"]
    with torch.no_grad():
        x = torch.tensor([probe["inputIds"]])
        logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1, :8]
    assert [float(v) for v in logits] == pytest.approx(probe["lastTokenLogits"], abs=1e-4)


def test_loftq_on_qlora_offsets_the_quantisation_error(tiny_models: dict[str, Path]) -> None:
    """CUDA + bitsandbytes only (the API accepts loftq only for qlora, which needs GPUs)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("LoftQ needs a CUDA GPU (bitsandbytes 4-bit)")
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    model_dir = tiny_models["llama"]
    x = torch.tensor([[5, 17, 40, 33, 9, 60, 21]], device="cuda")
    full = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).cuda()
    with torch.no_grad():
        want = full(input_ids=x).logits.float()
    config = arch.load_config(model_dir)
    shape = arch.shape_of(arch.meta_model(config), config)
    plan = budget.plan(shape, "qlora", size=4)
    errors = {}
    for init in ("default", "loftq"):
        base = AutoModelForCausalLM.from_pretrained(
            str(model_dir), quantization_config=methods.quantization_config("bf16"),
            device_map={"": 0})
        method = FineTuneJobSpec.model_validate({
            "model": {"uri": "s3://models/m"},
            "data": {"train": "s3://d/t.jsonl", "eval": "s3://d/e.jsonl"},
            "method": {"type": "qlora", "rank": 4, "init": init},
            "output": {"uri": "s3://out/"}}).method
        model = methods.apply(base, plan, method, shape, model_dir).eval()
        with torch.no_grad():
            errors[init] = float((model(input_ids=x).logits.float() - want).abs().mean())
    assert errors["loftq"] < errors["default"], errors
