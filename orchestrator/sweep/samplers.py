"""Sampler and pruner registries: names in the spec → configured Optuna objects."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import optuna
from optuna.pruners import BasePruner
from optuna.samplers import BaseSampler

from orchestrator.sweep.config import MULTI_OBJECTIVE_SAMPLERS, SweepConfig
from orchestrator.sweep.errors import SweepConfigError
from orchestrator.sweep.space import SearchSpace

# Samplers whose proposals depend on their RNG stream; see study.open_study for why they
# are reseeded when a study is reopened.
STOCHASTIC_SAMPLERS = frozenset({"tpe", "random", "cmaes", "gp", "nsga2"})


def _startup_trials(max_trials: int) -> int:
    # Optuna's default of 10 random trials would be half of a 20-trial sweep; a quarter of
    # the budget (4..10) leaves the model-based phase room to work.
    return max(4, min(10, max_trials // 4))


def _tpe(space: SearchSpace, seed: int | None, cfg: SweepConfig) -> BaseSampler:
    return optuna.samplers.TPESampler(
        seed=seed,
        n_startup_trials=_startup_trials(cfg.max_trials),
        multivariate=True,
        # Parallel trials: pretend running trials scored badly so concurrent asks spread out
        # instead of proposing the same point `parallelism` times.
        constant_liar=cfg.parallelism > 1,
    )


def _random(space: SearchSpace, seed: int | None, cfg: SweepConfig) -> BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed)


class _AskTellGridSampler(optuna.samplers.GridSampler):
    """GridSampler that does not call ``study.stop()`` when the grid is exhausted: that
    only works inside ``study.optimize``, and in ask/tell use the sweep plan stops at
    ``min(maxTrials, grid size)`` anyway."""

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        return None


def _grid(space: SearchSpace, seed: int | None, cfg: SweepConfig) -> BaseSampler:
    return _AskTellGridSampler(space.grid(), seed=seed)


def _cmaes(space: SearchSpace, seed: int | None, cfg: SweepConfig) -> BaseSampler:
    _require("cmaes", "cmaes", "pip install cmaes")
    return optuna.samplers.CmaEsSampler(
        seed=seed,
        n_startup_trials=_startup_trials(cfg.max_trials),
        # Categorical parameters fall back to random sampling; that is expected here.
        warn_independent_sampling=False,
    )


def _gp(space: SearchSpace, seed: int | None, cfg: SweepConfig) -> BaseSampler:
    _require("gp", "torch", "pip install 'kubetune[trainer]' (or torch) and scipy")
    _require("gp", "scipy", "pip install scipy")
    return optuna.samplers.GPSampler(
        seed=seed,
        n_startup_trials=_startup_trials(cfg.max_trials),
    )


def _nsga2(space: SearchSpace, seed: int | None, cfg: SweepConfig) -> BaseSampler:
    # Optuna's default population (50) would make a small sweep one random generation.
    population = max(4, min(50, cfg.max_trials // 4))
    return optuna.samplers.NSGAIISampler(seed=seed, population_size=population)


SAMPLERS: dict[str, Callable[[SearchSpace, int | None, SweepConfig], BaseSampler]] = {
    "tpe": _tpe,
    "random": _random,
    "grid": _grid,
    "cmaes": _cmaes,
    "gp": _gp,
    "nsga2": _nsga2,
}


def _require(sampler: str, module: str, hint: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise SweepConfigError(
            f"sampler {sampler!r} needs the Python package {module!r}, which is not installed "
            f"({hint})"
        )


def derive_seed(seed: int | None, n_trials: int) -> int | None:
    """The seed for a sampler created when the study already holds ``n_trials`` trials.

    A controller re-creates the sampler on every restart (and may on every reconcile); with
    the plain seed each new sampler would replay the same random stream and propose points
    already tried. Mixing in the trial count keeps runs reproducible yet never replays.
    """
    if seed is None or n_trials == 0:
        return seed
    return (seed * 1_000_003 + n_trials * 7_919) % (2**31 - 1)


def make_sampler(cfg: SweepConfig, *, n_existing_trials: int = 0) -> BaseSampler:
    """The configured sampler for a study that already has ``n_existing_trials`` trials."""
    if cfg.sampler not in SAMPLERS:
        raise SweepConfigError(
            f"unknown sampler {cfg.sampler!r} (choose from {', '.join(SAMPLERS)})"
        )
    if cfg.multi_objective and cfg.sampler not in MULTI_OBJECTIVE_SAMPLERS:
        raise SweepConfigError(
            f"sampler {cfg.sampler!r} supports one objective only; with two objectives use "
            "nsga2 or tpe"
        )
    # GridSampler's seed only shuffles the grid, which must stay the same across restarts
    # (trial n runs grid point n); everything else is reseeded as above.
    seed = cfg.seed
    if cfg.sampler in STOCHASTIC_SAMPLERS:
        seed = derive_seed(cfg.seed, n_existing_trials)
    return SAMPLERS[cfg.sampler](cfg.space, seed, cfg)


def _opt(options: dict[str, Any], *names: str, default: Any = None) -> Any:
    for n in names:
        if options.get(n) is not None:
            return options[n]
    return default


def make_pruner(cfg: SweepConfig) -> BasePruner:
    """none | median | hyperband | successiveHalving, with the spec's earlyStopping knobs.

    Steps are the trainer's eval steps as reported (global optimizer steps), so resources
    (minResource/maxResource) count in those units.
    """
    o = cfg.pruner_options
    name = cfg.pruner
    if name == "none":
        return optuna.pruners.NopPruner()
    if cfg.multi_objective:
        raise SweepConfigError(
            f"pruner {name!r} cannot be used with two objectives: set earlyStopping.pruner to none"
        )
    if name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=int(_opt(o, "startupTrials", "startup_trials", default=3)),
            n_warmup_steps=int(_opt(o, "warmupSteps", "warmup_steps", default=0)),
            interval_steps=1,
            n_min_trials=1,
        )
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=int(_opt(o, "minResource", "min_resource", default=1)),
            max_resource=_opt(o, "maxResource", "max_resource", default="auto"),
            reduction_factor=int(_opt(o, "reductionFactor", "reduction_factor", default=3)),
        )
    if name == "successiveHalving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=_opt(o, "minResource", "min_resource", default="auto"),
            reduction_factor=int(_opt(o, "reductionFactor", "reduction_factor", default=4)),
            min_early_stopping_rate=0,
        )
    raise SweepConfigError(
        f"unknown pruner {name!r} (choose from none, median, hyperband, successiveHalving)"
    )
