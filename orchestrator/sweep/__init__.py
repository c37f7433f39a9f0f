"""Optuna sweeps for kubetune: search space, samplers/pruners, durable studies, ask/tell.

Used by the controller (one study per FineTuneSweep) and by ``kubetune sweep --local``::

    from orchestrator.sweep import SweepStudy
    from orchestrator.api import trial_name

    s = SweepStudy.open(spec, namespace="default", sweep="support-sweep",
                        storage="sqlite:///var/lib/kubetune/studies.db")
    for _ in range(s.plan().launch):
        number, params, job = s.ask(lambda n: trial_name("support-sweep", n))
        ...                                   # create the trial job with params
    s.report(number, step=100, value=1.9); s.should_prune(number)
    s.tell_metrics(number, {"evalLoss": 1.23, "trainableParamPercent": 0.9})
    s.counts(); s.best(); s.pareto_front(); s.records()
"""

from __future__ import annotations

from orchestrator.sweep.config import Objective, SweepConfig
from orchestrator.sweep.errors import (
    MissingMetricError,
    SweepConfigError,
    SweepError,
    TrialNotFoundError,
)
from orchestrator.sweep.policy import Plan, plan
from orchestrator.sweep.samplers import SAMPLERS, derive_seed, make_pruner, make_sampler
from orchestrator.sweep.space import (
    Param,
    SearchSpace,
    build_space,
    decode_choice,
    encode_choice,
)
from orchestrator.sweep.study import (
    SweepStudy,
    default_storage_url,
    delete_study,
    get_storage,
    make_storage,
    open_study,
    study_name,
)
from orchestrator.sweep.tokens import (
    bearer_token,
    derive_sweep_key,
    generate_secret,
    mint_job_token,
    mint_token,
    verify_job_token,
    verify_token,
)
from orchestrator.sweep.trials import (
    ATTR_ARTIFACT,
    ATTR_JOB,
    ATTR_METRICS,
    ATTR_REASON,
    FAIL,
    PRUNED,
    Outcome,
    ask_trial,
    best_trials,
    count_trials,
    decode_params,
    find_trial_by_user_attr,
    get_trial,
    pareto_front,
    report_intermediate,
    set_trial_user_attrs,
    should_prune,
    state_name,
    summarize_trial,
    tell_result,
    trial_record,
)

__all__ = [
    "ATTR_ARTIFACT",
    "ATTR_JOB",
    "ATTR_METRICS",
    "ATTR_REASON",
    "FAIL",
    "PRUNED",
    "SAMPLERS",
    "MissingMetricError",
    "Objective",
    "Outcome",
    "Param",
    "Plan",
    "SearchSpace",
    "SweepConfig",
    "SweepConfigError",
    "SweepError",
    "SweepStudy",
    "TrialNotFoundError",
    "ask_trial",
    "bearer_token",
    "best_trials",
    "build_space",
    "count_trials",
    "decode_choice",
    "decode_params",
    "default_storage_url",
    "delete_study",
    "derive_seed",
    "derive_sweep_key",
    "encode_choice",
    "find_trial_by_user_attr",
    "generate_secret",
    "get_storage",
    "get_trial",
    "make_pruner",
    "make_sampler",
    "make_storage",
    "mint_job_token",
    "mint_token",
    "open_study",
    "pareto_front",
    "plan",
    "report_intermediate",
    "set_trial_user_attrs",
    "should_prune",
    "state_name",
    "study_name",
    "summarize_trial",
    "tell_result",
    "trial_record",
    "verify_job_token",
    "verify_token",
]
