"""Data loading: formats, loss masks, truncation, packing, and precise errors."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from orchestrator.trainer.data import (
    IGNORE,
    Fields,
    build_dataset,
    load_examples,
    pack,
    truncate,
)
from orchestrator.trainer.errors import DataError, ExitCode
from tests.trainer import helpers

pytestmark = pytest.mark.trainer


@pytest.fixture(scope="module")
def tok(tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def _load(path: Path, fmt: str) -> tuple[list[Any], list[int]]:
    return load_examples(path, str(path), fmt, Fields())


def _text(tok: Any, ids: list[int]) -> str:
    return str(tok.decode(ids))


def test_instruction_loss_only_on_response(tok: Any, data_dir: Path) -> None:
    payloads, where = _load(data_dir / "eval.jsonl", "instruction")
    ds = build_dataset(payloads, where, "eval", "instruction", tok, 64, False, 0, "eval")
    ex = ds[0]
    trained = [i for i, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != IGNORE]
    prompt, response = payloads[0]
    assert _text(tok, trained) == response + tok.eos_token
    assert ex["labels"][: len(tok(prompt)["input_ids"])] == [IGNORE] * len(tok(prompt)["input_ids"])


def test_chat_loss_only_on_assistant_turns(tok: Any, tmp_path: Path) -> None:
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What color is the sky?"},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "And the sun?"},
            {"role": "assistant", "content": "Yellow."}]
    f = helpers.write_jsonl(tmp_path / "chat.jsonl", [{"messages": msgs}])
    payloads, where = _load(f, "chat")
    ex = build_dataset(payloads, where, "chat", "chat", tok, 256, False, 0, "t")[0]
    spans, cur = [], []
    for i, lab in zip(ex["input_ids"], ex["labels"], strict=True):
        if lab != IGNORE:
            cur.append(i)
        elif cur:
            spans.append(_text(tok, cur))
            cur = []
    if cur:
        spans.append(_text(tok, cur))
    assert spans == ["Blue.<|end|>", "Yellow.<|end|>"]


def test_text_truncation_and_packing(tok: Any, data_dir: Path) -> None:
    payloads, where = _load(data_dir / "train.jsonl", "text")
    full = build_dataset(payloads, where, "t", "text", tok, 256, False, 0, "t")
    short = build_dataset(payloads, where, "t", "text", tok, 8, False, 0, "t")
    assert max(len(e["input_ids"]) for e in short.examples) == 8
    assert len(short) == len(full)
    packed = build_dataset(payloads, where, "t", "text", tok, 64, True, 0, "t")
    assert all(len(e["input_ids"]) <= 64 for e in packed.examples)
    assert sum(len(e["input_ids"]) for e in packed.examples) == full.num_tokens
    assert len(packed) < len(full)
    # Deterministic by seed.
    assert pack(full.examples, 64, 3) == pack(full.examples, 64, 3)
    assert pack(full.examples, 64, 3) != pack(full.examples, 64, 4)


def test_truncation_drops_examples_without_trainable_tokens() -> None:
    ex = [{"input_ids": [1, 2, 3, 4], "labels": [IGNORE, IGNORE, IGNORE, 4]}]
    kept, cut, dropped = truncate(ex, 3)
    assert (kept, cut, dropped) == ([], 1, 1)


BAD = [
    ("empty.jsonl", "", "instruction", r"empty\.jsonl: file is empty"),
    ("json.jsonl", '{"prompt": "a", "response": "b"}\n\n{"prompt": "a", "resp\n', "instruction",
     r"json\.jsonl:3: invalid JSON"),
    ("missing.jsonl", '{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n', "instruction",
     r"missing\.jsonl: line 2: missing field \(field 'response'\)"),
    ("type.jsonl", '{"text": 3}\n', "text", r"type\.jsonl: line 1: expected a string, got int "
     r"\(field 'text'\)"),
    ("array.jsonl", '[1, 2]\n', "text", r"array\.jsonl:1: expected a JSON object"),
    ("noasst.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n",
     "chat", r"line 1: no assistant message"),
    ("role.jsonl", json.dumps({"messages": [{"role": "bot", "content": "hi"}]}) + "\n", "chat",
     r"line 1: role must be one of .* got 'bot' \(field 'messages\[0\]\.role'\)"),
]


@pytest.mark.parametrize(("name", "content", "fmt", "pattern"), BAD, ids=[b[0] for b in BAD])
def test_bad_data_names_file_line_and_field(tmp_path: Path, name: str, content: str, fmt: str,
                                            pattern: str) -> None:
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(DataError, match=pattern):
        _load(f, fmt)


def test_parquet_rows(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "response": ["x", None]}), f)
    with pytest.raises(DataError, match=r"d\.parquet: row 2: expected a string, got NoneType "
                                        r"\(field 'response'\)"):
        _load(f, "instruction")
    pq.write_table(pa.table({"prompt": ["a"], "response": ["x"]}), f)
    assert _load(f, "instruction") == ([("a", "x")], [1])


def test_invalid_data_fails_fast_through_the_entrypoint(tiny_models: dict[str, Path],
                                                        tmp_path: Path) -> None:
    """The real entrypoint: exit code 65 in seconds, the termination message names the
    file, line and field; nothing is uploaded."""
    data = tmp_path / "data"
    recs = helpers.corpus(8, 0)
    helpers.write_jsonl(data / "eval.jsonl", recs)
    bad = [{k: v for k, v in r.items()} for r in recs]
    del bad[4]["response"]
    helpers.write_jsonl(data / "train.jsonl", bad)
    cfg = helpers.trainer_config(tmp_path / "c.json", job="bad-data",
                                 model_dir=tiny_models["llama"], data_dir=data,
                                 output=f"file://{tmp_path}/out")
    t0 = time.monotonic()
    proc = helpers.run_trainer(cfg, tmp_path)
    elapsed = time.monotonic() - t0
    assert proc.returncode == ExitCode.DATA, proc.stderr[-2000:]
    assert elapsed < 30, elapsed
    msg = helpers.termination(tmp_path)
    assert msg["status"] == "Failed" and msg["reason"] == "InvalidData"
    assert f"file://{data}/train.jsonl: line 5: missing field (field 'response')" in msg["message"]
    assert not (tmp_path / "out").exists()
