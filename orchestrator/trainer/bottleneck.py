"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020), compact and self-contained.

An adapter ``h + up(act(down(dropout(h))))`` is applied to the output of a sub-block's output
projection, i.e. after the attention block (``o_proj`` / GPT-2 ``attn.c_proj``) and/or after
the MLP block (``down_proj`` / ``mlp.c_proj``), before the residual addition — Houlsby
placement uses both points, Pfeiffer only the MLP one. ``up`` starts at zero, so a fresh
adapter is the identity and training starts from the base model's behaviour.

The adapter is attached as a child module ``kubetune_adapter`` of the projection plus a
forward hook, so base-model parameter names do not change (plain ``from_pretrained`` weights
and ZeRO-3 partitioning keep working).

On-disk format (``kubetune.bottleneck/v1``), with file names of its own:

- ``bottleneck_config.json``: ``{"kubetune_format": "kubetune.bottleneck/v1",
  "base_model_name_or_path", "bottleneck_size", "placement", "non_linearity", "dropout",
  "target_modules": [projection module names], "task_type"}``
- ``bottleneck_model.safetensors``: ``<projection>.kubetune_adapter.{down,up}.{weight,bias}``.

PEFT has no bottleneck tuner (and cannot register a new peft_type without patching its
enum). The files are deliberately not called ``adapter_config.json`` /
``adapter_model.safetensors``: PEFT, transformers and vLLM auto-detect a directory holding
those as a PEFT adapter and fail on a foreign ``peft_type``. Load it with
:func:`load_adapter` (``orchestrator.trainer.bottleneck`` imports only torch and
safetensors)::

    model = AutoModelForCausalLM.from_pretrained(base)
    load_adapter(model, "path/to/adapter")
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

FORMAT = "kubetune.bottleneck/v1"
CONFIG_NAME = "bottleneck_config.json"
WEIGHTS_NAME = "bottleneck_model.safetensors"
LEGACY_CONFIG_NAME, LEGACY_WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
CHILD = "kubetune_adapter"


def _module_classes() -> Any:
    import torch
    from torch import nn

    acts = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "swish": nn.SiLU}

    class BottleneckAdapter(nn.Module):
        def __init__(self, dim: int, size: int, non_linearity: str = "relu",
                     dropout: float = 0.0) -> None:
            super().__init__()
            self.down = nn.Linear(dim, size)
            self.up = nn.Linear(size, dim)
            self.act = acts[non_linearity]()
            self.dropout = nn.Dropout(dropout)
            self.enabled = True
            nn.init.zeros_(self.up.weight)  # identity at start
            nn.init.zeros_(self.up.bias)

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            x = self.down(self.dropout(h).to(self.down.weight.dtype))
            return h + self.up(self.act(x)).to(h.dtype)

    return BottleneckAdapter


def _hook(module: Any, _inputs: Any, output: Any) -> Any:
    adapter = getattr(module, CHILD)
    return adapter(output) if adapter.enabled else output


@contextlib.contextmanager
def disabled(model: Any) -> Iterator[None]:
    """The base model's behaviour: every bottleneck adapter of ``model`` is skipped."""
    adapters = [m for n, m in model.named_modules() if n.endswith(f".{CHILD}") or n == CHILD]
    for a in adapters:
        a.enabled = False
    try:
        yield
    finally:
        for a in adapters:
            a.enabled = True


def _out_features(module: Any) -> int:
    return int(getattr(module, "out_features", None) or module.nf)  # nn.Linear / GPT-2 Conv1D


