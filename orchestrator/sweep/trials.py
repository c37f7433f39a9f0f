"""Ask/tell helpers over an Optuna study held in durable (RDB) storage.

Everything here works from a trial *number*, never from an in-memory Trial object, so a
restarted controller (or another process, e.g. the metric-report endpoint) can continue
any trial that storage knows about. Telling is idempotent: a finished trial is left as is.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from orchestrator.api.job import Artifact
from orchestrator.api.reasons import (
    TRIAL_FAILED,
    TRIAL_PENDING,
    TRIAL_PRUNED,
    TRIAL_RUNNING,
    TRIAL_SUCCEEDED,
)
from orchestrator.api.sweep import TrialCounts, TrialRecord, TrialSummary
from orchestrator.sweep.config import SweepConfig
from orchestrator.sweep.errors import TrialNotFoundError
from orchestrator.sweep.space import SearchSpace, decode_choice

log = logging.getLogger("orchestrator.sweep")

# Trial user attributes (JSON values, stored in the study's RDB).
ATTR_JOB = "kubetune.io/job"  # the trial's FineTuneJob name: the idempotence key
ATTR_REASON = "kubetune.io/reason"  # why it failed or was pruned
ATTR_METRICS = "kubetune.io/metrics"  # final metrics as the trainer reported them
ATTR_ARTIFACT = "kubetune.io/artifact"  # {uri, sha256}
ATTR_INFEASIBLE = "kubetune.infeasible"  # refused before launch (see SweepStudy.refuse)
ATTR_REUSED = "kubetune.io/reused-from"  # number of the trial whose result was reused


class Outcome(enum.Enum):
    """Non-value results for tell_result."""

    FAIL = "fail"
    PRUNED = "pruned"


FAIL = Outcome.FAIL
PRUNED = Outcome.PRUNED

Result = float | Sequence[float] | Outcome


# ---- low-level access by number ------------------------------------------------------------
def _trial_id(study: optuna.Study, number: int) -> int:
    # Optuna exposes no public number → id lookup; the storage method is stable API of
    # BaseStorage, reached through the study's storage.
    try:
        return study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
    except KeyError:
        raise TrialNotFoundError(
            f"study {study.study_name!r} has no trial number {number}"
        ) from None


def get_trial(study: optuna.Study, number: int) -> FrozenTrial:
    """The trial's current state, read from storage (not from a stale cache)."""
    return study._storage.get_trial(_trial_id(study, number))


def set_trial_user_attrs(study: optuna.Study, number: int, attrs: Mapping[str, Any]) -> bool:
    """Set user attributes on an unfinished trial; False (no-op) if it already finished."""
    tid = _trial_id(study, number)
    try:
        for key, value in attrs.items():
            study._storage.set_trial_user_attr(tid, key, value)
    except UpdateFinishedTrialError:
        return False
    return True


def _live(study: optuna.Study, number: int) -> optuna.Trial:
    """A Trial handle for a RUNNING trial created earlier (possibly by another process)."""
    return optuna.trial.Trial(study, _trial_id(study, number))


# ---- ask -----------------------------------------------------------------------------------
def find_trial_by_user_attr(study: optuna.Study, key: str, value: Any) -> FrozenTrial | None:
    """The (lowest-numbered) trial whose user attribute ``key`` equals ``value``."""
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get(key) == value:
            return t
    return None


def ask_trial(
    study: optuna.Study,
    space: SearchSpace,
    *,
    user_attrs: Mapping[str, Any] | None = None,
    dedupe: tuple[str, Any] | None = None,
) -> tuple[int, dict[str, Any]]:
    """Create a trial with every parameter sampled now; returns (number, decoded params).

    ``dedupe=(key, value)``: if a trial already carries that user attribute (e.g. the
    child job name, for a caller that names children before asking), return it instead of
    asking again — so a retried reconcile never creates a second trial for one child.
    """
    if dedupe is not None:
        existing = find_trial_by_user_attr(study, *dedupe)
        if existing is not None:
            return existing.number, space.decode(existing.params)
    trial = study.ask(fixed_distributions=space.distributions)
    attrs = dict(user_attrs or {})
    if dedupe is not None:
        attrs[dedupe[0]] = dedupe[1]
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
    return trial.number, space.decode(trial.params)


def decode_params(trial: FrozenTrial) -> dict[str, Any]:
    """A trial's parameters as written into its job (ints stay ints, lists come back)."""
    out: dict[str, Any] = {}
    for name, value in trial.params.items():
        dist = trial.distributions.get(name)
        out[name] = (
            int(value)
            if isinstance(dist, optuna.distributions.IntDistribution)
            else (decode_choice(value))
        )
    return out


