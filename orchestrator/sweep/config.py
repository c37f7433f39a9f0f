"""SweepConfig: the parts of a FineTuneSweep spec the study needs, validated once.

Built from the pydantic ``FineTuneSweepSpec`` (via its wire form) or from a plain
camelCase dict, so the controller, the local runner and tests share one code path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from orchestrator.sweep.errors import MissingMetricError, SweepConfigError
from orchestrator.sweep.space import SearchSpace, build_space

Direction = Literal["minimize", "maximize"]

SAMPLER_NAMES = ("tpe", "random", "grid", "cmaes", "gp", "nsga2")
PRUNER_NAMES = ("none", "median", "hyperband", "successiveHalving")
# Samplers that can optimise two objectives at once (GridSampler and RandomSampler ignore
# the objective values; TPE, NSGA-II and GP have multi-objective variants).
MULTI_OBJECTIVE_SAMPLERS = ("tpe", "random", "grid", "gp", "nsga2")


@dataclass(frozen=True)
class Objective:
    metric: str
    direction: Direction = "minimize"


@dataclass(frozen=True)
class Constraint:
    """``metric`` must stay within [min, max] (either end optional) for a feasible trial."""

    metric: str
    max: float | None = None
    min: float | None = None

    def describe(self) -> str:
        if self.min is not None and self.max is not None:
            return f"{self.min:g} <= {self.metric} <= {self.max:g}"
        if self.max is not None:
            return f"{self.metric} <= {self.max:g}"
        return f"{self.metric} >= {self.min:g}"


@dataclass(frozen=True)
class SweepConfig:
    space: SearchSpace
    objectives: tuple[Objective, ...] = (Objective("evalLoss"),)
    sampler: str = "tpe"
    seed: int | None = None
    pruner: str = "none"
    pruner_options: dict[str, Any] = field(default_factory=dict)
    max_trials: int = 10
    parallelism: int = 1
    max_failed_trials: int = 3
    constraints: tuple[Constraint, ...] = ()

    @property
    def directions(self) -> list[Direction]:
        return [o.direction for o in self.objectives]

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def metrics(self) -> list[str]:
        return [o.metric for o in self.objectives]

    @classmethod
    def from_spec(cls, spec: Any) -> SweepConfig:
        """From a FineTuneSweepSpec, or a camelCase dict shaped like one (template optional)."""
        wire = to_wire(spec)
        space = build_space(wire.get("parameters") or [])
        objectives = tuple(
            Objective(str(o.get("metric", "evalLoss")), o.get("direction", "minimize"))
            for o in (wire.get("objectives") or [{"metric": "evalLoss"}])
        )
        constraints = tuple(
            Constraint(
                str(c.get("metric")),
                None if c.get("max") is None else float(c["max"]),
                None if c.get("min") is None else float(c["min"]),
            )
            for c in (wire.get("constraints") or [])
        )
        algorithm = wire.get("algorithm") or {}
        early = dict(_get(wire, "earlyStopping", "early_stopping") or {})
        pruner = str(early.pop("pruner", "none"))
        cfg = cls(
            space=space,
            objectives=objectives,
            sampler=str(algorithm.get("sampler", "tpe")),
            seed=algorithm.get("seed"),
            pruner=pruner,
            pruner_options=early,
            max_trials=int(_get(wire, "maxTrials", "max_trials") or 10),
            parallelism=int(_get(wire, "parallelism") or 1),
            max_failed_trials=int(_get(wire, "maxFailedTrials", "max_failed_trials", default=3)),
            constraints=constraints,
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if not 1 <= len(self.objectives) <= 2:
            raise SweepConfigError(
                f"a sweep takes one or two objectives, not {len(self.objectives)}"
            )
        metrics = self.metrics
        if len(set(metrics)) != len(metrics):
            raise SweepConfigError(f"objectives repeat a metric: {metrics}")
        for o in self.objectives:
            if o.direction not in ("minimize", "maximize"):
                raise SweepConfigError(
                    f"objective {o.metric!r}: direction must be minimize or maximize, "
                    f"not {o.direction!r}"
                )
        if self.sampler not in SAMPLER_NAMES:
            raise SweepConfigError(
                f"unknown sampler {self.sampler!r} (choose from {', '.join(SAMPLER_NAMES)})"
            )
        if self.multi_objective and self.sampler not in MULTI_OBJECTIVE_SAMPLERS:
            raise SweepConfigError(
                f"sampler {self.sampler!r} supports one objective only; with two objectives "
                "use nsga2 or tpe"
            )
        if self.pruner not in PRUNER_NAMES:
            raise SweepConfigError(
                f"unknown pruner {self.pruner!r} (choose from {', '.join(PRUNER_NAMES)})"
            )
        if self.multi_objective and self.pruner != "none":
            raise SweepConfigError(
                f"pruner {self.pruner!r} cannot be used with two objectives (Optuna prunes "
                "single-objective studies only): set earlyStopping.pruner to none"
            )
        bounded = [c.metric for c in self.constraints]
        if len(set(bounded)) != len(bounded):
            raise SweepConfigError(f"constraints repeat a metric: {bounded}")
        for c in self.constraints:
            if c.max is None and c.min is None:
                raise SweepConfigError(f"constraint on {c.metric!r} needs max, min or both")
            if c.max is not None and c.min is not None and c.min > c.max:
                raise SweepConfigError(f"constraint on {c.metric!r}: min {c.min} > max {c.max}")
        if self.max_trials < 1 or self.parallelism < 1 or self.max_failed_trials < 0:
            raise SweepConfigError(
                "maxTrials and parallelism must be >= 1 and maxFailedTrials >= 0"
            )

    def objective_values(self, metrics: Mapping[str, Any]) -> list[float]:
        """Objective values from a trial's final metrics (camelCase or snake_case keys)."""
        values = []
        for o in self.objectives:
            value = _get(metrics, o.metric, _snake(o.metric))
            if value is None:
                have = ", ".join(sorted(k for k, v in metrics.items() if v is not None)) or "none"
                raise MissingMetricError(
                    f"metric {o.metric!r} missing from the trial's metrics (have: {have})"
                )
            try:
                values.append(float(value))
            except (TypeError, ValueError):
                raise MissingMetricError(
                    f"metric {o.metric!r} is not a number: {value!r}"
                ) from None
        return values


    def constraint_values(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        """Optuna constraint values (<= 0: met) by name, ``<metric>.max``/``<metric>.min``,
        from a trial's final metrics. A missing metric raises MissingMetricError: a trial
        that cannot show it meets a constraint does not count as meeting it."""
        out: dict[str, float] = {}
        for c in self.constraints:
            value = _metric(metrics, c.metric, "constraint")
            if c.max is not None:
                out[f"{c.metric}.max"] = value - c.max
            if c.min is not None:
                out[f"{c.metric}.min"] = c.min - value
        return out

    def violations(self, metrics: Mapping[str, Any]) -> list[str]:
        """Human-readable broken constraints, e.g. ``generalLossDelta 0.83 > max 0.1``."""
        out = []
        for c in self.constraints:
            value = _get(metrics, c.metric, _snake(c.metric))
            if not isinstance(value, int | float):
                out.append(f"{c.metric} missing")
            elif c.max is not None and value > c.max:
                out.append(f"{c.metric} {value:.4g} > max {c.max:g}")
            elif c.min is not None and value < c.min:
                out.append(f"{c.metric} {value:.4g} < min {c.min:g}")
        return out


def _metric(metrics: Mapping[str, Any], metric: str, role: str) -> float:
    value = _get(metrics, metric, _snake(metric))
    if value is None:
        have = ", ".join(sorted(k for k, v in metrics.items() if v is not None)) or "none"
        raise MissingMetricError(
            f"{role} metric {metric!r} missing from the trial's metrics (have: {have})"
        )
    try:
        return float(value)
    except (TypeError, ValueError):
        raise MissingMetricError(f"{role} metric {metric!r} is not a number: {value!r}") from None


def to_wire(obj: Any) -> dict[str, Any]:
    """A pydantic model (ours: ``to_wire``) or a mapping → a camelCase dict."""
    if obj is None:
        return {}
    if isinstance(obj, Mapping):
        return dict(obj)
    if hasattr(obj, "to_wire"):
        return dict(obj.to_wire())
    if hasattr(obj, "model_dump"):
        return dict(obj.model_dump(mode="json", by_alias=True, exclude_none=True))
    raise SweepConfigError(f"cannot read a sweep spec from {type(obj).__name__}")


def _get(obj: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    for n in names:
        if obj.get(n) is not None:
            return obj[n]
    return default


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name)
