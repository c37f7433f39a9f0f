"""Evaluation losses that can be compared across trials.

A sweep compares ``evalLoss`` (and ``generalLossDelta``) between trials whose micro batch,
world size and ``maxSeqLength`` differ, so the number must not depend on any of them. HF's
evaluation loop averages per-batch token means (weighted by sequences), with the eval batch
equal to the training micro batch: the same model gives different losses at micro batch 1 and
8. Here the loss is::

    sum of per-token cross-entropy over every loss token of the whole set
    ---------------------------------------------------------------------
                      number of loss tokens in the whole set

The loss is computed here from the logits (not taken from the model's mean), on exactly the
tokens a causal LM scores: every label after the first position. Prompt tuning's virtual
tokens shift the logits; labels are aligned to them, and the first real token (which only
prompt tuning could predict) is not scored, so every method is scored on the same tokens.

Each rank evaluates every ``world_size``-th sequence, longest first, in batches of at most
:data:`EVAL_BATCH_TOKENS` padded tokens (bounded logits memory, whatever the training micro
batch), and the (sum, count) pairs are added across ranks in float64. Every rank plans
every rank's batches (the plan is deterministic) and ranks with fewer batches run padding
batches whose labels are all ignored, so all make the same number of forward passes
(ZeRO-3 gathers parameters collectively). The eval sets are truncated to
``data.evalMaxSeqLength`` (default: :data:`DEFAULT_EVAL_MAX_LEN` capped at the model's
context), never to the training ``maxSeqLength``.

The "before" of forgetting is the untouched base model: the general set is evaluated with
the adapters switched off (:func:`adapters_disabled`), not at step 0 with them on (prefix and
prompt tuning start with random virtual tokens), and cached per (model, general set).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from orchestrator.trainer.data import IGNORE, Collator, TokenDataset
from orchestrator.trainer.dist import rank, sum_across_ranks, world_size

log = logging.getLogger("orchestrator.trainer")

EVAL_BATCH_TOKENS = 8192  # padded tokens per eval forward
EVAL_BATCH_SIZE = 8  # sequences per device in Trainer.predict (the artifact probe)
DEFAULT_EVAL_MAX_LEN = 4096
BASELINE_VERSION = 1  # bump when the way the baseline is computed changes


def eval_max_length(configured: int | None, model_config: Any) -> int:
    """``data.evalMaxSeqLength`` when set, else 4096 capped at the model's context length."""
    if configured:
        return int(configured)
    context = getattr(model_config, "max_position_embeddings", None) or getattr(
        model_config, "n_positions", None)
    return min(DEFAULT_EVAL_MAX_LEN, int(context)) if context else DEFAULT_EVAL_MAX_LEN


def shard_batches(lengths: Sequence[int], ranks: int, this_rank: int,
                  max_tokens: int = EVAL_BATCH_TOKENS) -> list[list[int | None]]:
    """This rank's batches of example indices: every ``ranks``-th example, longest first,
    at most ``max_tokens`` padded tokens per batch (a longer single sequence goes alone).
    ``[None]`` is a padding batch: every rank gets the same number of batches."""
    def plan(r: int) -> list[list[int | None]]:
        batches: list[list[int | None]] = []
        cur: list[int | None] = []
        longest = 0
        for i in sorted(range(r, len(lengths), ranks), key=lambda i: (-lengths[i], i)):
            if cur and max(longest, lengths[i]) * (len(cur) + 1) > max_tokens:
                batches.append(cur)
                cur, longest = [], 0
            cur.append(i)
            longest = max(longest, lengths[i])
        return [*batches, cur] if cur else batches

    plans = [plan(r) for r in range(ranks)]
    most = max(len(p) for p in plans)
    return plans[this_rank] + [[None]] * (most - len(plans[this_rank]))


def summed_loss(logits: Any, labels: Any) -> tuple[Any, int]:
    """(sum of token cross-entropies in float32, token count) for causal-LM ``logits`` and
    ``labels`` (-100: not scored). When ``logits`` is longer than ``labels`` (prompt tuning
    prepends virtual tokens) the labels are aligned to its end. Scored: ``labels[:, 1:]``,
    one sequence at a time (bounded float32 memory)."""
    import torch
    import torch.nn.functional as F

    scored = labels.clone()
    scored[:, 0] = IGNORE
    extra = logits.shape[1] - scored.shape[1]
    if extra > 0:
        pad = torch.full((scored.shape[0], extra), IGNORE, dtype=scored.dtype,
                         device=scored.device)
        scored = torch.cat([pad, scored], dim=1)
    target = scored[:, 1:].to(logits.device)
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for row in range(logits.shape[0]):
        total += F.cross_entropy(logits[row, :-1].float(), target[row], ignore_index=IGNORE,
                                 reduction="sum")
    return total, int((target != IGNORE).sum())


def token_weighted_loss(model: Any, dataset: TokenDataset, *, pad_id: int, device: Any,
                        context: Any = None,
                        max_tokens: int = EVAL_BATCH_TOKENS) -> tuple[float, int]:
    """(loss, token count) of ``model`` on the whole ``dataset`` across all ranks; collective:
    every rank must call it. ``context`` is a callable returning a context manager wrapped
    around each forward (the Trainer's autocast)."""
    import torch

    collate = Collator(pad_id)
    filler = {"input_ids": dataset[0]["input_ids"][:2],
              "labels": [IGNORE] * min(2, len(dataset[0]["input_ids"]))}
    lengths = [len(ex["input_ids"]) for ex in dataset.examples]
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch_ids in shard_batches(lengths, world_size(), rank(), max_tokens):
                batch = collate([dataset[i] if i is not None else filler for i in batch_ids])
                with context() if context is not None else contextlib.nullcontext():
                    out = model(input_ids=batch["input_ids"].to(device),
                                attention_mask=batch["attention_mask"].to(device))
                s, n = summed_loss(out.logits, batch["labels"])
                total += float(s)  # a padding batch scores nothing: it keeps ranks in step
                count += n
    finally:
        model.train(was_training)
    total, n_all = sum_across_ranks([total, float(count)])
    if not n_all:
        raise ValueError(f"{dataset.name} set has no loss token")
    return total / n_all, int(n_all)


