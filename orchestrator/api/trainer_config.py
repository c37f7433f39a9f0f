"""TrainerConfig: the contract between render (controller side) and the trainer pod.

The controller renders it into the ConfigMap as config.json; the trainer reads it with
`TrainerConfig.from_file(path)`. It carries no secrets: credentials reach the pod as env
variables from Secret references (see orchestrator/render).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from orchestrator.api.base import ApiModel
from orchestrator.api.job import FineTuneJobSpec

CONFIG_MOUNT_DIR = "/etc/kubetune"
CONFIG_FILE = "config.json"
DEEPSPEED_FILE = "ds_config.json"
CONFIG_PATH = f"{CONFIG_MOUNT_DIR}/{CONFIG_FILE}"
DEEPSPEED_PATH = f"{CONFIG_MOUNT_DIR}/{DEEPSPEED_FILE}"
# pvc://<claim>/<path> URIs resolve to <PVC_MOUNT_ROOT>/<claim>/<path> inside the pod.
PVC_MOUNT_ROOT = "/mnt/pvc"
WORKDIR = "/workspace"
# spec.model.cacheClaim is mounted here; the trainer downloads models into it (s3://) and
# HF_HOME points into it (hf://), so attempts and jobs share one download.
MODEL_CACHE_DIR = "/var/cache/kubetune"
MODEL_CACHE_ENV = "KUBETUNE_MODEL_CACHE"
REPORT_TOKEN_ENV = "KUBETUNE_REPORT_TOKEN"


class SweepTrialRef(ApiModel):
    """Set when the job is a sweep trial: where to report intermediate values."""

    name: str = Field(description="FineTuneSweep name.")
    trial_number: int = Field(ge=0, description="Optuna trial number.")
    report_url: str | None = Field(
        default=None, description="Endpoint receiving intermediate eval values (pruning)."
    )
    token_env: str = Field(
        default=REPORT_TOKEN_ENV, description="Env variable holding the report token."
    )
    token: str | None = Field(
        default=None,
        exclude=True,  # never serialised (ConfigMap, kubetune.json): only the pods' env holds it
        repr=False,
        description="The trial's report token, put in the pods' env as token_env.",
    )
    metric: str = Field(
        default="evalLoss", description="Metric reported as the intermediate value."
    )
    parameters: dict[str, Any] = Field(
        default_factory=dict, description="The trial's sampled parameters (for metadata)."
    )


class ProgressRef(ApiModel):
    """Where rank 0 posts live progress (step, losses, tokens/s, ETA) for status.progress."""

    url: str = Field(description="The controller's report endpoint.")
    token_env: str = Field(
        default=REPORT_TOKEN_ENV, description="Env variable holding the job's report token."
    )
    interval_seconds: float = Field(
        default=30.0, gt=0, description="At most one progress post per this many seconds."
    )
    token: str | None = Field(
        default=None,
        exclude=True,  # never serialised: only the pods' env holds it
        repr=False,
        description="The job's report token, put in the pods' env as token_env.",
    )


class TrainerConfig(ApiModel):
    """Everything the trainer needs, resolved: the spec with controller defaults filled in,
    the generated DeepSpeed config, the attempt number and (for trials) the sweep link."""

    job_name: str = Field(description="FineTuneJob name.")
    namespace: str = Field(default="default", description="FineTuneJob namespace.")
    spec: FineTuneJobSpec = Field(description="The resolved job spec.")
    deepspeed: dict[str, Any] = Field(
        default_factory=dict, description="Generated DeepSpeed config, user overrides merged."
    )
    attempt: int = Field(default=1, ge=1, description="Gang attempt number (1-based).")
    sweep: SweepTrialRef | None = Field(default=None, description="Sweep trial link.")
    progress: ProgressRef | None = Field(
        default=None, description="Live progress link (the controller's report endpoint)."
    )
    artifact_uri: str | None = Field(
        default=None, description="Where the adapter goes; default <output.uri>/<job>/."
    )
    checkpoint_uri: str | None = Field(
        default=None, description="Where checkpoints go; default <output.uri>/<job>/checkpoints/."
    )
    pvc_mount_root: str = Field(default=PVC_MOUNT_ROOT, description="Where PVCs are mounted.")
    workdir: str = Field(default=WORKDIR, description="Scratch directory (model cache, etc.).")

    @model_validator(mode="after")
    def _fill_uris(self) -> TrainerConfig:
        if self.artifact_uri is None:
            self.artifact_uri = self.spec.output.artifact_uri(self.job_name)
        if self.checkpoint_uri is None:
            self.checkpoint_uri = self.spec.output.checkpoint_uri(self.job_name)
        return self

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_wire(), indent=indent, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainerConfig:
        return cls.model_validate_json(text)

    @classmethod
    def from_file(cls, path: str | Path) -> TrainerConfig:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

    def local_path(self, uri: str) -> str | None:
        """Filesystem path for file:// and pvc:// URIs inside the pod; None for others."""
        if uri.startswith("file://"):
            return uri[len("file://") :]
        if uri.startswith("pvc://"):
            return f"{self.pvc_mount_root.rstrip('/')}/{uri[len('pvc://') :]}"
        return None
