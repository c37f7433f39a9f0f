"""Model FLOPs utilisation (MFU): how much of the accelerators' dense peak the training run
turns into useful model arithmetic.

Model FLOPs per trained token, in the convention of PaLM (appendix B) adapted to a frozen base:

- every matrix multiply of the model counts ``2 * in * out`` FLOPs forward. N is the weight
  count of the model's ``Linear`` layers (the LM head included, the input embedding, a table
  lookup, not);
- backward costs the gradient with respect to the activations (``2 * N``) through every
  layer, frozen or not, and the gradient with respect to the weights (another ``2 * N``) only
  for trainable weights: ``4 * N_frozen + 6 * N_trainable``;
- attention scores and their weighted sum add ``12 * layers * hidden * T`` with T the
  training context length (``maxSeqLength``), as PaLM counts it.

Recomputation under gradient checkpointing is not model arithmetic, so it lowers MFU, as it
should. The peak is the dense bf16/fp16 tensor-core rate of the device, from a table of
common data-centre GPUs, or ``KUBETUNE_PEAK_TFLOPS`` (per device); unknown devices (and
CPUs) get no MFU rather than a made-up one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

PEAK_ENV = "KUBETUNE_PEAK_TFLOPS"

# Dense bf16/fp16 tensor-core TFLOPS per device (vendor data sheets, without sparsity).
# Checked in order: a longer name before its prefix (H100 PCIe before H100, A100 before A10).
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("B200", 2250.0),
    ("GH200", 989.5),
    ("H200", 989.5),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.5),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 0.0),  # AWS's variant: no published dense rate, so no MFU
    ("A10", 125.0),
)


@dataclass(frozen=True)
class FlopsModel:
    """The counts MFU is computed from, also written to the log once."""

    frozen: int  # weights of frozen matmuls
    trainable: int  # weights of trainable matmuls (adapters, unfrozen layers)
    layers: int
    hidden: int
    context: int

    @property
    def per_token(self) -> float:
        return (4.0 * self.frozen + 6.0 * self.trainable
                + 12.0 * self.layers * self.hidden * self.context)


def _matmul_weights(module: Any) -> int:
    """Weights of one matmul layer (0 for anything else, PEFT's wrappers included: their base
    layer and adapters are counted on their own). Uses the layer's declared shape, not its
    tensor: under ZeRO-3 a rank holds an empty shard, and a 4-bit weight is packed."""
    import torch

    if isinstance(module, torch.nn.Linear):  # bitsandbytes' 4/8-bit layers are Linear too
        return module.in_features * module.out_features
    if type(module).__name__ == "Conv1D":  # GPT-2 style: weight (in, out)
        weight = module.weight
        shape = getattr(weight, "ds_shape", None) or weight.shape
        return int(shape[0]) * int(shape[1])
    return 0


def flops_model(model: Any, context: int) -> FlopsModel:
    """Count the model's matmul weights, frozen and trainable, as the run trains them."""
    frozen = trainable = 0
    for module in model.modules():
        n = _matmul_weights(module)
        if not n:
            continue
        weight = getattr(module, "weight", None)
        if weight is not None and getattr(weight, "requires_grad", False):
            trainable += n
        else:
            frozen += n
    cfg = getattr(model, "config", None)
    text = getattr(cfg, "get_text_config", None)  # multimodal configs nest the LM's
    cfg = text() if callable(text) else cfg
    layers = int(getattr(cfg, "num_hidden_layers", 0) or 0)
    hidden = int(getattr(cfg, "hidden_size", 0) or 0)
    return FlopsModel(frozen, trainable, layers, hidden, context)


def peak_flops(precision: str, device_name: str | None) -> float | None:
    """Peak FLOP/s of one device, or None when unknown (no MFU is reported then)."""
    override = os.environ.get(PEAK_ENV, "").strip()
    if override:
        try:
            value = float(override)
        except ValueError:
            return None
        return value * 1e12 if value > 0 else None
    if device_name is None or precision not in ("bf16", "fp16"):
        return None  # fp32 peaks differ by TF32 settings; CPUs have no table
    for name, tflops in PEAK_TFLOPS:
        if name in device_name:
            return tflops * 1e12 if tflops > 0 else None
    return None


def device_name() -> str | None:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def mfu(tokens_per_second: float, per_token: float, peak: float | None,
        devices: int) -> float | None:
    """Model FLOPs per second of the whole run over the peak of all its devices."""
    if peak is None or per_token <= 0 or devices <= 0:
        return None
    return tokens_per_second * per_token / (peak * devices)
