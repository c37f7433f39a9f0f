"""Eval and general losses are comparable across trials: token-weighted over the whole set,
independent of micro batch, world size and maxSeqLength, and the forgetting baseline is the
untouched base model even when the method perturbs the model from step 0 (prompt tuning).

Two real trainer runs share one set of data with responses of very different lengths (the
case where averaging per-batch means goes wrong):

- A: lora, one process (ZeRO-2 asked: runs as plain PyTorch), microBatchSize 8,
  maxSeqLength 64, packed training data;
- B: prompt tuning, torchrun with 2 processes under ZeRO-3, microBatchSize 1,
  maxSeqLength 24 (shorter than many eval sequences), an odd-sized eval set (uneven shards).

Every number is checked against a reference computed here, one example at a time, in
float64: sum of token losses ÷ number of loss tokens.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import pytest

from orchestrator import storage
from tests.trainer import helpers

pytestmark = pytest.mark.trainer

TOL = 1e-5


def _records(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        i = rng.randrange(len(helpers.NOUNS))
        noun, color = helpers.NOUNS[i], helpers.COLORS[i]
        words = rng.randint(1, 14)  # responses from 2 to ~45 tokens
        out.append({"prompt": f"What color is the {noun}? Answer:",
                    "response": " " + " ".join([color] * words),
                    "text": " ".join([f"the {noun} is {color}."] * rng.randint(1, 6))})
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("evaldata")
    helpers.write_jsonl(root / "train.jsonl", helpers.corpus(64, 3))
    helpers.write_jsonl(root / "eval.jsonl", _records(21, 5))  # 21: uneven over 2 ranks
    helpers.write_jsonl(root / "general.jsonl", _records(13, 6))
    return root


def _tokenized(model_dir: Path, path: Path, fmt: str) -> list[dict[str, list[int]]]:
    from transformers import AutoTokenizer

    from orchestrator.trainer.data import Fields, build_dataset, load_examples

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    payloads, where = load_examples(path, str(path), fmt, Fields())
    return build_dataset(payloads, where, str(path), fmt, tok, 256, False, 0, "ref").examples


def reference_loss(model: Any, examples: list[dict[str, list[int]]]) -> float:
    """Σ token losses ÷ Σ loss tokens over the whole set, one example per forward, in
    float64; the scored tokens are labels[1:] (the last len(ids) logits: prompt tuning puts
    its virtual tokens' logits first)."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]])
            labels = torch.tensor(ex["labels"][1:])
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
            logits = logits[-ids.shape[1]:-1].double()
            total += float(F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"))
            count += int((labels != -100).sum())
    return total / count


def _run(tmp: Path, model_dir: Path, data: Path, *, job: str, method: dict[str, Any],
         nprocs: int, micro: int, max_len: int, zero: int | None,
         packing: bool = False) -> dict[str, Any]:
    cfg = helpers.trainer_config(
        tmp / "c.json", job=job, model_dir=model_dir, data_dir=data,
        output=f"file://{tmp}/store", method=method, nprocs=nprocs, zero_stage=zero,
        training={"maxSteps": 4, "evalEvery": 2, "microBatchSize": micro,
                  "learningRate": 3e-2},
        data={"general": f"file://{data}/general.jsonl", "maxSeqLength": max_len,
              "packing": packing})
    env = helpers.trainer_env(tmp, {"KUBETUNE_CACHE_DIR": str(tmp / "objects")})
    proc = helpers.run_trainer(cfg, tmp, nprocs=nprocs, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    msg = helpers.termination(tmp)
    dl = tmp / "collected"
    storage.download_dir(msg["artifact"]["uri"], dl, require_manifest=True)
    return {"metrics": msg["metrics"], "stderr": proc.stderr, "dir": dl, "tmp": tmp,
            "meta": json.loads((dl / "kubetune.json").read_text())}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path],
         data: Path) -> dict[str, dict[str, Any]]:
    model_dir = tiny_models["llama"]
    return {
        "A": _run(tmp_path_factory.mktemp("a"), model_dir, data, job="eval-a",
                  method={"type": "lora", "rank": 4}, nprocs=1, micro=8, max_len=64,
                  zero=2, packing=True),
        "B": _run(tmp_path_factory.mktemp("b"), model_dir, data, job="eval-b",
                  method={"type": "prompt", "numVirtualTokens": 4}, nprocs=2, micro=1,
                  max_len=24, zero=3),
    }


@pytest.fixture(scope="module")
def reference(tiny_models: dict[str, Path], data: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    model_dir = tiny_models["llama"]
    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    task = _tokenized(model_dir, data / "eval.jsonl", "instruction")
    general = _tokenized(model_dir, data / "general.jsonl", "text")  # generalFormat default
    return {"task": task, "general": general, "model_dir": model_dir,
            "base_task": reference_loss(base, task),
            "base_general": reference_loss(base, general)}


def test_eval_loss_is_token_weighted_whatever_micro_batch_world_size_and_seq_length(
        runs: dict[str, dict[str, Any]], reference: dict[str, Any]) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    a, b = runs["A"]["metrics"], runs["B"]["metrics"]
    assert runs["A"]["meta"]["deepspeed"] is False and runs["B"]["meta"]["deepspeed"] is True
    # Step 0 of LoRA is the base model: micro batch 8, one process, maxSeqLength 64.
    assert a["initialEvalLoss"] == pytest.approx(reference["base_task"], abs=TOL)
    # The trained prompt-tuning model of run B (micro batch 1, 2 ranks, ZeRO-3, maxSeqLength
    # 24) reloaded from its artifact: the same loss over the whole eval set.
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(reference["model_dir"]))
    trained = PeftModel.from_pretrained(base, str(runs["B"]["dir"]))
    assert b["evalLoss"] == pytest.approx(reference_loss(trained, reference["task"]), abs=TOL)
    assert b["generalLossAfter"] == pytest.approx(
        reference_loss(trained, reference["general"]), abs=TOL)


def test_forgetting_baseline_is_the_untouched_base_model(
        runs: dict[str, dict[str, Any]], reference: dict[str, Any]) -> None:
    a, b = runs["A"]["metrics"], runs["B"]["metrics"]
    # Prompt tuning starts with random virtual tokens: its step-0 loss is not the base's...
    assert abs(b["initialEvalLoss"] - reference["base_task"]) > 1e-3
    # ...but "before" is the base model (adapters off) in both runs, on the text-format
    # general set of a job whose own format is instruction.
    for m in (a, b):
        assert m["generalLossBefore"] == pytest.approx(reference["base_general"], abs=TOL)
        assert m["generalLossDelta"] == pytest.approx(
            m["generalLossAfter"] - m["generalLossBefore"], abs=2e-6)
        assert m["generalLossRelativeDelta"] == pytest.approx(
            m["generalLossDelta"] / m["generalLossBefore"], abs=2e-6)
    assert runs["B"]["meta"]["generalBaseline"]["source"] == "base model"
    # Cached per (model, general set) for the next trial on the node.
    cached = list((runs["A"]["tmp"] / "objects" / "baselines").glob("*.json"))
    assert len(cached) == 1
    assert json.loads(cached[0].read_text())["loss"] == pytest.approx(a["generalLossBefore"],
                                                                       abs=1e-6)


def test_sweep_reports_carry_this_intervals_general_loss(
        runs: dict[str, dict[str, Any]]) -> None:
    """Each report's generalLoss is the one evaluated at that step (not one interval old)."""
    reports = {int(step): dict(re.findall(r"(\w+)=([-\d.]+)", body)) for step, body in
               re.findall(r"eval at step (\d+): (.*)", runs["A"]["stderr"])}
    assert sorted(reports) == [0, 2, 4], reports
    m = runs["A"]["metrics"]
    assert float(reports[0]["generalLoss"]) == pytest.approx(m["generalLossBefore"], abs=1e-4)
    assert float(reports[4]["generalLoss"]) == pytest.approx(m["generalLossAfter"], abs=1e-4)
    assert float(reports[4]["generalLossDelta"]) == pytest.approx(m["generalLossDelta"],
                                                                  abs=1e-4)
    assert abs(m["generalLossDelta"]) > 1e-3  # training moved it: a stale value would show
