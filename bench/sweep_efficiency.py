#!/usr/bin/env python3
"""Sweep efficiency on a known-optimum objective, through the same sweep code the controller
runs (SweepConfig -> Optuna sampler/pruner -> ask/report/should_prune/tell on an RDB study).

Part 1 (pruning): for each configuration and seed, trials needed until the best value is
within 2 % of the optimum, and the "GPU time" spent (eval intervals actually trained; a pruned
trial stops at the interval where it was pruned). Compares tpe+hyperband, tpe, and random.

Part 2 (side by side, ``--compare-seeds``): kubetune's sweep loop against Optuna's own
ask/tell loop with the same sampler settings, seeds and parallelism, on two known-optimum
functions (one with a categorical parameter). Both run the same asynchronous schedule: up
to ``parallelism`` trials at once, each finishing after a duration drawn per trial slot (not
per parameter set), the loop telling what finished and then asking to refill, as the
controller's reconcile does (tell finished children, plan, ask). Variants of kubetune's loop
isolate what the controller could lose: ``reopen`` re-opens the study (new, reseeded
sampler) on every reconcile, as a restarted or cache-less controller does.
Reported: the gap of the best value above the optimum after ``--compare-trials`` trials,
median over seeds. Writes JSON.

    .venv/bin/python bench/sweep_efficiency.py --seeds 8 --trials 60 --compare-seeds 15
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
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


# --- part 2: kubetune's loop vs Optuna's own ask/tell -----------------------------------------
MODULES = [["q_proj", "v_proj"], "all-linear", ["q_proj", "k_proj", "v_proj", "o_proj"]]
FUNCTIONS: dict[str, dict[str, Any]] = {
    # the shape: int log, float log, float, categorical
    "four-with-categorical": {
        "params": [
            {"name": "method.rank", "int": {"low": 2, "high": 128, "log": True}},
            {"name": "training.learningRate", "float": {"low": 1e-5, "high": 1e-2, "log": True}},
            {"name": "method.trainableParamPercent", "float": {"low": 0.1, "high": 5.0}},
            {"name": "method.targetModules", "categorical": MODULES},
        ],
        "f": lambda p: (
            OPTIMUM
            + 0.15 * (math.log2(p["method.rank"]) - 4) ** 2
            + (math.log10(p["training.learningRate"]) - math.log10(2e-4)) ** 2
            + 0.1 * (p["method.trainableParamPercent"] - 1.5) ** 2
            + {0: 0.15, 1: 0.0, 2: 0.08}[MODULES.index(p["method.targetModules"])]
        ),
    },
    "three-log-scale": {"params": PARAMS, "f": final_loss},
}


class _Loop:
    """ask() -> (handle, params); tell(handle, value)."""

    def ask(self) -> tuple[Any, dict[str, Any]]:
        raise NotImplementedError

    def tell(self, handle: Any, value: float) -> None:
        raise NotImplementedError

    def reconcile(self) -> None:
        """Called once per scheduling round (between tells and asks)."""


class _KubetuneLoop(_Loop):
    def __init__(self, spec: dict[str, Any], name: str, reopen: bool, storage: str) -> None:
        self.cfg = SweepConfig.from_spec(spec)
        self.storage: optuna.storages.BaseStorage = (
            optuna.storages.RDBStorage("sqlite:///:memory:")
            if storage == "sqlite"
            else optuna.storages.InMemoryStorage()
        )
        self.name = name
        self.reopen = reopen
        self.st = SweepStudy(self.cfg, open_study(self.cfg, name, self.storage))

    def reconcile(self) -> None:
        if self.reopen:
            self.st = SweepStudy(self.cfg, open_study(self.cfg, self.name, self.storage))

    def ask(self) -> tuple[Any, dict[str, Any]]:
        number, params, _ = self.st.ask(f"{self.name}-x")
        return number, params

    def tell(self, handle: Any, value: float) -> None:
        self.st.tell_metrics(handle, {"evalLoss": value})


class _OptunaLoop(_Loop):
    """Plain Optuna: the sampler kubetune configures, define-by-run suggest_* calls."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from orchestrator.sweep import make_sampler

        cfg = SweepConfig.from_spec(spec)
        self.params = spec["parameters"]
        self.study = optuna.create_study(sampler=make_sampler(cfg))

    def ask(self) -> tuple[Any, dict[str, Any]]:
        trial = self.study.ask()
        out: dict[str, Any] = {}
        for p in self.params:
            name = p["name"]
            if "int" in p:
                r = p["int"]
                out[name] = trial.suggest_int(name, r["low"], r["high"], log=r.get("log", False))
            elif "float" in p:
                r = p["float"]
                out[name] = trial.suggest_float(
                    name, r["low"], r["high"], log=r.get("log", False)
                )
            else:
                index = trial.suggest_categorical(name, list(range(len(p["categorical"]))))
                out[name] = p["categorical"][index]
        return trial, out

    def tell(self, handle: Any, value: float) -> None:
        self.study.tell(handle, value)


