from __future__ import annotations

from typing import Any

import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from orchestrator.api import FineTuneSweepSpec
from orchestrator.sweep import (
    SweepConfig,
    SweepConfigError,
    build_space,
    decode_choice,
    encode_choice,
    make_pruner,
    make_sampler,
)

pytestmark = pytest.mark.unit

PARAMS: list[dict[str, Any]] = [
    {"name": "method.rank", "int": {"low": 4, "high": 64, "log": True}},
    {"name": "method.trainableParamPercent", "float": {"low": 0.5, "high": 2.0}},
    {"name": "training.learningRate", "float": {"low": 1.0e-5, "high": 1.0e-3, "log": True}},
    {"name": "method.targetModules", "categorical": [["q_proj", "v_proj"], "all-linear"]},
    {"name": "training.microBatchSize", "int": {"low": 2, "high": 8, "step": 2}},
]


def test_distributions() -> None:
    space = build_space(PARAMS)
    d = space.distributions
    assert d["method.rank"] == IntDistribution(4, 64, log=True)
    assert d["method.trainableParamPercent"] == FloatDistribution(0.5, 2.0)
    assert d["training.learningRate"] == FloatDistribution(1e-5, 1e-3, log=True)
    assert d["training.microBatchSize"] == IntDistribution(2, 8, step=2)
    cat = d["method.targetModules"]
    assert isinstance(cat, CategoricalDistribution)
    assert cat.choices == ('json:["q_proj","v_proj"]', "all-linear")


@pytest.mark.parametrize(
    "value",
    [["q_proj", "v_proj"], "all-linear", 3, 2.5, None, True, {"a": [1, 2]}, "json:not-really"],
)
def test_choice_encoding_round_trips(value: object) -> None:
    enc = encode_choice(value)
    assert enc is None or isinstance(enc, bool | int | float | str)
    assert decode_choice(enc) == value


def test_decode_restores_lists_and_ints() -> None:
    space = build_space(PARAMS)
    params = {"method.targetModules": 'json:["q_proj","v_proj"]', "method.rank": 16}
    assert space.decode(params) == {"method.targetModules": ["q_proj", "v_proj"], "method.rank": 16}
    assert space.encode({"method.targetModules": ["q_proj", "v_proj"]}) == {
        "method.targetModules": 'json:["q_proj","v_proj"]'
    }


def test_grid_from_categorical_and_steps() -> None:
    space = build_space(
        [
            {"name": "method.rank", "int": {"low": 4, "high": 16, "step": 4}},
            {
                "name": "method.trainableParamPercent",
                "float": {"low": 0.1, "high": 0.5, "step": 0.2},
            },
            {"name": "method.targetModules", "categorical": [["q_proj"], "all-linear"]},
        ]
    )
    grid = space.grid()
    assert grid["method.rank"] == [4, 8, 12, 16]
    assert grid["method.trainableParamPercent"] == [0.1, 0.3, 0.5]
    assert grid["method.targetModules"] == ['json:["q_proj"]', "all-linear"]
    assert space.grid_size() == 24


def test_grid_needs_float_step() -> None:
    cfg = SweepConfig.from_spec({"parameters": PARAMS[1:2], "algorithm": {"sampler": "grid"}})
    with pytest.raises(SweepConfigError, match=r"'method.trainableParamPercent'.*needs a step"):
        make_sampler(cfg)


@pytest.mark.parametrize(
    ("param", "message"),
    [
        ({"name": "x", "int": {"low": 5, "high": 1}}, "low \\(5\\) must be <= high \\(1\\)"),
        ({"name": "x", "int": {"low": 0, "high": 8, "log": True}}, "needs low >= 1"),
        ({"name": "x", "float": {"low": 0.0, "high": 1.0, "log": True}}, "needs low > 0"),
        ({"name": "x", "float": {"low": 0.1, "high": 1.0, "log": True, "step": 0.1}}, "step"),
        ({"name": "x", "categorical": []}, "non-empty"),
        ({"name": "x", "categorical": ["a", "a"]}, "repeat"),
        ({"name": "x", "int": {"low": 1, "high": 2}, "categorical": [1]}, "exactly one"),
        ({"name": "x", "float": {"high": 2}}, "malformed"),
    ],
)
def test_bad_parameters(param: dict[str, object], message: str) -> None:
    with pytest.raises(SweepConfigError, match=message):
        build_space([param])


