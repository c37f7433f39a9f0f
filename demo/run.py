"""`make demo`: a real local sweep on this machine, end to end.

1. build a small Llama base model, its tokenizer and two datasets (demo/assets.py);
2. `kubetune sweep sweep.yaml --local --nproc 2`: Optuna (NSGA-II) over LoRA rank x
   trainable-parameter budget x replay fraction (general text mixed into training), every
   trial torchrun with 2 processes (gloo) and DeepSpeed ZeRO-2, two objectives (eval loss,
   trainable %) and a forgetting constraint (generalLossDelta <= MAX_FORGETTING);
3. show every trial's forgetting next to its eval loss, and what the chosen adapter trades;
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
from typing import Any

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


def _f(value: Any, spec: str = ".3f") -> str:
    return format(value, spec) if isinstance(value, int | float) else "-"


def forgetting_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'trial':>5}  {'rank':>4}  {'target %':>8}  {'replay':>6}  {'evalLoss':>8}  "
             f"{'forgetting':>10}  {'trainable %':>11}  note"]
    for r in rows:
        m, p = r.get("metrics") or {}, r.get("parameters") or {}
        note = ""
        if r.get("state") != "Succeeded":
            note = str(r.get("state") or "").lower()
            note += f": {r['message']}" if r.get("message") else ""
        elif r.get("feasible") is False:
            note = "infeasible: forgets too much"
        elif r.get("reusedFrom") is not None:
            note = f"same parameters as trial {r['reusedFrom']}: result reused"
        if r.get("pareto"):
            note = ("★ Pareto front" + (f"; {note}" if note else "")).strip()
        lines.append(
            f"{r['number']:>5}  {_f(p.get('method.rank'), 'd'):>4}  "
            f"{_f(p.get('method.trainableParamPercent'), '.2f'):>8}  "
            f"{_f(p.get('data.replay.fraction'), '.2f'):>6}  {_f(m.get('evalLoss')):>8}  "
            f"{_f(m.get('generalLossDelta'), '+.3f'):>10}  "
            f"{_f(m.get('trainableParamPercent'), '.3f'):>11}  {note[:60]}")
    return "\n".join(lines)


def tradeoff(best: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """One line: what the chosen adapter gives up, and what it keeps."""
    m = best["metrics"]
    done = [r for r in rows if r.get("state") == "Succeeded"
            and isinstance((r.get("metrics") or {}).get("evalLoss"), int | float)]
    lowest = min(done, key=lambda r: r["metrics"]["evalLoss"])
    replay = (best.get("parameters") or {}).get("data.replay.fraction")
    line = (f"{best['name']} (evalLoss {m['evalLoss']:.3f}, forgetting "
            f"{m.get('generalLossDelta', float('nan')):+.3f} nats, "
            f"{m.get('trainableParamPercent', float('nan')):.2f}% trainable, replay "
            f"{_f(replay, '.2f')})")
    if lowest["number"] == best["number"]:
        within = ", within the forgetting bound" if best.get("feasible") is not False else ""
        return line + ": the lowest task loss of all trials" + within
    lm = lowest["metrics"]
    return (line + f": gives up {m['evalLoss'] - lm['evalLoss']:.3f} task loss against trial "
            f"{lowest['number']} ({lm['evalLoss']:.3f}) to forget "
            f"{lm.get('generalLossDelta', 0.0) - m.get('generalLossDelta', 0.0):.3f} nats less "
            f"general text (bound {assets.MAX_FORGETTING})")


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

    print("\n== 2. a real local sweep: LoRA rank x trainable % x replay, 2 processes, DeepSpeed "
          f"ZeRO-2, forgetting constraint generalLossDelta <= {assets.MAX_FORGETTING}")
    kubetune("--state-dir", str(state), "sweep", str(out / "sweep.yaml"), "--local",
             "--nproc", str(args.nproc))
    timings["sweep"] = time.monotonic() - t0 - timings["assets"]

    from orchestrator.client import best_trial_number
    from orchestrator.local import LocalClient

    client = LocalClient(state)
    sweep = client.get_raw("demo", "sweep")
    rows = client.trials(sweep)
    print("\n== 3. every trial: task loss next to forgetting (general-text loss after - before)")
    print(forgetting_table(rows))
    number = best_trial_number(sweep, rows)
    collect_args = ["--best"]
    if number is None:  # no adapter met the bound: show the one that forgets least instead
        done = [r for r in rows if isinstance((r.get("metrics") or {}).get("generalLossDelta"),
                                              int | float) and r.get("reusedFrom") is None]
        number = min(done, key=lambda r: r["metrics"]["generalLossDelta"])["number"]
        collect_args = ["--trial", str(number)]
        print(f"\nno trial kept forgetting within {assets.MAX_FORGETTING} nats: the sweep has "
              f"no best trial; showing trial {number}, the one that forgets least")
    best = next(r for r in rows if r["number"] == number)
    print(f"\nchosen: {tradeoff(best, rows)}")

    print("\n== 4. collect the best adapter (PEFT files + kubetune.json, sha256 verified)")
    adapter = out / "best-adapter"
    kubetune("--state-dir", str(state), "collect", "demo", *collect_args, "--local", "-o",
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
