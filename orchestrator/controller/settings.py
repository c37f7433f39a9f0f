"""Controller settings, read once from the environment (the Helm chart sets them).

Each setting is declared once, with its environment variable and a one-line description:
`python -m orchestrator.controller --help` prints this table.
"""

from __future__ import annotations

import json
import os
import re
import socket
import urllib.parse
from dataclasses import dataclass, field, fields
from typing import Any

from pydantic import ValidationError

from orchestrator.api.base import QUANTITY
from orchestrator.api.paths import format_errors
from orchestrator.api.pod import (
    EnvVarSource,
    SecretKeySelector,
    check_annotations,
    check_env_names,
    check_extended_resources,
    check_labels,
    check_name,
)
from orchestrator.controller.leader import check_durations
from orchestrator.render import RenderDefaults


def _list(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def _bool(value: str) -> bool:
    return value.strip().lower() not in ("false", "0", "no", "off")


def _doc(env: str, help: str) -> dict[str, str]:
    return {"env": env, "help": help}


def report_endpoint(url: str) -> str:
    """The URL trainers POST to: the report server serves /report only, so a base URL
    (what a Service address naturally is) gets that path instead of answering 404 to every
    report, which would leave the pruner without a single intermediate value."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"KUBETUNE_REPORT_URL must be an http(s) URL, not {url!r}")
    if parts.path in ("", "/"):
        parts = parts._replace(path="/report")
    return urllib.parse.urlunsplit(parts)


@dataclass(frozen=True)
class ControllerSettings:
    namespaces: list[str] = field(
        default_factory=list,
        metadata=_doc(
            "KUBETUNE_NAMESPACES", "comma-separated namespaces to watch; empty: the whole cluster"
        ),
    )
    trainer_image: str = field(
        default="ghcr.io/kubetune/trainer:0.1.0",
        metadata=_doc("KUBETUNE_TRAINER_IMAGE", "trainer image for pods"),
    )
    s3_endpoint: str | None = field(
        default=None,
        metadata=_doc(
            "KUBETUNE_S3_ENDPOINT", "default object-store endpoint for jobs without spec.storage"
        ),
    )
    s3_credentials_secret: str | None = field(
        default=None,
        metadata=_doc(
            "KUBETUNE_S3_CREDENTIALS_SECRET", "default credentials Secret for jobs without one"
        ),
    )
    s3_region: str | None = field(
        default=None, metadata=_doc("KUBETUNE_S3_REGION", "default object-store region")
    )
    # Trainer pod defaults for FineTuneJobs that leave spec.pod / resources / model.cacheClaim
    # out (spec wins; env, labels, annotations and extended resources merge per key).
    trainer_service_account: str | None = field(
        default=None,
        metadata=_doc(
            "KUBETUNE_TRAINER_SERVICE_ACCOUNT",
            "ServiceAccount of trainer pods (cloud identity); unset: the namespace's default",
        ),
    )
    trainer_priority_class: str | None = field(
        default=None,
        metadata=_doc("KUBETUNE_TRAINER_PRIORITY_CLASS", "PriorityClass of trainer pods"),
    )
    trainer_image_pull_secrets: list[str] = field(
        default_factory=list,
        metadata=_doc(
            "KUBETUNE_TRAINER_IMAGE_PULL_SECRETS",
            "comma-separated pull Secrets (in each job's namespace) for the trainer image",
        ),
    )
    # values: a literal, or {"secretKeyRef": {"name": ..., "key": ...}} (a key of a Secret
    # in each job's namespace, as the spec's env[].valueFrom)
    trainer_env: dict[str, Any] = field(
        default_factory=dict,
        metadata=_doc(
            "KUBETUNE_TRAINER_ENV",
            'JSON object of extra trainer env, e.g. {"NCCL_DEBUG": "WARN", "WANDB_API_KEY": '
            '{"secretKeyRef": {"name": "wandb", "key": "api-key"}}}',
        ),
    )
    trainer_pod_labels: dict[str, str] = field(
        default_factory=dict,
        metadata=_doc("KUBETUNE_TRAINER_POD_LABELS", "JSON object of extra trainer pod labels"),
    )
    trainer_pod_annotations: dict[str, str] = field(
        default_factory=dict,
        metadata=_doc(
            "KUBETUNE_TRAINER_POD_ANNOTATIONS", "JSON object of extra trainer pod annotations"
        ),
    )
    trainer_extended_resources: dict[str, int] = field(
        default_factory=dict,
        metadata=_doc(
            "KUBETUNE_TRAINER_EXTENDED_RESOURCES",
            'JSON object of extended resources per trainer pod, e.g. {"vpc.amazonaws.com/efa": 4}',
        ),
    )
    trainer_ephemeral_storage: str | None = field(
        default=None,
        metadata=_doc(
            "KUBETUNE_TRAINER_EPHEMERAL_STORAGE", "ephemeral-storage request per trainer pod"
        ),
    )
    trainer_workspace_size: str | None = field(
        default=None,
        metadata=_doc(
            "KUBETUNE_TRAINER_WORKSPACE_SIZE", "sizeLimit of the trainer's /workspace emptyDir"
        ),
    )
    trainer_model_cache_claim: str | None = field(
        default=None,
        metadata=_doc(
            "KUBETUNE_TRAINER_MODEL_CACHE_CLAIM",
            "PVC (in each job's namespace) caching downloaded models",
        ),
    )
    study_storage: str = field(  # an RDB URL may carry a password: not in repr
        default="sqlite:////var/lib/kubetune/optuna.db",
        repr=False,
        metadata=_doc(
            "KUBETUNE_STUDY_STORAGE", "Optuna study storage (SQLite on a volume, or any RDB URL)"
        ),
    )
    metrics_port: int = field(
        default=8080, metadata=_doc("KUBETUNE_METRICS_PORT", "Prometheus metrics port")
    )
    report_port: int = field(
        default=8081,
        metadata=_doc(
            "KUBETUNE_REPORT_PORT", "port of the report endpoint (trainer pods POST /report)"
        ),
    )
    report_url: str | None = field(
        default=None,
        metadata=_doc(
            "KUBETUNE_REPORT_URL",
            "URL trainer pods use to reach the report endpoint (a bare http://host:port gets "
            "the endpoint's path /report)",
        ),
    )
    progress_seconds: float = field(
        default=30.0,
        metadata=_doc(
            "KUBETUNE_PROGRESS_SECONDS",
            "trainer pods post live progress at most this often (status.progress is written "
            "at most once per 30 s per job)",
        ),
    )
    report_key_secret: str = field(
        default="kubetune-report-key",
        metadata=_doc(
            "KUBETUNE_REPORT_KEY_SECRET",
            "Secret in the controller's namespace (the Lease's) holding the master key that "
            "sweep report tokens are derived from; created when missing",
        ),
    )
    report_tls_cert: str | None = field(
        default=None,
        metadata=_doc(
            "KUBETUNE_REPORT_TLS_CERT", "TLS certificate file for the report endpoint (optional)"
        ),
    )
    report_tls_key: str | None = field(
        default=None,
        metadata=_doc("KUBETUNE_REPORT_TLS_KEY", "TLS key file for the report endpoint (optional)"),
    )
    leader_election: bool = field(
        default=True,
        metadata=_doc("KUBETUNE_LEADER_ELECTION", "hold a Lease so one replica is active"),
    )
    lease_name: str = field(
        default="kubetune-controller", metadata=_doc("KUBETUNE_LEASE_NAME", "name of the Lease")
    )
    lease_namespace: str = field(
        default="",
        metadata=_doc(
            "KUBETUNE_LEASE_NAMESPACE",
            "namespace of the Lease; empty: the pod's namespace (POD_NAMESPACE) in a "
            "cluster, the kubeconfig context's namespace outside",
        ),
    )
    identity: str = field(
        default_factory=socket.gethostname,
        metadata=_doc("POD_NAME", "this replica's identity in the Lease"),
    )
    lease_duration_seconds: float = field(
        default=15.0,
        metadata=_doc(
            "KUBETUNE_LEASE_DURATION_SECONDS",
            "a standby takes over once it has seen the Lease unchanged this long (on its own "
            "clock)",
        ),
    )
    renew_deadline_seconds: float = field(
        default=10.0,
        metadata=_doc(
            "KUBETUNE_RENEW_DEADLINE_SECONDS",
            "the leader exits when it has not renewed the Lease for this long (shorter than "
            "the lease duration)",
        ),
    )
    retry_period_seconds: float = field(
        default=2.0,
        metadata=_doc(
            "KUBETUNE_RETRY_PERIOD_SECONDS",
            "seconds between Lease renewals, and between a standby's looks at the Lease",
        ),
    )
    resync_seconds: float = field(
        default=60.0,
        metadata=_doc(
            "KUBETUNE_RESYNC_SECONDS",
            "seconds between looks at an unchanged object (read from the watch caches)",
        ),
    )
    study_gc_seconds: float = field(
        default=3600.0,
        metadata=_doc(
            "KUBETUNE_STUDY_GC_SECONDS",
            "seconds between collections of studies whose FineTuneSweep no longer exists "
            "(one also runs at start)",
        ),
    )
    workers: int = field(
        default=16, metadata=_doc("KUBETUNE_WORKERS", "reconcile workers (keys in parallel)")
    )
    failed_attempts_kept: int = field(
        default=3,
        metadata=_doc(
            "KUBETUNE_FAILED_ATTEMPTS_KEPT",
            "Jobs (and so pods and logs) of this many failed attempts kept per job, newest "
            "first; older ones are deleted (0: deleted on restart)",
        ),
    )
    failed_attempt_ttl_seconds: int = field(
        default=86400,
        metadata=_doc(
            "KUBETUNE_FAILED_ATTEMPT_TTL_SECONDS",
            "ttlSecondsAfterFinished set on a failed attempt's Job when the next attempt "
            "starts (0: none; kept until the job is deleted)",
        ),
    )
    api_qps: float = field(
        default=200.0,
        metadata=_doc("KUBETUNE_API_QPS", "client-side rate limit: API requests per second"),
    )
    api_burst: int = field(
        default=400, metadata=_doc("KUBETUNE_API_BURST", "client-side rate limit: burst")
    )

    def __post_init__(self) -> None:
        """Trainer pod defaults obey the rules of the spec fields they stand in for."""
        if self.report_url:
            object.__setattr__(self, "report_url", report_endpoint(self.report_url))  # frozen
        for name in ("failed_attempts_kept", "failed_attempt_ttl_seconds"):
            if getattr(self, name) < 0:
                env = next(f.metadata["env"] for f in fields(self) if f.name == name)
                raise ValueError(f"{env} must be 0 or more, not {getattr(self, name)}")
        if self.leader_election:
            try:
                check_durations(
                    self.lease_duration_seconds,
                    self.renew_deadline_seconds,
                    self.retry_period_seconds,
                )
            except ValueError as exc:
                raise ValueError(
                    f"KUBETUNE_LEASE_DURATION_SECONDS, KUBETUNE_RENEW_DEADLINE_SECONDS, "
                    f"KUBETUNE_RETRY_PERIOD_SECONDS: {exc}"
                ) from None
        check_name(self.trainer_service_account, "KUBETUNE_TRAINER_SERVICE_ACCOUNT",
                   "ServiceAccount")
        check_name(self.trainer_priority_class, "KUBETUNE_TRAINER_PRIORITY_CLASS",
                   "PriorityClass")
        for secret in self.trainer_image_pull_secrets:
            check_name(secret, "KUBETUNE_TRAINER_IMAGE_PULL_SECRETS", "Secret")
        check_name(self.trainer_model_cache_claim, "KUBETUNE_TRAINER_MODEL_CACHE_CLAIM",
                   "PersistentVolumeClaim")
        check_env_names(self.trainer_env, "KUBETUNE_TRAINER_ENV")
        for name, value in self.trainer_env.items():
            _env_default(name, value)
        check_labels(self.trainer_pod_labels, "KUBETUNE_TRAINER_POD_LABELS")
        check_annotations(self.trainer_pod_annotations, "KUBETUNE_TRAINER_POD_ANNOTATIONS")
        check_extended_resources(self.trainer_extended_resources, None,
                                 "KUBETUNE_TRAINER_EXTENDED_RESOURCES")
        for name in ("trainer_ephemeral_storage", "trainer_workspace_size"):
            value = getattr(self, name)
            if value is not None and not re.match(QUANTITY, value):
                env = next(f.metadata["env"] for f in fields(self) if f.name == name)
                raise ValueError(f"{env} must be a Kubernetes quantity such as 100Gi, "
                                 f"not {value!r}")

    def render_defaults(self) -> RenderDefaults:
        """What render fills into specs that leave these out."""
        return RenderDefaults(
            image=self.trainer_image,
            storage_endpoint=self.s3_endpoint,
            credentials_secret=self.s3_credentials_secret,
            region=self.s3_region,
            service_account=self.trainer_service_account,
            priority_class=self.trainer_priority_class,
            image_pull_secrets=tuple(self.trainer_image_pull_secrets),
            env={k: _env_default(k, v) for k, v in self.trainer_env.items()},
            pod_labels=dict(self.trainer_pod_labels),
            pod_annotations=dict(self.trainer_pod_annotations),
            extended_resources=dict(self.trainer_extended_resources),
            ephemeral_storage=self.trainer_ephemeral_storage,
            workspace_size=self.trainer_workspace_size,
            model_cache_claim=self.trainer_model_cache_claim,
        )

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> ControllerSettings:
        e = dict(os.environ if env is None else env)
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = e.get(f.metadata["env"])
            if f.name == "lease_namespace" and not raw:
                raw = e.get("POD_NAMESPACE")
            if raw is None or (raw == "" and f.name != "namespaces"):
                continue
            values[f.name] = _parse(f.type, raw, f.metadata["env"])
        return cls(**values)

    @classmethod
    def describe(cls) -> str:
        """One line per setting: environment variable, default, meaning (for --help)."""
        base = cls()
        lines = []
        for f in fields(cls):
            default = getattr(base, f.name)
            if f.name == "identity":
                default = "the host name"
            shown = ",".join(default) if isinstance(default, list) else default
            if isinstance(default, dict):
                shown = json.dumps(default) if default else None
            lines.append(
                f"  {f.metadata['env']:<36} {f.metadata['help']} "
                f"(default: {shown if shown not in (None, '') else 'unset'})"
            )
        return "\n".join(lines)


def _env_default(name: str, value: Any) -> str | SecretKeySelector:
    """One KUBETUNE_TRAINER_ENV value: a literal or {"secretKeyRef": {"name", "key"}}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and set(value) == {"secretKeyRef"}:
        try:
            return EnvVarSource.model_validate(value).secret_key_ref
        except ValidationError as exc:
            raise ValueError(
                f"KUBETUNE_TRAINER_ENV {name}: {format_errors(exc)}"
            ) from None
    raise ValueError(
        f"KUBETUNE_TRAINER_ENV {name} must be a string or "
        '{"secretKeyRef": {"name": "<Secret>", "key": "<key>"}}'
    )


def _parse(type_: Any, raw: str, env: str = "") -> Any:
    t = str(type_)
    if t.startswith("list"):
        return _list(raw)
    if t.startswith("dict"):
        if not raw.strip():
            return {}
        try:
            value = json.loads(raw)
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise ValueError(f"{env} must be a JSON object, e.g. {{\"KEY\": \"value\"}}")
        return value
    if t == "bool":
        return _bool(raw)
    if t == "int":
        return int(raw)
    if t == "float":
        return float(raw)
    return raw