def test_config_from_pydantic_spec_and_dict_agree() -> None:
    wire = {
        "template": {
            "model": {"uri": "s3://models/tiny"},
            "data": {"train": "s3://data/train.jsonl", "eval": "s3://data/eval.jsonl"},
            "method": {"type": "lora", "rank": 8},
            "output": {"uri": "s3://adapters/x/"},
        },
        "parameters": PARAMS[:4],
        "objectives": [
            {"metric": "evalLoss", "direction": "minimize"},
            {"metric": "trainableParamPercent", "direction": "minimize"},
        ],
        "algorithm": {"sampler": "nsga2", "seed": 1},
        "maxTrials": 24,
        "parallelism": 4,
        "maxFailedTrials": 2,
    }
    model = FineTuneSweepSpec.model_validate(wire)
    a, b = SweepConfig.from_spec(model), SweepConfig.from_spec(wire)
    assert a.space.distributions == b.space.distributions
    assert (a.objectives, a.sampler, a.seed, a.max_trials, a.parallelism, a.max_failed_trials) == (
        b.objectives,
        b.sampler,
        b.seed,
        24,
        4,
        2,
    )
    assert a.directions == ["minimize", "minimize"] and a.multi_objective
    assert a.objective_values({"evalLoss": 1.5, "trainable_param_percent": 0.9}) == [1.5, 0.9]


def test_multi_objective_rules() -> None:
    two = [{"metric": "evalLoss"}, {"metric": "trainableParamPercent"}]
    with pytest.raises(SweepConfigError, match=r"'cmaes' supports one objective only"):
        SweepConfig.from_spec(
            {"parameters": PARAMS, "objectives": two, "algorithm": {"sampler": "cmaes"}}
        )
    with pytest.raises(SweepConfigError, match=r"two objectives.*pruner to none"):
        SweepConfig.from_spec(
            {"parameters": PARAMS, "objectives": two, "earlyStopping": {"pruner": "median"}}
        )
    with pytest.raises(SweepConfigError, match=r"one or two objectives"):
        SweepConfig.from_spec({"parameters": PARAMS, "objectives": [*two, {"metric": "x"}]})
    for sampler in ("tpe", "nsga2", "random"):
        cfg = SweepConfig.from_spec(
            {"parameters": PARAMS, "objectives": two, "algorithm": {"sampler": sampler}}
        )
        assert make_sampler(cfg) is not None


def test_registries() -> None:
    import importlib.util

    import optuna

    base = {"parameters": PARAMS[:3]}
    expected = {
        "tpe": optuna.samplers.TPESampler,
        "random": optuna.samplers.RandomSampler,
        "nsga2": optuna.samplers.NSGAIISampler,
        "cmaes": optuna.samplers.CmaEsSampler,
        "gp": optuna.samplers.GPSampler,
    }
    for name, cls in expected.items():
        cfg = SweepConfig.from_spec({**base, "algorithm": {"sampler": name, "seed": 0}})
        deps = {"cmaes": ["cmaes"], "gp": ["torch", "scipy"]}.get(name, [])
        missing = [d for d in deps if importlib.util.find_spec(d) is None]
        if missing:
            with pytest.raises(SweepConfigError, match=f"needs the Python package '{missing[0]}'"):
                make_sampler(cfg)
        else:
            assert isinstance(make_sampler(cfg), cls)
    with pytest.raises(SweepConfigError, match=r"unknown sampler 'bayes'"):
        SweepConfig.from_spec({**base, "algorithm": {"sampler": "bayes"}})

    pruners = {
        "none": optuna.pruners.NopPruner,
        "median": optuna.pruners.MedianPruner,
        "hyperband": optuna.pruners.HyperbandPruner,
        "successiveHalving": optuna.pruners.SuccessiveHalvingPruner,
    }
    for name, cls in pruners.items():
        cfg = SweepConfig.from_spec({**base, "earlyStopping": {"pruner": name, "minResource": 2}})
        assert isinstance(make_pruner(cfg), cls)
    with pytest.raises(SweepConfigError, match=r"unknown pruner 'asha'"):
        SweepConfig.from_spec({**base, "earlyStopping": {"pruner": "asha"}})
