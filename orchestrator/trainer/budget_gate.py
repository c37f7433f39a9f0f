"""A sweep trial's parameter budget, checked in the trial's own pod before the model is read.

The controller does not read users' models (it would need their credentials: see
``orchestrator.controller.feasibility``). So each trial reads the base model's
``config.json`` with its own credentials in its first seconds, tells the controller the
architecture's sizes over its report link (the controller then refuses the unreachable
trials of this sweep before launch), and refuses its own budget if the solver cannot reach
it — before a byte of weights is downloaded. Where config.json alone says too little (an
hf:// model, an architecture the torch-free formulas do not cover) the same check runs on the
meta-device shape right after the download, still before training.

A plain FineTuneJob keeps the closest achievable budget with a warning: the user asked for
one job. A trial refuses (reason BudgetInfeasible, exit 78): its sweep tells Optuna the
combination failed without counting it against maxFailedTrials.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from orchestrator import storage
from orchestrator.api import reasons as R
from orchestrator.api.architectures import shape_from_config
from orchestrator.api.budget import ModelShape, unreachable_budget
from orchestrator.trainer.errors import ConfigError
from orchestrator.trainer.reporting import HttpMetricsReporter, MetricsReporter

log = logging.getLogger("kubetune.trainer")


class BudgetInfeasible(ConfigError):
    reason_override = R.REASON_BUDGET_INFEASIBLE


def read_model_config(model_uri: str) -> dict[str, Any] | None:
    """The base model's config.json from object storage or a mounted path, or None when it
    is elsewhere (hf://) or cannot be read now (the post-download check then decides)."""
    uri = model_uri.rstrip("/")
    if not uri.startswith(("s3://", "file://")):
        return None
    try:
        doc = json.loads(storage.read_text(f"{uri}/config.json", progress=False))
    except Exception as exc:  # any storage or parse failure: the download reports it properly
        log.info("budget check before download skipped: %s/config.json unreadable (%s)",
                 uri, type(exc).__name__)
        return None
    return doc if isinstance(doc, dict) else None


def refuse_unreachable(shape: ModelShape, spec: Any) -> None:
    """A trial whose trainableParamPercent the solver cannot reach stops here."""
    reason = unreachable_budget(shape, spec.method, spec.model.uri)
    if reason:
        raise BudgetInfeasible(f"trial not trained: {reason}")


def check_before_download(spec: Any, sweep: Any, reporter: MetricsReporter | None,
                          attempt: int, announce: bool) -> bool:
    """For sweep trials: read config.json, announce it to the controller (``announce``: rank
    0 only), refuse an unreachable budget. True when the budget was checked here."""
    if sweep is None:
        return False
    config = read_model_config(spec.model.uri)
    if config is None:
        return False
    if announce and isinstance(reporter, HttpMetricsReporter):
        # the model stream's step is the attempt: each attempt may announce once
        reporter.announce_model(config, step=attempt)
    shape = shape_from_config(config)
    if shape is None or spec.method.trainable_param_percent is None:
        return False
    refuse_unreachable(shape, spec)
    return True