# ---- tell ----------------------------------------------------------------------------------
def tell_result(
    study: optuna.Study,
    number: int,
    result: Result,
    *,
    reason: str | None = None,
    metrics: Mapping[str, Any] | None = None,
    artifact: Mapping[str, Any] | None = None,
    constraints: Mapping[str, float] | None = None,
    extra_attrs: Mapping[str, Any] | None = None,
) -> bool:
    """Finish a trial with objective value(s), FAIL or PRUNED.

    Returns True when this call finished it, False when it was already finished (a
    repeated tell after a controller restart is a no-op, not an error). ``reason``,
    ``metrics`` and ``artifact`` are stored as user attributes for status and collect;
    ``constraints`` (name → Optuna constraint value, <= 0 when met) are set on the trial
    with ``Trial.set_constraint`` before the tell: TPE, NSGA-II and GP read them from the
    trial (Optuna 5's replacement for ``constraints_func``), and best_trials filters on them.
    Non-finite values are told as FAIL (Optuna would do the same, with a warning).
    """
    trial = get_trial(study, number)
    if trial.state.is_finished():
        return False
    values: list[float] | None = None
    if not isinstance(result, Outcome):
        values = [float(result)] if isinstance(result, int | float) else [float(v) for v in result]
        if not all(math.isfinite(v) for v in values):
            reason = reason or f"non-finite objective value(s) {values}"
            values, result = None, FAIL
    attrs: dict[str, Any] = {}
    if reason:
        attrs[ATTR_REASON] = reason
    if metrics:
        attrs[ATTR_METRICS] = _numbers(metrics)
    if artifact:
        attrs[ATTR_ARTIFACT] = {k: v for k, v in artifact.items() if v is not None}
    attrs.update(extra_attrs or {})
    if attrs and not set_trial_user_attrs(study, number, attrs):
        return False
    if constraints and values is not None:
        live = _live(study, number)
        try:
            for key, value in constraints.items():
                if key not in trial.constraints:  # a repeated tell after a crash: already set
                    live.set_constraint(key, float(value))
        except UpdateFinishedTrialError:
            return False
    try:
        if result is FAIL:
            study.tell(number, state=TrialState.FAIL, skip_if_finished=False)
        elif result is PRUNED:
            study.tell(number, state=TrialState.PRUNED, skip_if_finished=False)
        else:
            study.tell(number, values, skip_if_finished=False)
    except (UpdateFinishedTrialError, ValueError):
        # Another writer may have finished it between our read and our tell ("Cannot tell
        # a COMPLETE trial"); anything else (e.g. wrong number of values) is a real error.
        if get_trial(study, number).state.is_finished():
            log.debug("trial %d was finished concurrently; tell skipped", number)
            return False
        raise
    return True


