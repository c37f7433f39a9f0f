"""FineTuneSweep v1alpha1: an Optuna study whose trials are FineTuneJobs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, computed_field, model_validator

from orchestrator.api.base import ApiModel, StatusModel, cel, cel_rules
from orchestrator.api.job import Artifact, Condition, FineTuneJobSpec
from orchestrator.api.paths import (
    FREE_FORM_PREFIXES,
    InvalidOverride,
    check_parameter_path,
    format_errors,
    resolve_path,
    sweepable_paths,
)
from orchestrator.api.reasons import Phase, TrialState

Sampler = Literal["tpe", "random", "grid", "cmaes", "gp", "nsga2"]
Pruner = Literal["none", "median", "hyperband", "successiveHalving"]
Direction = Literal["minimize", "maximize"]
MAX_PARAMETERS = 32
MAX_CHOICES = 64
MAX_TRIALS = 10000
MAX_CONSTRAINTS = 8


class IntRange(ApiModel):
    """An integer search range [low, high]."""

    model_config = {
        "json_schema_extra": cel_rules(
            cel("self.low <= self.high", "int.low must be <= int.high", ".low"),
            cel("!self.log || self.low >= 1", "a log-scale int range needs low >= 1", ".low"),
            cel(
                "!self.log || !has(self.step)",
                "int.step cannot be combined with log: true (remove one)",
                ".step",
            ),
        )
    }

    low: int = Field(description="Smallest value.")
    high: int = Field(description="Largest value (inclusive).")
    log: bool = Field(default=False, description="Sample on a log scale.")
    step: int | None = Field(default=None, ge=1, description="Spacing between values.")

    @model_validator(mode="after")
    def _check(self) -> IntRange:
        if self.low > self.high:
            raise ValueError(f"int.low must be <= int.high (got {self.low} > {self.high})")
        if self.log and self.low < 1:
            raise ValueError("a log-scale int range needs low >= 1")
        if self.log and self.step is not None:
            raise ValueError("int.step cannot be combined with log: true (remove one)")
        return self


class FloatRange(ApiModel):
    """A real search range [low, high]."""

    model_config = {
        "json_schema_extra": cel_rules(
            cel("self.low <= self.high", "float.low must be <= float.high", ".low"),
            cel("!self.log || self.low > 0.0", "a log-scale float range needs low > 0", ".low"),
            cel(
                "!self.log || !has(self.step)",
                "float.step cannot be combined with log: true (remove one)",
                ".step",
            ),
        )
    }

    low: float = Field(description="Smallest value.")
    high: float = Field(description="Largest value.")
    log: bool = Field(default=False, description="Sample on a log scale.")
    step: float | None = Field(default=None, gt=0, description="Discretisation step.")

    @model_validator(mode="after")
    def _check(self) -> FloatRange:
        if self.low > self.high:
            raise ValueError(f"float.low must be <= float.high (got {self.low} > {self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log-scale float range needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("float.step cannot be combined with log: true (remove one)")
        return self


_NUMERIC_MESSAGE = (
    "int and float ranges need a numeric field such as method.rank or training.learningRate: "
    "use categorical for other fields"
)
_INTEGER_MESSAGE = "a float range cannot target an integer field such as method.rank: use int"


def _numeric_rules() -> list[dict[str, str]]:
    numeric = [p for p in sweepable_paths() if resolve_path(p).is_number]  # type: ignore[union-attr]
    integer = [p for p in numeric if resolve_path(p).is_integer]  # type: ignore[union-attr]
    prefixes = " || ".join(f"self.name.startsWith('{p}')" for p in FREE_FORM_PREFIXES)
    return [
        cel(
            f"!(has(self.int) || has(self.float)) || {prefixes} || "
            f"self.name in [{', '.join(repr(p) for p in numeric)}]",
            _NUMERIC_MESSAGE,
            ".name",
        ),
        cel(
            f"!has(self.float) || !(self.name in [{', '.join(repr(p) for p in integer)}])",
            _INTEGER_MESSAGE,
            ".float",
        ),
    ]


_NAME_MESSAGE = (
    "parameters[].name must be a FineTuneJob spec field path such as method.rank, "
    "method.trainableParamPercent or training.learningRate"
)


def _name_rule() -> dict[str, str]:
    allowed = ", ".join(f"'{p}'" for p in sweepable_paths())
    prefixes = " || ".join(f"self.startsWith('{p}')" for p in FREE_FORM_PREFIXES)
    return cel(f"self in [{allowed}] || {prefixes}", _NAME_MESSAGE)


class SweepParameter(ApiModel):
    """One searched field: exactly one of int, float or categorical."""

    # name plus exactly one kind = two properties. CEL cannot see `categorical` (its items
    # are untyped JSON), so the count does the "exactly one" part on the API server.
    model_config = {
        "json_schema_extra": {
            "minProperties": 2,
            "maxProperties": 2,
            **cel_rules(
                cel(
                    "!(has(self.int) && has(self.float))",
                    "each parameter needs exactly one of int, float or categorical",
                ),
                *_numeric_rules(),
            ),
        }
    }

    name: str = Field(
        min_length=1,
        max_length=128,
        description="FineTuneJob spec field path the value is written to, e.g. method.rank; "
        "keys under distributed.deepspeed.config. are allowed too.",
        json_schema_extra=cel_rules(_name_rule()),
    )
    int_: IntRange | None = Field(default=None, alias="int", description="Integer range.")
    float_: FloatRange | None = Field(default=None, alias="float", description="Real range.")
    categorical: list[Any] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_CHOICES,
        description="Choices (any JSON values, e.g. [[q_proj, v_proj], all-linear]).",
    )

    @model_validator(mode="after")
    def _check(self) -> SweepParameter:
        kinds = [k for k in ("int", "float", "categorical") if self._kind_value(k) is not None]
        if len(kinds) != 1:
            raise ValueError(
                f"parameter {self.name!r} needs exactly one of int, float or categorical "
                f"(found {', '.join(kinds) or 'none'})"
            )
        try:
            check_parameter_path(self.name)
        except InvalidOverride as exc:
            raise ValueError(f"{_NAME_MESSAGE}: {exc}") from None
        ref = resolve_path(self.name)
        if ref is None:  # free-form DeepSpeed key: any JSON value
            return self
        if kinds[0] in ("int", "float") and not ref.is_number:
            raise ValueError(f"parameter {self.name!r}: {_NUMERIC_MESSAGE}")
        if kinds[0] == "float" and ref.is_integer:
            raise ValueError(f"parameter {self.name!r}: {_INTEGER_MESSAGE}")
        for value in self.sample_values():
            try:
                ref.validate(value)
            except ValidationError as exc:
                raise ValueError(
                    f"parameter {self.name!r}: value {value!r} is not valid for that field "
                    f"({format_errors(exc)})"
                ) from None
        return self

    def _kind_value(self, kind: str) -> Any:
        return {"int": self.int_, "float": self.float_, "categorical": self.categorical}[kind]

    @property
    def kind(self) -> Literal["int", "float", "categorical"]:
        if self.int_ is not None:
            return "int"
        if self.float_ is not None:
            return "float"
        return "categorical"

    def sample_values(self) -> list[Any]:
        """Values checked against the job schema at apply time: the ends or every choice."""
        if self.int_ is not None:
            return [self.int_.low, self.int_.high]
        if self.float_ is not None:
            return [self.float_.low, self.float_.high]
        return list(self.categorical or [])


_METRIC_DESCRIPTION = (
    "Metric name from the trainer: evalLoss, trainLoss, generalLossDelta, "
    "trainableParams, trainableParamPercent, ..."
)


class MetricConstraint(ApiModel):
    """A bound a trial's final metric must meet for the trial to count (be feasible).

    Infeasible trials still finish and are told to the sampler (TPE, NSGA-II and GP steer
    away from them); they are never status.bestTrial nor on status.paretoFront.
    """

    model_config = {
        "json_schema_extra": cel_rules(
            cel(
                "has(self.max) || has(self.min)",
                "each constraint needs max, min or both",
                ".metric",
            ),
            cel(
                "!has(self.min) || !has(self.max) || self.min <= self.max",
                "constraints[].min must be <= constraints[].max",
                ".min",
            ),
        )
    }

    metric: str = Field(
        min_length=1,
        max_length=64,
        description=_METRIC_DESCRIPTION,
        json_schema_extra={"pattern": r"^[A-Za-z][A-Za-z0-9_.]*$"},
    )
    max_: float | None = Field(
        default=None, alias="max", description="Largest allowed value (inclusive)."
    )
    min_: float | None = Field(
        default=None, alias="min", description="Smallest allowed value (inclusive)."
    )

    @model_validator(mode="after")
    def _check(self) -> MetricConstraint:
        if self.max_ is None and self.min_ is None:
            raise ValueError(
                f"constraint on {self.metric!r}: each constraint needs max, min or both"
            )
        if self.max_ is not None and self.min_ is not None and self.min_ > self.max_:
            raise ValueError(
                f"constraint on {self.metric!r}: constraints[].min must be <= constraints[].max "
                f"(got {self.min_} > {self.max_})"
            )
        return self


class Objective(ApiModel):
    """A metric to optimise (a key of the trial's status.metrics)."""

    metric: str = Field(
        min_length=1,
        max_length=64,
        description=_METRIC_DESCRIPTION,
        json_schema_extra={"pattern": r"^[A-Za-z][A-Za-z0-9_.]*$"},
    )
    direction: Direction = Field(default="minimize", description="minimize | maximize.")


class AlgorithmSpec(ApiModel):
    """The Optuna sampler."""

    sampler: Sampler = Field(
        default="tpe",
        description="tpe | random | grid | cmaes | gp | nsga2 (nsga2 suits two objectives).",
    )
    seed: int | None = Field(
        default=None, ge=0, le=2**31 - 1, description="Sampler seed for reproducible sweeps."
    )


class EarlyStoppingSpec(ApiModel):
    """The Optuna pruner that stops unpromising trials on their intermediate eval values."""

    model_config = {
        "json_schema_extra": cel_rules(
            cel(
                "!has(self.minResource) || !has(self.maxResource) || "
                "self.minResource <= self.maxResource",
                "earlyStopping.minResource must be <= earlyStopping.maxResource",
                ".minResource",
            )
        )
    }

    pruner: Pruner = Field(
        default="none", description="none | median | hyperband | successiveHalving."
    )
    min_resource: int | None = Field(
        default=None,
        ge=1,
        description="hyperband/successiveHalving: evaluations a trial gets before it can be "
        "stopped.",
    )
    max_resource: int | None = Field(
        default=None, ge=1, description="hyperband: evaluations of a full trial (unset: auto)."
    )
    reduction_factor: int | None = Field(
        default=None, ge=2, description="hyperband/successiveHalving: keep 1/factor per rung."
    )
    startup_trials: int | None = Field(
        default=None, ge=0, description="median: trials that finish before pruning starts."
    )
    warmup_steps: int | None = Field(
        default=None, ge=0, description="median: steps before a trial can be pruned."
    )

    @model_validator(mode="after")
    def _check(self) -> EarlyStoppingSpec:
        if (
            self.min_resource is not None
            and self.max_resource is not None
            and self.min_resource > self.max_resource
        ):
            raise ValueError("earlyStopping.minResource must be <= earlyStopping.maxResource")
        return self


_UNIQUE_PARAMS = "self.parameters.all(p, self.parameters.exists_one(q, q.name == p.name))"
_UNIQUE_OBJECTIVES = "self.objectives.all(o, self.objectives.exists_one(q, q.metric == o.metric))"
_GRID_RULE = (
    "self.algorithm.sampler != 'grid' || self.parameters.all(p, !has(p.float) || has(p.float.step))"
)
_GRID_MESSAGE = (
    "algorithm.sampler grid needs a finite grid: give every float parameter a step "
    "(or use categorical)"
)
_CMAES_MESSAGE = "algorithm.sampler cmaes supports one objective only: use nsga2 or tpe"
_UNIQUE_CONSTRAINTS = (
    "self.constraints.all(c, self.constraints.exists_one(q, q.metric == c.metric))"
)
_GENERAL_RULE = (
    "!self.constraints.exists(c, c.metric == 'generalLossDelta') || "
    "has(self.template.data.general)"
)
_GENERAL_MESSAGE = (
    "a constraint on generalLossDelta needs template.data.general (the general-domain eval "
    "set that measures forgetting)"
)
_PRUNER_MESSAGE = (
    "earlyStopping.pruner must be none with two objectives (Optuna prunes single-objective "
    "studies only)"
)


class FineTuneSweepSpec(ApiModel):
    """A hyperparameter sweep: trials are FineTuneJobs built from a template."""

    model_config = {
        "json_schema_extra": cel_rules(
            cel(_UNIQUE_PARAMS, "parameters[].name must be unique", ".parameters"),
            cel(_UNIQUE_OBJECTIVES, "objectives[].metric must be unique", ".objectives"),
            cel(_GRID_RULE, _GRID_MESSAGE, ".algorithm.sampler"),
            cel(
                "self.algorithm.sampler != 'cmaes' || size(self.objectives) == 1",
                _CMAES_MESSAGE,
                ".algorithm.sampler",
            ),
            cel(
                "size(self.objectives) == 1 || self.earlyStopping.pruner == 'none'",
                _PRUNER_MESSAGE,
                ".earlyStopping.pruner",
            ),
            cel(_UNIQUE_CONSTRAINTS, "constraints[].metric must be unique", ".constraints"),
            cel(_GENERAL_RULE, _GENERAL_MESSAGE, ".constraints"),
        )
    }

    template: FineTuneJobSpec = Field(
        description="The FineTuneJob spec every trial starts from; parameters override fields."
    )
    parameters: list[SweepParameter] = Field(
        min_length=1, max_length=MAX_PARAMETERS, description="The search space."
    )
    objectives: list[Objective] = Field(
        default_factory=lambda: [Objective(metric="evalLoss")],
        min_length=1,
        max_length=2,
        description="One objective gives status.bestTrial; two give status.paretoFront.",
    )
    constraints: list[MetricConstraint] = Field(
        default_factory=list,
        max_length=MAX_CONSTRAINTS,
        description="Bounds on final metrics (e.g. generalLossDelta max 0.1): trials that "
        "break one are infeasible, steer the sampler away and are never the best trial or on "
        "the Pareto front.",
    )
    algorithm: AlgorithmSpec = Field(default_factory=AlgorithmSpec, description="Sampler.")
    early_stopping: EarlyStoppingSpec = Field(
        default_factory=EarlyStoppingSpec, description="Pruner."
    )
    max_trials: int = Field(
        default=10, ge=1, le=MAX_TRIALS, description="Trials to run in total (editable)."
    )
    parallelism: int = Field(
        default=1, ge=1, le=256, description="Trials running at once (editable)."
    )
    max_failed_trials: int = Field(
        default=3,
        ge=0,
        le=MAX_TRIALS,
        description="Failed trials tolerated; one more and the sweep is Failed.",
    )

    @model_validator(mode="after")
    def _check(self) -> FineTuneSweepSpec:
        names = [p.name for p in self.parameters]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup:
            raise ValueError(f"parameters[].name must be unique: {dup!r} appears twice")
        metrics = [o.metric for o in self.objectives]
        dup = next((m for m in metrics if metrics.count(m) > 1), None)
        if dup:
            raise ValueError(f"objectives[].metric must be unique: {dup!r} appears twice")
        if self.algorithm.sampler == "grid" and any(
            p.float_ is not None and p.float_.step is None for p in self.parameters
        ):
            raise ValueError(_GRID_MESSAGE)
        if self.algorithm.sampler == "cmaes" and len(self.objectives) > 1:
            raise ValueError(_CMAES_MESSAGE)
        if len(self.objectives) > 1 and self.early_stopping.pruner != "none":
            raise ValueError(_PRUNER_MESSAGE)
        bounded = [c.metric for c in self.constraints]
        dup = next((m for m in bounded if bounded.count(m) > 1), None)
        if dup:
            raise ValueError(
                f"constraints[].metric must be unique: {dup!r} appears twice (give one "
                "constraint both min and max)"
            )
        if "generalLossDelta" in bounded and self.template.data.general is None:
            raise ValueError(_GENERAL_MESSAGE)
        return self

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1


# --- status ----------------------------------------------------------------------------------


class TrialCounts(StatusModel):
    """Trials by state."""

    created: int = Field(default=0, ge=0, description="Trial jobs created.")
    running: int = Field(default=0, ge=0, description="Trials running now.")
    succeeded: int = Field(default=0, ge=0, description="Trials completed.")
    failed: int = Field(default=0, ge=0, description="Trials failed (including infeasible).")
    pruned: int = Field(default=0, ge=0, description="Trials stopped early by the pruner.")
    infeasible: int = Field(
        default=0, ge=0, description="Succeeded trials that break spec.constraints."
    )
    reused: int = Field(
        default=0,
        ge=0,
        description="Succeeded trials whose parameters repeat an earlier trial's: its result "
        "was reused and no job launched.",
    )

    @computed_field(description="Finished trials: succeeded + failed + pruned.")  # type: ignore[prop-decorator]
    @property
    def completed(self) -> int:
        return self.succeeded + self.failed + self.pruned


class TrialSummary(StatusModel):
    """A finished trial worth reporting (best trial or Pareto-front member)."""

    name: str = Field(description="The trial's FineTuneJob.")
    number: int = Field(ge=0, description="Optuna trial number.")
    parameters: dict[str, Any] = Field(default_factory=dict, description="Sampled values.")
    metrics: dict[str, float] = Field(default_factory=dict, description="Final metrics.")
    values: list[float] = Field(
        default_factory=list, description="Objective values, in spec.objectives order."
    )
    artifact: Artifact | None = Field(default=None, description="The trial's adapter.")

    @computed_field(description="The first objective's value.")  # type: ignore[prop-decorator]
    @property
    def value(self) -> float | None:
        return self.values[0] if self.values else None


class TrialRecord(StatusModel):
    """One line of the compact per-trial list."""

    number: int = Field(ge=0, description="Optuna trial number.")
    name: str | None = Field(default=None, description="The trial's FineTuneJob, if created.")
    state: TrialState = Field(description="Pending | Running | Succeeded | Failed | Pruned.")
    parameters: dict[str, Any] = Field(default_factory=dict, description="Sampled values.")
    values: list[float] | None = Field(default=None, description="Objective values.")
    feasible: bool | None = Field(
        default=None,
        description="Whether a succeeded trial meets spec.constraints (unset without "
        "constraints).",
    )
    reused_from: int | None = Field(
        default=None,
        description="The earlier trial with identical parameters whose result this trial "
        "reused (no job was launched).",
    )
    message: str | None = Field(
        default=None, description="Why it failed, was pruned, is infeasible or was reused."
    )


class FineTuneSweepStatus(StatusModel):
    """Observed state of the sweep."""

    phase: Phase | None = Field(default=None, description="Pending | Running | Succeeded | Failed.")
    conditions: list[Condition] = Field(default_factory=list, description="Conditions.")
    trials: TrialCounts = Field(default_factory=TrialCounts, description="Trials by state.")
    best_trial: TrialSummary | None = Field(
        default=None, description="Best trial (single objective)."
    )
    pareto_front: list[TrialSummary] = Field(
        default_factory=list, description="Non-dominated trials (two objectives)."
    )
    trial_list: list[TrialRecord] = Field(
        default_factory=list, description="Compact per-trial list (most recent first if capped)."
    )
    study_name: str | None = Field(default=None, description="Optuna study name.")
    message: str | None = Field(default=None, description="Latest human-readable summary.")
    observed_generation: int | None = Field(
        default=None, description="metadata.generation last reconciled."
    )
    start_time: str | None = Field(default=None, description="When the first trial started.")
    completion_time: str | None = Field(default=None, description="When the sweep finished.")

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)


class FineTuneSweep(ApiModel):
    """A whole FineTuneSweep object."""

    api_version: Literal["kubetune.io/v1alpha1"] = Field(
        default="kubetune.io/v1alpha1", alias="apiVersion"
    )
    kind: Literal["FineTuneSweep"] = "FineTuneSweep"
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: FineTuneSweepSpec
    status: FineTuneSweepStatus | None = None

    @property
    def name(self) -> str:
        return str(self.metadata.get("name", ""))


def trial_name(sweep_name: str, number: int) -> str:
    """Deterministic trial FineTuneJob name: `<sweep>-<trial number>`."""
    return f"{sweep_name}-{number}"


__all__ = [
    "AlgorithmSpec",
    "EarlyStoppingSpec",
    "FineTuneSweep",
    "FineTuneSweepSpec",
    "FineTuneSweepStatus",
    "FloatRange",
    "IntRange",
    "MetricConstraint",
    "Objective",
    "SweepParameter",
    "TrialCounts",
    "TrialRecord",
    "TrialSummary",
    "format_errors",
    "trial_name",
]
