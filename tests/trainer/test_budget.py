"""The parameter-budget solver: deterministic, within ±10 % or reported closest, and equal to
what PEFT itself counts (for the bottleneck adapter: what the model holds)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from orchestrator.trainer import arch, budget, methods
from orchestrator.trainer import bottleneck as bn
from tests.trainer.helpers import ARCHS, REPO, model_config

pytestmark = pytest.mark.trainer

BUDGETS = (0.1, 0.3, 1.0, 2.0, 5.0)
# Meta-device models of a realistic layout (no memory): 4 layers, hidden 512, 32k vocab.
HIDDEN, LAYERS, VOCAB = 512, 4, 32000


@pytest.fixture(scope="module")
def shapes() -> dict[str, budget.ModelShape]:
    out = {}
    for a in ARCHS:
        cfg = model_config(a, VOCAB, hidden=HIDDEN, layers=LAYERS)
        out[a] = arch.shape_of(arch.meta_model(cfg), cfg)
    return out


class _Method:
    """The MethodSpec fields methods.peft_config reads."""

    def __init__(self, **kw: object) -> None:
        self.alpha = None
        self.dropout = 0.0
        self.use_rslora = False
        self.__dict__.update(kw)


def counted(a: str, plan: budget.BudgetPlan, shape: budget.ModelShape) -> tuple[int, int]:
    """(trainable, all) as PEFT's get_nb_trainable_parameters reports for the plan."""
    cfg = model_config(a, VOCAB, hidden=HIDDEN, layers=LAYERS)
    model = arch.meta_model(cfg)
    if plan.method == "adapter":
        bn.add_adapters(model, plan.modules, int(plan.size or 0))
        return methods.count_trainable(model)
    from peft import get_peft_model

    pm = get_peft_model(model, methods.peft_config(plan, _Method(), shape))
    return methods.count_trainable(pm)


def check(plan: budget.BudgetPlan, target: float) -> None:
    if plan.within_tolerance:
        assert abs(plan.percent - target) <= 0.1 * target + 1e-9, plan.summary()
    else:
        assert plan.note.startswith("closest achievable"), plan.summary()


@pytest.mark.parametrize("a", ARCHS)
@pytest.mark.parametrize("target", BUDGETS)
def test_rank_from_budget_matches_peft(shapes: dict[str, budget.ModelShape], a: str,
                                       target: float) -> None:
    """Without a rank the budget picks it; all-linear on these shapes always lands within
    ±10 %, and PEFT counts exactly what the plan says."""
    shape = shapes[a]
    plan = budget.plan(shape, "lora", target_percent=target)
    assert plan.within_tolerance, plan.summary()
    check(plan, target)
    assert counted(a, plan, shape) == (plan.trainable_params, plan.all_params)


@pytest.mark.parametrize("a", ARCHS)
@pytest.mark.parametrize("target", BUDGETS)
def test_modules_from_budget_with_fixed_rank(shapes: dict[str, budget.ModelShape], a: str,
                                             target: float) -> None:
    """With rank given the budget picks modules: spread over layers, attention first."""
    shape = shapes[a]
    plan = budget.plan(shape, "lora", size=16, target_percent=target)
    check(plan, target)
    assert plan.size == 16
    assert counted(a, plan, shape) == (plan.trainable_params, plan.all_params)
    if plan.within_tolerance and len(plan.modules) < len(shape.linears):
        full = budget.plan(shape, "lora", size=16)
        assert plan.trainable_params < full.trainable_params


@pytest.mark.parametrize("a", ARCHS)
@pytest.mark.parametrize("method", ["dora", "ia3", "adapter", "prefix", "prompt"])
@pytest.mark.parametrize("target", [0.1, 1.0, 5.0])
def test_other_methods_match_counts(shapes: dict[str, budget.ModelShape], a: str, method: str,
                                    target: float) -> None:
    shape = shapes[a]
    plan = budget.plan(shape, method, target_percent=target)
    check(plan, target)
    assert counted(a, plan, shape) == (plan.trainable_params, plan.all_params)


def test_ia3_reports_closest_when_budget_unreachable(shapes: dict[str, budget.ModelShape]) -> None:
    plan = budget.plan(shapes["llama"], "ia3", target_percent=5.0)
    assert not plan.within_tolerance
    assert len(plan.modules) == len(shapes["llama"].linears)  # everything it can adapt
    assert "closest achievable" in plan.note and "5%" in plan.note


def test_deterministic_and_serialisable(shapes: dict[str, budget.ModelShape]) -> None:
    shape = shapes["qwen2"]
    again = budget.ModelShape.from_dict(shape.to_dict())
    assert again == shape
    p1 = budget.plan(shape, "lora", size=8, target_percent=0.3)
    p2 = budget.plan(again, "lora", size=8, target_percent=0.3)
    assert p1 == p2


def test_selection_spreads_layers_and_prefers_attention() -> None:
    assert budget.spread_order(range(8)) == [7, 0, 4, 2, 6, 5, 3, 1]
    lin = tuple(budget.Linear(f"model.layers.{i}.{n}", i, r, 64, 64)
                for i in range(4) for n, r in (("self_attn.q_proj", "q"), ("mlp.up_proj", "up")))
    shape = budget.ModelShape("llama", 100_000, 64, 4, lin, 64, 512)
    plan = budget.plan(shape, "lora", size=2, target_percent=0.5)
    assert all("q_proj" in m for m in plan.modules)
    assert plan.modules[0].startswith("model.layers.3.")


def test_target_modules_list_and_unknown_name(shapes: dict[str, budget.ModelShape]) -> None:
    shape = shapes["llama"]
    plan = budget.plan(shape, "lora", size=4, target_modules=["q_proj", "v_proj"])
    assert len(plan.modules) == 2 * LAYERS
    with pytest.raises(ValueError, match=r"matches no linear module.*available: self_attn\.q_proj"):
        budget.plan(shape, "lora", size=4, target_modules=["query"])
    gpt2 = budget.plan(shapes["gpt2"], "lora", size=4, target_modules=["c_attn"])
    assert all(m.endswith("attn.c_attn") for m in gpt2.modules)


def test_budget_module_needs_no_torch() -> None:
    code = ("import sys, orchestrator.trainer.budget, orchestrator.trainer.errors; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_real_tiny_models_match_plan(tiny_models: dict[str, object]) -> None:
    """The exact tiny models the training tests use: meta shape == real model count."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    for a, path in tiny_models.items():
        shape = arch.shape_from_dir(path)  # type: ignore[arg-type]
        plan = budget.plan(shape, "lora", size=2, target_percent=2.0)
        model = AutoModelForCausalLM.from_pretrained(str(path))
        assert arch.count_params(model) == shape.total_params
        pm = get_peft_model(model, methods.peft_config(plan, _Method(), shape))
        assert methods.count_trainable(pm) == (plan.trainable_params, plan.all_params), a
