"""Generation samples: the trained model's greedy completions of the first ``output.samples``
eval prompts, stored in ``kubetune.json`` (``samples: [{prompt, completion}]``) and shown by
``kubetune status``. A look at what the adapter does, next to the numbers.

Prompts come from data.eval, in its format: ``instruction`` the prompt field; ``chat`` the
messages before the last assistant turn, rendered with the chat template and its generation
prompt (``prompt`` is that rendered text: what the model saw); ``text`` the first half of
the text's tokens (at most :data:`TEXT_PROMPT_TOKENS`).

Greedy decoding, at most :data:`MAX_NEW_TOKENS` new tokens (fewer when the prompt nearly fills
the eval length), stopping at EOS. Every rank generates the same prompts: under ZeRO-3 each
forward pass gathers parameters collectively, and ``generate`` keeps the ranks in step
(``synced_gpus``). A failure to generate never fails the run: it is logged and recorded as
``samplesError``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from orchestrator.trainer.data import render_chat

log = logging.getLogger("orchestrator.trainer")

MAX_NEW_TOKENS = 64
TEXT_PROMPT_TOKENS = 32
MAX_CHARS = 2000  # per prompt/completion in kubetune.json


def prompts(payloads: Sequence[Any], fmt: str, tokenizer: Any, n: int,
            max_len: int) -> list[tuple[str, list[int]]]:
    """(display text, token ids) of the first ``n`` eval records' prompts; ids keep the last
    ``max_len - MAX_NEW_TOKENS`` tokens (at least 1)."""
    out: list[tuple[str, list[int]]] = []
    keep = max(1, max_len - MAX_NEW_TOKENS)
    for payload in payloads:
        if len(out) >= n:
            break
        if fmt == "instruction":
            text = payload[0]
            ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
            if ids and ids[-1] == tokenizer.eos_token_id:
                ids = ids[:-1]
        elif fmt == "chat":
            last = max(i for i, m in enumerate(payload) if m["role"] == "assistant")
            text = render_chat(tokenizer, payload[:last], gen=True)
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            ids = list(tokenizer(payload, add_special_tokens=True)["input_ids"])
            ids = ids[:max(1, min(TEXT_PROMPT_TOKENS, len(ids) // 2))]
            text = tokenizer.decode(ids, skip_special_tokens=True)
        if ids:
            out.append((text, ids[-keep:]))
    return out


def generate(trainer: Any, items: list[tuple[str, list[int]]], tokenizer: Any,
             max_len: int) -> tuple[list[dict[str, str]], str | None]:
    """Greedy completions (collective: every rank calls it). Returns (samples, error)."""
    if not items:
        return [], None
    import torch
    from transformers import GenerationConfig

    model = trainer.model
    was_training = model.training
    model.eval()
    out: list[dict[str, str]] = []
    try:
        for text, ids in items:
            budget = max(1, min(MAX_NEW_TOKENS, max_len - len(ids)))
            cfg = GenerationConfig(max_new_tokens=budget, do_sample=False, num_beams=1,
                                   use_cache=True, pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id)
            x = torch.tensor([ids], device=trainer.args.device)
            with torch.no_grad():
                y = model.generate(input_ids=x, attention_mask=torch.ones_like(x),
                                   generation_config=cfg)
            completion = tokenizer.decode(y[0, len(ids):], skip_special_tokens=True)
            out.append({"prompt": text[-MAX_CHARS:], "completion": completion[:MAX_CHARS]})
    except Exception as exc:  # a sample is a courtesy: never fail a trained run over it
        log.warning("generation samples failed: %s: %s", type(exc).__name__, exc)
        return out, f"{type(exc).__name__}: {exc}"[:500]
    finally:
        model.train(was_training)
    return out, None


__all__ = ["MAX_NEW_TOKENS", "generate", "prompts"]
