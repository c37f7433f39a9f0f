"""data.trainMix: several training sets mixed in proportion to their weights, by seed.

What a user notices: the examples the Trainer actually feeds (its training dataloader) come
from each set in the weighted proportions, a small set repeating and a large one subsampled;
the stream is the same in every run with the same seed; each set is read in its own format;
the run records what it drew in kubetune.json."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from orchestrator import storage
from orchestrator.api import TrainerConfig
from orchestrator.trainer.data import Collator
from orchestrator.trainer.run import Run
from tests.trainer import helpers

pytestmark = pytest.mark.trainer

# disjoint nouns per set, so every example in the stream tells which set it came from
GROUPS = {"a": helpers.NOUNS[0:4], "b": helpers.NOUNS[4:8], "c": helpers.NOUNS[8:12]}
SIZES = {"a": 40, "b": 20, "c": 80}
WEIGHTS = {"a": 1.0, "b": 2.0, "c": 1.0}  # shares 1/4, 1/2, 1/4 of 140 examples
FORMATS = {"a": None, "b": None, "c": "text"}  # c is read as text, the others as instruction


def _records(group: str, n: int) -> list[dict[str, Any]]:
    rng = random.Random(group)
    out = []
    for _ in range(n):
        noun = rng.choice(GROUPS[group])
        color = helpers.COLORS[helpers.NOUNS.index(noun)]
        out.append({"prompt": f"What color is the {noun}? Answer:", "response": f" {color}",
                    "text": f"the {noun} is {color} and the {noun} stays {color}."})
    return out


@pytest.fixture(scope="module")
def mix_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mix")
    for g, n in SIZES.items():
        helpers.write_jsonl(root / f"{g}.jsonl", _records(g, n))
    helpers.write_jsonl(root / "eval.jsonl", _records("a", 8))
    return root


def _config(tmp: Path, model_dir: Path, mix_dir: Path, seed: int = 7,
            training: dict[str, Any] | None = None, packing: bool = False) -> Path:
    mix = [{"uri": f"file://{mix_dir}/{g}.jsonl", "weight": WEIGHTS[g],
            **({"format": FORMATS[g]} if FORMATS[g] else {})} for g in SIZES]
    return helpers.trainer_config(
        tmp / "c.json", job="mix", model_dir=model_dir, data_dir=mix_dir,
        output=f"file://{tmp}/store", data={"train": None, "trainMix": mix, "packing": packing},
        training={"seed": seed, **(training or {})}, output_options={"samples": 0})


def _stream(tmp: Path, model_dir: Path, mix_dir: Path, seed: int = 7) -> list[str]:
    """The set of every example, in the order the Trainer's train dataloader yields them
    (one epoch), built by the trainer's own data path."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    tmp.mkdir(parents=True)
    cfg = TrainerConfig.model_validate_json(_config(tmp, model_dir, mix_dir, seed).read_text())
    run = Run(cfg)
    run.work = tmp / "work"
    tok = run.load_tokenizer(model_dir)
    datasets = run.tokenize_data(run.read_data(), tok, 128)
    args = TrainingArguments(output_dir=str(tmp / "out"), per_device_train_batch_size=4,
                             seed=seed, data_seed=seed, use_cpu=True, report_to="none",
                             remove_unused_columns=False)
    trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(str(model_dir)), args=args,
                      train_dataset=datasets["train"], data_collator=Collator(tok.pad_token_id))
    out = []
    for batch in trainer.get_train_dataloader():
        for ids in batch["input_ids"]:
            text = tok.decode(ids, skip_special_tokens=True)
            out.append(next(g for g, nouns in GROUPS.items()
                            if any(f"the {n}" in text for n in nouns)))
    return out


def test_stream_follows_the_weights_and_the_seed(tmp_path: Path, tiny_models: dict[str, Path],
                                                 mix_dir: Path) -> None:
    first = _stream(tmp_path / "1", tiny_models["llama"], mix_dir)
    n = sum(SIZES.values())
    assert len(first) == n  # one epoch: as many examples as the sets hold together
    total = sum(WEIGHTS.values())
    for g in SIZES:
        share = WEIGHTS[g] / total
        assert first.count(g) == round(share * n), (g, first.count(g))  # whole epoch: exact
        half = first[: n // 2]  # shuffled, so any stretch of the stream is close to the mix
        assert abs(half.count(g) / len(half) - share) < 0.1, (g, half.count(g))
    # b (20 examples, half of the mix) repeats; c (80 examples, a quarter) is subsampled
    assert first.count("b") > SIZES["b"] and first.count("c") < SIZES["c"]
    assert _stream(tmp_path / "2", tiny_models["llama"], mix_dir) == first  # deterministic
    assert _stream(tmp_path / "3", tiny_models["llama"], mix_dir, seed=8) != first


@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
def test_run_with_train_mix_records_what_it_drew(tmp_path: Path, tiny_models: dict[str, Path],
                                                 mix_dir: Path, packing: bool) -> None:
    cfg = _config(tmp_path, tiny_models["llama"], mix_dir, packing=packing,
                  training={"maxSteps": 4, "evalEvery": 4})
    proc = helpers.run_trainer(cfg, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    art = tmp_path / "collected"
    storage.download_dir(helpers.termination(tmp_path)["artifact"]["uri"], art)
    doc = json.loads((art / "kubetune.json").read_text())
    assert [(m["uri"].rsplit("/", 1)[-1], m["examples"], m["drawn"], m["share"])
            for m in doc["trainMix"]] == [("a.jsonl", 40, 35, 0.25), ("b.jsonl", 20, 70, 0.5),
                                          ("c.jsonl", 80, 35, 0.25)]
