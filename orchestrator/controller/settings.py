"""Controller settings, read once from the environment (the Helm chart sets them)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field


def _list(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


@dataclass(frozen=True)
class ControllerSettings:
    # Namespaces to watch; empty means the whole cluster.
    namespaces: list[str] = field(default_factory=list)
    trainer_image: str = "ghcr.io/kubetune/trainer:0.1.0"
    # Defaults for FineTuneJobs that leave `spec.storage` out.
    s3_endpoint: str | None = None
    s3_credentials_secret: str | None = None
    s3_region: str | None = None
    # Optuna study storage: SQLite on a volume by default, any RDB URL in production.
    study_storage: str = "sqlite:////var/lib/kubetune/optuna.db"
    metrics_port: int = 8080
    # Where trial pods report intermediate values (pruning).
    report_port: int = 8081
    report_url: str | None = None
    leader_election: bool = True
    lease_name: str = "kubetune-controller"
    lease_namespace: str = "kubetune-system"
    identity: str = field(default_factory=socket.gethostname)
    # Seconds between status polls of running children (watch events do most of the work).
    resync_seconds: float = 10.0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> ControllerSettings:
        e = dict(os.environ if env is None else env)
        base = cls()
        return cls(
            namespaces=_list(e.get("KUBETUNE_NAMESPACES")),
            trainer_image=e.get("KUBETUNE_TRAINER_IMAGE", base.trainer_image),
            s3_endpoint=e.get("KUBETUNE_S3_ENDPOINT") or None,
            s3_credentials_secret=e.get("KUBETUNE_S3_CREDENTIALS_SECRET") or None,
            s3_region=e.get("KUBETUNE_S3_REGION") or None,
            study_storage=e.get("KUBETUNE_STUDY_STORAGE", base.study_storage),
            metrics_port=int(e.get("KUBETUNE_METRICS_PORT", base.metrics_port)),
            report_port=int(e.get("KUBETUNE_REPORT_PORT", base.report_port)),
            report_url=e.get("KUBETUNE_REPORT_URL") or None,
            leader_election=e.get("KUBETUNE_LEADER_ELECTION", "true").lower() != "false",
            lease_name=e.get("KUBETUNE_LEASE_NAME", base.lease_name),
            lease_namespace=e.get(
                "KUBETUNE_LEASE_NAMESPACE", e.get("POD_NAMESPACE", base.lease_namespace)
            ),
            identity=e.get("POD_NAME", base.identity),
            resync_seconds=float(e.get("KUBETUNE_RESYNC_SECONDS", base.resync_seconds)),
        )
