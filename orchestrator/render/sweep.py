"""Pure builders for a FineTuneSweep's objects: each trial FineTuneJob (owned by the sweep:
deleting it deletes them), and the controller's report master key Secret.

The sweep reconciler decides *what* to create; these functions say what it looks like, so
every object body and owner reference of kubetune is built in `orchestrator.render`.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

from orchestrator.api import labels as L
from orchestrator.api.base import API_VERSION
from orchestrator.render.names import owner_reference

SWEEP_KIND = "FineTuneSweep"


def _sweep_labels(sweep_meta: Mapping[str, Any], trial: int | None = None) -> dict[str, str]:
    out = {
        L.LABEL_NAME: L.APP_NAME,
        L.LABEL_MANAGED_BY: L.MANAGED_BY,
        L.LABEL_SWEEP: str(sweep_meta["name"]),
    }
    if trial is not None:
        out[L.LABEL_TRIAL] = str(trial)
    return out


def render_report_master_secret(namespace: str, name: str, key: str) -> dict[str, Any]:
    """The controller's master key for trial report tokens, in the controller's own
    namespace: every sweep's key is derived from it (`derive_sweep_key`), so no Secret is
    written to a sweep's namespace. Not owned by anything: it outlives controller upgrades."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {L.LABEL_NAME: L.APP_NAME, L.LABEL_MANAGED_BY: L.MANAGED_BY},
        },
        "data": {"key": base64.b64encode(key.encode()).decode()},
    }


def render_trial(
    sweep_meta: Mapping[str, Any],
    job: str,
    trial: int,
    params: Mapping[str, Any],
    spec: Mapping[str, Any],
) -> dict[str, Any]:
    """Trial `trial` as a FineTuneJob: the template with the trial's parameters applied."""
    return {
        "apiVersion": API_VERSION,
        "kind": "FineTuneJob",
        "metadata": {
            "name": job,
            "namespace": str(sweep_meta["namespace"]),
            "labels": {
                **_sweep_labels(sweep_meta, trial),
                L.LABEL_COMPONENT: L.COMPONENT_TRIAL,
            },
            "annotations": {
                L.ANNOTATION_TRIAL_PARAMETERS: json.dumps(dict(params), sort_keys=True)
            },
            "ownerReferences": [owner_reference(sweep_meta, kind=SWEEP_KIND)],
        },
        "spec": dict(spec),
    }
