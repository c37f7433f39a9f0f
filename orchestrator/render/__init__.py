"""Pure builders: FineTuneJob spec -> Kubernetes objects (plain dicts) and trainer config.

Nothing here talks to the API server; the controller creates what these functions return.
"""

from __future__ import annotations

from orchestrator.render.children import (
    CONTAINER_NAME,
    SecretRef,
    config_hash,
    render_all,
    render_configmap,
    render_job,
    render_service,
    render_trainer_config,
    resolve_spec,
    secret_refs,
    torchrun_command,
)
from orchestrator.render.deepspeed import (
    deep_merge,
    generated_deepspeed_config,
    render_deepspeed_config,
)
from orchestrator.render.defaults import DEFAULT_IMAGE, RenderDefaults
from orchestrator.render.names import (
    RENDEZVOUS_PORT,
    ChildNames,
    JobMeta,
    child_labels,
    child_names,
    owner_reference,
    selector_labels,
    service_name,
)

__all__ = [
    "CONTAINER_NAME",
    "DEFAULT_IMAGE",
    "RENDEZVOUS_PORT",
    "ChildNames",
    "JobMeta",
    "RenderDefaults",
    "SecretRef",
    "child_labels",
    "child_names",
    "config_hash",
    "deep_merge",
    "generated_deepspeed_config",
    "owner_reference",
    "render_all",
    "render_configmap",
    "render_deepspeed_config",
    "render_job",
    "render_service",
    "render_trainer_config",
    "resolve_spec",
    "secret_refs",
    "selector_labels",
    "service_name",
    "torchrun_command",
]
