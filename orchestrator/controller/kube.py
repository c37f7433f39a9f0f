"""Thin Kubernetes access for the reconcilers: create-or-get, status patches, events.

Everything here is idempotent: `create` tolerates AlreadyExists (a restarted controller
re-creating a child it made before its crash finds the existing one), deletes tolerate
NotFound. AlreadyExists is tolerated only for an object the controller owns: the existing
object's controller ownerReference must carry the uid the rendered body names, else
`ownership.NameConflict` (someone else's object) or `ownership.PreviousOwner` (the child of
an earlier parent with the same name, not yet garbage-collected) is raised. Bodies are
plain dicts as rendered by `orchestrator.render`; answers are parsed from raw JSON (the
generated client's model deserialisation costs more CPU than the call).

Every call goes through `_call`: a client-side token bucket (qps/burst, as client-go's
rate limiter), a request timeout, and retries of 429 Too Many Requests after the server's
Retry-After (API priority and fairness answers 429 when the controller's share is used up).
A mutating call (create, patch, replace, delete) first passes the `fence` — with leader
election, `LeaseLock.check`, which ends the process when this replica may no longer lead
(e.g. resumed after a pause), so a stale leader never writes.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from orchestrator.api.base import GROUP, VERSION
from orchestrator.controller import metrics
from orchestrator.controller.bounded import BoundedMap
from orchestrator.controller.ownership import check, expected_owner

log = logging.getLogger("kubetune.kube")

FTJ_PLURAL = "finetunejobs"
FTS_PLURAL = "finetunesweeps"
# Every other verb (create, patch, replace, delete, or one not known) passes the fence.
READ_VERBS = frozenset({"read", "get", "list", "watch"})
# Accept header for a metadata-only GET (the API server answers PartialObjectMetadata)
METADATA_ONLY = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"


class RateLimiter:
    """Token bucket: `qps` requests per second on average, bursts of up to `burst`."""

    def __init__(self, qps: float, burst: int) -> None:
        self.qps, self.burst = qps, burst
        self._tokens = float(burst)
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def wait(self) -> None:
        if self.qps <= 0:
            return
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.qps)
            self._last = now
            self._tokens -= 1
            delay = -self._tokens / self.qps if self._tokens < 0 else 0.0
        if delay > 0:
            time.sleep(delay)


class Rejected(Exception):
    """The API server refused a child object as invalid (400/422): retrying cannot help."""

    def __init__(self, kind: str, name: str, message: str) -> None:
        super().__init__(f"the API server refused {kind} {name}: {message}")
        self.kind, self.name, self.message = kind, name, message


def _server_message(exc: ApiException) -> str:
    try:
        return str(json.loads(exc.body or "{}").get("message") or exc.reason)
    except (ValueError, AttributeError):
        return str(exc.reason)


class Kube:
    def __init__(
        self,
        api: client.ApiClient,
        secret_ttl: float = 30.0,
        qps: float = 200.0,
        burst: int = 400,
        timeout: float = 30.0,
        max_retries: int = 5,
        events_qps: float = 10.0,
        fence: Callable[[], None] | None = None,
    ) -> None:
        self.api = api
        self.fence = fence  # called before every write; see the module docstring
        self.events_qps = events_qps
        self.limiter = RateLimiter(qps, burst)
        self.timeout = timeout
        self.max_retries = max_retries
        self.requests = 0  # API calls made (for tests and the bench)
        # Any: the generated client accepts plain dict bodies and raw (_preload_content=False)
        # responses, which its type hints do not describe
        self.core: Any = client.CoreV1Api(api)
        self.batch: Any = client.BatchV1Api(api)
        self.custom: Any = client.CustomObjectsApi(api)
        # Secrets rarely appear or vanish; a short cache keeps the check off the hot path.
        self._secret_ttl = secret_ttl
        self._secrets: BoundedMap[tuple[str, str], float] = BoundedMap(4096)  # users' names
        # Events are posted by one background thread: never on a reconcile's critical path.
        self._events: queue.Queue[Any] = queue.Queue(maxsize=10000)
        threading.Thread(target=self._post_events, name="events", daemon=True).start()

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("_request_timeout", self.timeout)
        verb = _verb(fn)
        for attempt in range(self.max_retries + 1):
            self.limiter.wait()
            if self.fence is not None and verb not in READ_VERBS:
                self.fence()  # after the limiter's (and 429's) waits: right before sending
            self.requests += 1
            metrics.API_REQUESTS.labels(verb).inc()
            try:
                return fn(*args, **kwargs)
            except ApiException as exc:
                if exc.status != 429 or attempt == self.max_retries:
                    raise
                delay = _retry_after(exc, attempt)
                log.info("API server answered 429; retrying in %.1fs", delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    # --- custom resources -------------------------------------------------------------------
    def get_custom(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            resp = self._call(
                self.custom.get_namespaced_custom_object,
                GROUP,
                VERSION,
                namespace,
                plural,
                name,
                _preload_content=False,
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
            res = self._call(
                self.custom.list_namespaced_custom_object,
                GROUP,
                VERSION,
                namespace,
                plural,
                **kwargs,
            )
        else:
            res = self._call(
                self.custom.list_cluster_custom_object, GROUP, VERSION, plural, **kwargs
            )
        return list(res.get("items", []))

    def create_custom(self, plural: str, body: dict[str, Any]) -> dict[str, Any]:
        ns = body["metadata"]["namespace"]
        try:
            resp = self._call(
                self.custom.create_namespaced_custom_object,
                GROUP,
                VERSION,
                ns,
                plural,
                body,
                _preload_content=False,
            )
            return dict(json.loads(resp.data))
        except ApiException as exc:
            if exc.status != 409:
                raise
            got = self.get_custom(plural, ns, body["metadata"]["name"])
            if got is None:  # gone between the two calls: the next reconcile creates it
                raise
            owner = expected_owner(body)
            if owner is not None:
                check(got, owner, str(body.get("kind") or plural))
            return got

    def delete_custom(self, plural: str, namespace: str, name: str) -> None:
        try:
            self._call(
                self.custom.delete_namespaced_custom_object,
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

    def patch_status(
        self, plural: str, namespace: str, name: str, status: dict[str, Any]
    ) -> dict[str, Any] | None:
        """JSON merge patch of `status` (only the fields given; None deletes one); returns
        the object as stored, or None when it is gone."""
        try:
            resp = self._call(
                self.custom.patch_namespaced_custom_object_status,
                GROUP,
                VERSION,
                namespace,
                plural,
                name,
                {"status": status},
                _content_type="application/merge-patch+json",
                _preload_content=False,
            )
            return dict(json.loads(resp.data))
        except ApiException as exc:
            if exc.status != 404:  # deleted meanwhile: nothing to report on
                raise
            return None

    # --- core and batch children ------------------------------------------------------------
    def create(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """Creates a ConfigMap, Service, Secret or Job; returns the created object (as
        stored), or None when it already existed and is ours (see `ownership.check`)."""
        kind, ns = body["kind"], body["metadata"]["namespace"]
        fns = {
            "ConfigMap": self.core.create_namespaced_config_map,
            "Service": self.core.create_namespaced_service,
            "Secret": self.core.create_namespaced_secret,
            "Job": self.batch.create_namespaced_job,
        }
        if kind not in fns:
            raise ValueError(f"unsupported child kind {kind}")
        try:
            resp = self._call(fns[kind], ns, body, _preload_content=False)
        except ApiException as exc:
            if exc.status == 409:
                owner = expected_owner(body)
                if owner is not None:
                    existing = self.get(kind, ns, body["metadata"]["name"])
                    if existing is None:  # gone between the two calls: retry the reconcile
                        raise
                    check(existing, owner, kind)
                return None
            if exc.status in (400, 422):  # no retry can make the server accept this body
                raise Rejected(kind, body["metadata"]["name"], _server_message(exc)) from exc
            raise
        return dict(json.loads(resp.data))

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """Reads a ConfigMap, Service, Secret or Job by name (None: not found)."""
        fns = {
            "ConfigMap": self.core.read_namespaced_config_map,
            "Service": self.core.read_namespaced_service,
            "Secret": self.core.read_namespaced_secret,
            "Job": self.batch.read_namespaced_job,
        }
        try:
            resp = self._call(fns[kind], name, namespace, _preload_content=False)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return dict(json.loads(resp.data))

    def patch_job(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        """Patches the Job; one that is gone meanwhile (e.g. its TTL passed) is no error."""
        try:
            self._call(
                self.batch.patch_namespaced_job, name, namespace, patch, _preload_content=False
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    def delete_job(self, namespace: str, name: str) -> None:
        try:
            self._call(
                self.batch.delete_namespaced_job,
                name,
                namespace,
                body=client.V1DeleteOptions(propagation_policy="Background"),
                _preload_content=False,
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    def delete_configmap(self, namespace: str, name: str) -> None:
        try:
            self._call(
                self.core.delete_namespaced_config_map, name, namespace, _preload_content=False
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    def secret_exists(self, namespace: str, name: str) -> bool:
        """Only presence is checked (a positive answer is cached briefly)."""
        key = (namespace, name)
        if time.monotonic() - self._secrets.get(key, -1e9) < self._secret_ttl:
            return True
        try:
            # metadata only: the API server never sends the Secret's data to the controller
            self._call(self.core.read_namespaced_secret, name, namespace,
                       _preload_content=False, _headers={"Accept": METADATA_ONLY})
        except ApiException as exc:
            if exc.status == 404:
                self._secrets.pop(key, None)
                return False
            raise
        self._secrets[key] = time.monotonic()
        return True

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
        metrics.EVENTS_PENDING.set(self._events.qsize())

    def _post_events(self) -> None:
        # Events are history, not state: their own, smaller budget (as client-go's event
        # recorder has), so a burst of transitions never takes API capacity from reconciles.
        limiter = RateLimiter(self.events_qps, 100)
        while True:
            ev = self._events.get()
            metrics.EVENTS_PENDING.set(self._events.qsize() + 1)  # this one is not out yet
            limiter.wait()
            try:
                self._call(
                    self.core.create_namespaced_event,
                    ev.metadata.namespace,
                    ev,
                    _preload_content=False,
                )
            except Exception as exc:
                log.warning(
                    "cannot post event %s on %s: %s", ev.reason, ev.involved_object.name, exc
                )
            metrics.EVENTS_PENDING.set(self._events.qsize())


def _retry_after(exc: ApiException, attempt: int) -> float:
    """The server's Retry-After (seconds), else exponential backoff; capped at 30 s."""
    headers = exc.headers or {}
    try:
        value = float(headers.get("Retry-After") or "")
    except ValueError:
        value = 0.5 * 2**attempt
    return max(0.05, min(value, 30.0))


def _verb(fn: Any) -> str:
    """create / read / list / patch / delete / replace, from the client method's name."""
    return str(getattr(fn, "__name__", "call")).split("_", 1)[0]
