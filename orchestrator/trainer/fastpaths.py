"""Optional GPU fast paths, used only when the trainer image has them (trainer_image
Dockerfile, build arg GPU_FAST_PATHS=1) and they apply:

- FlashAttention-2 (``attn_implementation="flash_attention_2"``): on CUDA, with bf16 or fp16
  weights (not method full, whose base weights stay fp32), ``flash_attn`` importable and
  the architecture supporting it in transformers. It also runs packed sequences as varlen
  attention (see data.pack). Otherwise the load keeps transformers' default (SDPA where the
  architecture has it, else eager), as before.
- Liger kernels (``TrainingArguments(use_liger_kernel=True)``: fused RMSNorm, RoPE, SwiGLU
  and linear + cross-entropy): on CUDA, with ``liger_kernel`` importable and a model type
  it patches, and not under ZeRO-3 (its fused loss reads ``lm_head.weight`` directly,
  which ZeRO-3 keeps partitioned outside the module's own forward).

``decide`` is pure (flags in, choice out) and unit-tested; ``probe`` reads the flags from
the process. The choice is logged and recorded in kubetune.json ("fastPaths").
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("orchestrator.trainer")

FLASH = "flash_attention_2"


@dataclass(frozen=True)
class Flags:
    cuda: bool
    precision: str  # bf16 | fp16 | fp32
    method: str  # spec.method.type
    model_type: str  # config.model_type
    zero_stage: int = 0
    flash_attn_installed: bool = False
    arch_supports_flash: bool = False
    liger_installed: bool = False
    liger_model_types: frozenset[str] = frozenset()


@dataclass(frozen=True)
class FastPaths:
    attn_implementation: str | None = None  # None: transformers' default (sdpa / eager)
    liger: bool = False
    why_not: tuple[str, ...] = field(default=())

    def summary(self) -> dict[str, Any]:
        return {"flashAttention2": self.attn_implementation == FLASH, "liger": self.liger,
                "notes": list(self.why_not)}

    def describe(self) -> str:
        used = [n for n, on in (("flash-attention 2", self.attn_implementation == FLASH),
                                ("liger kernels", self.liger)) if on]
        return (", ".join(used) or "none") + (f" ({'; '.join(self.why_not)})"
                                              if self.why_not else "")


def decide(f: Flags) -> FastPaths:
    """Which fast paths this run uses; ``why_not`` says why an installed one is not."""
    if not f.cuda:
        return FastPaths()  # CPU: nothing to say, nothing installed is usable
    notes: list[str] = []
    attn = None
    if f.flash_attn_installed:
        if f.precision not in ("bf16", "fp16"):
            notes.append(f"flash-attention needs bf16/fp16, precision is {f.precision}")
        elif f.method == "full":
            notes.append("flash-attention not used for method full (fp32 base weights)")
        elif not f.arch_supports_flash:
            notes.append(f"flash-attention not supported by model type {f.model_type}")
        else:
            attn = FLASH
    liger = False
    if f.liger_installed:
        if f.model_type not in f.liger_model_types:
            notes.append(f"liger kernels do not support model type {f.model_type}")
        elif f.zero_stage == 3:
            notes.append("liger kernels not used under ZeRO-3 (partitioned lm_head)")
        else:
            liger = True
    return FastPaths(attn, liger, tuple(notes))


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _arch_supports_flash(config: Any) -> bool:
    try:
        from transformers import AutoModelForCausalLM

        cls = AutoModelForCausalLM._model_mapping[type(config)]
    except Exception:
        return False
    return bool(getattr(cls, "_supports_flash_attn", False)
                or getattr(cls, "_supports_flash_attn_2", False))


def _liger_model_types() -> frozenset[str]:
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except Exception:  # not installed, or an incompatible version
        return frozenset()
    return frozenset(MODEL_TYPE_TO_APPLY_LIGER_FN)


def probe(*, cuda: bool, precision: str, method: str, config: Any,
          zero_stage: int = 0) -> Flags:
    flash = cuda and _installed("flash_attn")
    liger = cuda and _installed("liger_kernel")
    return Flags(cuda=cuda, precision=precision, method=method,
                 model_type=str(getattr(config, "model_type", "")), zero_stage=zero_stage,
                 flash_attn_installed=flash,
                 arch_supports_flash=flash and _arch_supports_flash(config),
                 liger_installed=liger,
                 liger_model_types=_liger_model_types() if liger else frozenset())
