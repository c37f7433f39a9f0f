"""Controller settings, read once from the environment (the Helm chart sets them).

Each setting is declared once, with its environment variable and a one-line description:
`python -m orchestrator.controller --help` prints this table.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field, fields
from typing import Any


def _list(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def _bool(value: str) -> bool:
    return value.strip().lower() not in ("false", "0", "no", "off")


def _doc(env: str, help: str) -> dict[str, str]:
    return {"env": env, "help": help}


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
    study_storage: str = field(
        default="sqlite:////var/lib/kubetune/optuna.db",
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
        metadata=_doc("KUBETUNE_REPORT_URL", "URL trainer pods use to reach the report endpoint"),
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
    resync_seconds: float = field(
        default=60.0,
        metadata=_doc(
            "KUBETUNE_RESYNC_SECONDS",
            "seconds between looks at an unchanged object (read from the watch caches)",
        ),
    )
    workers: int = field(
        default=16, metadata=_doc("KUBETUNE_WORKERS", "reconcile workers (keys in parallel)")
    )
    api_qps: float = field(
        default=200.0,
        metadata=_doc("KUBETUNE_API_QPS", "client-side rate limit: API requests per second"),
    )
    api_burst: int = field(
        default=400, metadata=_doc("KUBETUNE_API_BURST", "client-side rate limit: burst")
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
            values[f.name] = _parse(f.type, raw)
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
            lines.append(
                f"  {f.metadata['env']:<32} {f.metadata['help']} "
                f"(default: {shown if shown not in (None, '') else 'unset'})"
            )
        return "\n".join(lines)


def _parse(type_: Any, raw: str) -> Any:
    t = str(type_)
    if t.startswith("list"):
        return _list(raw)
    if t == "bool":
        return _bool(raw)
    if t == "int":
        return int(raw)
    if t == "float":
        return float(raw)
    return raw