def add_adapters(model: Any, targets: Sequence[str], size: int, *, non_linearity: str = "relu",
                 dropout: float = 0.0) -> list[str]:
    """Attach adapters after each module in ``targets``; freeze everything else.
    Returns the adapted module names."""
    cls = _module_classes()
    modules = dict(model.named_modules())
    missing = [t for t in targets if t not in modules]
    if missing:
        raise ValueError(f"adapter targets not found in the model: {missing[:5]}")
    for p in model.parameters():
        p.requires_grad_(False)
    ref = next(model.parameters())
    for name in targets:
        mod = modules[name]
        adapter = cls(_out_features(mod), size, non_linearity, dropout)
        # Keep the adapter in fp32 master weights when the base is in fp32; match device.
        adapter.to(device=ref.device if ref.device.type != "meta" else "cpu")
        mod.add_module(CHILD, adapter)
        mod.register_forward_hook(_hook)
    model.kubetune_bottleneck = {"bottleneck_size": size, "non_linearity": non_linearity,
                                 "dropout": dropout, "target_modules": list(targets)}
    return list(targets)


def adapter_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    marker = f".{CHILD}."
    return {k: v for k, v in state_dict.items() if marker in k}


def adapter_tensors(model: Any, zero3: bool = False) -> dict[str, Any]:
    """The adapter parameters of ``model`` as CPU tensors, and nothing of the base model.
    Under ZeRO-3 only these are gathered (collective: every rank must call it)."""
    params = [(n, p) for n, p in model.named_parameters() if f".{CHILD}." in n]
    gathered = contextlib.nullcontext()
    if zero3:
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters([p for _, p in params])
    with gathered:
        return {n: p.detach().cpu().clone() for n, p in params}


def save_adapter(out_dir: str | Path, state_dict: dict[str, Any], *, bottleneck_size: int,
                 placement: str, non_linearity: str, dropout: float,
                 target_modules: Sequence[str], base_model: str) -> None:
    """Write ``bottleneck_config.json`` + ``bottleneck_model.safetensors`` from a (full or
    adapter) state dict — on ZeRO-3 pass the gathered one."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in adapter_state_dict(state_dict).items()}
    if len(weights) != 4 * len(target_modules):
        raise RuntimeError(f"expected {4 * len(target_modules)} adapter tensors, found "
                           f"{len(weights)}")
    save_file(weights, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    config = {
        "kubetune_format": FORMAT,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "bottleneck_size": bottleneck_size,
        "placement": placement,
        "non_linearity": non_linearity,
        "dropout": dropout,
        "target_modules": list(target_modules),
        "inference_mode": True,
    }
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


def load_adapter(model: Any, adapter_dir: str | Path) -> Any:
    """Attach a saved bottleneck adapter to ``model`` (a base model loaded as usual) and load
    its weights; every tensor must match (strict). Returns the model in eval mode."""
    d = Path(adapter_dir)
    config_name, weights_name = CONFIG_NAME, WEIGHTS_NAME
    if not (d / CONFIG_NAME).is_file() and (d / LEGACY_CONFIG_NAME).is_file():
        config_name, weights_name = LEGACY_CONFIG_NAME, LEGACY_WEIGHTS_NAME  # before v0.2
    config = json.loads((d / config_name).read_text())
    if config.get("kubetune_format") != FORMAT:
        raise ValueError(f"{d / config_name} is not a {FORMAT} adapter")
    add_adapters(model, config["target_modules"], int(config["bottleneck_size"]),
                 non_linearity=config.get("non_linearity", "relu"), dropout=0.0)
    load_weights(model, d, weights_name)
    return model.eval()


def load_weights(model: Any, adapter_dir: str | Path, weights_name: str = WEIGHTS_NAME) -> None:
    """Load saved adapter tensors into a model that already carries the adapters; every
    tensor must match (strict)."""
    from safetensors.torch import load_file

    weights = load_file(str(Path(adapter_dir) / weights_name))
    own = adapter_state_dict(model.state_dict())
    if set(weights) != set(own):
        raise ValueError(f"adapter tensors do not match the model: missing "
                         f"{sorted(set(own) - set(weights))[:3]}, unexpected "
                         f"{sorted(set(weights) - set(own))[:3]}")
    model.load_state_dict(weights, strict=False)
