"""kopf wiring: thin handlers that route watch events to the reconcilers.

Only `on.event` handlers are used (no on.create/update bookkeeping annotations): the
reconcilers are level-triggered, so every event, and a periodic resync, simply says
"look at this object again". A child Job's events are routed to its FineTuneJob, a trial
FineTuneJob's events to its FineTuneSweep.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from orchestrator.api import labels as L
from orchestrator.api import reasons as R
from orchestrator.api.base import GROUP, VERSION
from orchestrator.controller import metrics
from orchestrator.controller.jobs import JobReconciler
from orchestrator.controller.kube import FTJ_PLURAL, FTS_PLURAL, Kube
from orchestrator.controller.runtime import KeyedLocks, measured
from orchestrator.controller.settings import ControllerSettings

log = logging.getLogger("kubetune.controller")


@contextlib.contextmanager
def _quiet_when_namespace_terminates() -> Iterator[None]:
    """A namespace being deleted takes its FineTuneJobs with it; creating children there
    is refused (403 NamespaceTerminating) and nothing needs doing."""
    try:
        yield
    except ApiException as exc:
        if exc.status == 403 and "NamespaceTerminating" in str(exc.body):
            log.debug("namespace terminating: %s", exc.reason)
            return
        raise


class Controller:
    """Holds the reconcilers and the per-object locks; kopf handlers call into it."""

    def __init__(self, kube: Kube, settings: ControllerSettings, sweeps: Any = None) -> None:
        self.kube = kube
        self.settings = settings
        self.jobs = JobReconciler(kube, settings)
        self.sweeps = sweeps
        self.locks = KeyedLocks()
        self.phases: dict[str, str] = {}
        self._stop = threading.Event()

    def reconcile_job(self, namespace: str, name: str) -> None:
        with _quiet_when_namespace_terminates(), self.locks.hold(("ftj", namespace, name)):
            obj = self.kube.get_custom(FTJ_PLURAL, namespace, name)
            if obj is None:
                self.phases.pop(f"{namespace}/{name}", None)
                return
            phase = measured("FineTuneJob", lambda: self.jobs.reconcile(obj))
            if phase:
                self.phases[f"{namespace}/{name}"] = phase
            for p in R.PHASES:
                metrics.JOBS_BY_PHASE.labels(p).set(sum(1 for v in self.phases.values() if v == p))
        labels = obj["metadata"].get("labels") or {}
        if self.sweeps is not None and labels.get(L.LABEL_SWEEP):
            self.reconcile_sweep(namespace, labels[L.LABEL_SWEEP])

    def reconcile_sweep(self, namespace: str, name: str) -> None:
        if self.sweeps is None:
            return
        with _quiet_when_namespace_terminates(), self.locks.hold(("fts", namespace, name)):
            obj = self.kube.get_custom(FTS_PLURAL, namespace, name)
            if obj is None:
                return
            measured("FineTuneSweep", lambda: self.sweeps.reconcile(obj))

    def resync_once(self) -> None:
        """Looks at every unfinished object: retries after errors, catches missed events."""
        namespaces: list[str | None] = list(self.settings.namespaces) or [None]
        for ns in namespaces:
            for obj in self.kube.list_custom(FTJ_PLURAL, ns):
                if (obj.get("status") or {}).get("phase") not in R.TERMINAL_PHASES:
                    self._safe(self.reconcile_job, obj)
            if self.sweeps is not None:
                for obj in self.kube.list_custom(FTS_PLURAL, ns):
                    if (obj.get("status") or {}).get("phase") not in R.TERMINAL_PHASES:
                        self._safe(self.reconcile_sweep, obj)

    def _safe(self, fn: Any, obj: dict[str, Any]) -> None:
        try:
            fn(obj["metadata"]["namespace"], obj["metadata"]["name"])
        except Exception:
            log.exception(
                "reconcile of %s/%s failed; retrying at the next resync",
                obj["metadata"]["namespace"],
                obj["metadata"]["name"],
            )

    def resync_forever(self) -> None:
        while not self._stop.wait(self.settings.resync_seconds):
            try:
                self.resync_once()
            except Exception:
                log.exception("resync failed")

    def stop(self) -> None:
        self._stop.set()


def register(controller: Controller, registry: kopf.OperatorRegistry) -> None:
    @kopf.on.event(GROUP, VERSION, FTJ_PLURAL, registry=registry)  # type: ignore[arg-type]
    def finetunejob_event(event: dict[str, Any], name: str, namespace: str, **_: Any) -> None:
        if event.get("type") == "DELETED":
            controller.phases.pop(f"{namespace}/{name}", None)
            return
        controller.reconcile_job(namespace, name)

    seen: dict[str, str] = {}

    @kopf.on.event(  # type: ignore[arg-type]
        "batch", "v1", "jobs", registry=registry, labels={L.LABEL_MANAGED_BY: L.MANAGED_BY}
    )
    def child_job_event(
        event: dict[str, Any],
        body: Any,
        labels: dict[str, str],
        namespace: str,
        name: str,
        **_: Any,
    ) -> None:
        parent = labels.get(L.LABEL_JOB)
        if not parent:
            return
        # Only what the reconciler looks at; the Job controller's other status writes
        # (e.g. uncountedTerminatedPods bookkeeping) would only cost API calls.
        st = body.get("status") or {}
        digest = repr(
            (
                event.get("type"),
                body.get("spec", {}).get("suspend"),
                st.get("active"),
                st.get("ready"),
                st.get("succeeded"),
                st.get("failed"),
                sorted(
                    c.get("type", "")
                    for c in st.get("conditions") or []
                    if c.get("status") == "True"
                ),
            )
        )
        key = f"{namespace}/{name}"
        if event.get("type") == "DELETED":
            seen.pop(key, None)
        elif seen.get(key) == digest:
            return
        else:
            seen[key] = digest
        controller.reconcile_job(namespace, parent)

    @kopf.on.event(GROUP, VERSION, FTS_PLURAL, registry=registry)  # type: ignore[arg-type]
    def finetunesweep_event(event: dict[str, Any], name: str, namespace: str, **_: Any) -> None:
        if event.get("type") != "DELETED":
            controller.reconcile_sweep(namespace, name)
