"""Model structure: the shapes the budget solver needs, read from a meta-device model.

Building a model on the ``meta`` device allocates no memory, so a 70B shape takes the same
fraction of a second as a tiny one. The result is a pure :class:`~.budget.ModelShape`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from orchestrator.trainer.budget import Linear, ModelShape

_LAYER_RE = re.compile(r"\.(\d+)(?:\.|$)")

# Roles by the module's own name; attention/MLP ambiguity (GPT-2's c_proj) is resolved by
# the parent's name below.
_ROLE_BY_NAME = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
    "query": "q", "key": "k", "value": "v", "wq": "q", "wk": "k", "wv": "v", "wo": "o",
    "out_proj": "o", "c_attn": "qkv", "qkv_proj": "qkv", "query_key_value": "qkv", "Wqkv": "qkv",
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down", "gate_up_proj": "up",
    "c_fc": "up", "fc1": "up", "fc_in": "up", "dense_h_to_4h": "up", "w1": "gate", "w3": "up",
    "fc2": "down", "fc_out": "down", "dense_4h_to_h": "down", "w2": "down",
}
_AMBIGUOUS = {"c_proj", "dense", "proj", "out"}


def role_of(name: str) -> str:
    parts = name.split(".")
    last = parts[-1]
    if last in _ROLE_BY_NAME:
        return _ROLE_BY_NAME[last]
    if last in _AMBIGUOUS:
        parent = ".".join(parts[:-1]).lower()
        if "attn" in parent or "attention" in parent:
            return "o"
        if "mlp" in parent or "ffn" in parent or "feed_forward" in parent:
            return "down"
    return "other"


def load_config(model_dir: str | Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(model_dir))


def meta_model(config: Any) -> Any:
    """The model for ``config`` with every tensor on the meta device (no memory, no init)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.integrations import deepspeed as hf_ds

    # Under a ZeRO-3 TrainingArguments, from_config would partition the (meta) model through
    # deepspeed.zero.Init; a shape needs none of that, so hide the ZeRO-3 config meanwhile.
    ref = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = ref


def linear_modules(model: Any) -> list[tuple[str, int, int]]:
    """(name, in_features, out_features) of every linear layer except the output head.

    Works on meta, real and ZeRO-3-partitioned models: features come from module attributes,
    never from (possibly empty) weight tensors. GPT-2's Conv1D stores ``nx`` (in) and ``nf``
    (out)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    out = []
    for name, module in model.named_modules():
        if module is head:
            continue
        if isinstance(module, torch.nn.Linear):
            out.append((name, module.in_features, module.out_features))
        elif isinstance(module, Conv1D):
            out.append((name, module.nx, module.nf))
    return out


def count_params(model: Any) -> int:
    """Unique parameters (tied embeddings once), as PEFT counts them."""
    total = 0
    for p in model.parameters():
        n = p.numel()
        if n == 0 and hasattr(p, "ds_numel"):  # ZeRO-3 partitioned
            n = p.ds_numel
        total += n
    return total


def prompt_params_per_token(config: Any, method: str) -> int:
    """Parameters one virtual token costs, using PEFT's own config preparation (it accounts
    for grouped-query attention in prefix tuning)."""
    from peft import PrefixTuningConfig, PromptTuningConfig, TaskType
    from peft.utils.other import _prepare_prompt_learning_config

    cls = PrefixTuningConfig if method == "prefix" else PromptTuningConfig
    cfg = _prepare_prompt_learning_config(cls(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=1),
                                          config)
    if method == "prefix":
        return int(cfg.num_layers * 2 * cfg.token_dim)
    return int(cfg.token_dim * (cfg.num_transformer_submodules or 1))  # 1 for decoder-only


def shape_of(model: Any, config: Any | None = None) -> ModelShape:
    """The budget solver's view of ``model`` (meta, real or ZeRO-3-partitioned)."""
    from transformers.pytorch_utils import Conv1D

    config = config or model.config
    text = getattr(config, "text_config", None) or config
    linears = []
    for name, fin, fout in linear_modules(model):
        m = _LAYER_RE.search(name)
        linears.append(Linear(name, int(m.group(1)) if m else None, role_of(name), fin, fout))
    hidden = getattr(text, "hidden_size", None) or text.n_embd
    layers = getattr(text, "num_hidden_layers", None) or text.n_layer
    return ModelShape(
        model_type=str(getattr(config, "model_type", "unknown")),
        total_params=count_params(model),
        hidden_size=int(hidden),
        num_layers=int(layers),
        linears=tuple(linears),
        prompt_params_per_token=prompt_params_per_token(config, "prompt"),
        prefix_params_per_token=prompt_params_per_token(config, "prefix"),
        uses_conv1d=any(isinstance(m, Conv1D) for m in model.modules()),
    )


def shape_from_dir(model_dir: str | Path) -> ModelShape:
    """ModelShape of the model in ``model_dir`` without loading a single weight."""
    config = load_config(model_dir)
    return shape_of(meta_model(config), config)
