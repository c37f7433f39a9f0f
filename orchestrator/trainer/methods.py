"""Applying a PEFT method (or full fine-tuning) to a loaded model according to a BudgetPlan.

LoRA initialisations (``method.init``) map onto PEFT's ``init_lora_weights``. PiSSA and OLoRA
move the principal part of each adapted weight into A and B and leave the residual in the
base weight, so the trained adapter only makes sense on that residual base. The artifact must
load on the original base (``PeftModel.from_pretrained(base, dir)``), so it is stored
converted: ``ΔW = B x A - B0 x A0 = [B | -B0] x [A ; A0]``, a plain LoRA adapter of twice the rank
(PEFT's ``path_initial_model_for_weight_conversion``, done here on the saved tensors because
the Trainer saves the model). LoftQ (qlora only) keeps the quantised base and initialises
A and B against its quantisation error (``replace_lora_weights_loftq``, bitsandbytes on CUDA).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from orchestrator.api.job import DEFAULT_RSLORA_ALPHA
from orchestrator.trainer import bottleneck
from orchestrator.trainer.budget import BudgetPlan, ModelShape
from orchestrator.trainer.errors import ConfigError

ADAPTER_NON_LINEARITY = "relu"
# method.init -> PEFT init_lora_weights; loftq starts from PEFT's default and is replaced
# afterwards (replace_lora_weights_loftq works on the already quantised qlora base).
INIT_LORA_WEIGHTS: dict[str | None, Any] = {
    None: True, "default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora",
    "loftq": True,
}
CONVERTED_INITS = ("pissa", "olora")  # base keeps a residual: the artifact is converted


def peft_config(plan: BudgetPlan, method: Any, shape: ModelShape) -> Any:
    """The PEFT config for a plan (None for ``adapter`` and ``full``)."""
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType

    t = plan.method
    if t in ("lora", "dora", "qlora"):
        assert plan.size is not None
        # PEFT annotates lora_alpha as int but scales with any number; keep fractional alphas.
        # Default: 2 x the planned rank, or a fixed alpha for rsLoRA (api.job.effective_alpha).
        alpha: Any = method.alpha
        if alpha is None:
            alpha = DEFAULT_RSLORA_ALPHA if method.use_rslora else 2 * plan.size
        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=plan.size,
            lora_alpha=alpha,
            lora_dropout=method.dropout,
            target_modules=list(plan.modules),
            use_dora=t == "dora",
            use_rslora=bool(method.use_rslora),
            fan_in_fan_out=shape.uses_conv1d,
            init_lora_weights=INIT_LORA_WEIGHTS[getattr(method, "init", None)],
        )
    if t == "ia3":
        return IA3Config(
            task_type=TaskType.CAUSAL_LM,
            target_modules=list(plan.modules),
            feedforward_modules=list(plan.feedforward_modules),
            fan_in_fan_out=shape.uses_conv1d,
        )
    if t in ("prefix", "prompt"):
        assert plan.size is not None
        cls = PrefixTuningConfig if t == "prefix" else PromptTuningConfig
        return cls(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=plan.size)
    return None


def apply(model: Any, plan: BudgetPlan, method: Any, shape: ModelShape,
          model_dir: Path | None = None) -> Any:
    """Wrap/modify ``model`` for ``plan``; the returned model has exactly the planned
    trainable parameters marked ``requires_grad``. ``model_dir`` (the base model's local
    safetensors) is read by LoftQ."""
    t = plan.method
    if t == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if t == "adapter":
        assert plan.size is not None
        bottleneck.add_adapters(model, plan.modules, plan.size,
                                non_linearity=ADAPTER_NON_LINEARITY, dropout=method.dropout)
        return model
    from peft import get_peft_model

    cfg = peft_config(plan, method, shape)
    if cfg is None:  # pragma: no cover - every method is handled above
        raise ConfigError(f"unsupported method '{t}'")
    if t == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    peft_model = get_peft_model(model, cfg)
    if getattr(method, "init", None) == "loftq":
        _loftq(peft_model, model_dir)
    return peft_model


def _loftq(model: Any, model_dir: Path | None) -> None:
    """LoftQ on the 4-bit qlora base: A and B offset the quantisation error of each weight,
    computed against the full-precision weights read from the model's safetensors."""
    from peft import replace_lora_weights_loftq

    if model_dir is None or not any(model_dir.glob("*.safetensors")):
        raise ConfigError("method.init loftq reads the base model's full-precision weights from "
                          "safetensors files, and the model directory has none; use init "
                          "default or gaussian")
    try:
        replace_lora_weights_loftq(model, model_path=str(model_dir))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"method.init loftq failed: {exc}") from None


def initial_adapter(model: Any, method: Any) -> dict[str, Any] | None:
    """The adapter tensors right after a PiSSA/OLoRA initialisation (CPU copies), kept for
    converting the artifact; None for every other initialisation."""
    if getattr(method, "init", None) not in CONVERTED_INITS:
        return None
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", copy=True)
            for k, v in get_peft_model_state_dict(model).items()}


def convert_to_plain_lora(out_dir: Path, initial: dict[str, Any]) -> None:
    """Rewrite a saved PiSSA/OLoRA adapter as the plain LoRA adapter it amounts to on the
    original base: ``ΔW = B x A - B0 x A0``, i.e. A' = [A; A0], B' = [B, -B0] (rank 2r; alpha
    doubled, or x √2 with rsLoRA, so the scale stays the same)."""
    import torch
    from safetensors.torch import load_file, save_file

    weights = out_dir / "adapter_model.safetensors"
    trained = load_file(str(weights))
    out: dict[str, Any] = {}
    for name, tensor in trained.items():
        if name not in initial:
            raise RuntimeError(f"cannot convert the PiSSA/OLoRA adapter: {name} has no "
                               "initial value")
        init = initial[name].to(tensor.dtype)
        if "lora_A" in name:
            out[name] = torch.cat([tensor, init], dim=0).contiguous()
        elif "lora_B" in name:
            out[name] = torch.cat([tensor, -init], dim=1).contiguous()
        else:
            out[name] = tensor
    save_file(out, str(weights), metadata={"format": "pt"})
    cfg_file = out_dir / "adapter_config.json"
    doc = json.loads(cfg_file.read_text())
    doc["init_lora_weights"] = True
    doc["r"] = 2 * int(doc["r"])
    doc["lora_alpha"] = doc["lora_alpha"] * (math.sqrt(2) if doc.get("use_rslora") else 2)
    cfg_file.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def count_trainable(model: Any) -> tuple[int, int]:
    """(trainable, all) the way PEFT's print_trainable_parameters counts them."""
    if hasattr(model, "get_nb_trainable_parameters"):
        t, a = model.get_nb_trainable_parameters()
        return int(t), int(a)
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() or int(getattr(p, "ds_numel", 0))
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def quantization_config(precision: str) -> Any:
    """4-bit NF4 with double quantization for qlora (bitsandbytes, CUDA only)."""
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("method qlora needs a CUDA GPU (bitsandbytes 4-bit kernels); this "
                          "process has none. Use method lora on CPU")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("method qlora needs the bitsandbytes package in the trainer "
                          "image") from None
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if precision == "bf16" else torch.float16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute,
                              bnb_4bit_quant_storage=compute)
