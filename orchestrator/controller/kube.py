"""Thin Kubernetes access for the reconcilers: create-or-get, status patches, events.

Everything here is idempotent: `create` tolerates AlreadyExists (a restarted controller
re-creating a child it made before its crash finds the existing one), deletes tolerate
NotFound. Bodies are plain dicts as rendered by `orchestrator.render`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import queue
import threading
import time
import uuid
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from orchestrator.api.base import GROUP, VERSION

log = logging.getLogger("kubetune.kube")

FTJ_PLURAL = "finetunejobs"
FTS_PLURAL = "finetunesweeps"


class Kube:
    def __init__(self, api: client.ApiClient, secret_ttl: float = 30.0) -> None:
        self.api = api
        # Any: the generated client accepts plain dict bodies and raw (_preload_content=False)
        # responses, which its type hints do not describe
        self.core: Any = client.CoreV1Api(api)
        self.batch: Any = client.BatchV1Api(api)
        self.custom: Any = client.CustomObjectsApi(api)
        # Secrets rarely appear or vanish; a short cache keeps the check off the hot path.
        self._secret_ttl = secret_ttl
        self._secrets: dict[tuple[str, str], float] = {}
        # Events are posted by one background thread: never on a reconcile's critical path.
        self._events: queue.Queue[Any] = queue.Queue(maxsize=10000)
        threading.Thread(target=self._post_events, name="events", daemon=True).start()

    # --- custom resources -------------------------------------------------------------------
    def get_custom(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            resp = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, name, _preload_content=False
            )
            return dict(json.loads(resp.data))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def list_custom(
        self, plural: str, namespace: str | None = None, selector: str | None = None
    ) -> list[dict[str, Any]]:
        kwargs: dict[str, Any] = {"label_selector": selector} if selector else {}
        if namespace:
            res = self.custom.list_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, **kwargs
            )
        else:
            res = self.custom.list_cluster_custom_object(GROUP, VERSION, plural, **kwargs)
        return list(res.get("items", []))

    def create_custom(self, plural: str, body: dict[str, Any]) -> dict[str, Any]:
        ns = body["metadata"]["namespace"]
        try:
            return dict(
                self.custom.create_namespaced_custom_object(GROUP, VERSION, ns, plural, body)
            )
        except ApiException as exc:
            if exc.status != 409:
                raise
            got = self.get_custom(plural, ns, body["metadata"]["name"])
            assert got is not None
            return got

    def delete_custom(self, plural: str, namespace: str, name: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object(
                GROUP,
                VERSION,
                namespace,
                plural,
                name,
                body=client.V1DeleteOptions(propagation_policy="Background"),
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    def patch_status(self, plural: str, namespace: str, name: str, status: dict[str, Any]) -> None:
        try:
            self.custom.patch_namespaced_custom_object_status(
                GROUP,
                VERSION,
                namespace,
                plural,
                name,
                {"status": status},
                _content_type="application/merge-patch+json",
            )
        except ApiException as exc:
            if exc.status != 404:  # deleted meanwhile: nothing to report on
                raise

    # --- core and batch children ------------------------------------------------------------
    def create(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """Creates a ConfigMap, Service or Job; returns None when it already existed."""
        kind, ns = body["kind"], body["metadata"]["namespace"]
        try:
            if kind == "ConfigMap":
                self.core.create_namespaced_config_map(ns, body)
            elif kind == "Service":
                self.core.create_namespaced_service(ns, body)
            elif kind == "Job":
                self.batch.create_namespaced_job(ns, body)
            elif kind == "Secret":
                self.core.create_namespaced_secret(ns, body)
            else:
                raise ValueError(f"unsupported child kind {kind}")
        except ApiException as exc:
            if exc.status == 409:
                return None
            raise
        return body

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            # raw JSON: skips the client's (slow) model deserialisation
            resp = self.batch.read_namespaced_job(name, namespace, _preload_content=False)
            return dict(json.loads(resp.data))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def patch_job(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        self.batch.patch_namespaced_job(name, namespace, patch)

    def delete_job(self, namespace: str, name: str) -> None:
        try:
            self.batch.delete_namespaced_job(
                name, namespace, body=client.V1DeleteOptions(propagation_policy="Background")
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    def delete_configmap(self, namespace: str, name: str) -> None:
        try:
            self.core.delete_namespaced_config_map(name, namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        resp = self.core.list_namespaced_pod(
            namespace, label_selector=selector, _preload_content=False
        )
        return list(json.loads(resp.data).get("items", []))

    def secret_exists(self, namespace: str, name: str) -> bool:
        """Only presence is checked (a positive answer is cached briefly)."""
        key = (namespace, name)
        if time.monotonic() - self._secrets.get(key, -1e9) < self._secret_ttl:
            return True
        try:
            self.core.read_namespaced_secret(name, namespace, _preload_content=False)
        except ApiException as exc:
            if exc.status == 404:
                self._secrets.pop(key, None)
                return False
            raise
        self._secrets[key] = time.monotonic()
        return True

    def get_secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        try:
            sec = self.core.read_namespaced_secret(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return dict(sec.data or {})

    # --- events -----------------------------------------------------------------------------
    def event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """A core/v1 Event on `obj`, shown by `kubectl describe`. Never fails the caller."""
        meta = obj["metadata"]
        now = dt.datetime.now(dt.UTC)
        ev = client.CoreV1Event(
            metadata=client.V1ObjectMeta(
                name=f"{meta['name']}.{uuid.uuid4().hex[:12]}", namespace=meta["namespace"]
            ),
            involved_object=client.V1ObjectReference(
                api_version=obj.get("apiVersion"),
                kind=obj.get("kind"),
                name=meta["name"],
                namespace=meta["namespace"],
                uid=meta.get("uid"),
                resource_version=meta.get("resourceVersion"),
            ),
            reason=reason,
            message=message[:1024],
            type=type_,
            count=1,
            first_timestamp=now,
            last_timestamp=now,
            source=client.V1EventSource(component="kubetune-controller"),
            reporting_component="kubetune.io/controller",
            reporting_instance="kubetune-controller",
        )
        try:
            self._events.put_nowait(ev)
        except queue.Full:
            log.warning("event queue full; dropped %s on %s", reason, meta["name"])

    def _post_events(self) -> None:
        while True:
            ev = self._events.get()
            try:
                self.core.create_namespaced_event(ev.metadata.namespace, ev)
            except Exception as exc:
                log.warning(
                    "cannot post event %s on %s: %s", ev.reason, ev.involved_object.name, exc
                )