def schedule(loop: _Loop, f: Any, trials: int, parallelism: int, seed: int) -> float:
    """Asynchronous parallel sweep; returns the best value after ``trials`` trials."""
    durations = random.Random(seed)  # the same finishing order for every loop
    clock = 0.0
    running: list[tuple[float, int, Any, float]] = []
    asked = 0
    best = math.inf

    def fill() -> None:
        nonlocal asked
        while len(running) < parallelism and asked < trials:
            handle, params = loop.ask()
            heapq.heappush(running, (clock + durations.uniform(0.5, 1.5), asked, handle,
                                     f(params)))
            asked += 1

    fill()
    while running:
        clock = running[0][0]
        done = []
        while running and running[0][0] <= clock + 1e-9:
            done.append(heapq.heappop(running))
        loop.reconcile()
        for _, _, handle, value in done:
            loop.tell(handle, value)
            best = min(best, value)
        fill()
    return best


def compare(seeds: int, trials: int, parallelism: int, storage: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for fname, fn in FUNCTIONS.items():
        rows: dict[str, list[float]] = {"optuna": [], "kubetune": [], "kubetune-reopen": []}
        for seed in range(seeds):
            spec = {
                "parameters": fn["params"],
                "objectives": [{"metric": "evalLoss"}],
                "algorithm": {"sampler": "tpe", "seed": seed},
                "maxTrials": trials,
                "parallelism": parallelism,
            }
            f = fn["f"]
            runs = {
                "optuna": schedule(_OptunaLoop(spec), f, trials, parallelism, seed),
                "kubetune": schedule(_KubetuneLoop(spec, f"k-{fname}-{seed}", False, storage),
                                     f, trials, parallelism, seed),
                "kubetune-reopen": schedule(
                    _KubetuneLoop(spec, f"r-{fname}-{seed}", True, storage),
                    f, trials, parallelism, seed),
            }
            for k, best in runs.items():
                rows[k].append(best / OPTIMUM - 1)
        out[fname] = {
            k: {"median_gap_pct": round(100 * statistics.median(v), 2),
                "gaps_pct": [round(100 * g, 2) for g in v]}
            for k, v in rows.items()
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--compare-seeds", type=int, default=15,
                    help="seeds for the kubetune-vs-Optuna side by side (0: skip it)")
    ap.add_argument("--compare-trials", type=int, default=40)
    ap.add_argument("--compare-parallelism", type=int, default=4)
    ap.add_argument("--compare-storage", choices=("sqlite", "memory"), default="sqlite",
                    help="kubetune's study storage: sqlite as the controller (default) or "
                    "memory (faster; Optuna proposes the same points on either)")
    ap.add_argument("--skip-pruning", action="store_true", help="only the side by side")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "sweep_efficiency.json"))
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    configs = [("tpe", "hyperband"), ("tpe", "none"), ("random", "none"), ("random", "median")]
    if args.skip_pruning:
        configs = []
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
    side = (
        compare(args.compare_seeds, args.compare_trials, args.compare_parallelism,
                args.compare_storage)
        if args.compare_seeds
        else {}
    )
    doc = {
        "benchmark": "sweep_efficiency",
        "trials": args.trials,
        "intervals": INTERVALS,
        "optimum": OPTIMUM,
        "results": results,
        "side_by_side": {
            "trials": args.compare_trials,
            "parallelism": args.compare_parallelism,
            "seeds": args.compare_seeds,
            "storage": args.compare_storage,
            "functions": side,
        },
        "seconds": round(time.monotonic() - t0, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))
    if results:
        a, b = results["tpe+hyperband"], results["random+none"]
        print(
            f"sweep_efficiency: trials to within 2% of optimum (median over {args.seeds} "
            f"seeds): tpe+hyperband {a['median_trials_to_2pct']} ({a['reached_2pct']}/"
            f"{args.seeds} reached) vs random {b['median_trials_to_2pct']} ({b['reached_2pct']}"
            f"/{args.seeds}); pruning saved {a['gpu_time_saved_vs_no_pruning']:.0%} GPU time"
        )
    for fname, rows in side.items():
        print(
            f"sweep_efficiency side by side ({fname}, {args.compare_trials} TPE trials, "
            f"parallelism {args.compare_parallelism}, median over {args.compare_seeds} seeds): "
            + ", ".join(f"{k} {v['median_gap_pct']}% above optimum" for k, v in rows.items())
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
