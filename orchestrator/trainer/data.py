"""Training data: reading JSONL/Parquet, validating records, tokenizing with loss masks.

Every record is validated before any tokenization so that a bad file fails in seconds with
``DataError`` naming the file, the line (JSONL) or row (Parquet) and the field.

Loss masks (label -100 means "no loss"):

- ``text``: every token, plus EOS.
- ``instruction``: only the response tokens and the EOS after them.
- ``chat``: only the tokens of assistant turns, including the template's end-of-turn marker.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.trainer.errors import ConfigError, DataError

log = logging.getLogger("orchestrator.trainer")

IGNORE = -100
CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})


@dataclass(frozen=True)
class Fields:
    text: str = "text"
    prompt: str = "prompt"
    response: str = "response"
    messages: str = "messages"


@dataclass
class Record:
    where: int  # 1-based line (JSONL) or row (Parquet)
    data: dict[str, Any]


def _unit(name: str) -> str:
    return "row" if name.endswith(".parquet") else "line"


def read_records(path: Path, display: str) -> list[Record]:
    """Records of a JSONL (``.jsonl``/``.json``) or Parquet (``.parquet``) file."""
    if not path.exists():
        raise DataError("file not found", file=display)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".jsonl", ".json", ".parquet"))
        if not files:
            raise DataError("directory holds no .jsonl or .parquet files", file=display)
        out: list[Record] = []
        for f in files:
            out.extend(read_records(f, f"{display.rstrip('/')}/{f.relative_to(path).as_posix()}"))
        return out
    if path.suffix == ".parquet":
        records = list(_read_parquet(path, display))
    else:
        records = list(_read_jsonl(path, display))
    if not records:
        raise DataError("file is empty (no records)", file=display)
    return records


def _read_jsonl(path: Path, display: str) -> Iterator[Record]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise DataError(f"invalid JSON: {exc}", file=display, line=lineno) from None
            if not isinstance(obj, dict):
                raise DataError(f"expected a JSON object, got {type(obj).__name__}",
                                file=display, line=lineno)
            yield Record(lineno, obj)


def _read_parquet(path: Path, display: str) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DataError(f"cannot read Parquet: {exc}", file=display) from None
    for i, row in enumerate(table.to_pylist(), start=1):
        yield Record(i, row)


def _require_str(rec: Record, key: str, display: str, *, allow_empty: bool = False) -> str:
    unit = _unit(display)
    if key not in rec.data:
        raise DataError(f"{unit} {rec.where}: missing field", file=display, field=key)
    value = rec.data[key]
    if not isinstance(value, str):
        raise DataError(f"{unit} {rec.where}: expected a string, got {type(value).__name__}",
                        file=display, field=key)
    if not allow_empty and not value.strip():
        raise DataError(f"{unit} {rec.where}: empty string", file=display, field=key)
    return value


def validate(records: Sequence[Record], fmt: str, display: str, fields: Fields) -> list[Any]:
    """Check every record against ``fmt``; return the payloads (str, (prompt, response) or a
    message list)."""
    out: list[Any] = []
    unit = _unit(display)
    for rec in records:
        if fmt == "text":
            out.append(_require_str(rec, fields.text, display))
        elif fmt == "instruction":
            out.append((_require_str(rec, fields.prompt, display, allow_empty=True),
                        _require_str(rec, fields.response, display)))
        elif fmt == "chat":
            msgs = rec.data.get(fields.messages)
            if fields.messages not in rec.data:
                raise DataError(f"{unit} {rec.where}: missing field", file=display,
                                field=fields.messages)
            if not isinstance(msgs, list) or not msgs:
                raise DataError(f"{unit} {rec.where}: expected a non-empty list of messages",
                                file=display, field=fields.messages)
            for j, m in enumerate(msgs):
                f = f"{fields.messages}[{j}]"
                if not isinstance(m, dict):
                    raise DataError(f"{unit} {rec.where}: message is not an object",
                                    file=display, field=f)
                if m.get("role") not in CHAT_ROLES:
                    raise DataError(f"{unit} {rec.where}: role must be one of "
                                    f"{sorted(CHAT_ROLES)}, got {m.get('role')!r}",
                                    file=display, field=f + ".role")
                if not isinstance(m.get("content"), str):
                    raise DataError(f"{unit} {rec.where}: content must be a string",
                                    file=display, field=f + ".content")
            if not any(m["role"] == "assistant" for m in msgs):
                raise DataError(f"{unit} {rec.where}: no assistant message to train on",
                                file=display, field=fields.messages)
            out.append([{"role": m["role"], "content": m["content"]} for m in msgs])
        else:
            raise ConfigError(f"unknown data.format '{fmt}' (use chat, instruction or text)")
    return out


# --- tokenization ---------------------------------------------------------------------------


def _eos(tokenizer: Any) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def tokenize(payloads: Sequence[Any], fmt: str, tokenizer: Any, display: str,
             where: Sequence[int]) -> list[dict[str, list[int]]]:
    """Token ids and labels (``IGNORE`` where no loss) per example, untruncated."""
    if fmt == "text":
        enc = tokenizer(list(payloads), add_special_tokens=True)["input_ids"]
        out = []
        for ids in enc:
            ids = list(ids)
            if not ids or ids[-1] != tokenizer.eos_token_id:
                ids += _eos(tokenizer)
            out.append({"input_ids": ids, "labels": list(ids)})
        return out
    if fmt == "instruction":
        prompts = tokenizer([p for p, _ in payloads], add_special_tokens=True)["input_ids"]
        responses = tokenizer([r for _, r in payloads], add_special_tokens=False)["input_ids"]
        out = []
        for p, r in zip(prompts, responses, strict=True):
            p = list(p)
            if p and p[-1] == tokenizer.eos_token_id:  # some tokenizers append EOS themselves
                p = p[:-1]
            r = list(r) + _eos(tokenizer)
            out.append({"input_ids": p + r, "labels": [IGNORE] * len(p) + r})
        return out
    if fmt == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("data.format is chat but the model's tokenizer has no chat "
                              "template (tokenizer_config.json 'chat_template'); add one or use "
                              "format instruction")
        return [_tokenize_chat(m, tokenizer, display, w) for m, w in zip(payloads, where,
                                                                          strict=True)]
    raise ConfigError(f"unknown data.format '{fmt}'")


def render_chat(tokenizer: Any, messages: list[dict[str, str]], gen: bool = False) -> str:
    return str(tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=gen))


#: Conversations with fewer assistant turns take the per-prefix method directly: it renders
#: 1 + 2 x turns times, the linear one about 4 + 2 x roles, so below this it is no slower.
LINEAR_FROM_TURNS = 3
_SENTINEL = "\ue000{}\ue001"  # private-use characters: no template or content uses them


def _tokenize_chat(messages: list[dict[str, str]], tokenizer: Any, display: str,
                   where: int) -> dict[str, list[int]]:
    """Render with the chat template; the loss covers the assistant turns' character spans
    (see ``chat_spans_by_prefixes`` for what a span is)."""
    try:
        full = render_chat(tokenizer, messages)
        spans = None
        if sum(m["role"] == "assistant" for m in messages) >= LINEAR_FROM_TURNS:
            spans = chat_spans_linear(messages, tokenizer, full)
        if spans is None:
            spans = chat_spans_by_prefixes(messages, tokenizer, full)
    except ConfigError:
        raise
    except Exception as exc:  # jinja raises for messages the template rejects
        raise DataError(f"{_unit(display)} {where}: the chat template rejected the messages: "
                        f"{exc}", file=display, field="messages") from None
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE] * len(ids)
    si = 0
    for t, (a, _b) in enumerate(enc["offset_mapping"]):
        while si < len(spans) and a >= spans[si][1]:
            si += 1
        if si < len(spans) and spans[si][0] <= a < spans[si][1]:
            labels[t] = ids[t]
    return {"input_ids": ids, "labels": labels}


def chat_spans_by_prefixes(messages: list[dict[str, str]], tokenizer: Any,
                           full: str) -> list[tuple[int, int]]:
    """Assistant turn i spans from the end of the render of ``messages[:i]`` with a generation
    prompt to the end of the render of ``messages[:i + 1]``, where both are prefixes of the
    full render ``full``; else (the template rewrites history, e.g. drops old reasoning) its
    content, found in ``full``. Two renders per turn, each as long as the history: quadratic
    in the turns (``chat_spans_linear`` is the fast path)."""
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], gen=True) if i else ""
        upto = render_chat(tokenizer, messages[: i + 1])
        if full.startswith(before) and full.startswith(upto) and len(upto) > len(before):
            spans.append((len(before), len(upto)))
        else:  # template rewrites history (e.g. drops old reasoning): find the content
            start = full.find(m["content"], cursor)
            if start < 0:
                raise ConfigError("cannot locate assistant turns in the chat template's "
                                  "output; use format instruction")
            spans.append((start, start + len(m["content"])))
        cursor = spans[-1][1]
    return spans


def chat_spans_linear(messages: list[dict[str, str]], tokenizer: Any,
                      full: str) -> list[tuple[int, int]] | None:
    """The spans of ``chat_spans_by_prefixes`` from a constant number of renders, or None
    when the template does not fit the model below (the caller then takes that method).

    Model (ChatML, Llama-3, Gemma, Mistral-like templates): the render of ``messages[:k]`` is
    the prefix of ``full`` ending a fixed string ``END[role]`` after message k-1's content
    (the whole of ``full`` for the last message), and the render with a generation prompt
    is that prefix plus a fixed ``GEN``. So:

    1. one render with sentinel contents locates every content in ``full`` (the template
       must copy contents verbatim: no trim of surrounding blanks, no branching on them);
    2. ``END[role]`` is measured at the first and the last message of each role that
       matters, ``GEN`` at the first and the last assistant turn, by real prefix renders
       (they must agree, so ``loop.first``/``loop.last`` special cases fall back);
    3. every turn is checked to carry those strings where the model puts them."""
    if any("\ue000" in m["content"] or "\ue001" in m["content"] for m in messages):
        return None
    n = len(messages)
    try:
        skeleton = render_chat(tokenizer, [{"role": m["role"], "content": _SENTINEL.format(j)}
                                           for j, m in enumerate(messages)])
    except Exception:
        return None
    # 1. Content positions in the full render, and the check that the template is verbatim.
    starts: list[int] = []
    ends: list[int] = []
    parts: list[str] = []
    pos = size = 0
    for j, m in enumerate(messages):
        mark = _SENTINEL.format(j)
        k = skeleton.find(mark, pos)
        if k < 0 or "\ue000" in skeleton[pos:k]:
            return None
        parts += [skeleton[pos:k], m["content"]]
        size += k - pos
        starts.append(size)
        size += len(m["content"])
        ends.append(size)
        pos = k + len(mark)
    if "\ue000" in skeleton[pos:]:
        return None
    parts.append(skeleton[pos:])
    if "".join(parts) != full:
        return None
    roles = [m["role"] for m in messages]
    turns = [i for i, r in enumerate(roles) if r == "assistant"]
    # 2. END per role, for the messages whose end bounds a span (the last message's is the
    # end of ``full``), measured where the role first and last occurs.
    needed = {i for i in turns if i < n - 1} | {i - 1 for i in turns if i > 0}
    end_of: dict[str, str] = {}
    for role in {roles[i] for i in needed}:
        seen = [i for i in range(n - 1) if roles[i] == role]
        for i in {seen[0], seen[-1]}:
            upto = render_chat(tokenizer, messages[: i + 1])
            if len(upto) < ends[i] or not full.startswith(upto):
                return None
            if end_of.setdefault(role, upto[ends[i]:]) != upto[ends[i]:]:
                return None
    bound = [len(full) if j == n - 1 else ends[j] + len(end_of.get(roles[j], ""))
             for j in range(n)]
    gen: str | None = None
    later = [i for i in turns if i > 0]
    for i in {later[0], later[-1]} if later else ():
        before = render_chat(tokenizer, messages[:i], gen=True)
        if len(before) < bound[i - 1] or not full.startswith(before):
            return None
        if gen is None:
            gen = before[bound[i - 1]:]
        elif before[bound[i - 1]:] != gen:
            return None
    # 3. Every turn carries END and GEN where the model puts them.
    spans: list[tuple[int, int]] = []
    for i in turns:
        if i == 0:
            a = 0
        else:
            b0 = bound[i - 1]
            if full[ends[i - 1]:b0] != end_of[roles[i - 1]]:
                return None
            a = b0 + len(gen or "")
            if full[b0:a] != gen:
                return None
        if i < n - 1 and full[ends[i]:bound[i]] != end_of["assistant"]:
            return None
        if bound[i] <= a:
            return None
        spans.append((a, bound[i]))
    return spans


Example = dict[str, list[int]]


def truncate(examples: list[Example], max_len: int) -> tuple[list[Example], int, int]:
    """Cut to ``max_len`` tokens; drop examples left with nothing to learn.
    Returns (examples, truncated count, dropped count)."""
    out, cut, dropped = [], 0, 0
    for ex in examples:
        if len(ex["input_ids"]) > max_len:
            cut += 1
            ex = {"input_ids": ex["input_ids"][:max_len], "labels": ex["labels"][:max_len]}
        # A label only counts if it can be predicted, i.e. is not the first token.
        if any(lab != IGNORE for lab in ex["labels"][1:]):
            out.append(ex)
        else:
            dropped += 1
    return out, cut, dropped


def pack(examples: list[Example], max_len: int, seed: int) -> list[Example]:
    """Bin-pack whole examples (never split) into sequences of at most ``max_len`` tokens.

    Each example keeps its own ``position_ids`` (0, 1, …) and the first label of every
    example is ignored, as it is unpacked (nothing precedes it). With no attention mask,
    transformers reads the restarting position ids as sequence boundaries: flash-attention
    runs varlen, SDPA/eager get a block-diagonal causal mask. So no example attends to
    another and each example's loss equals its unpacked loss.

    Order: examples shuffled by ``seed``, then first-fit into the open sequences in
    that order (deterministic); the sequences are shuffled again by ``seed``."""
    order = list(range(len(examples)))
    rng = random.Random(seed)
    rng.shuffle(order)
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(examples[i]["input_ids"])
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(max_len - n)
    blocks: list[Example] = []
    for members in bins:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for i in members:
            ex = examples[i]
            ids += ex["input_ids"]
            labels += [IGNORE, *ex["labels"][1:]]
            positions += list(range(len(ex["input_ids"])))
        blocks.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    rng.shuffle(blocks)
    return blocks


class TokenDataset:
    """A map-style dataset of tokenized examples (torch's DataLoader accepts any object with
    ``__len__`` and ``__getitem__``)."""

    def __init__(self, examples: list[dict[str, list[int]]], name: str) -> None:
        self.examples = examples
        self.name = name

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.examples[i]

    @property
    def num_tokens(self) -> int:
        return sum(len(e["input_ids"]) for e in self.examples)


#: Non-padding tokens of a training batch, as a plain int: the training collator adds it and
#: the trainer takes it off before the forward pass (hf.py), so counting tokens needs no
#: device sync.
TOKENS_KEY = "kubetune_num_tokens"


class Collator:
    """Right-pads a batch; padding gets attention 0 and label -100.

    Packed sequences (with ``position_ids``) get no attention mask: the padding becomes a
    segment of its own (positions restart at 0), so nothing attends across segments.
    ``count_tokens`` adds the batch's non-padding token count under ``TOKENS_KEY``."""

    def __init__(self, pad_id: int, count_tokens: bool = False) -> None:
        self.pad_id = pad_id
        self.count_tokens = count_tokens

    def counting(self) -> Collator:
        return Collator(self.pad_id, count_tokens=True)

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, Any]:
        out = self._pad(batch)
        if self.count_tokens:
            out[TOKENS_KEY] = sum(len(b["input_ids"]) for b in batch)
        return out

    def _pad(self, batch: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        n = max(len(b["input_ids"]) for b in batch)
        if "position_ids" in batch[0]:
            ids = torch.full((len(batch), n), self.pad_id, dtype=torch.long)
            labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
            pos = torch.arange(n, dtype=torch.long).repeat(len(batch), 1)
            for i, b in enumerate(batch):
                k = len(b["input_ids"])
                ids[i, :k] = torch.tensor(b["input_ids"])
                labels[i, :k] = torch.tensor(b["labels"])
                pos[i, :k] = torch.tensor(b["position_ids"])
                pos[i, k:] = torch.arange(n - k)
            return {"input_ids": ids, "labels": labels, "position_ids": pos}
        ids = torch.full((len(batch), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k] = torch.tensor(b["input_ids"])
            labels[i, :k] = torch.tensor(b["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def load_examples(path: Path, display: str, fmt: str,
                  fields: Fields) -> tuple[list[Any], list[int]]:
    """Read and validate one data file: (payloads, their line/row numbers). Cheap, so it runs
    before the model is fetched and bad data fails in seconds."""
    records = read_records(path, display)
    return validate(records, fmt, display, fields), [r.where for r in records]


def build_dataset(payloads: Sequence[Any], where: Sequence[int], display: str, fmt: str,
                  tokenizer: Any, max_len: int, packing: bool, seed: int,
                  name: str) -> TokenDataset:
    """Tokenize, truncate and optionally pack validated examples."""
    examples = tokenize(payloads, fmt, tokenizer, display, where)
    examples, cut, dropped = truncate(examples, max_len)
    if not examples:
        raise DataError(f"no example has any trainable token within maxSeqLength={max_len} "
                        f"({dropped} dropped)", file=display)
    if cut or dropped:
        log.warning("%s: %d example(s) truncated to %d tokens, %d dropped (no trainable token "
                    "left)", display, cut, max_len, dropped)
    if packing:
        n = len(examples)
        examples = pack(examples, max_len, seed)
        log.info("%s: packed %d examples into %d sequences of <= %d tokens", display, n,
                 len(examples), max_len)
    ds = TokenDataset(examples, name)
    log.info("%s dataset %s: %d sequences, %d tokens", name, display, len(ds), ds.num_tokens)
    return ds


def mix_replay(train: TokenDataset, replay: TokenDataset, fraction: float,
               seed: int) -> TokenDataset:
    """Rehearsal (data.replay): add replay sequences so that they make up ``fraction`` of the
    training set, ``round(fraction / (1 - fraction) * len(train))`` of them, drawn without
    replacement while the replay set lasts and then again (deterministic in ``seed``). The
    trainer's sampler shuffles the whole set, so every batch carries about ``fraction``
    replay sequences; an epoch grows by the same share."""
    if fraction <= 0 or not len(replay):
        return train
    want = round(fraction / (1.0 - fraction) * len(train))
    rng = random.Random(seed + 7919)
    chosen: list[dict[str, list[int]]] = []
    while len(chosen) < want:
        order = list(range(len(replay)))
        rng.shuffle(order)
        chosen.extend(replay.examples[i] for i in order[: want - len(chosen)])
    log.info("replay: %d general sequences mixed into %d training sequences (%.0f%% of %d)",
             len(chosen), len(train), 100.0 * fraction, len(train) + len(chosen))
    return TokenDataset(train.examples + chosen, train.name)


def mix_counts(sizes: Sequence[int], weights: Sequence[float]) -> list[int]:
    """How many examples each set contributes to a data.trainMix epoch of ``sum(sizes)``
    examples: proportional to ``weights``, rounded by largest remainder so the counts add up
    exactly (ties go to the earlier set)."""
    total, wsum = sum(sizes), float(sum(weights))
    exact = [total * w / wsum for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def mix_sets(sets: Sequence[TokenDataset], weights: Sequence[float],
             seed: int) -> tuple[list[Example], list[int]]:
    """data.trainMix: the training examples of several sets in proportion to their weights.

    One epoch holds as many examples as the sets together; set i contributes
    ``mix_counts(...)[i]`` of them, drawn without replacement while it lasts and then again
    (each pass a fresh permutation), so small sets repeat and large ones are subsampled. The
    draw and the final order depend only on ``seed``. Returns (examples, per-set counts)."""
    counts = mix_counts([len(s) for s in sets], weights)
    rng = random.Random(seed + 104729)
    out: list[Example] = []
    for ds, want in zip(sets, counts, strict=True):
        chosen: list[Example] = []
        while len(chosen) < want:
            order = list(range(len(ds)))
            rng.shuffle(order)
            chosen.extend(ds.examples[i] for i in order[: want - len(chosen)])
        out.extend(chosen)
    rng.shuffle(out)
    return out, counts
