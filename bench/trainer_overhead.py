"""Trainer overhead: kubetune's trainer vs a plain HF Trainer + PEFT script, same tiny model,
same data, same LoRA, on CPU. Reports training steps/s of both and their ratio (target >= 0.97).

Both run in this process, alternating (ours, plain, ours, plain, ...) so that machine noise
hits both alike; each rep's steps/s is measured between the first and the last optimizer
step by a callback (evaluations and model loading are outside the window), and the medians
are compared.

    python bench/trainer_overhead.py [--steps 120] [--reps 3] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import TrainerCallback  # noqa: E402


class StepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.times.append(time.perf_counter())

    def steps_per_s(self) -> float:
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])


def setup(root: Path, hidden: int) -> tuple[Path, Path]:
    from tests.trainer import helpers

    tok = root / "tok"
    helpers.build_tokenizer(tok)
    model = helpers.build_model(root / "model", "llama", tok, hidden=hidden)
    recs = helpers.corpus(1200, 1)
    helpers.write_jsonl(root / "data/train.jsonl", recs[:1024])
    helpers.write_jsonl(root / "data/eval.jsonl", recs[1024:1056])
    return model, root / "data"


def run_ours(root: Path, model: Path, data: Path, steps: int, rep: int) -> float:
    from orchestrator.api import TrainerConfig
    from orchestrator.trainer.run import Run
    from tests.trainer import helpers

    cfg_path = helpers.trainer_config(
        root / f"ours-{rep}.json", job=f"ours-{rep}", model_dir=model, data_dir=data,
        output=f"file://{root}/store", method={"type": "lora", "rank": 8},
        training={"maxSteps": steps, "evalEvery": 10 * steps, "checkpointEvery": 10 * steps,
                  "globalBatchSize": 8, "microBatchSize": 8, "learningRate": 1e-3})
    cfg = TrainerConfig.from_file(cfg_path)
    timer = StepTimer()

    class Timed(Run):
        def make_trainer(self, *a: Any, **kw: Any) -> Any:
            trainer = super().make_trainer(*a, **kw)
            trainer.add_callback(timer)
            return trainer

    os.environ["KUBETUNE_WORKDIR"] = str(root / "work")
    Timed(cfg).execute()
    return timer.steps_per_s()


def run_plain(root: Path, model_dir: Path, data: Path, steps: int, rep: int) -> float:
    """What a user would write by hand: tokenize, LoRA, Trainer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    train = []
    for r in rows:
        p = tok(r["prompt"])["input_ids"]
        a = tok(r["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        train.append({"input_ids": p + a, "labels": [-100] * len(p) + a,
                      "attention_mask": [1] * (len(p) + len(a))})
    set_seed(7)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=str(root / f"plain-{rep}"), max_steps=steps,
                             per_device_train_batch_size=8, learning_rate=1e-3,
                             lr_scheduler_type="constant", optim="adamw_torch",
                             report_to="none", disable_tqdm=True, save_strategy="no",
                             logging_steps=10, use_cpu=True, seed=7, data_seed=7)
    timer = StepTimer()
    trainer = Trainer(model=model, args=args, train_dataset=train,
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True),
                      callbacks=[timer])
    trainer.train()
    return timer.steps_per_s()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--out", default=str(REPO / "bench/results/trainer_overhead.json"))
    args = ap.parse_args()
    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with tempfile.TemporaryDirectory(prefix="kt-bench-") as tmp:
        root = Path(tmp)
        os.environ["KUBETUNE_TERMINATION_LOG"] = str(root / "termination-log")
        model, data = setup(root, args.hidden)
        ours, plain = [], []
        for rep in range(args.reps):
            ours.append(run_ours(root, model, data, args.steps, rep))
            plain.append(run_plain(root, model, data, args.steps, rep))
    result = {
        "benchmark": "trainer_overhead",
        "model": f"llama-arch hidden={args.hidden} layers=2 (random init)",
        "method": "lora r=8 all-linear, fp32, CPU, 1 process, batch 8",
        "steps": args.steps,
        "reps": args.reps,
        "torch_threads": torch.get_num_threads(),
        "kubetune_steps_per_s": [round(x, 3) for x in ours],
        "plain_steps_per_s": [round(x, 3) for x in plain],
        "kubetune_median": round(statistics.median(ours), 3),
        "plain_median": round(statistics.median(plain), 3),
        "ratio": round(statistics.median(ours) / statistics.median(plain), 4),
        "target_ratio": 0.97,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"trainer_overhead: kubetune {result['kubetune_median']} steps/s vs plain HF+PEFT "
          f"{result['plain_median']} steps/s -> ratio {result['ratio']} (target >= 0.97); "
          f"{out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
