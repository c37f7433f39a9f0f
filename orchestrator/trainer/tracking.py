"""Experiment tracking: MLflow and Weights & Biases, each on only when its standard
environment asks for it (off by default), through transformers' own callbacks.

- MLflow when ``MLFLOW_TRACKING_URI`` is set (``DISABLE_MLFLOW_INTEGRATION=true``, HF's own
  switch, turns it off again).
- W&B when ``WANDB_API_KEY`` is set or ``WANDB_MODE`` is ``online`` / ``offline``;
  ``WANDB_MODE=disabled`` turns it off.

Everything else (experiment, project, entity, tags, host, credentials) is the tracker's own
environment, read by its client. The classes below are HF's ``MLflowCallback`` and
``WandbCallback`` with three changes, which is why they are added as callbacks here rather
than named in ``TrainingArguments.report_to`` (which would add the stock ones):

- the run stays open past ``on_train_end``: kubetune evaluates once more after training (a
  final evaluation goes through ``trainer.log`` too) and logs the final metrics it reports
  (``final/evalLoss``, ``final/generalLossDelta``, ...). HF's MLflow callback ends the run at
  ``on_train_end``, and a later ``log_metrics`` would silently start a second, unnamed run;
- the run is ended explicitly by :func:`finish` with the outcome (FINISHED, KILLED for a
  pruned or preempted attempt, FAILED), before the trainer leaves with ``os._exit``: neither
  MLflow's nor W&B's atexit hooks run then, so an MLflow run would stay RUNNING (and its
  asynchronously logged metrics be lost) and a W&B run would never be synced or closed;
- kubetune's own parameters (method, rank, sweep, trial and its parameters, attempt) are
  logged next to HF's training arguments.

The trackers are created on rank 0 only (HF's callbacks also log only where
``state.is_world_process_zero``); the run name is the FineTuneJob's name. This module imports
transformers: the entrypoint ends runs only if it was imported (``sys.modules``).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from transformers.integrations import MLflowCallback, WandbCallback

from orchestrator.trainer.errors import ConfigError, ExitCode

log = logging.getLogger("orchestrator.trainer")

MLFLOW, WANDB = "mlflow", "wandb"
WANDB_ON_MODES = ("online", "offline")
#: The image build argument that adds packages to the trainer image (trainer_image/Dockerfile).
IMAGE_EXTRAS_ARG = "TRAINER_EXTRAS"


@dataclass(frozen=True)
class Tracker:
    """A tracker the environment asks for."""

    name: str  # HF's integration name (report_to)
    module: str  # what is imported
    package: str  # what pip installs
    env: str  # the variable that switched it on (named in messages)
    title: str


def requested(env: Mapping[str, str] | None = None) -> list[Tracker]:
    """The trackers this process's environment asks for; none by default."""
    e = os.environ if env is None else env
    out: list[Tracker] = []
    if (e.get("MLFLOW_TRACKING_URI", "").strip()
            and e.get("DISABLE_MLFLOW_INTEGRATION", "").strip().upper() not in ("TRUE", "1")):
        out.append(Tracker(MLFLOW, "mlflow", "mlflow-skinny", "MLFLOW_TRACKING_URI", "MLflow"))
    mode = e.get("WANDB_MODE", "").strip().lower()
    if mode != "disabled":
        if mode in WANDB_ON_MODES:
            out.append(Tracker(WANDB, "wandb", "wandb", f"WANDB_MODE={mode}",
                               "Weights & Biases"))
        elif e.get("WANDB_API_KEY", "").strip():
            out.append(Tracker(WANDB, "wandb", "wandb", "WANDB_API_KEY", "Weights & Biases"))
    return out


def check(trackers: list[Tracker]) -> None:
    """Fail fast (before any download or training) when a requested tracker's client is not
    installed in this image."""
    for t in trackers:
        try:
            importlib.import_module(t.module)
        except ImportError as exc:
            raise ConfigError(
                f"{t.env} is set, which turns on experiment tracking with {t.title}, but the "
                f"trainer image has no {t.package} package ({exc}): build the trainer image "
                f"with --build-arg {IMAGE_EXTRAS_ARG}={t.package} (pip install "
                f"'kubetune[tracking]' outside an image), or unset {t.env.split('=')[0]}"
            ) from None


def params_of(cfg: Any, plan: Any = None) -> dict[str, Any]:
    """kubetune's own run parameters: what the training arguments do not say."""
    spec = cfg.spec
    p: dict[str, Any] = {
        "kubetune.job": cfg.job_name,
        "kubetune.namespace": cfg.namespace,
        "kubetune.attempt": cfg.attempt,
        "kubetune.method": spec.method.type,
        "kubetune.model": spec.model.uri,
    }
    if plan is not None and plan.knob and plan.size is not None:  # the size the plan chose
        p[f"kubetune.{plan.knob}"] = plan.size  # rank | bottleneck | numVirtualTokens
    if spec.method.trainable_param_percent is not None:
        p["kubetune.trainableParamPercentTarget"] = spec.method.trainable_param_percent
    if cfg.sweep is not None:
        p["kubetune.sweep"] = cfg.sweep.name
        p["kubetune.trial"] = cfg.sweep.trial_number
        for name, value in sorted(cfg.sweep.parameters.items()):
            p[f"sweep.{name}"] = value if isinstance(value, (int, float, str)) else (
                json.dumps(value))
    return p


