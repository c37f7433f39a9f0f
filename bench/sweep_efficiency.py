#!/usr/bin/env python3
"""Sweep efficiency on a known-optimum objective, through the same sweep code the controller
runs (SweepConfig -> Optuna sampler/pruner -> ask/report/should_prune/tell on an RDB study).

For each configuration and seed: trials needed until the best value is within 2 % of the
optimum, and the "GPU time" spent (eval intervals actually trained; a pruned trial stops at
the interval where it was pruned). Compares tpe+hyperband, tpe, and random; writes JSON.

    .venv/bin/python bench/sweep_efficiency.py --seeds 8 --trials 60
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import optuna  # noqa: E402

from orchestrator.sweep import SweepConfig, SweepStudy, open_study  # noqa: E402

PARAMS = [
    {"name": "method.rank", "int": {"low": 2, "high": 128, "log": True}},
    {"name": "training.learningRate", "float": {"low": 1e-5, "high": 1e-2, "log": True}},
    {"name": "method.trainableParamPercent", "float": {"low": 0.1, "high": 5.0, "log": True}},
]
OPTIMUM = 0.5
INTERVALS = 10  # eval intervals per full trial


def final_loss(p: dict[str, Any]) -> float:
    """Minimum 0.5 at rank 16, lr 2e-4, 1 % trainable (smooth in log space)."""
    return (
        OPTIMUM
        + 0.15 * (math.log2(p["method.rank"]) - 4) ** 2
        + (math.log10(p["training.learningRate"]) - math.log10(2e-4)) ** 2
        + 0.2 * math.log(p["method.trainableParamPercent"]) ** 2
    )


def curve(p: dict[str, Any], step: int) -> float:
    """Eval loss after `step` of INTERVALS intervals: decays to exactly the final value."""
    return final_loss(p) + 2.0 * (math.exp(-0.5 * step) - math.exp(-0.5 * INTERVALS))


def run(sampler: str, pruner: str, seed: int, trials: int) -> dict[str, Any]:
    spec = {
        "parameters": PARAMS,
        "objectives": [{"metric": "evalLoss"}],
        "algorithm": {"sampler": sampler, "seed": seed},
        "earlyStopping": {"pruner": pruner},
        "maxTrials": trials,
        "parallelism": 1,
    }
    cfg = SweepConfig.from_spec(spec)
    st = SweepStudy(cfg, open_study(cfg, f"bench-{sampler}-{pruner}-{seed}", "sqlite:///:memory:"))
    best = math.inf
    reached_at = None
    gpu_intervals = 0
    pruned = 0
    for i in range(trials):
        number, params, _ = st.ask(f"t-{i}")
        stopped = False
        for step in range(1, INTERVALS + 1):
            gpu_intervals += 1
            st.report(number, step, curve(params, step))
            if st.should_prune(number):
                st.tell_pruned(number)
                pruned += 1
                stopped = True
                break
        if not stopped:
            value = curve(params, INTERVALS)
            st.tell_metrics(number, {"evalLoss": value})
            best = min(best, value)
        if reached_at is None and best <= OPTIMUM * 1.02:
            reached_at = i + 1
    return {
        "best": best,
        "trials_to_2pct": reached_at,
        "gpu_intervals": gpu_intervals,
        "pruned": pruned,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "sweep_efficiency.json"))
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    configs = [("tpe", "hyperband"), ("tpe", "none"), ("random", "none"), ("random", "median")]
    t0 = time.monotonic()
    results: dict[str, Any] = {}
    for sampler, pruner in configs:
        runs = [run(sampler, pruner, seed, args.trials) for seed in range(args.seeds)]
        reached = [r["trials_to_2pct"] for r in runs if r["trials_to_2pct"] is not None]
        results[f"{sampler}+{pruner}"] = {
            "seeds": args.seeds,
            "reached_2pct": len(reached),
            "median_trials_to_2pct": statistics.median(reached) if reached else None,
            "median_best": statistics.median(r["best"] for r in runs),
            "mean_gpu_intervals": statistics.fmean(r["gpu_intervals"] for r in runs),
            "mean_pruned": statistics.fmean(r["pruned"] for r in runs),
        }
    full = args.trials * INTERVALS
    for v in results.values():
        v["gpu_time_saved_vs_no_pruning"] = round(1 - v["mean_gpu_intervals"] / full, 3)
    doc = {
        "benchmark": "sweep_efficiency",
        "trials": args.trials,
        "intervals": INTERVALS,
        "optimum": OPTIMUM,
        "results": results,
        "seconds": round(time.monotonic() - t0, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))
    a, b = results["tpe+hyperband"], results["random+none"]
    print(
        f"sweep_efficiency: trials to within 2% of optimum (median over {args.seeds} seeds): "
        f"tpe+hyperband {a['median_trials_to_2pct']} ({a['reached_2pct']}/{args.seeds} reached) "
        f"vs random {b['median_trials_to_2pct']} ({b['reached_2pct']}/{args.seeds}); "
        f"pruning saved {a['gpu_time_saved_vs_no_pruning']:.0%} GPU time"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
