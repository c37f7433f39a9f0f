"""The ceiling for bench/trainer_overhead.py --production: what a user writes by hand to
fine-tune with LoRA on several processes — HF Trainer + PEFT under torchrun (DDP), no
kubetune. Run by the bench as

    torchrun --standalone --nproc-per-node 2 bench/plain_ddp_lora.py MODEL DATA STEPS OUT

Rank 0 writes {"steps_per_s": ...} to OUT, timed from the end of optimizer step 10 to the
end of the last (model loading, tokenization and the first steps' warm-up stay outside the
window, as in the bench's timing of kubetune's trainer; both log every 10 steps).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

FROM_STEP = 10


class StepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.times.append(time.perf_counter())


def main() -> int:
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

    model_dir, data_dir, steps, out = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in (data_dir / "train.jsonl").read_text().splitlines()]
    train = []
    for r in rows:
        p = tok(r["prompt"])["input_ids"]
        a = tok(r["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids, labels = (p + a)[:64], ([-100] * len(p) + a)[:64]
        train.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)})
    set_seed(7)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=str(Path(out).with_suffix(".d")), max_steps=steps,
                             per_device_train_batch_size=8, learning_rate=1e-3,
                             lr_scheduler_type="constant", optim="adamw_torch",
                             report_to="none", disable_tqdm=True, save_strategy="no",
                             logging_steps=10, use_cpu=True, seed=7, data_seed=7,
                             ddp_backend="gloo")
    timer = StepTimer()
    Trainer(model=model, args=args, train_dataset=train,
            data_collator=DataCollatorForSeq2Seq(tok, padding=True), callbacks=[timer]).train()
    if int(os.environ.get("RANK", "0")) == 0:
        t = timer.times  # t[i]: end of step i + 1
        Path(out).write_text(json.dumps(
            {"steps_per_s": (len(t) - FROM_STEP) / (t[-1] - t[FROM_STEP - 1])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
