"""spec.constraints (feasible best trial and Pareto front, steering the sampler) and reuse of
identical parameter sets (no wasted trials), through the study code the controller and the
local runner share."""

from __future__ import annotations

import math
import statistics
from typing import Any

import optuna
import pytest

from orchestrator.api import trial_name
from orchestrator.sweep import SweepStudy
from orchestrator.sweep.trials import get_trial, is_feasible

pytestmark = pytest.mark.unit

optuna.logging.set_verbosity(optuna.logging.WARNING)

PARAMS = [
    {"name": "training.learningRate", "float": {"low": 1e-5, "high": 1e-2, "log": True}},
    {"name": "method.rank", "int": {"low": 2, "high": 128, "log": True}},
]
MAX_DELTA = 0.1


def forgetting(p: dict[str, Any]) -> dict[str, float]:
    """Task loss is best at lr 10^-2.5 (rank 16), but forgetting grows with the learning rate:
    generalLossDelta <= 0.1 needs log10(lr) <= -5 + ln(5)/1.5, where the feasible optimum is."""
    u = math.log10(p["training.learningRate"])
    r = math.log2(p["method.rank"])
    return {
        "evalLoss": 1.0 + 0.1 * (u + 2.5) ** 2 + 0.02 * (r - 4) ** 2,
        "generalLossDelta": 0.02 * math.exp(1.5 * (u + 5)),
    }


U_BOUND = -5 + math.log(5) / 1.5
FEASIBLE_OPTIMUM = 1.0 + 0.1 * (U_BOUND + 2.5) ** 2
UNCONSTRAINED_OPTIMUM = 1.0


def _spec(sampler: str = "tpe", seed: int = 0, **extra: Any) -> dict[str, Any]:
    return {
        "parameters": PARAMS,
        "algorithm": {"sampler": sampler, "seed": seed},
        "maxTrials": 40,
        "parallelism": 1,
        "constraints": [{"metric": "generalLossDelta", "max": MAX_DELTA}],
        **extra,
    }


def _open(spec: dict[str, Any], name: str = "sw") -> SweepStudy:
    return SweepStudy.open(
        spec, namespace="ns", sweep=name, storage=optuna.storages.InMemoryStorage()
    )


def _constrained_run(seed: int) -> float:
    s = _open(_spec(seed=seed), f"c{seed}")
    while not (plan := s.plan()).done:
        batch = [s.ask(lambda n: trial_name("c", n)) for _ in range(plan.launch)]
        for number, params, _ in batch:
            s.tell_metrics(number, forgetting(params))
            best = s.best()
            if best is not None:  # never an infeasible trial as best, at any point
                assert best.metrics["generalLossDelta"] <= MAX_DELTA, best
    best = s.best()
    assert best is not None
    # the unconstrained optimum was in reach but is infeasible
    assert best.values[0] > UNCONSTRAINED_OPTIMUM * 1.2
    return best.values[0] / FEASIBLE_OPTIMUM - 1


def test_constrained_sweep_returns_the_best_feasible_point() -> None:
    gaps = [_constrained_run(seed) for seed in range(7)]
    assert all(g >= -1e-9 for g in gaps), gaps  # nothing better than the feasible optimum
    assert statistics.median(gaps) <= 0.02, gaps


def test_pareto_front_holds_only_feasible_trials_like_optuna() -> None:
    spec = _spec(
        sampler="nsga2",
        seed=3,
        objectives=[{"metric": "evalLoss"}, {"metric": "trainableParamPercent"}],
        maxTrials=30,
        parallelism=3,
    )
    s = _open(spec)
    while not (plan := s.plan()).done:
        batch = [s.ask(lambda n: trial_name("p", n)) for _ in range(plan.launch)]
        for number, params, _ in batch:
            m = forgetting(params)
            m["trainableParamPercent"] = params["method.rank"] / 16
            s.tell_metrics(number, m)
    front = s.pareto_front()
    assert front and all(t.metrics["generalLossDelta"] <= MAX_DELTA for t in front)
    # Optuna's own constrained front (from the constraint values set on each trial), less
    # the trials that reused an identical earlier trial's result
    optuna_front = [t for t in s.study.best_trials if "kubetune.io/reused-from" not in t.user_attrs]
    assert [t.number for t in front] == sorted(t.number for t in optuna_front)
    infeasible = [t for t in s.trials() if not is_feasible(t)]
    assert infeasible, "the space has infeasible points: some trial should have hit one"
    records = {r.number: r for r in s.records()}
    for t in infeasible:
        assert records[t.number].feasible is False
        assert "infeasible: generalLossDelta" in (records[t.number].message or "")
    assert s.counts().infeasible == len(infeasible)


def test_missing_constraint_metric_fails_the_trial() -> None:
    s = _open(_spec())
    number, _params, _ = s.ask("t-0")
    s.tell_metrics(number, {"evalLoss": 1.0})
    trial = get_trial(s.study, number)
    assert trial.state == optuna.trial.TrialState.FAIL
    assert "constraint metric 'generalLossDelta' missing" in trial.user_attrs["kubetune.io/reason"]
    assert s.best() is None


