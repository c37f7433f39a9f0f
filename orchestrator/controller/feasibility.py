"""Budget feasibility before a trial costs GPU time.

A sweep over (rank, trainableParamPercent, ...) can propose combinations the budget solver
cannot reach for this base model (e.g. rank 64 at 0.1 % on a small model). The controller
reads the model's `config.json` from object storage (with the job's own credentials
Secret), derives the module shapes without torch (orchestrator.api.architectures), runs the
same deterministic solver as the trainer, and tells such trials FAIL instead of launching
them. Models it cannot read (pvc://, hf://, unknown architectures) are left to the trainer,
which fails fast with InvalidConfig.

The controller is the most privileged pod of the cluster, so it reads only from the object
store the platform configured (the chart's objectStorage.endpoint): a spec that names its
own `storage.endpoint` (unless the operator listed it in KUBETUNE_BUDGET_CHECK_ENDPOINTS)
is left to the trainer, never fetched by the controller (no request
to a user-chosen address). The credentials Secret is one the creator may read themselves
(the chart's admission policy checks it).
"""

from __future__ import annotations

import base64
import logging
import time

from orchestrator.api import FineTuneJobSpec
from orchestrator.api.architectures import shape_at
from orchestrator.api.budget import ModelShape, unreachable_budget
from orchestrator.controller.bounded import BoundedMap
from orchestrator.controller.kube import Kube

log = logging.getLogger("kubetune.feasibility")
RETRY_UNREADABLE_SECONDS = 300.0


class BudgetChecker:
    def __init__(
        self,
        kube: Kube,
        default_secret: str | None = None,
        default_endpoint: str | None = None,
        trusted_endpoints: list[str] | None = None,
    ) -> None:
        self.kube = kube
        self.default_secret = default_secret
        self.default_endpoint = default_endpoint
        # the platform's stores: the default endpoint and any the operator added
        self.trusted = {default_endpoint, *(trusted_endpoints or [])}
        # bounded: the keys are users' model URIs
        self._shapes: BoundedMap[tuple[str, str], tuple[float, ModelShape | None]] = BoundedMap(
            1024
        )

    def shape(self, namespace: str, spec: FineTuneJobSpec) -> ModelShape | None:
        uri = spec.model.uri.rstrip("/")
        key = (namespace, uri)
        cached = self._shapes.get(key)
        if cached and (
            cached[1] is not None or time.monotonic() - cached[0] < RETRY_UNREADABLE_SECONDS
        ):
            return cached[1]
        shape = self._read_shape(namespace, spec, uri)
        self._shapes[key] = (time.monotonic(), shape)
        return shape

    def _read_shape(self, namespace: str, spec: FineTuneJobSpec, uri: str) -> ModelShape | None:
        from orchestrator import storage

        if not uri.startswith("s3://"):
            return None  # never a file of the controller's own filesystem (file://)
        endpoint = spec.storage.endpoint or self.default_endpoint
        if endpoint not in self.trusted:
            log.info("budget pre-check skipped for %s: spec.storage.endpoint %s is not the "
                     "platform's object store; the trainer checks it", uri, endpoint)
            return None
        secret = spec.storage.credentials_secret or self.default_secret
        data = self.kube.get_secret_data(namespace, secret) if secret else None
        if secret and data is None:
            return None
        creds = {k: base64.b64decode(v).decode() for k, v in (data or {}).items()}
        config = storage.S3Config(
            endpoint_url=endpoint,
            region=spec.storage.region,
            access_key_id=creds.get("AWS_ACCESS_KEY_ID"),
            secret_access_key=creds.get("AWS_SECRET_ACCESS_KEY"),
            max_attempts=2,
            connect_timeout=3.0,
            read_timeout=10.0,
        )
        return shape_at(uri, lambda u: storage.read_text(u, s3=config, progress=False))

    def infeasible(self, namespace: str, spec: FineTuneJobSpec) -> str | None:
        """Why this spec's parameter budget cannot be met, or None when it can (or is unknown)."""
        if spec.method.trainable_param_percent is None:
            return None
        shape = self.shape(namespace, spec)
        return None if shape is None else unreachable_budget(shape, spec.method, spec.model.uri)
