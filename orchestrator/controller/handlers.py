"""The controller core: watch caches feed one keyed work queue; workers reconcile.

    kopf watches (FineTuneJob, FineTuneSweep) ─┐
    informers (Jobs, Pods; server-side selector)├─► caches ─► queue.add(key) ─► N workers
    report endpoint (aiohttp, on kopf's loop) ──┘                                 │
                                                  reconcile(snapshot from caches) ┘
                                                  API calls only for changes

Event sources never reconcile and never call the API: they update a cache and add the key
of the object that must be looked at (a child Job's or pod's key is its FineTuneJob's, a
trial's events also add its sweep's key). The queue de-duplicates keys and never hands one
key to two workers at a time, so everything that writes an object's status — including a
pruning decision from the report endpoint — happens inside that object's reconcile. A
reconcile returns `Result(requeue_after=...)` (the resync, read from the caches: no API
calls when nothing changed) or raises, and the key comes back with per-key backoff.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.exceptions import ApiException

from orchestrator.api import labels as L
from orchestrator.api import reasons as R
from orchestrator.controller import metrics
from orchestrator.controller.cache import (
    Informer,
    Obj,
    Store,
    trim_custom,
    trim_job,
    trim_pod,
    wait_synced,
)
from orchestrator.controller.jobs import JobReconciler, Result, Snapshot, job_attempt
from orchestrator.controller.kube import FTS_PLURAL, Kube
from orchestrator.controller.runtime import measured
from orchestrator.controller.settings import ControllerSettings
from orchestrator.controller.workqueue import WorkQueue
from orchestrator.render.sweep import SWEEP_KIND

log = logging.getLogger("kubetune.controller")

JOB = "FineTuneJob"
SWEEP = "FineTuneSweep"
Key = tuple[str, str, str]  # (kind, namespace, name)


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


def _labels(obj: Obj) -> dict[str, str]:
    return obj["metadata"].get("labels") or {}


def _by_parent(obj: Obj) -> tuple[str, str] | None:
    parent = _labels(obj).get(L.LABEL_JOB)
    return (obj["metadata"].get("namespace", ""), parent) if parent else None


def _by_attempt(obj: Obj) -> tuple[str, str, str] | None:
    lab = _labels(obj)
    parent, attempt = lab.get(L.LABEL_JOB), lab.get(L.LABEL_ATTEMPT)
    if not parent or not attempt:
        return None
    return (obj["metadata"].get("namespace", ""), parent, attempt)


def _by_sweep(obj: Obj) -> tuple[str, str] | None:
    sweep = _labels(obj).get(L.LABEL_SWEEP)
    return (obj["metadata"].get("namespace", ""), sweep) if sweep else None


@dataclass
class Report:
    """An intermediate report from a trainer pod, waiting for its job's reconcile."""

    step: int
    metrics: dict[str, float]
    progress: dict[str, Any] | None
    model: dict[str, Any] | None = None  # a trial's base-model config.json (feasibility)
    answer: concurrent.futures.Future[str] = field(default_factory=concurrent.futures.Future)