def test_no_feasible_trial_means_no_best_and_says_so() -> None:
    s = _open(_spec(maxTrials=3))
    for i in range(3):
        number, _, _ = s.ask(f"t-{i}")
        s.tell_metrics(number, {"evalLoss": 1.0 + i, "generalLossDelta": 0.5})
        assert s.tell_metrics(number, {"evalLoss": 0.0, "generalLossDelta": 0.0}) is False
    assert s.best() is None
    plan = s.plan()
    assert plan.done and not plan.failed
    assert "no trial met spec.constraints" in plan.message
    assert s.counts().infeasible == 3


def test_min_and_max_bounds() -> None:
    s = _open(_spec(constraints=[{"metric": "trainableParamPercent", "min": 0.5, "max": 1.0}]))
    outcomes = {}
    for i, pct in enumerate([0.2, 0.7, 1.5]):
        number, _, _ = s.ask(f"t-{i}")
        s.tell_metrics(number, {"evalLoss": 3.0 - i, "trainableParamPercent": pct})
        outcomes[pct] = is_feasible(get_trial(s.study, number))
    assert outcomes == {0.2: False, 0.7: True, 1.5: False}
    best = s.best()
    assert best is not None and best.metrics["trainableParamPercent"] == 0.7


# --- no wasted trials -------------------------------------------------------------------------
TINY = [
    {"name": "method.rank", "int": {"low": 4, "high": 6}},
    {"name": "method.targetModules", "categorical": [["q_proj", "v_proj"], "all-linear"]},
]


def test_identical_parameters_reuse_the_result_instead_of_a_job() -> None:
    """NSGA-II on a 6-point space proposes repeats; each repeat is told the earlier result
    at once, launches nothing, and still counts towards maxTrials."""
    spec = {
        "parameters": TINY,
        "objectives": [{"metric": "evalLoss"}, {"metric": "trainableParamPercent"}],
        "algorithm": {"sampler": "nsga2", "seed": 1},
        "maxTrials": 16,
        "parallelism": 2,
    }
    s = _open(spec)
    launched: list[tuple[int, dict[str, Any]]] = []
    while not (plan := s.plan()).done:
        batch = [s.ask(lambda n: trial_name("tiny", n)) for _ in range(plan.launch)]
        jobs = [(n, p) for n, p, job in batch if job is not None]
        for n, p in jobs:  # only real jobs are "trained"
            launched.append((n, p))
            wide = p["method.targetModules"] == "all-linear"
            s.tell_metrics(
                n,
                {"evalLoss": 1.0 / p["method.rank"] + (0.0 if wide else 0.05),
                 "trainableParamPercent": p["method.rank"] * (2 if wide else 1) / 10},
                artifact={"uri": f"s3://a/{n}/", "sha256": "ab" * 32},
            )
    counts = s.counts()
    assert counts.created == 16 and counts.succeeded == 16
    keys = [repr(sorted(p.items())) for _, p in launched]
    assert len(keys) == len(set(keys)) <= 6  # every job ran a new parameter set
    assert counts.reused == 16 - len(launched) > 0
    records = {r.number: r for r in s.records()}
    for t in s.trials():
        source = t.user_attrs.get("kubetune.io/reused-from")
        if source is None:
            continue
        original = get_trial(s.study, int(source))
        assert s.params(t.number) == s.params(original.number)
        assert t.values == original.values
        assert t.user_attrs["kubetune.io/artifact"] == original.user_attrs["kubetune.io/artifact"]
        assert "kubetune.io/job" not in t.user_attrs  # no job name: nothing to create
        assert records[t.number].reused_from == original.number
        assert "reused the result of trial" in (records[t.number].message or "")
    assert s.unlaunched([trial_name("tiny", n) for n, _ in launched]) == []
    # a reused result is the same point again, never a second Pareto-front entry
    reused = {r.number for r in records.values() if r.reused_from is not None}
    front = s.pareto_front()
    assert front and not reused & {t.number for t in front}


def test_reuse_keeps_constraint_values() -> None:
    spec = {**_spec(), "parameters": TINY, "maxTrials": 8}
    s = _open(spec)
    first, params, _ = s.ask("t-0")
    s.tell_metrics(first, {"evalLoss": 0.5, "generalLossDelta": 0.9})
    again = None
    for i in range(1, 8):  # ask until the sampler repeats the first point
        number, p, job = s.ask(f"t-{i}")
        if p == params:
            assert job is None
            again = number
            break
        s.tell_metrics(number, {"evalLoss": 1.0, "generalLossDelta": 0.0})
    assert again is not None
    assert not is_feasible(get_trial(s.study, again))
    best = s.best()
    assert best is not None and best.number not in (first, again)


def test_local_mode_rejects_an_invalid_constraint_before_running(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """`kubetune sweep --local` validates with the same rules as the CRD's CEL."""
    import yaml

    from orchestrator.cli.main import main

    sweep = {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneSweep",
        "metadata": {"name": "bad"},
        "spec": {
            "template": {"model": {"uri": "file:///m"},
                         "data": {"train": "file:///d/t.jsonl", "eval": "file:///d/e.jsonl"},
                         "output": {"uri": "file:///o/"}},
            "parameters": PARAMS,
            "constraints": [{"metric": "generalLossDelta", "max": 0.1}],
        },
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    code = main(["--state-dir", str(tmp_path / "state"), "sweep", str(path), "--local"],
                prog="kubetune")
    err = " ".join(capsys.readouterr().err.split())
    assert code != 0
    assert "a constraint on generalLossDelta needs template.data.general" in err
    assert not (tmp_path / "state" / "studies.db").exists()  # nothing ran
