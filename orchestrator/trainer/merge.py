"""``output.merged``: the base model with the trained adapter folded into its weights, for
serving without PEFT (``AutoModelForCausalLM.from_pretrained(<artifact>/merged)``).

The merge starts from the artifact, not from the model in training: rank 0 loads the
original base weights from the model directory on the CPU (in the training precision),
applies the adapter just saved into the artifact (``PeftModel.from_pretrained``) and calls
PEFT's ``merge_and_unload``. Under ZeRO-3 the adapter in the artifact is the gathered one
(``Trainer.save_model`` collects every shard), so no partitioned parameter is ever read,
the GPUs need no room for a second copy, and the merged weights are by construction the
weights a user would get by merging the shipped adapter themselves. PiSSA/OLoRA adapters are
already converted to plain LoRA on the original base at that point (see methods.py).

Only LoRA, DoRA and IA³ merge (the API rejects the rest): virtual tokens and bottleneck
layers have no place in the base weights, and a QLoRA adapter was trained against the 4-bit
base, not the bf16 weights on disk.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from orchestrator.api.job import MERGEABLE_METHODS

log = logging.getLogger("orchestrator.trainer")

MERGED_DIR = "merged"
# Serving stacks and the Hub handle 5 GB shards well (transformers 5 defaults to 50 GB).
MAX_SHARD_SIZE = "5GB"
SHARD_SIZE_ENV = "KUBETUNE_MERGED_MAX_SHARD_SIZE"  # tests: small shards from tiny models
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def max_shard_size() -> str:
    return os.environ.get(SHARD_SIZE_ENV) or MAX_SHARD_SIZE


def write_merged(model_dir: Path, adapter_dir: Path, tokenizer: Any, method: str,
                 precision: str) -> dict[str, Any]:
    """Write ``adapter_dir/merged/`` (sharded safetensors + index, config, generation config,
    tokenizer) and return its ``kubetune.json`` entry. Rank 0 only; CPU memory for one copy
    of the base model in ``precision``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if method not in MERGEABLE_METHODS:  # the API rejects these; never write a wrong model
        raise ValueError(f"method {method} has no adapter that merges into the base weights")
    dtype = getattr(torch, DTYPES[precision])
    out = adapter_dir / MERGED_DIR
    shard = max_shard_size()
    with _outside_zero3():
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype,
                                                    device_map="cpu")
        model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
        # safe_merge checks every merged weight for NaN/inf before replacing the original.
        merged = model.merge_and_unload(safe_merge=True)
        merged.save_pretrained(str(out), max_shard_size=shard)
    tokenizer.save_pretrained(str(out))
    weights = sorted(p.name for p in out.glob("*.safetensors"))
    if not weights:
        raise RuntimeError(f"merged weights missing in {out} after saving")
    log.info("merged model written to %s (%d safetensors shard(s), %s)", out, len(weights),
             DTYPES[precision])
    return {"path": f"{MERGED_DIR}/", "dtype": DTYPES[precision], "maxShardSize": shard,
            "weights": weights,
            "load": f"AutoModelForCausalLM.from_pretrained(dir + '/{MERGED_DIR}')"}


@contextmanager
def _outside_zero3() -> Iterator[None]:
    """A plain, whole model on this process: transformers reads ZeRO-3 from a process-wide
    reference to the training's DeepSpeed config and would otherwise partition the merge
    model across ranks that are not taking part (or refuse device_map)."""
    from transformers.integrations import deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


__all__ = ["MAX_SHARD_SIZE", "MERGED_DIR", "SHARD_SIZE_ENV", "max_shard_size", "write_merged"]
