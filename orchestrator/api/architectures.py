"""Model shapes from a Hugging Face ``config.json`` alone: no torch, no weights.

The budget solver (``orchestrator.api.budget``) needs each linear module's in/out features
and the base model's parameter count. The trainer reads them from a meta-device model; the
controller cannot import torch, so for the common decoder architectures it computes the same
numbers from the config with the formulas below. A trainer-tier test checks that both agree
exactly for Llama, Mistral, Qwen2 and GPT-2. Unknown architectures return None: the sweep
then leaves the budget check to the trainer, which fails fast with InvalidConfig.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from orchestrator.api.budget import Linear, ModelShape

LLAMA_LIKE = frozenset({"llama", "mistral", "qwen2"})
SUPPORTED = frozenset(LLAMA_LIKE | {"gpt2"})


def _llama_like(c: Mapping[str, Any]) -> ModelShape:
    mt = str(c["model_type"])
    h, n_layers = int(c["hidden_size"]), int(c["num_hidden_layers"])
    nh = int(c["num_attention_heads"])
    nkv = int(c.get("num_key_value_heads") or nh)
    hd = int(c.get("head_dim") or h // nh)
    inter = int(c["intermediate_size"])
    vocab = int(c["vocab_size"])
    tie = bool(c.get("tie_word_embeddings", False))
    # Qwen2 always has q/k/v biases; Llama has them (and o's) only with attention_bias.
    qkv_bias = mt == "qwen2" or bool(c.get("attention_bias", False))
    o_bias = mt != "qwen2" and bool(c.get("attention_bias", False))
    mlp_bias = bool(c.get("mlp_bias", False)) if mt == "llama" else False

    per_layer = [
        ("self_attn.q_proj", "q", h, nh * hd),
        ("self_attn.k_proj", "k", h, nkv * hd),
        ("self_attn.v_proj", "v", h, nkv * hd),
        ("self_attn.o_proj", "o", nh * hd, h),
        ("mlp.gate_proj", "gate", h, inter),
        ("mlp.up_proj", "up", h, inter),
        ("mlp.down_proj", "down", inter, h),
    ]
    linears = tuple(
        Linear(f"model.layers.{i}.{name}", i, role, fin, fout)
        for i in range(n_layers)
        for name, role, fin, fout in per_layer
    )
    weights = sum(fin * fout for _, _, fin, fout in per_layer)
    biases = (
        ((nh + 2 * nkv) * hd if qkv_bias else 0)
        + (h if o_bias else 0)
        + ((2 * inter + h) if mlp_bias else 0)
    )
    layer_params = weights + biases + 2 * h  # two RMSNorm weights
    total = vocab * h + n_layers * layer_params + h + (0 if tie else vocab * h)
    return ModelShape(
        model_type=mt,
        total_params=total,
        hidden_size=h,
        num_layers=n_layers,
        linears=linears,
        prompt_params_per_token=h,
        # PEFT sizes prefix key/values by the KV heads for grouped-query attention
        prefix_params_per_token=n_layers * 2 * hd * nkv,
    )


def _gpt2(c: Mapping[str, Any]) -> ModelShape:
    h = int(c.get("n_embd", c.get("hidden_size", 768)))
    n_layers = int(c.get("n_layer", c.get("num_hidden_layers", 12)))
    inner = int(c.get("n_inner") or 4 * h)
    vocab, positions = int(c.get("vocab_size", 50257)), int(c.get("n_positions", 1024))
    per_layer = [
        ("attn.c_attn", "qkv", h, 3 * h),
        ("attn.c_proj", "o", h, h),
        ("mlp.c_fc", "up", h, inner),
        ("mlp.c_proj", "down", inner, h),
    ]
    linears = tuple(
        Linear(f"transformer.h.{i}.{name}", i, role, fin, fout)
        for i in range(n_layers)
        for name, role, fin, fout in per_layer
    )
    layer_params = sum(fin * fout + fout for _, _, fin, fout in per_layer) + 4 * h  # + 2 LNs
    total = vocab * h + positions * h + n_layers * layer_params + 2 * h  # lm_head tied
    return ModelShape(
        model_type="gpt2",
        total_params=total,
        hidden_size=h,
        num_layers=n_layers,
        linears=linears,
        prompt_params_per_token=h,
        prefix_params_per_token=n_layers * 2 * h,
        uses_conv1d=True,
    )


def shape_from_config(config: Mapping[str, Any]) -> ModelShape | None:
    """The ModelShape of a ``config.json`` dict, or None for architectures not covered."""
    model_type = str(config.get("model_type", ""))
    if model_type in LLAMA_LIKE:
        return _llama_like(config)
    if model_type == "gpt2":
        return _gpt2(config)
    return None


def shape_at(model_uri: str, read_text: Callable[[str], str]) -> ModelShape | None:
    """The shape of the model at ``model_uri`` from its config.json, read with ``read_text``
    (the caller's storage access, with its credentials). None when the model is not in
    object storage or a local path (pvc://, hf://), unreadable, or of an unknown architecture:
    the trainer then checks the budget itself at start."""
    uri = model_uri.rstrip("/")
    if not uri.startswith(("s3://", "file://")):
        return None
    try:
        config = json.loads(read_text(f"{uri}/config.json"))
    except Exception:  # any storage or parse failure: leave the check to the trainer
        return None
    return shape_from_config(config) if isinstance(config, dict) else None