@contextlib.contextmanager
def adapters_disabled(model: Any) -> Iterator[None]:
    """Run ``model`` as the base model: PEFT adapters (incl. prefix/prompt virtual tokens)
    and kubetune bottleneck adapters switched off; a no-op for full fine-tuning."""
    from orchestrator.trainer import bottleneck

    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield
    elif getattr(model, "kubetune_bottleneck", None) is not None:
        with bottleneck.disabled(model):
            yield
    else:
        yield


def baseline_key(model_id: str, dataset: TokenDataset, precision: str) -> str:
    """Identifies a general-loss baseline: the base model, the tokenised general set (so the
    file, format, fields, truncation and tokenizer) and the precision."""
    h = hashlib.sha256()
    h.update(json.dumps([BASELINE_VERSION, model_id, precision]).encode())
    for ex in dataset.examples:
        h.update(json.dumps([ex["input_ids"], ex["labels"]]).encode())
    return h.hexdigest()


def model_identity(model_dir: Path, uri: str) -> str:
    """A cheap identity of a base model directory: its kubetune manifest when present, else
    the URI plus every file's name and size."""
    from orchestrator.storage.checksum import MANIFEST_NAME

    manifest = model_dir / MANIFEST_NAME
    if manifest.is_file():
        return hashlib.sha256(manifest.read_bytes()).hexdigest()
    files = sorted((p.relative_to(model_dir).as_posix(), p.stat().st_size)
                   for p in model_dir.rglob("*") if p.is_file())
    return hashlib.sha256(json.dumps([uri, files]).encode()).hexdigest()


class BaselineCache:
    """General-set losses of base models, one small JSON file per key (shared by every trial
    on a node through the object cache directory)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def get(self, key: str) -> float | None:
        try:
            doc = json.loads((self.root / f"{key}.json").read_text())
            return float(doc["loss"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, key: str, loss: float, tokens: int) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = self.root / f".{key}.{rank()}.tmp"
            tmp.write_text(json.dumps({"loss": loss, "tokens": tokens}))
            tmp.replace(self.root / f"{key}.json")
        except OSError as exc:  # a cache that cannot be written only costs time
            log.warning("could not cache the general-loss baseline in %s: %s", self.root, exc)


class Evaluator:
    """The trainer's evaluation: every eval set (``task``, ``general``) in one pass, one log
    entry and one ``on_evaluate`` call, so a sweep report carries this interval's general loss
    next to its eval loss. Installed as ``Trainer.evaluate`` by :func:`hf.trainer_class`."""

    def __init__(self, *, pad_id: int, model_id: str, precision: str, method: str,
                 cache: BaselineCache) -> None:
        self.pad_id = pad_id
        self.model_id = model_id
        self.precision = precision
        self.method = method
        self.cache = cache
        self.baseline: float | None = None
        self.baseline_tokens: int | None = None
        self.baseline_source: str | None = None

    def evaluate(self, trainer: Any, eval_dataset: Any = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        sets = eval_dataset if eval_dataset is not None else trainer.eval_dataset
        if isinstance(sets, TokenDataset):
            sets = {sets.name: sets}
        context = trainer.compute_loss_context_manager
        metrics: dict[str, float] = {}
        for name, ds in sets.items():
            if name == "general" and self.baseline is None:
                self.general_baseline(trainer, ds)
            loss, tokens = token_weighted_loss(trainer.model, ds, pad_id=self.pad_id,
                                               device=trainer.args.device, context=context)
            metrics[f"{metric_key_prefix}_{name}_loss"] = loss
            metrics[f"{metric_key_prefix}_{name}_tokens"] = tokens
        if "general" in sets and self.baseline is not None:
            metrics[f"{metric_key_prefix}_general_baseline_loss"] = self.baseline
        trainer.log(dict(metrics))
        trainer.control = trainer.callback_handler.on_evaluate(trainer.args, trainer.state,
                                                               trainer.control, metrics)
        return metrics

    def general_baseline(self, trainer: Any, ds: TokenDataset) -> None:
        """The base model's loss on the general set: from the cache, else evaluated now with
        the adapters switched off (collective)."""
        from orchestrator.trainer.dist import broadcast

        key = baseline_key(self.model_id, ds, self.precision)
        cached = broadcast(self.cache.get(key) if rank() == 0 else None)
        self.baseline_source = ("base model, 4-bit NF4 weights as trained"
                                if self.method == "qlora" else "base model")
        if cached is not None:
            self.baseline = cached
            log.info("general-loss baseline %.6f from cache (%s)", cached, key[:12])
            return
        if self.method == "full" and trainer.state.global_step > 0:
            log.warning("no cached general-loss baseline and full fine-tuning resumed at step "
                        "%d: the base model is gone, generalLossBefore is not reported",
                        trainer.state.global_step)
            self.baseline_source = None
            return
        with adapters_disabled(trainer.model):
            loss, tokens = token_weighted_loss(
                trainer.model, ds, pad_id=self.pad_id, device=trainer.args.device,
                context=trainer.compute_loss_context_manager)
        self.baseline, self.baseline_tokens = loss, tokens
        log.info("general-loss baseline (base model, adapters off) %.6f over %d tokens", loss,
                 tokens)
        if rank() == 0:
            self.cache.put(key, loss, tokens)