def _numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {
        str(k): float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


# ---- intermediate values and pruning -------------------------------------------------------
def report_intermediate(study: optuna.Study, number: int, step: int, value: float) -> bool:
    """Record an intermediate objective value at ``step`` for a running trial.

    Returns False (and records nothing) when the trial has finished or the study has two
    objectives (Optuna does not prune multi-objective studies); a repeated step is ignored.
    """
    if len(study.directions) > 1:
        return False
    trial = get_trial(study, number)
    if trial.state.is_finished():
        return False
    if step in trial.intermediate_values:
        return False
    try:
        _live(study, number).report(float(value), int(step))
    except UpdateFinishedTrialError:
        return False
    return True


def should_prune(study: optuna.Study, number: int) -> bool:
    """Whether the pruner wants this trial stopped now (True for an already-pruned one,
    so a late trainer report still gets told to stop)."""
    if len(study.directions) > 1:
        return False
    trial = get_trial(study, number)
    if trial.state.is_finished():
        return trial.state == TrialState.PRUNED
    return bool(_live(study, number).should_prune())


# ---- results -------------------------------------------------------------------------------
def is_feasible(trial: FrozenTrial) -> bool:
    """Whether a trial meets spec.constraints (always True for a sweep without any)."""
    return all(float(c) <= 0.0 for c in trial.constraints.values())


def best_trials(study: optuna.Study, trials: list[FrozenTrial] | None = None) -> list[FrozenTrial]:
    """The best trial (one objective) or the Pareto front (two) among the *feasible*
    completed trials; [] before any feasible trial completes.

    Otherwise this is ``study.best_trial`` / ``study.best_trials`` (ties on one objective go
    to the lowest trial number; on two, trials with identical values are all on the front,
    as in Optuna), except that a trial which reused another's result is left out: it is the
    same point as the trial it copied.
    """
    if trials is None:
        trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    done = [
        t
        for t in trials
        if t.state == TrialState.COMPLETE
        and t.values
        and is_feasible(t)
        and ATTR_REUSED not in t.user_attrs  # the same point as its source, not a second one
    ]
    if not done:
        return []
    signs = [1.0 if d == optuna.study.StudyDirection.MINIMIZE else -1.0 for d in study.directions]
    if len(signs) == 1:
        return [min(done, key=lambda t: (signs[0] * t.values[0], t.number))]
    return sorted(_pareto(done, signs), key=lambda t: t.number)


def _pareto(trials: list[FrozenTrial], signs: list[float]) -> list[FrozenTrial]:
    """Non-dominated trials for two objectives: sort by (loss0, loss1) and keep each distinct
    point whose loss1 beats every point before it (Optuna's 2-D rule, O(n log n))."""
    losses = {t.number: (signs[0] * t.values[0], signs[1] * t.values[1]) for t in trials}
    front: set[tuple[float, float]] = set()
    best1 = math.inf
    for point in sorted(set(losses.values())):
        if point[1] < best1:
            front.add(point)
            best1 = point[1]
    return [t for t in trials if losses[t.number] in front]


def pareto_front(study: optuna.Study) -> list[FrozenTrial]:
    return best_trials(study)


_STATES = {
    TrialState.RUNNING: TRIAL_RUNNING,
    TrialState.WAITING: TRIAL_PENDING,
    TrialState.COMPLETE: TRIAL_SUCCEEDED,
    TrialState.FAIL: TRIAL_FAILED,
    TrialState.PRUNED: TRIAL_PRUNED,
}


def state_name(state: TrialState) -> str:
    """Optuna state → the API's trial state (Pending/Running/Succeeded/Failed/Pruned)."""
    return _STATES[state]


def count_trials(study: optuna.Study, trials: list[FrozenTrial] | None = None) -> TrialCounts:
    """Counts by state; pass ``trials`` when the caller already read them."""
    counts = dict.fromkeys(("running", "succeeded", "failed", "pruned", "infeasible", "reused"), 0)
    if trials is None:
        trials = study.get_trials(deepcopy=False)
    for t in trials:
        key = {
            TrialState.RUNNING: "running",
            TrialState.WAITING: "running",
            TrialState.COMPLETE: "succeeded",
            TrialState.FAIL: "failed",
            TrialState.PRUNED: "pruned",
        }[t.state]
        counts[key] += 1
        if key == "succeeded":
            counts["infeasible"] += 0 if is_feasible(t) else 1
            counts["reused"] += 1 if t.user_attrs.get(ATTR_REUSED) is not None else 0
    return TrialCounts(created=len(trials), **counts)


def trial_job_name(trial: FrozenTrial) -> str | None:
    name = trial.user_attrs.get(ATTR_JOB)
    return str(name) if name else None


def summarize_trial(trial: FrozenTrial, cfg: SweepConfig | None = None) -> TrialSummary:
    """A finished trial as status.bestTrial / status.paretoFront show it."""
    metrics = dict(trial.user_attrs.get(ATTR_METRICS) or {})
    values = list(trial.values or [])
    if cfg is not None:
        for metric, v in zip(cfg.metrics, values, strict=False):
            metrics.setdefault(metric, float(v))
    art = trial.user_attrs.get(ATTR_ARTIFACT)
    return TrialSummary(
        name=trial_job_name(trial) or f"trial-{trial.number}",
        number=trial.number,
        parameters=decode_params(trial),
        metrics=metrics,
        values=values,
        artifact=Artifact.model_validate(art) if art else None,
    )


def trial_record(trial: FrozenTrial, cfg: SweepConfig | None = None) -> TrialRecord:
    """One line of status.trialList; with ``cfg``, succeeded trials say whether they meet
    its constraints (and which they break)."""
    complete = trial.state == TrialState.COMPLETE
    values = list(trial.values) if complete and trial.values else None
    message = trial.user_attrs.get(ATTR_REASON)
    feasible: bool | None = None
    if complete and cfg is not None and cfg.constraints:
        feasible = is_feasible(trial)
        if not feasible:
            broken = cfg.violations(trial.user_attrs.get(ATTR_METRICS) or {})
            message = "infeasible: " + (", ".join(broken) or "breaks spec.constraints")
    reused = trial.user_attrs.get(ATTR_REUSED)
    if reused is not None:
        note = f"reused the result of trial {reused} (identical parameters); no job launched"
        message = f"{note}; {message}" if message else note
    return TrialRecord(
        number=trial.number,
        name=trial_job_name(trial),
        state=state_name(trial.state),  # type: ignore[arg-type]
        parameters=decode_params(trial),
        values=values,
        feasible=feasible,
        reused_from=None if reused is None else int(reused),
        message=message,
    )