def callbacks(run: Any, trackers: list[Tracker] | None = None) -> list[Any]:
    """The tracker callbacks for this process (rank 0 only; none when nothing is requested).
    They are remembered for :func:`log_final` and :func:`finish`."""
    from orchestrator.trainer.dist import rank

    trackers = requested() if trackers is None else trackers
    if not trackers or rank() != 0:
        return []
    made: list[Any] = []
    for t in trackers:
        made.append(_MLflow(run) if t.name == MLFLOW else _Wandb(run))
    _open.extend(made)
    return made


def log_final(metrics: Mapping[str, Any], step: int, artifact_uri: str | None) -> None:
    """The run's final metrics (what status.metrics and kubetune.json report) as ``final/*``."""
    numbers = {f"final/{k}": float(v) for k, v in metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for cb in _open:
        try:
            cb.log_final(numbers, step, artifact_uri)
        except Exception as exc:  # tracking must not fail a finished training run
            log.warning("could not log the final metrics to %s: %s", cb.title, exc)


def finish(code: int) -> None:
    """End every open tracker run with the trainer's outcome; waits until the data is written
    (MLflow's async queue flushed; W&B's run synced or, offline, its run directory complete)."""
    while _open:
        cb = _open.pop(0)
        try:
            cb.finish(code)
        except Exception as exc:
            log.warning("could not end the %s run: %s", cb.title, exc)


def mlflow_status(code: int) -> str:
    if code == ExitCode.OK:
        return "FINISHED"
    if code in (ExitCode.PRUNED, ExitCode.STOPPED):
        return "KILLED"  # stopped on purpose: pruned by the sweep, or preempted (resumes)
    return "FAILED"


#: Tracker callbacks of this process whose runs finish() has not ended yet.
_open: list[Any] = []


class _MLflow(MLflowCallback):
    title = "MLflow"

    def __init__(self, run: Any) -> None:
        super().__init__()
        self.run = run

    def setup(self, args: Any, state: Any, model: Any) -> None:
        super().setup(args, state, model)
        if state.is_world_process_zero and self._ml_flow.active_run() is not None:
            params = params_of(self.run.cfg, getattr(self.run, "plan", None))
            self._ml_flow.log_params({k: str(v)[:self._MAX_PARAM_VAL_LENGTH]
                                      for k, v in params.items()})
            self._ml_flow.set_tags({k: str(params[k]) for k in
                                    ("kubetune.job", "kubetune.namespace", "kubetune.method",
                                     "kubetune.sweep", "kubetune.trial") if k in params})

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        return  # the run ends in finish(), after the final evaluation and metrics

    def log_final(self, metrics: dict[str, float], step: int, artifact_uri: str | None) -> None:
        if self._ml_flow.active_run() is None:
            return
        self._ml_flow.log_metrics(metrics, step=step)
        if artifact_uri:
            self._ml_flow.set_tag("kubetune.artifact", artifact_uri)

    def finish(self, code: int) -> None:
        mlflow = self._ml_flow
        if not self._auto_end_run or mlflow.active_run() is None:
            return
        flush = getattr(mlflow, "flush_async_logging", None)
        if flush is not None:
            flush()  # older MLflow's end_run does not wait for the async queue (os._exit)
        mlflow.end_run(status=mlflow_status(code))
        self._auto_end_run = False


class _Wandb(WandbCallback):
    title = "Weights & Biases"

    def __init__(self, run: Any) -> None:
        super().__init__()
        self.run = run

    def setup(self, args: Any, state: Any, model: Any, **kw: Any) -> None:
        cfg = self.run.cfg
        if state.is_world_process_zero:
            # wandb.init reads these; the user's environment wins
            os.environ.setdefault("WANDB_PROJECT", "kubetune")  # HF's default: "huggingface"
            os.environ.setdefault("WANDB_JOB_TYPE", "trial" if cfg.sweep is not None else "train")
            if cfg.sweep is not None:
                os.environ.setdefault("WANDB_RUN_GROUP", cfg.sweep.name)
            os.environ.setdefault("WANDB_TAGS", f"kubetune,{cfg.spec.method.type}")
        super().setup(args, state, model, **kw)
        if state.is_world_process_zero and self._wandb.run is not None:
            params = params_of(cfg, getattr(self.run, "plan", None))
            self._wandb.config.update(params, allow_val_change=True)

    def on_predict(self, args: Any, state: Any, control: Any, metrics: Any, **kw: Any) -> None:
        return  # kubetune's predict() is the artifact's reproducibility probe, not a metric

    def log_final(self, metrics: dict[str, float], step: int, artifact_uri: str | None) -> None:
        run = self._wandb.run
        if run is None:
            return
        run.summary.update(metrics)
        if artifact_uri:
            run.summary["kubetune/artifact"] = artifact_uri

    def finish(self, code: int) -> None:
        if self._wandb.run is None:
            return
        # exit code 0 also for a pruned trial: W&B would show any other code as failed
        self._wandb.finish(exit_code=0 if code in (ExitCode.OK, ExitCode.PRUNED) else int(code))
        self._wandb.teardown()  # waits for the wandb-core service (atexit would, normally)


__all__ = ["Tracker", "callbacks", "check", "finish", "log_final", "params_of", "requested"]
