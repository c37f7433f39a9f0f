"""Controller-provided defaults that render fills into specs that leave them out."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_IMAGE = "ghcr.io/kubetune/trainer:0.1.0"


@dataclass(frozen=True)
class RenderDefaults:
    image: str = DEFAULT_IMAGE
    storage_endpoint: str | None = None
    credentials_secret: str | None = None
    region: str | None = None
    image_pull_policy: str | None = None  # None: Kubernetes' default for the tag
    service_account: str | None = None  # None: the namespace's default ServiceAccount
    priority_class: str | None = None
    # the non-root user the trainer image runs as (see trainer_image/Dockerfile)
    run_as_user: int = 1000
    termination_grace_seconds: int = 60
