"""Trainer overhead: kubetune's trainer vs a plain HF Trainer + PEFT script, same tiny model,
same data, same LoRA, on CPU. Reports training steps/s of both and their ratio (target >= 0.97).

Both run in this process, alternating (ours, plain, ours, plain, ...) so that machine noise
hits both alike; each rep's steps/s is measured between the first and the last optimizer
step by a callback (evaluations and model loading are outside the window), and the medians
are compared.

    python bench/trainer_overhead.py [--steps 120] [--reps 3] [--out PATH]
    python bench/trainer_overhead.py --production [--steps 120] [--reps 3]

--production measures what a pod runs: torchrun with 2 processes and the rendered ZeRO-2
DeepSpeed config, against a plain torchrun + HF Trainer + PEFT (DDP) script
(bench/plain_ddp_lora.py) on the same model, data, LoRA and batch.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
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


STEP_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) rank0 INFO orchestrator\.trainer: step (\d+)/")


def _torchrun(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800,
                          cwd=REPO, check=False)


def run_ours_production(root: Path, model: Path, data: Path, steps: int, rep: int,
                        zero_stage: int) -> float:
    """kubetune's trainer as a pod runs it: torchrun, 2 processes, the rendered DeepSpeed
    config for `zero_stage` (0: plain PyTorch DDP, no DeepSpeed engine); steps/s from rank
    0's progress lines (every 10 steps), step 10 to the last."""
    from datetime import datetime

    from tests.trainer import helpers

    cfg = helpers.trainer_config(
        root / f"prod-{rep}-z{zero_stage}.json", job=f"prod-{rep}-z{zero_stage}",
        model_dir=model, data_dir=data, output=f"file://{root}/store", nprocs=2,
        zero_stage=zero_stage,
        method={"type": "lora", "rank": 8, "targetModules": "all-linear", "dropout": 0.05},
        training={"maxSteps": steps, "evalEvery": 10 * steps, "checkpointEvery": 10 * steps,
                  "globalBatchSize": 16, "microBatchSize": 8, "learningRate": 1e-3})
    env = {**os.environ, "KUBETUNE_LOG_EVERY": "10", "KUBETUNE_WORKDIR": str(root / f"w{rep}"),
           "KUBETUNE_TERMINATION_LOG": str(root / "termination-log"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    proc = _torchrun("-m", "orchestrator.trainer", "--config", str(cfg), env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"kubetune trainer failed:\n{proc.stderr[-3000:]}")
    stamps = {}
    for line in proc.stderr.splitlines():
        m = STEP_LINE.match(line)
        if m:
            when = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            stamps[int(m[2])] = when
    return (steps - 10) / (stamps[steps] - stamps[10])


def run_plain_production(root: Path, model: Path, data: Path, steps: int, rep: int) -> float:
    out = root / f"plain-prod-{rep}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = _torchrun(str(REPO / "bench" / "plain_ddp_lora.py"), str(model), str(data),
                     str(steps), str(out), env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"plain DDP script failed:\n{proc.stderr[-3000:]}")
    return float(json.loads(out.read_text())["steps_per_s"])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--out", default=None)
    ap.add_argument("--production", action="store_true",
                    help="torchrun, 2 processes, the rendered ZeRO-2 config vs a plain torchrun "
                    "+ HF Trainer + PEFT (DDP) script (target >= 1.0)")
    args = ap.parse_args()
    if args.production:
        return production(args)
    args.out = args.out or str(REPO / "bench/results/trainer_overhead.json")
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


def production(args: argparse.Namespace) -> int:
    import torch

    with tempfile.TemporaryDirectory(prefix="kt-bench-") as tmp:
        root = Path(tmp)
        model, data = setup(root, args.hidden)
        ours: dict[int, list[float]] = {0: [], 2: []}
        plain: list[float] = []
        for rep in range(args.reps):  # interleaved, so machine noise hits all alike
            for stage in ours:
                ours[stage].append(
                    run_ours_production(root, model, data, args.steps, rep, stage))
            plain.append(run_plain_production(root, model, data, args.steps, rep))
    ceiling = statistics.median(plain)
    result = {
        "benchmark": "trainer_overhead_production",
        "model": f"llama-arch hidden={args.hidden} layers=2 (random init)",
        "method": "lora r=8 all-linear, fp32, CPU, torchrun 2 processes (gloo), global batch "
                  "16 (8 per process)",
        "kubetune": "python -m orchestrator.trainer with the rendered config: zeroStage 2 "
                    "(DeepSpeed engine) and zeroStage 0 (plain PyTorch DDP)",
        "ceiling": "bench/plain_ddp_lora.py: HF Trainer + PEFT, DDP",
        "steps": args.steps,
        "reps": args.reps,
        "cpu_count": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
        "torch_version": torch.__version__,
        "plain_steps_per_s": [round(x, 3) for x in plain],
        "plain_median": round(ceiling, 3),
        **{f"kubetune_zero{st}_steps_per_s": [round(x, 3) for x in v] for st, v in ours.items()},
        **{f"kubetune_zero{st}_median": round(statistics.median(v), 3)
           for st, v in ours.items()},
        **{f"ratio_zero{st}": round(statistics.median(v) / ceiling, 4) for st, v in ours.items()},
        "target_ratio": 1.0,
    }
    out = Path(args.out or REPO / "bench/results/trainer_overhead_production.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"trainer_overhead --production: plain torchrun + HF + PEFT (DDP) "
          f"{result['plain_median']} steps/s; kubetune zeroStage 0 (DDP) "
          f"{result['kubetune_zero0_median']} -> ratio {result['ratio_zero0']}, zeroStage 2 "
          f"(DeepSpeed) {result['kubetune_zero2_median']} -> ratio {result['ratio_zero2']} "
          f"(target >= 1.0); {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