class Controller:
    """Caches, the work queue and the workers; the reconcilers do the per-kind work."""

    PROGRESS_INTERVAL = 30.0  # at most one progress status patch per job per 30 s

    def __init__(
        self, kube: Kube, settings: ControllerSettings, sweeps: Any = None, workers: int = 0
    ) -> None:
        self.kube = kube
        self.settings = settings
        self.workers = workers or settings.workers
        self.queue = WorkQueue()
        self.ftjs = Store(JOB, trim_custom, index=_by_sweep)
        self.ftss = Store(SWEEP, trim_custom)
        self.child_jobs = Store("Job", trim_job, index=_by_parent)
        self.pods = Store("Pod", trim_pod, index=_by_attempt)
        self.jobs = JobReconciler(kube, settings, written=self.written)
        self.sweeps = sweeps
        if sweeps is not None:
            sweeps.written = self.written
            self.jobs.trial_token = self._trial_token
            self.jobs.job_token = lambda obj: sweeps.job_token(obj["metadata"]["uid"])
        self._lock = threading.Lock()
        self._phases: dict[tuple[str, str], str] = {}
        self._phase_counts: Counter[str] = Counter()
        self._reports: dict[Key, list[Report]] = {}
        self._progress: dict[Key, dict[str, Any]] = {}
        self._progress_written: dict[Key, float] = {}
        # last accepted report step per job and stream (no replays)
        self._steps: dict[Key, dict[str, int]] = {}
        self._threads: list[threading.Thread] = []
        self._informers: list[Informer] = []
        self._stop = threading.Event()

    # --- event sources: update a cache, add keys; no API calls, no reconciles -------------
    def written(self, obj: Obj) -> None:
        """Write-through: what a worker wrote is what the next reconcile reads."""
        kind = obj.get("kind")
        store = {JOB: self.ftjs, SWEEP: self.ftss, "Job": self.child_jobs}.get(str(kind))
        if store is not None:
            store.put(obj)

    def on_custom(self, kind: str, event_type: str | None, body: Obj) -> None:
        meta = body["metadata"]
        ns, name = meta.get("namespace", ""), meta["name"]
        store = self.ftjs if kind == JOB else self.ftss
        if event_type == "DELETED":
            old = store.delete(ns, name)
            self.forget((kind, ns, name))
            if old is not None and kind == JOB:
                self._sweep_of(old)
            if kind == SWEEP and self.sweeps is not None:
                # its study goes in the key's next reconcile (a worker: storage calls there)
                self.sweeps.deleted(ns, name, meta.get("uid"))
                self.queue.add((kind, ns, name))
            return
        store.put(body)
        self.queue.add((kind, ns, name))
        if kind == JOB:
            self._sweep_of(body)

    def _sweep_of(self, obj: Obj) -> None:
        sweep = _labels(obj).get(L.LABEL_SWEEP)
        if sweep and self.sweeps is not None:
            self.queue.add((SWEEP, obj["metadata"].get("namespace", ""), sweep))

    def on_child(self, old: Obj | None, new: Obj | None) -> None:
        parent = _by_parent(new or old or {"metadata": {}})
        if parent is not None:
            self.queue.add((JOB, *parent))

    def forget(self, key: Key) -> None:
        """The object is gone: drop everything kept about it."""
        self.queue.forget(key)
        with self._lock:
            phase = self._phases.pop(key[1:], None) if key[0] == JOB else None
            if phase:
                self._phase_counts[phase] -= 1
                metrics.JOBS_BY_PHASE.labels(phase).set(self._phase_counts[phase])
            for rep in self._reports.pop(key, []):
                rep.answer.set_result("continue")
            self._progress.pop(key, None)
            self._progress_written.pop(key, None)
            self._steps.pop(key, None)
        if key[0] == SWEEP and self.sweeps is not None:
            self.sweeps.forget(key[1], key[2])

    # --- reports from trainer pods (called on kopf's loop; never blocks, never calls the API)
    def trial_of(self, namespace: str, job: str) -> tuple[Obj, Obj, int] | None:
        """(trial FineTuneJob, its sweep, trial number) from the caches, or None."""
        obj = self.ftjs.get(namespace, job)
        if obj is None or self.sweeps is None:
            return None
        lab = _labels(obj)
        sweep_name, trial = lab.get(L.LABEL_SWEEP), lab.get(L.LABEL_TRIAL)
        if not sweep_name or trial is None or not trial.isdigit():
            return None
        sweep = self.ftss.get(namespace, sweep_name)
        if sweep is None:
            return None
        owners = obj["metadata"].get("ownerReferences") or []
        if not any(o.get("uid") == sweep["metadata"]["uid"] for o in owners):
            return None  # a `trial=` label on a job the sweep does not own
        return obj, sweep, int(trial)

    def _trial_token(self, obj: Obj) -> str | None:
        """The report token for a trial its sweep owns (checked by uid, in the job's own
        namespace), else None. A sweep not yet in the cache (e.g. right after a restart) is
        read once, so a real trial never starts without its token."""
        meta = obj["metadata"]
        ns, number = meta.get("namespace", ""), _labels(obj).get(L.LABEL_TRIAL, "")
        owner = next(
            (
                r
                for r in meta.get("ownerReferences") or []
                if r.get("controller") and r.get("kind") == SWEEP_KIND
            ),
            None,
        )
        if owner is None or not number.isdigit() or self.sweeps is None:
            return None
        name = str(owner.get("name", ""))
        sweep = self.ftss.get(ns, name) or self.kube.get_custom(FTS_PLURAL, ns, name)
        if sweep is None or sweep["metadata"].get("uid") != owner.get("uid"):
            return None
        return str(self.sweeps.trial_token(sweep, int(number)))

    def accept_step(self, namespace: str, job: str, step: int, stream: str = "metrics") -> bool:
        """A job's report steps only move forward, per stream (intermediate metrics, live
        progress: an evaluation may follow a progress post of the same step): an old step
        is a replay."""
        key = (JOB, namespace, job)
        with self._lock:
            steps = self._steps.setdefault(key, {})
            if step <= steps.get(stream, -1):
                return False
            steps[stream] = step
            return True

    def progress_job(self, namespace: str, job: str) -> Obj | None:
        """The FineTuneJob a progress-only report names, from the cache."""
        return self.ftjs.get(namespace, job)

    def submit_report(
        self, namespace: str, job: str, report: Report, limit: int = 4
    ) -> concurrent.futures.Future[str] | None:
        """Queues an authenticated report for its job's reconcile; None when too many wait."""
        key = (JOB, namespace, job)
        with self._lock:
            pending = self._reports.setdefault(key, [])
            if len(pending) >= limit:
                return None
            pending.append(report)
        self.queue.add(key)
        return report.answer

    def note_progress(self, namespace: str, job: str, progress: dict[str, Any] | None) -> None:
        """A plain job's live progress (no trial: its answer is always continue, so the
        endpoint answers at once instead of waiting for a worker): kept, the newest fields
        winning, for the job's reconcile to write at most once per PROGRESS_INTERVAL."""
        metrics.INTERMEDIATE_REPORTS.labels("continue").inc()
        if not progress:
            return
        key = (JOB, namespace, job)
        with self._lock:
            self._progress[key] = {**self._progress.get(key, {}), **progress}
        self.queue.add(key)

    def _take_reports(self, key: Key) -> list[Report]:
        with self._lock:
            return self._reports.pop(key, [])

    # --- workers ------------------------------------------------------------------------------
    def start(self) -> None:
        """Informers first, then (once their first LIST is in) the workers."""
        namespaces: list[str | None] = list(self.settings.namespaces) or [None]
        core, batch = self.kube.core, self.kube.batch
        for ns in namespaces:
            if ns is None:
                jobs_fn = batch.list_job_for_all_namespaces
                pods_fn = core.list_pod_for_all_namespaces
            else:

                def jobs_fn(_ns: str = ns, **kw: Any) -> Any:
                    return batch.list_namespaced_job(_ns, **kw)

                def pods_fn(_ns: str = ns, **kw: Any) -> Any:
                    return core.list_namespaced_pod(_ns, **kw)

            self._informers += [
                Informer(f"jobs/{ns or '*'}", jobs_fn, self.child_jobs, self.on_child),
                Informer(f"pods/{ns or '*'}", pods_fn, self.pods, self.on_child),
            ]
        for inf in self._informers:
            inf.start()
        threading.Thread(target=self._start_workers, name="start-workers", daemon=True).start()

    def _start_workers(self) -> None:
        if not wait_synced([self.child_jobs, self.pods], timeout=120):
            log.warning("child caches not synced after 120 s; starting workers anyway")
        for i in range(self.workers):
            t = threading.Thread(target=self._work, name=f"worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        if self.sweeps is not None:
            threading.Thread(target=self._study_upkeep, name="study-gc", daemon=True).start()

    # --- study storage upkeep: studies of deleted sweeps, the SQLite volume's fill ------------
    def _study_upkeep(self) -> None:
        """At start, then every KUBETUNE_STUDY_GC_SECONDS: studies whose sweep no longer
        exists (deleted while no controller ran, or a missed watch event) are deleted. The
        SQLite volume's fill is checked every resync."""
        next_gc = 0.0
        while not self._stop.is_set():
            try:
                self.sweeps.check_volume()
            except Exception:
                log.exception("study volume check failed")
            if time.monotonic() >= next_gc:
                try:
                    if self.collect_studies() is not None:  # else retried at the next tick
                        next_gc = time.monotonic() + self.settings.study_gc_seconds
                except Exception as exc:
                    log.warning("study garbage collection failed (%s); retried soon", exc)
            self._stop.wait(min(self.settings.resync_seconds, self.settings.study_gc_seconds))

    def collect_studies(self) -> list[str] | None:
        """Deletes the studies of sweeps that no longer exist (see SweepReconciler); None
        when the sweeps could not be listed."""
        fence = getattr(self.kube, "fence", None)
        if fence is not None:
            fence()  # a replica that no longer leads deletes nothing
        namespaces = list(self.settings.namespaces) or None
        deleted: list[str] | None = self.sweeps.collect_garbage(self._live_sweep_uids, namespaces)
        return deleted

    def _live_sweep_uids(self) -> set[str] | None:
        """Uids of every FineTuneSweep in the watched namespaces: a fresh LIST from the API
        server (not the cache, which may not be synced yet), plus what the watch has put
        in the cache since. None when the listing failed: then nothing is collected."""
        uids: set[str] = set()
        try:
            scopes: list[str | None] = list(self.settings.namespaces) or [None]
            for ns in scopes:
                for listed in self.kube.list_custom(FTS_PLURAL, ns):
                    uids.add(listed["metadata"]["uid"])
        except Exception as exc:
            log.warning("listing FineTuneSweeps for the study collection failed (%s)", exc)
            return None
        for ns_name in self.ftss.keys():  # noqa: SIM118 (a Store, not a dict)
            obj = self.ftss.get(*ns_name)
            if obj is not None and obj["metadata"].get("uid"):
                uids.add(obj["metadata"]["uid"])
        return uids

    def _work(self) -> None:
        fence = getattr(self.kube, "fence", None)
        while not self._stop.is_set():
            key = self.queue.get(timeout=1.0)
            if key is None:
                continue
            if fence is not None:
                fence()  # a replica that no longer leads reconciles nothing (study writes too)
            try:
                self.process(key)  # type: ignore[arg-type]
            except Exception:  # a bug in one reconcile must not take a worker down with it
                log.exception("worker: processing %s failed", key)
                self.queue.add_rate_limited(key)
            finally:
                self.queue.done(key)

    def process(self, key: Key) -> None:
        kind, ns, name = key
        result = None  # stays None when the namespace is being deleted
        try:
            with _quiet_when_namespace_terminates():
                result = (
                    self.reconcile_job(ns, name) if kind == JOB else self.reconcile_sweep(ns, name)
                )
        except Exception as exc:
            delay = self.queue.add_rate_limited(key)
            log.warning(
                "reconcile of %s %s/%s failed (%s); retrying in %.2fs",
                kind,
                ns,
                name,
                exc if isinstance(exc, ApiException) else repr(exc),
                delay,
                exc_info=not isinstance(exc, ApiException),
            )
            return
        self.queue.forget(key)
        if result is not None and result.requeue_after is not None:
            self.queue.add_after(key, result.requeue_after)

    def stop(self) -> None:
        self._stop.set()
        self.queue.shutdown()
        for inf in self._informers:
            inf.stop()

    def wait_stopped(self, timeout: float) -> None:
        """After `stop`: waits (at most `timeout` seconds in all) for reconciles in flight."""
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    # --- reconciles ---------------------------------------------------------------------------
    def snapshot(self, obj: Obj) -> Snapshot:
        meta = obj["metadata"]
        ns, name = meta["namespace"], meta["name"]
        uid = meta.get("uid")
        attempt = str(max(int((obj.get("status") or {}).get("attempts") or 0), 1))

        def owned(o: Obj) -> bool:
            refs = o["metadata"].get("ownerReferences") or []
            return not uid or any(r.get("uid") == uid for r in refs)

        jobs = {j["metadata"]["name"]: j for j in self.child_jobs.indexed((ns, name)) if owned(j)}
        by_attempt = {str(n): j for j in jobs.values() if (n := job_attempt(j)) is not None}

        def pods_of(n: str) -> list[Obj]:
            """Attempt n's pods: labelled so *and* owned by that attempt's Job, never the
            pods of an earlier FineTuneJob of the same name or anyone's labelled pod."""
            job = by_attempt.get(n)
            job_uid = job["metadata"].get("uid") if job else None
            if not job_uid:
                return []
            return [
                p
                for p in self.pods.indexed((ns, name, n))
                if any(r.get("uid") == job_uid for r in p["metadata"].get("ownerReferences") or [])
            ]

        pods = pods_of(attempt)
        # earlier attempts' pods, kept apart: only checked to have ended, never the gang
        old_pods: dict[int, list[Obj]] = {}
        for n_str in by_attempt:
            if n_str != attempt:
                old_pods[int(n_str)] = pods_of(n_str)
        return Snapshot(obj, jobs, pods, old_pods=old_pods)

    def reconcile_job(self, namespace: str, name: str) -> Result | None:
        key: Key = (JOB, namespace, name)
        obj = self.ftjs.get(namespace, name)
        if obj is None:
            self.forget(key)
            return None
        reports = self._take_reports(key)
        if reports:
            obj = self._apply_reports(obj, reports)
        snap = self.snapshot(obj)
        snap.progress = self._due_progress(key, obj)
        try:
            result: Result = measured(JOB, lambda: self.jobs.reconcile(snap))
        except BaseException:
            if snap.progress is not None:
                self._progress_done(key, snap.progress, written=False)
            raise
        if snap.progress is not None:
            self._progress_done(key, snap.progress, written=True)
        phase = ((self.ftjs.get(namespace, name) or obj).get("status") or {}).get("phase")
        self._count_phase((namespace, name), phase)
        pending = self._progress_wait(key)
        if pending is not None and (result.requeue_after or 1e9) > pending:
            result = Result(requeue_after=pending)
        return result

    def _apply_reports(self, obj: Obj, reports: list[Report]) -> Obj:
        """Intermediate values reach the study; a pruning decision is written here, inside
        the trial's own reconcile, so no other writer can race it."""
        meta = obj["metadata"]
        key: Key = (JOB, meta["namespace"], meta["name"])
        latest = max(reports, key=lambda r: r.step)
        if latest.progress:
            with self._lock:
                self._progress[key] = {**self._progress.get(key, {}), **latest.progress}
        trial = self.trial_of(meta["namespace"], meta["name"])
        decision = "continue"
        try:
            phase = (obj.get("status") or {}).get("phase")
            if trial is not None and phase in R.TERMINAL_PHASES:
                decision = "prune" if self.sweeps.was_pruned(obj) else "continue"
            elif trial is not None:
                _, sweep, number = trial
                for rep in reports:
                    if rep.model is not None:
                        self.sweeps.learn_model(sweep, obj, rep.model)
                for rep in sorted(reports, key=lambda r: r.step):
                    if rep.metrics and self.sweeps.record(sweep, number, rep.step, rep.metrics):
                        decision = "prune"
                        obj = self.jobs.prune(obj, rep.step) or obj
                        self.sweeps.tell_pruned(sweep, number, rep.step)
                        self.queue.add((SWEEP, meta["namespace"], sweep["metadata"]["name"]))
                        break
        finally:
            for rep in reports:
                if not rep.answer.done():
                    rep.answer.set_result(decision)
        metrics.INTERMEDIATE_REPORTS.labels(decision).inc(len(reports))
        return obj

    def _due_progress(self, key: Key, obj: Obj) -> dict[str, Any] | None:
        with self._lock:
            prog = self._progress.get(key)
            if prog is None:
                return None
            if time.monotonic() - self._progress_written.get(key, -1e9) < self.PROGRESS_INTERVAL:
                return None
            del self._progress[key]
            return prog

    def _progress_done(self, key: Key, prog: dict[str, Any], written: bool) -> None:
        """The interval starts when the status write has returned, so two writes reach the
        API server at least PROGRESS_INTERVAL apart however long each took; a failed
        reconcile keeps its progress (under any newer) for the retry."""
        with self._lock:
            if written:
                self._progress_written[key] = time.monotonic()
            else:
                self._progress[key] = {**prog, **self._progress.get(key, {})}

    def _progress_wait(self, key: Key) -> float | None:
        """Seconds until a coalesced progress update may be written, if one waits."""
        with self._lock:
            if key not in self._progress:
                return None
            last = self._progress_written.get(key, -1e9)
            return max(0.0, self.PROGRESS_INTERVAL - (time.monotonic() - last))

    def _count_phase(self, key: tuple[str, str], phase: str | None) -> None:
        """The phase gauge, kept by increments: O(1) per reconcile."""
        with self._lock:
            old = self._phases.get(key)
            if old == phase:
                return
            if old:
                self._phase_counts[old] -= 1
            if phase:
                self._phases[key] = phase
                self._phase_counts[phase] += 1
            else:
                self._phases.pop(key, None)
            for p in {old, phase} - {None}:
                metrics.JOBS_BY_PHASE.labels(p).set(self._phase_counts[str(p)])

    def reconcile_sweep(self, namespace: str, name: str) -> Result | None:
        if self.sweeps is None:
            return None
        obj = self.ftss.get(namespace, name)
        self.sweeps.collect_deleted(namespace, name, obj["metadata"]["uid"] if obj else None)
        if obj is None:
            self.forget((SWEEP, namespace, name))
            return None
        uid = obj["metadata"]["uid"]
        children = [
            c
            for c in self.ftjs.indexed((namespace, name))
            if any(r.get("uid") == uid for r in c["metadata"].get("ownerReferences") or [])
        ]
        result: Result | None = measured(SWEEP, lambda: self.sweeps.reconcile(obj, children))
        return result
