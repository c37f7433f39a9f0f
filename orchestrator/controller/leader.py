"""Single active replica: a coordination.k8s.io Lease, the way kube-controller-manager does it.

The controller blocks in `acquire()` until it holds the Lease, renews it in a background
thread, and exits the process if renewal fails for longer than the lease duration: a
second replica then takes over. Exiting (instead of trying to stop handlers mid-flight)
is what makes split-brain impossible: every handler is idempotent, so a restart is safe.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from orchestrator.controller import metrics

log = logging.getLogger("kubetune.leader")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class LeaseLock:
    def __init__(
        self,
        api: Any,
        name: str,
        namespace: str,
        identity: str,
        lease_seconds: int = 15,
        renew_seconds: float = 5.0,
    ) -> None:
        self.api, self.name, self.namespace = api, name, namespace
        self.identity, self.lease_seconds, self.renew_seconds = (
            identity,
            lease_seconds,
            renew_seconds,
        )
        self._stop = threading.Event()

    def _body(self, transitions: int) -> Any:
        now = _now()
        return client.V1Lease(
            metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
            spec=client.V1LeaseSpec(
                holder_identity=self.identity,
                lease_duration_seconds=self.lease_seconds,
                acquire_time=now,
                renew_time=now,
                lease_transitions=transitions,
            ),
        )

    def try_acquire(self) -> bool:
        try:
            metrics.API_REQUESTS.labels("lease").inc()
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            try:
                metrics.API_REQUESTS.labels("lease").inc()
                self.api.create_namespaced_lease(self.namespace, self._body(0))
                return True
            except ApiException as exc2:
                if exc2.status == 409:
                    return False
                raise
        spec: Any = lease.spec
        holder = spec.holder_identity
        renew = spec.renew_time
        expired = renew is None or (_now() - renew).total_seconds() > (
            spec.lease_duration_seconds or self.lease_seconds
        )
        if holder == self.identity or expired or not holder:
            transitions = (spec.lease_transitions or 0) + (0 if holder == self.identity else 1)
            body = self._body(transitions)
            if holder == self.identity and spec.acquire_time:
                body.spec.acquire_time = spec.acquire_time
            body.metadata.resource_version = lease.metadata.resource_version
            try:  # optimistic concurrency: a racing candidate gets 409
                metrics.API_REQUESTS.labels("lease").inc()
                self.api.replace_namespaced_lease(self.name, self.namespace, body)
                return True
            except ApiException as exc:
                if exc.status == 409:
                    return False
                raise
        return False

    def acquire(self) -> None:
        log.info("waiting for leadership", extra={"lease": f"{self.namespace}/{self.name}"})
        while not self.try_acquire():
            time.sleep(self.renew_seconds / 2)
        log.info("acquired leadership", extra={"identity": self.identity})
        threading.Thread(target=self._renew_loop, name="lease-renew", daemon=True).start()

    def _renew_loop(self) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(self.renew_seconds):
            try:
                if self.try_acquire():
                    last_ok = time.monotonic()
                    continue
            except Exception:
                log.exception("lease renewal failed")
            if time.monotonic() - last_ok > self.lease_seconds:
                log.error("lost leadership; exiting so another replica takes over")
                os._exit(1)

    def release(self) -> None:
        self._stop.set()
