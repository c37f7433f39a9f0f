"""Deterministic child names, labels and owner references.

Naming (all derived from the FineTuneJob name, so a controller restart finds the same
objects instead of creating duplicates):

- ConfigMap  `<job>-a<attempt>-config`  one per attempt (the config carries the attempt number)
- Job        `<job>-a<attempt>`         one per attempt; a gang restart is a new Job
- Service    `<job>-workers`            one per FineTuneJob, headless, shared by all attempts
- pods       `<job>-a<attempt>-<index>` host names given by the Indexed Job, resolvable as
             `<job>-a<attempt>-<index>.<job>-workers`

The CRD limits FineTuneJob names to 52 characters and backoffLimit to 20 (attempts <= 21)
and nodes to 256, so every host name stays within the 63-character DNS label limit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

from orchestrator.api import labels as L
from orchestrator.api.base import API_VERSION

RENDEZVOUS_PORT = 29500


class JobMeta(TypedDict, total=False):
    """The FineTuneJob's metadata as render needs it (a plain dict keeps render pure)."""

    name: str  # required
    namespace: str  # required
    uid: str  # required for ownerReferences
    labels: dict[str, str]  # kubetune.io/sweep and kubetune.io/trial are propagated


@dataclass(frozen=True)
class ChildNames:
    job: str
    configmap: str
    service: str

    def pod_host(self, index: int) -> str:
        """DNS name of pod `index` (relative to the namespace)."""
        return f"{self.job}-{index}.{self.service}"

    @property
    def master_addr(self) -> str:
        """torchrun rendezvous host: pod 0 through the headless Service."""
        return self.pod_host(0)


def child_names(job_name: str, attempt: int) -> ChildNames:
    if attempt < 1:
        raise ValueError(f"attempt numbers start at 1, not {attempt}")
    return ChildNames(
        job=f"{job_name}-a{attempt}",
        configmap=f"{job_name}-a{attempt}-config",
        service=service_name(job_name),
    )


def service_name(job_name: str) -> str:
    return f"{job_name}-workers"


def sweep_labels(job_meta: Mapping[str, Any]) -> dict[str, str]:
    """kubetune.io/sweep and kubetune.io/trial, when the FineTuneJob is a sweep trial."""
    meta_labels = job_meta.get("labels") or {}
    return {k: str(meta_labels[k]) for k in (L.LABEL_SWEEP, L.LABEL_TRIAL) if k in meta_labels}


def child_labels(
    job_meta: Mapping[str, Any], component: str, attempt: int | None = None
) -> dict[str, str]:
    """Labels on every child object (and the pods)."""
    out = {
        L.LABEL_NAME: L.APP_NAME,
        L.LABEL_INSTANCE: str(job_meta["name"]),
        L.LABEL_COMPONENT: component,
        L.LABEL_MANAGED_BY: L.MANAGED_BY,
        L.LABEL_JOB: str(job_meta["name"]),
    }
    if attempt is not None:
        out[L.LABEL_ATTEMPT] = str(attempt)
    out.update(sweep_labels(job_meta))
    return out


def selector_labels(job_name: str) -> dict[str, str]:
    """What the headless Service selects: every trainer pod of this FineTuneJob."""
    return {L.LABEL_JOB: job_name, L.LABEL_COMPONENT: L.COMPONENT_TRAINER}


def owner_reference(job_meta: Mapping[str, Any], kind: str = "FineTuneJob") -> dict[str, Any]:
    """Controller owner reference: deleting the FineTuneJob garbage-collects its children.

    blockOwnerDeletion needs the controller to be allowed to update
    `finetunejobs/finalizers` (OwnerReferencesPermissionEnforcement)."""
    return {
        "apiVersion": API_VERSION,
        "kind": kind,
        "name": str(job_meta["name"]),
        "uid": str(job_meta.get("uid", "")),
        "controller": True,
        "blockOwnerDeletion": True,
    }


def object_meta(
    job_meta: Mapping[str, Any],
    name: str,
    component: str,
    attempt: int | None = None,
    extra_labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": str(job_meta["namespace"]),
        "labels": {**child_labels(job_meta, component, attempt), **(extra_labels or {})},
    }
    if annotations:
        meta["annotations"] = dict(annotations)
    meta["ownerReferences"] = [owner_reference(job_meta)]
    return meta
