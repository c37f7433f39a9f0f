"""Method and launch settings that used to crash or mislead: rsLoRA's default alpha, the
bottleneck selection order, QLoRA's placement under ZeRO-3, the eval sharding. In-process
and fast (meta-device models, no training)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from orchestrator.api.job import FineTuneJobSpec
from orchestrator.render.deepspeed import render_deepspeed_config
from orchestrator.trainer import arch, budget, evaluation, methods
from orchestrator.trainer.run import deepspeed_config, qlora_placement
from tests.trainer.helpers import model_config

pytestmark = pytest.mark.trainer


@pytest.fixture(scope="module")
def llama() -> tuple[Any, budget.ModelShape]:
    cfg = model_config("llama", 32000, hidden=512, layers=4)
    return cfg, arch.shape_of(arch.meta_model(cfg), cfg)


def _spec(method: dict[str, Any], **distributed: Any) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate({
        "model": {"uri": "s3://models/m"},
        "data": {"train": "s3://d/t.jsonl", "eval": "s3://d/e.jsonl"},
        "method": method, "output": {"uri": "s3://out/"},
        "distributed": {"nodes": 1, "gpusPerNode": 2, **distributed},
        "training": {"globalBatchSize": 8, "microBatchSize": 2}})


@pytest.mark.parametrize("rslora", [True, False], ids=["rslora", "lora"])
def test_lora_scale_with_default_alpha(llama: tuple[Any, budget.ModelShape],
                                       rslora: bool) -> None:
    """rsLoRA (scale alpha/sqrt(r)) gets a fixed default alpha, so the scale no longer grows
    with the rank a sweep or the budget picks; plain LoRA keeps alpha = 2 x rank (scale 2)."""
    from peft import get_peft_model

    cfg, shape = llama
    for r in (4, 16, 64):
        spec = _spec({"type": "lora", "rank": r, "useRslora": rslora,
                      "targetModules": ["q_proj"]})
        plan = budget.plan(shape, "lora", size=r, target_modules=["q_proj"])
        model = get_peft_model(arch.meta_model(cfg), methods.peft_config(plan, spec.method,
                                                                         shape))
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        expected = 8 / math.sqrt(r) if rslora else 2.0
        assert layer.scaling["default"] == pytest.approx(expected), r
        assert spec.method.effective_alpha == (8.0 if rslora else 2.0 * r)


def test_bottleneck_budget_adapts_after_mlp_before_after_attention(
        llama: tuple[Any, budget.ModelShape]) -> None:
    """As documented: Pfeiffer's after-MLP points first, Houlsby's after-attention next."""
    _, shape = llama
    full = budget.plan(shape, "adapter", size=16)
    assert {m.rsplit(".", 1)[-1] for m in full.modules} == {"down_proj", "o_proj"}
    for target in (0.05, 0.2, 0.5):
        plan = budget.plan(shape, "adapter", size=16, target_percent=target)
        kinds = [m.rsplit(".", 1)[-1] for m in plan.modules]
        assert kinds and kinds[0] == "down_proj", (target, plan.modules)
        if "o_proj" in kinds:  # only once every after-MLP point is taken
            assert kinds.count("down_proj") == 4, (target, plan.modules)


def test_qlora_under_zero3_loads_without_device_map() -> None:
    """transformers refuses a device_map under ZeRO-3; ZeRO-2 keeps one GPU per process."""
    zero3 = render_deepspeed_config(_spec({"type": "qlora"}, deepspeed={"zeroStage": 3}))
    zero2 = render_deepspeed_config(_spec({"type": "qlora"}, deepspeed={"zeroStage": 2}))
    assert qlora_placement(zero3, 1) == {}
    assert qlora_placement(zero2, 1) == {"device_map": {"": 1}}
    assert qlora_placement({}, 0) == {"device_map": {"": 0}}


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_eval_shards_cover_each_example_once_in_equal_batch_counts(ranks: int) -> None:
    lengths = [5, 40, 7, 7, 33, 12, 1, 64, 9, 18, 2, 30, 30, 11, 70, 3, 8, 21, 6, 50, 4]
    shards = [evaluation.shard_batches(lengths, ranks, r, max_tokens=64) for r in range(ranks)]
    assert len({len(s) for s in shards}) == 1  # same number of forwards on every rank
    seen = [i for s in shards for batch in s for i in batch if i is not None]
    assert sorted(seen) == list(range(len(lengths)))
    for batch in (b for s in shards for b in s if b != [None]):
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 64  # type: ignore[index]


def test_deepspeed_engine_only_where_it_helps() -> None:
    """One process or ZeRO stage 0 trains with plain PyTorch (no DeepSpeed engine overhead);
    several processes with ZeRO >= 1, any CPU offload, or user DeepSpeed keys keep DeepSpeed."""
    def ds(world: int, user: bool = False, **deepspeed: Any) -> dict[str, Any] | None:
        raw = render_deepspeed_config(_spec({"type": "lora"}, deepspeed=deepspeed))
        return deepspeed_config(raw, world, user)

    assert ds(1, zeroStage=2) is None
    assert ds(2, zeroStage=0) is None
    assert ds(2, zeroStage=2) is not None
    assert ds(1, zeroStage=2, offload="cpu") is not None
    assert ds(1, True, zeroStage=2, config={"zero_allow_untested_optimizer": True}) is not None
    assert deepspeed_config({}, 2) is None
