"""Controller-provided defaults that render fills into specs that leave them out.

Scalars (image, service account, priority class, ephemeral storage, workspace size, model
cache claim) apply only where the spec has none; env, pod labels, pod annotations and
extended resources are merged with the spec's, the spec winning per key; image pull secrets
are the union of both. The controller validates them at startup with the same rules as the
spec (orchestrator/controller/settings.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from orchestrator.api.pod import SecretKeySelector

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
    image_pull_secrets: tuple[str, ...] = ()
    # a literal, or a key of a Secret in each job's namespace (checked like the spec's)
    env: Mapping[str, str | SecretKeySelector] = field(default_factory=dict)
    pod_labels: Mapping[str, str] = field(default_factory=dict)
    pod_annotations: Mapping[str, str] = field(default_factory=dict)
    extended_resources: Mapping[str, int] = field(default_factory=dict)
    ephemeral_storage: str | None = None
    workspace_size: str | None = None
    model_cache_claim: str | None = None
    # the non-root user the trainer image runs as (see trainer_image/Dockerfile)
    run_as_user: int = 1000
    termination_grace_seconds: int = 60
