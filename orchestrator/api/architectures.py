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
# Sizes no real decoder comes near. A config can arrive from a trial pod (the sweep learns
# the base model's shape from its first trial), so it is bounded before any loop runs.
MAX_LAYERS = 1024
MAX_DIM = 1 << 20
MAX_VOCAB = 1 << 24


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
    """The ModelShape of a ``config.json`` dict, or None for architectures not covered and
    for configs that are malformed or outside every real model's sizes."""
    model_type = str(config.get("model_type", ""))
    build = _llama_like if model_type in LLAMA_LIKE else _gpt2 if model_type == "gpt2" else None
    if build is None or not _plausible(config):
        return None
    try:
        shape = build(config)
    except (KeyError, TypeError, ValueError, ZeroDivisionError, OverflowError):
        return None
    dims_ok = all(0 < x.in_features <= MAX_DIM and 0 < x.out_features <= MAX_DIM
                  for x in shape.linears[:16])
    return shape if dims_ok and shape.total_params > 0 else None


def _plausible(c: Mapping[str, Any]) -> bool:
    """Every size the formulas read is a positive integer within bounds (bools and floats
    are not sizes); checked before a layer loop can run."""
    limits = {"num_hidden_layers": MAX_LAYERS, "n_layer": MAX_LAYERS, "vocab_size": MAX_VOCAB,
              "n_positions": MAX_DIM, "hidden_size": MAX_DIM, "n_embd": MAX_DIM,
              "intermediate_size": MAX_DIM, "n_inner": MAX_DIM, "head_dim": MAX_DIM,
              "num_attention_heads": MAX_DIM, "num_key_value_heads": MAX_DIM}
    for key, top in limits.items():
        v = c.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= top:
            return False
    return True


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
