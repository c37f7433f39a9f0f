"""Applying a PEFT method (or full fine-tuning) to a loaded model according to a BudgetPlan."""

from __future__ import annotations

from typing import Any

from orchestrator.api.job import DEFAULT_RSLORA_ALPHA
from orchestrator.trainer import bottleneck
from orchestrator.trainer.budget import BudgetPlan, ModelShape
from orchestrator.trainer.errors import ConfigError

ADAPTER_NON_LINEARITY = "relu"


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


def apply(model: Any, plan: BudgetPlan, method: Any, shape: ModelShape) -> Any:
    """Wrap/modify ``model`` for ``plan``; the returned model has exactly the planned
    trainable parameters marked ``requires_grad``."""
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
    return get_peft_model(model, cfg)


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
