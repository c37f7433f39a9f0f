"""`make demo`: a real local sweep on this machine, end to end.

1. build a small Llama base model, its tokenizer and two datasets (demo/assets.py);
2. `kubetune sweep sweep.yaml --local --nproc 2`: Optuna (NSGA-II) over LoRA rank x
   trainable-parameter budget, every trial torchrun with 2 processes (gloo) and DeepSpeed
   ZeRO-2, two objectives (eval loss, trainable %);
3. show the trials, the Pareto front and the best trial's forgetting (generalLossDelta);
4. `kubetune collect demo --best --local`: the best adapter, checksums verified;
5. load it onto the base model with PEFT and generate.

Re-running reuses what exists (the sweep resumes or is already done); `--fresh` starts over.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from demo import assets  # noqa: E402

BUDGET_SECONDS = 600


def kubetune(*args: str) -> None:
    """The real CLI in a child process, shown as the user would type it."""
    print(f"\n$ kubetune {' '.join(args)}", flush=True)
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=REPO)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        # the CLI got the same Ctrl-C: let it stop its trainer processes before we leave
        proc.wait()
        sys.exit("\ndemo interrupted; `make demo` again resumes the sweep where it stopped")
    if code != 0:
        sys.exit(f"demo: `kubetune {' '.join(args)}` failed with exit code {code}")


def generate(base_dir: Path, adapter_dir: Path, prompts: list[dict[str, str]]) -> float:
    """Load the adapter onto the base (PeftModel.from_pretrained) and answer tickets; prints
    two samples and returns the share of eval tickets routed to the right team."""
    import warnings

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)

    tok = AutoTokenizer.from_pretrained(str(base_dir))
    base = AutoModelForCausalLM.from_pretrained(str(base_dir))
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    stop = [tok.convert_tokens_to_ids("<|end|>"), tok.eos_token_id]
    right = 0
    for k, p in enumerate(prompts):
        text = tok.apply_chat_template([{"role": "user", "content": p["ticket"]}],
                                       tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=16, do_sample=False, eos_token_id=stop,
                                 pad_token_id=tok.pad_token_id)
        answer = str(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
        ok = f"{p['team']} team" in answer
        right += ok
        if k < 2:
            print(f"  ticket:   {p['ticket']}\n  adapter:  {answer.strip()}\n  expected: "
                  f"The {p['team']} team handles {p['issue']} for the {p['product']}.")
    return right / max(len(prompts), 1)


def eval_prompts(path: Path, n: int = 32) -> list[dict[str, str]]:
    out = []
    for line in path.read_text().splitlines()[:n]:
        msgs = json.loads(line)["messages"]
        words = msgs[1]["content"].rstrip(".").split()
        # "The <team> team handles <issue> for the <product>"
        out.append({"ticket": msgs[0]["content"], "team": words[1], "issue": words[4],
                    "product": words[-1]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="kubetune local demo")
    parser.add_argument("--out", type=Path, default=REPO / ".kubetune" / "demo")
    parser.add_argument("--fresh", action="store_true", help="rebuild and rerun everything")
    parser.add_argument("--max-trials", type=int, default=8)
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not Path("/dev/nvidia0").exists():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # no accelerator probing noise
    t0 = time.monotonic()
    out: Path = args.out.absolute()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    state = out / "state"
    timings: dict[str, float] = {}

    print("== 1. base model, tokenizer and datasets (built here, nothing downloaded)")
    if (out / "sweep.yaml").is_file() and (out / "base-model" / "config.json").is_file():
        print(f"reusing {out} (--fresh rebuilds)")
    else:
        info = assets.build(out, max_trials=args.max_trials)
        print(f"base model: Llama architecture, {int(info['params']):,} parameters, "
              f"pretrained on general text (loss {info['loss_first']:.2f} -> "
              f"{info['loss_last']:.2f}); datasets: support-ticket routing (chat) + general "
              "text")
    timings["assets"] = time.monotonic() - t0

    print("\n== 2. a real local sweep: LoRA rank x trainable %, 2 processes, DeepSpeed ZeRO-2")
    kubetune("--state-dir", str(state), "sweep", str(out / "sweep.yaml"), "--local",
             "--nproc", str(args.nproc))
    timings["sweep"] = time.monotonic() - t0 - timings["assets"]

    from orchestrator.client import best_trial_number
    from orchestrator.local import LocalClient

    client = LocalClient(state)
    sweep = client.get_raw("demo", "sweep")
    rows = client.trials(sweep)
    best = next(r for r in rows if r["number"] == best_trial_number(sweep, rows))
    m = best["metrics"]
    print("\n== 3. the best trial (lowest eval loss on the Pareto front)")
    print(f"best trial: {best['name']} rank {best['parameters'].get('method.rank')}, "
          f"evalLoss {m.get('evalLoss'):.4f}, trainable {m.get('trainableParamPercent'):.3f}%")
    delta = m.get("generalLossDelta")
    print(f"forgetting (generalLossDelta, general-text loss after - before): "
          f"{delta:+.4f}" if delta is not None else "forgetting: not measured")

    print("\n== 4. collect the best adapter (PEFT files + kubetune.json, sha256 verified)")
    adapter = out / "best-adapter"
    kubetune("--state-dir", str(state), "collect", "demo", "--best", "--local", "-o",
             str(adapter))
    print(f"best adapter: {adapter}")

    print("\n== 5. load it with PeftModel.from_pretrained on the base model and generate")
    accuracy = generate(out / "base-model", adapter,
                        eval_prompts(out / "data" / "task-eval.jsonl"))
    print(f"  routed {accuracy:.0%} of 32 held-out tickets to the right team")

    wall = time.monotonic() - t0
    timings["total"] = wall
    (out / "timing.json").write_text(json.dumps(timings, indent=2) + "\n")
    print(f"\ndemo wall time: {wall:.0f}s (budget {BUDGET_SECONDS}s; sweep "
          f"{timings['sweep']:.0f}s)")


if __name__ == "__main__":
    main()
