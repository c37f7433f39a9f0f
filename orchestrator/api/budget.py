"""The trainable-parameter budget solver: pure arithmetic, no torch.

It lives in the API package because it *defines* what `method.trainableParamPercent`
means: the trainer applies it, and the sweep controller uses the very same rule to refuse
trial parameters that cannot be met before they cost GPU time.

Input is a :class:`ModelShape` (the linear modules of a model with their layer index, role and
in/out features, plus the model's total parameter count) — ``orchestrator.trainer.arch``
builds one from a meta-device model in well under a second, and it serialises to JSON so a
controller can cache it. Output is a :class:`BudgetPlan`: the size knob, the exact list of
adapted modules and the exact trainable / total counts, equal to what PEFT's
``get_nb_trainable_parameters`` reports for the same configuration (the tests check this).

Percent means what ``print_trainable_parameters`` prints: ``trainable / (base + adapter) * 100``.

The rule (deterministic; see docs/trainer.md):

1. Candidates are the resolved target units: linear modules for lora/dora/qlora/ia3, the
   insertion points after attention and/or MLP blocks for ``adapter``, and the virtual
   tokens for prefix/prompt.
2. Without a size (rank, bottleneck width, number of virtual tokens) and with a budget, the
   size is solved over *all* candidates: trainable(k) = k*A + C is linear in k, so the best
   integer is the floor or ceiling of the exact solution, clipped to [1, max_size]; the one
   whose percent is closest to the target wins (ties: the smaller).
3. With a size given (or when even size 1 on all candidates overshoots the tolerance), the
   budget picks *which* units: candidates are ordered by role priority (q/qkv, v, k, o,
   gate, up, down, others — for adapters: after-MLP, then after-attention) and, within a role,
   by layers spread over depth (the last layer first, then always the layer farthest from
   those already chosen, ties to the deeper one). The plan takes the prefix of that order
   whose percent is closest to the target (ties: the shorter).
4. The plan is ``within_tolerance`` when |achieved - target| <= 10 % of target; otherwise
   it is the closest achievable value and ``note`` says why.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

#: Methods and their size knob (``None``: no knob).
KNOBS: dict[str, str | None] = {
    "lora": "rank",
    "dora": "rank",
    "qlora": "rank",
    "adapter": "bottleneck",
    "prefix": "numVirtualTokens",
    "prompt": "numVirtualTokens",
    "ia3": None,
    "full": None,
}
LINEAR_METHODS = frozenset({"lora", "dora", "qlora", "ia3"})
PROMPT_METHODS = frozenset({"prefix", "prompt"})

# Role priority for module selection: attention first (the classic LoRA q/v choice), MLP last.
ROLE_ORDER = ("qkv", "q", "v", "k", "o", "gate", "up", "down", "other")
# Adapters: after the MLP (Pfeiffer's single point) before after attention (Houlsby adds it).
ADAPTER_ROLE_ORDER = ("down", "o")
# IA3 scales the *input* of feed-forward output projections and the output of the rest.
IA3_FEEDFORWARD_ROLES = frozenset({"down"})
# Bottleneck adapters sit after these sub-blocks; "mlp" first (Pfeiffer's finding).
ADAPTER_POINT_ROLES = {"mlp": "down", "attn": "o"}
PLACEMENTS = {"houlsby": ("mlp", "attn"), "pfeiffer": ("mlp",)}

DEFAULT_TOLERANCE = 0.10


@dataclass(frozen=True)
class Linear:
    """One linear module: full dotted name, transformer block index (None outside blocks),
    role (q, k, v, qkv, o, gate, up, down, other) and its true in/out features."""

    name: str
    layer: int | None
    role: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    total_params: int  # unique parameters of the base model (tied weights counted once)
    hidden_size: int
    num_layers: int
    linears: tuple[Linear, ...]
    prompt_params_per_token: int  # prompt tuning: one embedding row per virtual token
    prefix_params_per_token: int  # prefix tuning: key and value rows for every layer
    uses_conv1d: bool = False  # GPT-2 style Conv1D (weights stored transposed)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["linears"] = [asdict(x) for x in self.linears]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelShape:
        d = dict(d)
        d["linears"] = tuple(Linear(**x) for x in d["linears"])
        return cls(**d)

    def resolve_targets(self, target_modules: str | Sequence[str] | None) -> list[Linear]:
        """``all-linear`` (or None) -> every linear in the model except the output head (the
        arch module already left it out); a list -> modules whose name is, or ends with
        ``.``+, one of the entries. Unknown entries raise ValueError naming what exists."""
        if target_modules is None or target_modules == "all-linear":
            return list(self.linears)
        if isinstance(target_modules, str):
            target_modules = [target_modules]
        chosen: list[Linear] = []
        for t in target_modules:
            hits = [m for m in self.linears if m.name == t or m.name.endswith("." + t)]
            if not hits:
                raise ValueError(
                    f"targetModules entry '{t}' matches no linear module of this "
                    f"{self.model_type} model; available: {', '.join(self.module_kinds())}"
                )
            chosen.extend(h for h in hits if h not in chosen)
        return [m for m in self.linears if m in chosen]  # model order

    def module_kinds(self) -> list[str]:
        """Names relative to their block (``self_attn.q_proj``), in model order, unique."""
        seen: dict[str, None] = {}
        for m in self.linears:
            seen.setdefault(_kind(m), None)
        return list(seen)


@dataclass(frozen=True)
class Unit:
    """Something the budget can switch on: costs ``per_size * k + fixed`` parameters."""

    name: str
    layer: int | None
    role: str
    per_size: int
    fixed: int


@dataclass(frozen=True)
class BudgetPlan:
    method: str
    knob: str | None
    size: int | None
    modules: tuple[str, ...]
    trainable_params: int
    all_params: int
    target_percent: float | None = None
    within_tolerance: bool = True
    note: str = ""
    feedforward_modules: tuple[str, ...] = field(default=())  # ia3 only
    placement: tuple[str, ...] = field(default=())  # adapter only

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable_params / self.all_params if self.all_params else 0.0

    def summary(self) -> dict[str, Any]:
        """The compact form for logs, metadata and the termination message."""
        return {
            "method": self.method,
            "knob": self.knob,
            "size": self.size,
            "adaptedModules": len(self.modules),
            "trainableParams": self.trainable_params,
            "allParams": self.all_params,
            "trainableParamPercent": round(self.percent, 6),
            "targetPercent": self.target_percent,
            "withinTolerance": self.within_tolerance,
            "note": self.note,
        }


def _kind(m: Linear) -> str:
    parts = m.name.split(".")
    if m.layer is not None and str(m.layer) in parts:
        return ".".join(parts[parts.index(str(m.layer)) + 1 :])
    return m.name


def spread_order(layers: Iterable[int]) -> list[int]:
    """Layers ordered so that every prefix is spread over depth: the deepest first, then
    repeatedly the layer farthest from those chosen (ties to the deeper one)."""
    remaining = sorted(set(layers))
    if not remaining:
        return []
    order = [remaining.pop()]
    while remaining:
        best = max(remaining, key=lambda i: (min(abs(i - j) for j in order), i))
        remaining.remove(best)
        order.append(best)
    return order


def order_units(units: Sequence[Unit], role_order: Sequence[str] = ROLE_ORDER) -> list[Unit]:
    rank_of = {r: i for i, r in enumerate(role_order)}
    by_role: dict[str, list[Unit]] = {}
    for u in units:
        by_role.setdefault(u.role, []).append(u)
    out: list[Unit] = []
    for role in sorted(by_role, key=lambda r: (rank_of.get(r, len(rank_of)), r)):
        group = by_role[role]
        pos = {layer: i for i, layer in enumerate(spread_order(u.layer for u in group
                                                               if u.layer is not None))}
        out.extend(sorted(group, key=lambda u: (u.layer is None,
                                                pos.get(u.layer, 0) if u.layer is not None
                                                else 0, u.name)))
    return out


def _role_order(method: str) -> Sequence[str]:
    return ADAPTER_ROLE_ORDER if method == "adapter" else ROLE_ORDER


def percent_of(trainable: int, base: int, additive: bool = True) -> float:
    total = base + trainable if additive else base
    return 100.0 * trainable / total if total else 0.0


def units_for(shape: ModelShape, method: str, target_modules: str | Sequence[str] | None,
              placement: str = "houlsby") -> list[Unit]:
    """The candidate units of a method, in model order."""
    if method in ("lora", "qlora"):
        return [Unit(m.name, m.layer, m.role, m.in_features + m.out_features, 0)
                for m in shape.resolve_targets(target_modules)]
    if method == "dora":  # + the magnitude vector (one per output feature)
        return [Unit(m.name, m.layer, m.role, m.in_features + m.out_features, m.out_features)
                for m in shape.resolve_targets(target_modules)]
    if method == "ia3":
        return [Unit(m.name, m.layer, m.role, 0,
                     m.in_features if m.role in IA3_FEEDFORWARD_ROLES else m.out_features)
                for m in shape.resolve_targets(target_modules)]
    if method == "adapter":
        return adapter_units(shape, placement)
    raise ValueError(f"method '{method}' has no module units")


def adapter_units(shape: ModelShape, placement: str) -> list[Unit]:
    """One unit per insertion point: Linear(d, k) + bias, then Linear(k, d) + bias."""
    if placement not in PLACEMENTS:
        raise ValueError(f"adapterPlacement must be one of {sorted(PLACEMENTS)}, got '{placement}'")
    roles = {ADAPTER_POINT_ROLES[p] for p in PLACEMENTS[placement]}
    out = []
    for m in shape.linears:
        if m.role in roles and m.layer is not None:
            d = m.out_features
            out.append(Unit(m.name, m.layer, m.role, 2 * d + 1, d))
    if not out:
        raise ValueError(f"no attention/MLP output projections found in this {shape.model_type} "
                         "model to place adapters after")
    return out


def _cost(units: Iterable[Unit], size: int) -> int:
    return sum(u.per_size * size + u.fixed for u in units)


def _tolerance_ok(achieved: float, target: float, tol: float) -> bool:
    return abs(achieved - target) <= tol * target + 1e-12


def plan(
    shape: ModelShape,
    method: str,
    *,
    size: int | None = None,
    target_percent: float | None = None,
    target_modules: str | Sequence[str] | None = "all-linear",
    placement: str = "houlsby",
    default_size: int = 8,
    max_size: int | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> BudgetPlan:
    """Plan a method's size and adapted modules, optionally against a percent budget.

    ``size`` is the rank (lora/dora/qlora), bottleneck width (adapter) or number of virtual
    tokens (prefix/prompt). Without a budget, ``size or default_size`` on all candidates.
    """
    if method not in KNOBS:
        raise ValueError(f"unknown method '{method}'")
    if target_percent is not None and not 0 < target_percent < 100:
        raise ValueError(f"trainableParamPercent must be in (0, 100), got {target_percent}")
    knob = KNOBS[method]
    base = shape.total_params

    if method == "full":
        note = ""
        within = True
        if target_percent is not None:
            within = _tolerance_ok(100.0, target_percent, tolerance)
            note = "full fine-tuning trains every parameter; the budget does not apply"
        return BudgetPlan(method, None, None, (), base, base, target_percent, within, note)

    if max_size is None:
        max_size = 1024 if method in PROMPT_METHODS else max(shape.hidden_size, 1)

    if method in PROMPT_METHODS:
        per = shape.prompt_params_per_token if method == "prompt" else shape.prefix_params_per_token
        unit = Unit("prompt_encoder", None, "virtual_tokens", per, 0)
        if target_percent is None or size is not None:
            n = size or default_size
            return _finish(method, knob, n, [unit], base, target_percent, tolerance,
                           given="numVirtualTokens" if size is not None else None)
        n = _solve_size([unit], base, target_percent, max_size)
        return _finish(method, knob, n, [unit], base, target_percent, tolerance,
                       bounds=(1, max_size))

    units = units_for(shape, method, target_modules, placement)
    if not units:
        raise ValueError(f"no modules to adapt for method '{method}'")
    extra: dict[str, Any] = {}
    if method == "adapter":
        extra["placement"] = PLACEMENTS[placement]

    if target_percent is None:
        k = (size or default_size) if knob else None
        return _finish(method, knob, k, units, base, None, tolerance, **extra)

    if knob is not None and size is None:
        k = _solve_size(units, base, target_percent, max_size)
        attempt = _finish(method, knob, k, units, base, target_percent, tolerance,
                          bounds=(1, max_size), **extra)
        if attempt.within_tolerance or (attempt.percent < target_percent and k >= max_size):
            return attempt
        # The size alone is too coarse (or even size 1 overshoots): take the smallest size
        # whose full candidate set reaches the target and select a subset of units at it
        # (rule 3); keep whichever plan lands closer.
        k_up = k if attempt.percent >= target_percent else k + 1
        chosen = _select_prefix(order_units(units, _role_order(method)), base, target_percent,
                                k_up)
        subset = _finish(method, knob, k_up, chosen, base, target_percent, tolerance,
                         of_candidates=len(units), **extra)
        err = abs(subset.percent - target_percent)
        return subset if err < abs(attempt.percent - target_percent) else attempt

    k = size if knob is not None else None
    chosen = _select_prefix(order_units(units, _role_order(method)), base, target_percent,
                            k or 1)
    return _finish(method, knob, k, chosen, base, target_percent, tolerance,
                   of_candidates=len(units), **extra)


def _solve_size(units: Sequence[Unit], base: int, target_percent: float, max_size: int) -> int:
    f = target_percent / 100.0
    want = f * base / (1.0 - f)  # trainable count T with T / (base + T) = f
    per = sum(u.per_size for u in units)
    fixed = sum(u.fixed for u in units)
    exact = (want - fixed) / per if per else 1.0
    cands = {min(max(c, 1), max_size) for c in (math.floor(exact), math.ceil(exact))}
    return min(sorted(cands),
               key=lambda k: abs(percent_of(_cost(units, k), base) - target_percent))


def _select_prefix(ordered: Sequence[Unit], base: int, target_percent: float,
                   size: int) -> list[Unit]:
    best_n, best_err, total = 1, math.inf, 0
    for n, u in enumerate(ordered, start=1):
        total += u.per_size * size + u.fixed
        err = abs(percent_of(total, base) - target_percent)
        if err < best_err:
            best_n, best_err = n, err
        if percent_of(total, base) > target_percent:
            break  # monotonic from here on
    return list(ordered[:best_n])


def _finish(method: str, knob: str | None, size: int | None, units: Sequence[Unit], base: int,
            target_percent: float | None, tolerance: float, *,
            bounds: tuple[int, int] | None = None, given: str | None = None,
            of_candidates: int | None = None, placement: tuple[str, ...] = ()) -> BudgetPlan:
    trainable = _cost(units, size or 1)
    all_params = base + trainable
    names = tuple(u.name for u in units)
    ff = tuple(u.name for u in units if u.role in IA3_FEEDFORWARD_ROLES) if method == "ia3" else ()
    achieved = percent_of(trainable, base)
    within, note = True, ""
    if target_percent is not None:
        within = _tolerance_ok(achieved, target_percent, tolerance)
        if not within:
            if method in PROMPT_METHODS and not given:
                note = (f"closest achievable: numVirtualTokens={size} gives {achieved:.4g}% "
                        f"(target {target_percent:g}%; one virtual token costs "
                        f"{units[0].per_size} parameters)")
            elif given:
                note = (f"{given}={size} fixes the size and {method} has no modules to choose; "
                        f"achieved {achieved:.4g}% for a target of {target_percent:g}%")
            elif bounds and size in bounds and of_candidates is None:
                note = (f"closest achievable: {knob}={size} on all {len(units)} candidate "
                        f"modules gives {achieved:.4g}% (target {target_percent:g}%)")
            elif of_candidates is not None and len(units) == of_candidates:
                note = (f"closest achievable: all {of_candidates} candidate modules"
                        + (f" at {knob}={size}" if knob else "")
                        + f" give {achieved:.4g}% (target {target_percent:g}%); "
                        + ("raise the rank or widen targetModules" if knob
                           else "widen targetModules"))
            else:
                note = (f"closest achievable with single-module granularity: {len(units)} "
                        f"module(s) give {achieved:.4g}% (target {target_percent:g}%)")
    return BudgetPlan(method, knob, size, names, trainable, all_params, target_percent, within,
                      note, ff, placement)


#: Size used when a method's knob is left unset and no budget decides it.
DEFAULT_SIZES = {"lora": 8, "dora": 8, "qlora": 8, "adapter": 64, "prefix": 20, "prompt": 20}


def plan_for_method(shape: ModelShape, method: Any) -> BudgetPlan:
    """The plan for a MethodSpec (pydantic model from orchestrator.api)."""
    t = method.type
    size = {"adapter": getattr(method, "bottleneck", None),
            "prefix": method.num_virtual_tokens,
            "prompt": method.num_virtual_tokens}.get(t, method.rank)
    return plan(shape, t, size=size, target_percent=method.trainable_param_percent,
                target_modules=method.target_modules,
                placement=getattr(method, "adapter_placement", None) or "houlsby",
                default_size=DEFAULT_SIZES.get(t, 8))


def unreachable_budget(shape: ModelShape, method: Any, model_uri: str) -> str | None:
    """Why ``method.trainableParamPercent`` cannot be met on this base model (None: it can,
    or no budget is set). Used by the sweep controller and the local runner before launch."""
    if method.trainable_param_percent is None:
        return None
    try:
        p = plan_for_method(shape, method)
    except ValueError as exc:
        return str(exc)
    if p.within_tolerance:
        return None
    return (f"method.trainableParamPercent {method.trainable_param_percent:.4g}% is not reachable "
            f"for {model_uri} ({shape.model_type}, {shape.total_params:,} parameters): the "
            f"closest is {p.percent:.4g}% with {p.knob or 'this method'}={p.size}. "
            f"{p.note}").strip()
