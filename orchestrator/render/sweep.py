"""Pure builders for a FineTuneSweep's objects: its report-key Secret, each trial's token
Secret and each trial FineTuneJob. All are owned by the sweep (deleting it deletes them).

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
KEY_SECRET_SUFFIX = "-report-key"
TOKEN_SECRET_SUFFIX = "-report-token"


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _sweep_labels(sweep_meta: Mapping[str, Any], trial: int | None = None) -> dict[str, str]:
    out = {
        L.LABEL_NAME: L.APP_NAME,
        L.LABEL_MANAGED_BY: L.MANAGED_BY,
        L.LABEL_SWEEP: str(sweep_meta["name"]),
    }
    if trial is not None:
        out[L.LABEL_TRIAL] = str(trial)
    return out


def key_secret_name(sweep: str) -> str:
    return sweep + KEY_SECRET_SUFFIX


def token_secret_name(job: str) -> str:
    return job + TOKEN_SECRET_SUFFIX


def render_key_secret(sweep_meta: Mapping[str, Any], key: str) -> dict[str, Any]:
    """The sweep's HMAC key for trial report tokens (survives controller restarts)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": key_secret_name(str(sweep_meta["name"])),
            "namespace": str(sweep_meta["namespace"]),
            "labels": _sweep_labels(sweep_meta),
            "ownerReferences": [owner_reference(sweep_meta, kind=SWEEP_KIND)],
        },
        "data": {"key": _b64(key)},
    }


def render_token_secret(
    sweep_meta: Mapping[str, Any], job: str, trial: int, token: str
) -> dict[str, Any]:
    """A trial's report token, mounted into its pods (`sweep.tokenEnv`)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": token_secret_name(job),
            "namespace": str(sweep_meta["namespace"]),
            "labels": _sweep_labels(sweep_meta, trial),
            "ownerReferences": [owner_reference(sweep_meta, kind=SWEEP_KIND)],
        },
        "data": {"token": _b64(token)},
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
