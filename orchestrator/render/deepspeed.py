"""The DeepSpeed config generated from a FineTuneJob spec (user keys deep-merged over it)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from orchestrator.api.job import FineTuneJobSpec


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """`override` over `base`: nested dicts merge, anything else is replaced."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def generated_deepspeed_config(spec: FineTuneJobSpec) -> dict[str, Any]:
    """The config kubetune derives from the spec, before the user's overrides."""
    t = spec.training
    ds = spec.distributed.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        # overlap communication with backward; contiguous buffers avoid fragmentation
        zero.update({"overlap_comm": True, "contiguous_gradients": True})
    if ds.zero_stage == 3:
        # gather the sharded weights when saving so the adapter is written whole
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        # sized from the model's hidden size by transformers ("auto"): prefetch buckets that
        # fit the layers, and small parameters (norms, biases) kept resident instead of being
        # gathered at every forward
        zero.update(
            {
                "reduce_bucket_size": "auto",
                "stage3_prefetch_bucket_size": "auto",
                "stage3_param_persistence_threshold": "auto",
            }
        )
    if ds.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if ds.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config: dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": spec.gradient_accumulation_steps,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16"},
        "steps_per_print": t.eval_every,
        "wall_clock_breakdown": False,
    }
    if ds.offload == "cpu":
        # Offloaded optimizer states are stepped on the CPU: DeepSpeed's own vectorised
        # CPUAdam, not a client torch AdamW (slow there, and refused by DeepSpeed unless
        # zero_force_ds_cpu_optimizer is off). "auto" values come from spec.training through
        # the trainer's TrainingArguments; the learning-rate schedule stays the trainer's.
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        }
    if t.precision == "fp16":
        # dynamic loss scaling (loss_scale 0), DeepSpeed's recommended fp16 setting
        config["fp16"].update(
            {
                "loss_scale": 0,
                "initial_scale_power": 16,
                "loss_scale_window": 1000,
                "hysteresis": 2,
                "min_loss_scale": 1,
            }
        )
    return config


def render_deepspeed_config(spec: FineTuneJobSpec) -> dict[str, Any]:
    """Generated config with `distributed.deepspeed.config` deep-merged over it."""
    return deep_merge(generated_deepspeed_config(spec), spec.distributed.deepspeed.config)
