"""Durable Optuna studies, one per FineTuneSweep, and the SweepStudy facade.

All sweep state lives in the study's RDB storage (SQLite on a volume by default, any
SQLAlchemy URL in production): trials, parameters, intermediate values, results and the
child job name of every trial. A restarted controller re-opens the study and carries on;
nothing is reconstructed from Kubernetes objects, so no trial is lost or asked twice.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, RDBStorage
from optuna.trial import FrozenTrial, TrialState

from orchestrator.api.sweep import TrialCounts, TrialRecord, TrialSummary
from orchestrator.sweep import trials as T
from orchestrator.sweep.config import SweepConfig
from orchestrator.sweep.errors import MissingMetricError, SweepConfigError
from orchestrator.sweep.policy import Plan, plan
from orchestrator.sweep.samplers import make_pruner, make_sampler

log = logging.getLogger("orchestrator.sweep")

STORAGE_ENV = "KUBETUNE_STUDY_STORAGE"
# Study-level user attributes, for tools that read a study without the spec.
ATTR_STUDY_OBJECTIVES = "kubetune.io/objectives"
ATTR_STUDY_SAMPLER = "kubetune.io/sampler"

_STORAGES: dict[str, RDBStorage] = {}
_STORAGES_LOCK = threading.Lock()


def study_name(namespace: str, sweep: str) -> str:
    """``<namespace>.<sweep>``: unique per cluster, readable in the database."""
    return f"{namespace}.{sweep}"


def default_storage_url(directory: str | os.PathLike[str] | None = None) -> str:
    """``KUBETUNE_STUDY_STORAGE``, else ``sqlite:///<directory>/studies.db`` (directory
    defaults to ``$XDG_STATE_HOME/kubetune`` i.e. ``~/.local/state/kubetune``)."""
    if directory is None and (env := os.environ.get(STORAGE_ENV)):
        return env
    if directory is None:
        state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        directory = Path(state) / "kubetune"
    return f"sqlite:///{Path(directory).absolute() / 'studies.db'}"


def make_storage(url: str | None = None) -> RDBStorage:
    """An RDBStorage for ``url`` (default: default_storage_url())."""
    url = url or default_storage_url()
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///") :])
        if str(path) != ":memory:":
            path.parent.mkdir(parents=True, exist_ok=True)
        # Several writers (controller threads, local trainer reports) share the file:
        # wait for the lock instead of failing with "database is locked".
        engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}}
    else:
        engine_kwargs = {"pool_pre_ping": True}  # survive database restarts / idle drops
    return RDBStorage(url, engine_kwargs=engine_kwargs)


def get_storage(url: str | None = None) -> RDBStorage:
    """A process-wide RDBStorage per URL: one engine and connection pool, however often a
    reconcile re-opens its study (RDBStorage is thread-safe)."""
    url = url or default_storage_url()
    with _STORAGES_LOCK:
        if url not in _STORAGES:
            _STORAGES[url] = make_storage(url)
        return _STORAGES[url]


def open_study(
    cfg: SweepConfig,
    name: str,
    storage: str | BaseStorage | None = None,
    *,
    create: bool = True,
) -> optuna.Study:
    """Create or load the study ``name``; samplers are reseeded by trial count (see
    samplers.derive_seed) so re-opening never replays proposals."""
    st = storage if isinstance(storage, BaseStorage) else get_storage(storage)
    pruner = make_pruner(cfg)
    if not create:
        try:
            study = optuna.load_study(study_name=name, storage=st, pruner=pruner)
        except KeyError:
            raise SweepConfigError(f"no study named {name!r} in the study storage") from None
    else:
        study = optuna.create_study(
            storage=st,
            study_name=name,
            directions=cfg.directions,
            sampler=make_sampler(cfg),
            pruner=pruner,
            load_if_exists=True,
        )
    have = [d.name.lower() for d in study.directions]
    if have != cfg.directions:
        raise SweepConfigError(
            f"study {name!r} exists with objectives {have}, the spec asks for {cfg.directions}: "
            "objectives cannot change on an existing sweep (delete and recreate it)"
        )
    n = len(study.get_trials(deepcopy=False))
    study.sampler = make_sampler(cfg, n_existing_trials=n)
    if study.user_attrs.get(ATTR_STUDY_OBJECTIVES) != cfg.metrics:
        study.set_user_attr(ATTR_STUDY_OBJECTIVES, cfg.metrics)
        study.set_user_attr(ATTR_STUDY_SAMPLER, cfg.sampler)
    return study


def delete_study(name: str, storage: str | BaseStorage | None = None) -> bool:
    """Remove a study (sweep deleted); False if it did not exist."""
    st = storage if isinstance(storage, BaseStorage) else get_storage(storage)
    try:
        optuna.delete_study(study_name=name, storage=st)
    except KeyError:
        return False
    return True


class SweepStudy:
    """One sweep's study with its config: what the controller and the local runner call.

    ``name_for(number)`` gives a trial's job name (``trial_name(sweep, number)``); it is
    stored on the trial, so ``unlaunched`` can tell which RUNNING trials still need a job
    after a crash between ask and create.
    """

    def __init__(self, cfg: SweepConfig, study: optuna.Study) -> None:
        self.cfg = cfg
        self.study = study

    @classmethod
    def open(
        cls,
        spec: Any,
        *,
        namespace: str,
        sweep: str,
        storage: str | BaseStorage | None = None,
    ) -> SweepStudy:
        cfg = spec if isinstance(spec, SweepConfig) else SweepConfig.from_spec(spec)
        return cls(cfg, open_study(cfg, study_name(namespace, sweep), storage))

    # ---- ask / tell ----
    def ask(self, job_name: Any = None) -> tuple[int, dict[str, Any], str | None]:
        """Ask one trial; ``job_name`` is a name or a callable number → name, recorded on
        the trial. Returns (number, params, job name).

        No wasted trials: when the sampler proposes exactly the parameters of a completed
        trial (ints and categorical choices compare exactly, floats to 12 significant
        digits), that trial's result is told again at once and the job name is None:
        there is no job to launch. The trial counts towards maxTrials like any other.
        """
        number, params = T.ask_trial(self.study, self.cfg.space)
        source = self.duplicate_of(params, exclude=number)
        if source is not None:
            self._reuse(number, source)
            return number, params, None
        name = job_name(number) if callable(job_name) else job_name
        if name:
            T.set_trial_user_attrs(self.study, number, {T.ATTR_JOB: name})
        return number, params, name

    def duplicate_of(self, params: Mapping[str, Any], *, exclude: int = -1) -> FrozenTrial | None:
        """The first completed trial with the same parameters, or None."""
        key = _params_key(params)
        for t in self.trials((TrialState.COMPLETE,)):
            if t.number != exclude and _params_key(T.decode_params(t)) == key:
                return t
        return None

    def _reuse(self, number: int, source: FrozenTrial) -> None:
        attrs = source.user_attrs
        T.tell_result(
            self.study,
            number,
            list(source.values),
            metrics=attrs.get(T.ATTR_METRICS),
            artifact=attrs.get(T.ATTR_ARTIFACT),
            constraints=source.constraints,
            extra_attrs={T.ATTR_REUSED: int(attrs.get(T.ATTR_REUSED, source.number))},
        )
        log.info(
            "trial %d repeats the parameters of trial %d: result reused, no job launched",
            number,
            source.number,
        )

    def tell_metrics(
        self,
        number: int,
        metrics: Mapping[str, Any],
        *,
        artifact: Mapping[str, Any] | None = None,
    ) -> bool:
        """Finish a succeeded trial from its final metrics; a missing objective metric
        tells FAIL with that reason. Idempotent."""
        try:
            values = self.cfg.objective_values(metrics)
            constraints = self.cfg.constraint_values(metrics) if self.cfg.constraints else None
        except MissingMetricError as exc:
            return T.tell_result(self.study, number, T.FAIL, reason=str(exc), metrics=metrics)
        return T.tell_result(
            self.study, number, values, metrics=metrics, artifact=artifact, constraints=constraints
        )

    def tell_failed(self, number: int, reason: str) -> bool:
        return T.tell_result(self.study, number, T.FAIL, reason=reason)

    def tell_pruned(self, number: int, reason: str = "stopped early by the pruner") -> bool:
        return T.tell_result(self.study, number, T.PRUNED, reason=reason)

    def report(self, number: int, step: int, value: float) -> bool:
        return T.report_intermediate(self.study, number, step, value)

    def should_prune(self, number: int) -> bool:
        return T.should_prune(self.study, number)

    # ---- queries ----
    def trials(self, states: Iterable[TrialState] | None = None) -> list[FrozenTrial]:
        return self.study.get_trials(
            deepcopy=False, states=tuple(states) if states is not None else None
        )

    def running(self) -> list[FrozenTrial]:
        return self.trials((TrialState.RUNNING, TrialState.WAITING))

    def unlaunched(self, existing_jobs: Iterable[str]) -> list[FrozenTrial]:
        """RUNNING trials whose job is not among ``existing_jobs`` (recreate those)."""
        have = set(existing_jobs)
        return [t for t in self.running() if T.trial_job_name(t) not in have]

    def reported(self, number: int) -> bool:
        """Whether any intermediate value of this trial reached the study."""
        return bool(T.get_trial(self.study, number).intermediate_values)

    def params(self, number: int) -> dict[str, Any]:
        return T.decode_params(T.get_trial(self.study, number))

    def counts(self) -> TrialCounts:
        return T.count_trials(self.study)

    def best(self) -> TrialSummary | None:
        """status.bestTrial (single objective; the first front member otherwise). Only
        feasible trials (meeting spec.constraints) qualify."""
        front = T.best_trials(self.study)
        return T.summarize_trial(front[0], self.cfg) if front else None

    def pareto_front(self) -> list[TrialSummary]:
        """status.paretoFront: the feasible trials' front (study.best_trials without
        constraints)."""
        if not self.cfg.multi_objective:
            return []
        return [T.summarize_trial(t, self.cfg) for t in T.best_trials(self.study)]

    def records(self, limit: int | None = None) -> list[TrialRecord]:
        """status.trialList, most recent first, at most ``limit`` entries."""
        out = [T.trial_record(t, self.cfg) for t in reversed(self.trials())]
        return out[:limit] if limit is not None else out

    def refuse(self, number: int, reason: str) -> bool:
        """FAIL a trial before launch because its parameters cannot work (e.g. an unreachable
        parameter budget). Refused trials cost no GPU time and do not count towards
        maxFailedTrials: the search space is at fault, not the cluster."""
        T.set_trial_user_attrs(self.study, number, {T.ATTR_INFEASIBLE: True})
        return self.tell_failed(number, reason)

    def plan(self) -> Plan:
        """How many trials to ask now, and whether the sweep has finished."""
        grid = self.cfg.space.grid_size() if self.cfg.sampler == "grid" else None
        trials = self.trials()  # one storage read for both the counts and the refusals
        refused = sum(1 for t in trials if t.user_attrs.get(T.ATTR_INFEASIBLE))
        cfg = self.cfg
        if refused:
            cfg = dataclasses.replace(cfg, max_failed_trials=cfg.max_failed_trials + refused)
        return plan(T.count_trials(self.study, trials), cfg, grid_size=grid)


def _params_key(params: Mapping[str, Any]) -> str:
    """Parameters compared for reuse: decoded values, floats to 12 significant digits."""

    def canon(v: Any) -> Any:
        if isinstance(v, float):
            return float(f"{v:.12g}")
        if isinstance(v, list | tuple):
            return [canon(x) for x in v]
        return v

    return json.dumps({k: canon(v) for k, v in params.items()}, sort_keys=True)
