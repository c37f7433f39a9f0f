"""The budget solver lives in orchestrator.api.budget (shared with the sweep controller)."""

from __future__ import annotations

from orchestrator.api.budget import *  # noqa: F403
from orchestrator.api.budget import (  # noqa: F401
    DEFAULT_TOLERANCE,
    KNOBS,
    LINEAR_METHODS,
    PROMPT_METHODS,
    BudgetPlan,
    Linear,
    ModelShape,
    Unit,
    _select_prefix,
    _solve_size,
    adapter_units,
    order_units,
    percent_of,
    plan,
    plan_for_method,
    spread_order,
    units_for,
)
