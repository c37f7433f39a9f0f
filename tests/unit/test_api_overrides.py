"""apply_overrides: how a sweep trial's parameters become a concrete FineTuneJob spec."""

from __future__ import annotations

import pytest

from orchestrator.api import (
    FineTuneJobSpec,
    InvalidOverride,
    apply_overrides,
    check_parameter_path,
    sweepable_paths,
)

pytestmark = pytest.mark.unit

TEMPLATE = FineTuneJobSpec.model_validate(
    {
        "model": {"uri": "s3://models/m"},
        "data": {"train": "s3://d/t.jsonl", "eval": "s3://d/e.jsonl"},
        "output": {"uri": "s3://o/"},
        "distributed": {"deepspeed": {"config": {"zero_optimization": {"overlap_comm": False}}}},
    }
)


def test_overrides_set_nested_fields_and_keep_the_template() -> None:
    spec = apply_overrides(
        TEMPLATE,
        {
            "method.rank": 32,
            "training.learningRate": 3e-4,
            "method.targetModules": ["q_proj", "v_proj"],
            "distributed.deepspeed.config.zero_optimization.reduce_bucket_size": 5e8,
        },
    )
    assert spec.method.rank == 32
    assert spec.training.learning_rate == 3e-4
    assert spec.method.target_modules == ["q_proj", "v_proj"]
    assert spec.distributed.deepspeed.config == {
        "zero_optimization": {"overlap_comm": False, "reduce_bucket_size": 5e8}
    }
    assert TEMPLATE.method.rank is None  # the template is untouched


def test_unset_template_fields_stay_unset() -> None:
    # a budget-only trial must not inherit a default rank (that would change its meaning)
    spec = apply_overrides(TEMPLATE, {"method.trainableParamPercent": 1.5})
    assert spec.method.rank is None and spec.method.trainable_param_percent == 1.5


def test_invalid_value_names_the_path_and_the_field() -> None:
    with pytest.raises(InvalidOverride) as info:
        apply_overrides(TEMPLATE, {"method.rank": 0})
    assert "method.rank=0" in str(info.value)
    assert "method.rank: Input should be greater than or equal to 1" in str(info.value)


def test_cross_field_rules_apply_to_the_result() -> None:
    ia3 = apply_overrides(TEMPLATE, {"method.type": "ia3"})
    with pytest.raises(InvalidOverride, match=r"method\.rank applies only to lora"):
        apply_overrides(ia3, {"method.rank": 8})
    with pytest.raises(InvalidOverride, match="globalBatchSize must be divisible"):
        apply_overrides(TEMPLATE, {"training.microBatchSize": 3})


def test_unknown_path_suggests_the_closest_field() -> None:
    with pytest.raises(InvalidOverride, match=r"did you mean .training\.learningRate."):
        apply_overrides(TEMPLATE, {"training.learningrate": 1e-4})
    with pytest.raises(InvalidOverride, match="not a FineTuneJob spec field"):
        check_parameter_path("storage.credentialsSecret")


def test_sweepable_paths_cover_the_tuning_knobs_only() -> None:
    paths = sweepable_paths()
    for p in (
        "method.rank",
        "method.trainableParamPercent",
        "training.learningRate",
        "method.targetModules",
        "distributed.deepspeed.zeroStage",
    ):
        assert p in paths
    for p in (
        "storage.credentialsSecret",
        "output.uri",
        "resources.tolerations",
        "distributed.deepspeed.config",
    ):
        assert p not in paths
