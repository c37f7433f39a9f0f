"""FineTuneSweep models: search space, objectives, sampler/pruner rules, status."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from pydantic import ValidationError

from orchestrator.api import (
    FineTuneSweepSpec,
    FineTuneSweepStatus,
    TrialCounts,
    TrialSummary,
    format_errors,
    trial_name,
)

pytestmark = pytest.mark.unit

TEMPLATE: dict[str, Any] = {
    "model": {"uri": "s3://models/llama-3.2-1b"},
    "data": {"train": "s3://d/train.jsonl", "eval": "s3://d/eval.jsonl"},
    "output": {"uri": "s3://adapters/sweep/"},
}
RANK = {"name": "method.rank", "int": {"low": 4, "high": 64, "log": True}}
LR = {"name": "training.learningRate", "float": {"low": 1e-5, "high": 1e-3, "log": True}}


def sweep(**overrides: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"template": copy.deepcopy(TEMPLATE), "parameters": [RANK, LR]}
    out.update(overrides)
    return out


def errors_of(doc: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as info:
        FineTuneSweepSpec.model_validate(doc)
    return format_errors(info.value, "spec")


def test_design_example_validates_with_defaults() -> None:
    spec = FineTuneSweepSpec.model_validate(
        sweep(
            parameters=[
                RANK,
                {"name": "method.trainableParamPercent", "float": {"low": 0.5, "high": 2.0}},
                LR,
                {
                    "name": "method.targetModules",
                    "categorical": [["q_proj", "v_proj"], "all-linear"],
                },
            ]
        )
    )
    assert [p.kind for p in spec.parameters] == ["int", "float", "float", "categorical"]
    wire = spec.to_wire()
    assert wire["objectives"] == [{"metric": "evalLoss", "direction": "minimize"}]
    assert wire["algorithm"] == {"sampler": "tpe"}
    assert wire["earlyStopping"] == {"pruner": "none"}
    assert (wire["maxTrials"], wire["parallelism"], wire["maxFailedTrials"]) == (10, 1, 3)
    assert wire["parameters"][0] == {
        "name": "method.rank",
        "int": {"low": 4, "high": 64, "log": True},
    }
    assert not spec.multi_objective


def test_free_form_deepspeed_keys_can_be_swept() -> None:
    spec = FineTuneSweepSpec.model_validate(
        sweep(
            parameters=[
                {
                    "name": "distributed.deepspeed.config.gradient_clipping",
                    "float": {"low": 0.5, "high": 2.0},
                }
            ]
        )
    )
    assert spec.parameters[0].name.endswith("gradient_clipping")


INVALID: list[tuple[str, dict[str, Any], list[str]]] = [
    (
        "unknown parameter path",
        sweep(parameters=[{"name": "method.rnak", "int": {"low": 1, "high": 8}}]),
        ["'method.rnak' is not a FineTuneJob spec field", "did you mean 'method.rank'"],
    ),
    (
        "unsweepable field",
        sweep(parameters=[{"name": "storage.credentialsSecret", "categorical": ["a"]}]),
        ["not a FineTuneJob spec field that can be swept"],
    ),
    (
        "no kind",
        sweep(parameters=[{"name": "method.rank"}]),
        ["exactly one of int, float or categorical"],
    ),
    (
        "two kinds",
        sweep(
            parameters=[{"name": "method.rank", "int": {"low": 1, "high": 2}, "categorical": [4]}]
        ),
        ["exactly one of int, float or categorical", "found int, categorical"],
    ),
    (
        "float range on int field",
        sweep(parameters=[{"name": "method.rank", "float": {"low": 1, "high": 8}}]),
        ["a float range cannot target an integer field", "'method.rank'"],
    ),
    (
        "int range on enum field",
        sweep(parameters=[{"name": "method.type", "int": {"low": 1, "high": 2}}]),
        ["int and float ranges need a numeric field", "'method.type'"],
    ),
    (
        "range outside the field's limits",
        sweep(parameters=[{"name": "method.rank", "int": {"low": 0, "high": 8}}]),
        ["'method.rank': value 0 is not valid", "greater than or equal to 1"],
    ),
    (
        "bad categorical choice",
        sweep(parameters=[{"name": "method.type", "categorical": ["lora", "loha"]}]),
        ["value 'loha' is not valid"],
    ),
    (
        "empty categorical",
        sweep(parameters=[{"name": "method.type", "categorical": []}]),
        ["categorical"],
    ),
    (
        "low above high",
        sweep(parameters=[{"name": "method.rank", "int": {"low": 64, "high": 4}}]),
        ["int.low must be <= int.high (got 64 > 4)"],
    ),
    (
        "log with zero low",
        sweep(
            parameters=[
                {"name": "training.weightDecay", "float": {"low": 0.0, "high": 0.1, "log": True}}
            ]
        ),
        ["log-scale float range needs low > 0"],
    ),
    (
        "log with step",
        sweep(
            parameters=[
                {"name": "method.rank", "int": {"low": 4, "high": 64, "log": True, "step": 4}}
            ]
        ),
        ["int.step cannot be combined with log"],
    ),
    (
        "duplicate parameter",
        sweep(parameters=[RANK, RANK]),
        ["parameters[].name must be unique", "'method.rank' appears twice"],
    ),
    ("no parameters", sweep(parameters=[]), ["spec.parameters"]),
    (
        "three objectives",
        sweep(
            objectives=[
                {"metric": "evalLoss"},
                {"metric": "trainLoss"},
                {"metric": "trainableParams"},
            ]
        ),
        ["spec.objectives"],
    ),
    (
        "duplicate objective",
        sweep(objectives=[{"metric": "evalLoss"}, {"metric": "evalLoss", "direction": "maximize"}]),
        ["objectives[].metric must be unique"],
    ),
    (
        "unknown direction",
        sweep(objectives=[{"metric": "evalLoss", "direction": "lower"}]),
        ["spec.objectives.0.direction"],
    ),
    ("unknown sampler", sweep(algorithm={"sampler": "bayes"}), ["spec.algorithm.sampler", "'tpe'"]),
    ("unknown pruner", sweep(earlyStopping={"pruner": "asha"}), ["spec.earlyStopping.pruner"]),
    (
        "pruning two objectives",
        sweep(
            objectives=[{"metric": "evalLoss"}, {"metric": "trainableParamPercent"}],
            earlyStopping={"pruner": "median"},
        ),
        ["earlyStopping.pruner must be none with two objectives"],
    ),
    (
        "cmaes with two objectives",
        sweep(
            objectives=[{"metric": "evalLoss"}, {"metric": "trainableParamPercent"}],
            algorithm={"sampler": "cmaes"},
        ),
        ["cmaes supports one objective"],
    ),
    (
        "grid with continuous float",
        sweep(algorithm={"sampler": "grid"}),
        ["grid needs a finite grid"],
    ),
    (
        "min above max resource",
        sweep(earlyStopping={"pruner": "hyperband", "minResource": 9, "maxResource": 3}),
        ["minResource must be <= earlyStopping.maxResource"],
    ),
    ("zero max trials", sweep(maxTrials=0), ["spec.maxTrials"]),
    ("zero parallelism", sweep(parallelism=0), ["spec.parallelism"]),
    (
        "bad template",
        sweep(template={**TEMPLATE, "method": {"type": "prefix"}}),
        ["spec.template", "numVirtualTokens is required"],
    ),
    ("misspelt sweep field", {**sweep(), "maxTrails": 5}, ["spec.maxTrails", "unknown field"]),
    (
        "constraint without bounds",
        sweep(constraints=[{"metric": "evalLoss"}]),
        ["each constraint needs max, min or both"],
    ),
    (
        "constraint min above max",
        sweep(constraints=[{"metric": "trainableParamPercent", "min": 2.0, "max": 1.0}]),
        ["constraints[].min must be <= constraints[].max"],
    ),
    (
        "duplicate constraint",
        sweep(constraints=[{"metric": "evalLoss", "max": 2.0}, {"metric": "evalLoss", "min": 1}]),
        ["constraints[].metric must be unique"],
    ),
    (
        "forgetting constraint without general data",
        sweep(constraints=[{"metric": "generalLossDelta", "max": 0.1}]),
        ["a constraint on generalLossDelta needs template.data.general"],
    ),
    (
        "misspelt constraint bound",
        sweep(constraints=[{"metric": "evalLoss", "maximum": 2.0}]),
        ["spec.constraints.0.maximum", "unknown field"],
    ),
]


@pytest.mark.parametrize(("case", "doc", "expected"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_sweep_is_rejected_naming_the_field(
    case: str, doc: dict[str, Any], expected: list[str]
) -> None:
    message = errors_of(doc)
    for text in expected:
        assert text in message, f"{case}: {text!r} not in {message!r}"


def test_constraints_parse_with_either_bound() -> None:
    template = {**TEMPLATE, "data": {**TEMPLATE["data"], "general": "s3://d/general.jsonl"}}
    spec = FineTuneSweepSpec.model_validate(
        sweep(
            template=template,
            constraints=[
                {"metric": "generalLossDelta", "max": 0.1},
                {"metric": "trainableParamPercent", "min": 0.5, "max": 2},
            ],
        )
    )
    assert [(c.metric, c.min_, c.max_) for c in spec.constraints] == [
        ("generalLossDelta", None, 0.1),
        ("trainableParamPercent", 0.5, 2.0),
    ]
    assert spec.to_wire()["constraints"][0] == {"metric": "generalLossDelta", "max": 0.1}
    assert FineTuneSweepSpec.model_validate(sweep()).constraints == []


def test_grid_with_stepped_floats_is_fine() -> None:
    lr = {"name": "training.learningRate", "float": {"low": 1e-4, "high": 5e-4, "step": 1e-4}}
    spec = FineTuneSweepSpec.model_validate(
        sweep(
            parameters=[{"name": "method.rank", "int": {"low": 4, "high": 16, "step": 4}}, lr],
            algorithm={"sampler": "grid"},
        )
    )
    assert spec.algorithm.sampler == "grid"


def test_status_counts_and_best_value_are_derived() -> None:
    status = FineTuneSweepStatus(
        phase="Running",
        trials=TrialCounts(created=9, running=4, succeeded=3, failed=1, pruned=1),
        best_trial=TrialSummary(
            name="s-7", number=7, values=[1.25, 0.5], metrics={"evalLoss": 1.25}
        ),
    )
    wire = status.to_wire()
    assert wire["trials"]["completed"] == 5  # printer column "Done"
    assert wire["bestTrial"]["value"] == 1.25  # printer column "Best"
    # reading back what the controller wrote (including derived fields) works
    again = FineTuneSweepStatus.model_validate(wire)
    assert again.to_wire() == wire


def test_trial_names_are_deterministic() -> None:
    assert trial_name("support-sweep", 7) == "support-sweep-7"
