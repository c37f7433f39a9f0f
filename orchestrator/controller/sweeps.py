"""FineTuneSweep reconciler: one durable Optuna study per sweep; trials are child FineTuneJobs.

Source of truth: the study in RDB storage (SQLite on a volume by default). The trial's job
name is derived from its number and stored on the trial, so after a crash between `ask` and
the child's creation the next reconcile finds the RUNNING trial without a job and creates it
(deterministic name: a create that already happened is a no-op). No trial is lost and none
runs twice. Results come back from the children's status: Succeeded -> tell values,
Failed -> tell FAIL, pruned -> tell PRUNED (all idempotent).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from orchestrator.api import FineTuneSweepSpec, apply_overrides, format_errors, trial_name
from orchestrator.api import labels as L
from orchestrator.api import reasons as R
from orchestrator.api.conditions import get_condition, now_iso, set_condition
from orchestrator.controller import metrics
from orchestrator.controller.bounded import BoundedMap
from orchestrator.controller.feasibility import BudgetChecker, model_facts
from orchestrator.controller.jobs import Result, cluster_output_problem, status_patch
from orchestrator.controller.kube import FTJ_PLURAL, FTS_PLURAL, Kube
from orchestrator.controller.ownership import (
    NameConflict,
    PreviousOwner,
    blocked_condition,
)
from orchestrator.controller.settings import ControllerSettings
from orchestrator.render.sweep import render_report_master_secret, render_trial
from orchestrator.sweep import (
    SweepConfig,
    SweepStudy,
    delete_study,
    derive_sweep_key,
    generate_secret,
    get_storage,
    mint_job_token,
    mint_token,
    open_study,
    verify_job_token,
)
from orchestrator.sweep.errors import SweepError
from orchestrator.sweep.gc import (
    ATTR_STUDY_NAMESPACE,
    ATTR_STUDY_SWEEP,
    ATTR_STUDY_UID,
    delete_if_uid,
    is_disk_full,
    stored_studies,
    studies_to_delete,
    sweep_study_name,
    volume_usage,
)

log = logging.getLogger("kubetune.sweeps")

TRIAL_LIST_LIMIT = 50
STUDY_VOLUME_WARN = 0.8  # warn when the SQLite study volume is fuller than this
VOLUME_WARN_INTERVAL = 3600.0  # at most one such warning an hour
DISK_FULL_EVENT_INTERVAL = 600.0  # at most one StudyStorageFull Event per sweep per 10 min


def _unb64(text: str) -> str:
    import base64

    return base64.b64decode(text).decode()


class SweepReconciler:
    def __init__(
        self, kube: Kube, settings: ControllerSettings, key_namespace: str | None = None
    ) -> None:
        self.kube = kube
        self.settings = settings
        # where the report master key lives: the controller's own namespace
        self.key_namespace = key_namespace or settings.lease_namespace or "default"
        self._studies: dict[str, Any] = {}  # sweep uid -> optuna.Study (config may change)
        self._guard = threading.Lock()
        self._master: bytes | None = None  # report master key (load_master_key)
        self._uids: dict[tuple[str, str], str] = {}  # (namespace, name) -> uid, to forget
        # called with every object this reconciler wrote (the caches' write-through)
        self.written: Any = lambda obj: None
        self.budget = BudgetChecker()  # shapes learned from trials' reports
        # sweeps seen deleted by the watch, whose study the key's next reconcile deletes
        self._deleted: dict[tuple[str, str], set[str]] = {}
        # sweep uid -> last StudyStorageFull Event (bounded: uids come and go)
        self._full_events: BoundedMap[str, float] = BoundedMap(1024)
        self._volume_warned = -1e9

    # --- study and report key -------------------------------------------------------------
    def study(self, obj: dict[str, Any], spec: FineTuneSweepSpec) -> SweepStudy:
        cfg = SweepConfig.from_spec(spec)
        uid = obj["metadata"]["uid"]
        with self._guard:
            study = self._studies.get(uid)
            if study is None:
                ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
                study = open_study(
                    cfg, sweep_study_name(ns, name, uid), self.settings.study_storage
                )
                if study.user_attrs.get(ATTR_STUDY_UID) != uid:
                    # whose study this is: garbage collection keeps it while this uid lives
                    study.set_user_attr(ATTR_STUDY_NAMESPACE, ns)
                    study.set_user_attr(ATTR_STUDY_SWEEP, name)
                    study.set_user_attr(ATTR_STUDY_UID, uid)
                self._studies[uid] = study
        return SweepStudy(cfg, study)

    def load_master_key(self) -> bytes:
        """The master key report tokens derive from: Secret `report_key_secret` in the
        controller's namespace, created with a random key when missing (on a race, the
        winner's). Read once per process; no Secret is ever written to a sweep's namespace."""
        if self._master is not None:
            return self._master
        ns, name = self.key_namespace, self.settings.report_key_secret
        existing = self.kube.get("Secret", ns, name)
        if existing is None:
            self.kube.create(render_report_master_secret(ns, name, generate_secret()))
            existing = self.kube.get("Secret", ns, name)
            if existing is None:
                raise RuntimeError(f"Secret {ns}/{name} vanished right after its creation")
        raw = (existing.get("data") or {}).get("key")
        key = _unb64(raw).encode() if raw else b""
        if len(key) < 16:
            raise RuntimeError(
                f"Secret {ns}/{name} holds no usable report master key (key 'key', at least 16 "
                "bytes): delete it and the controller creates a new one"
            )
        self._master = key
        return key

    def key_for(self, uid: str) -> bytes:
        """A sweep's token key, derived from the master key and the sweep's uid."""
        return derive_sweep_key(self.load_master_key(), uid)

    def cached_key(self, uid: str) -> bytes | None:
        """The sweep's key if the master key is loaded (the report endpoint checks tokens
        from memory and never calls the API)."""
        return derive_sweep_key(self._master, uid) if self._master is not None else None

    def job_token(self, job_uid: str) -> str:
        """A FineTuneJob's progress token (put in its pods)."""
        return mint_job_token(self.load_master_key(), job_uid)

    def job_token_ok(self, token: str | None, job_uid: str) -> bool:
        """Checks a progress token from memory; False until the master key is loaded."""
        return self._master is not None and verify_job_token(self._master, token, job_uid)

    def trial_token(self, sweep: dict[str, Any], number: int) -> str:
        """The report token of trial `number` of `sweep` (put in the trial's pods)."""
        uid = sweep["metadata"]["uid"]
        return mint_token(self.key_for(uid), uid, number)

    def forget(self, namespace: str, name: str) -> None:
        """The sweep is gone: drop its study handle and key."""
        with self._guard:
            uid = self._uids.pop((namespace, name), None)
            if uid:
                self._studies.pop(uid, None)
                self._full_events.pop(uid, None)
        for state in ("running", "succeeded", "failed", "pruned"):
            with contextlib.suppress(KeyError):
                metrics.SWEEP_TRIALS.remove(namespace, name, state)

    # --- studies of deleted sweeps -------------------------------------------------------
    def deleted(self, namespace: str, name: str, uid: str | None) -> None:
        """The watch saw the sweep deleted (kopf's loop: no storage call here); the key's
        next reconcile deletes its study (`collect_deleted`)."""
        if uid:
            with self._guard:
                self._deleted.setdefault((namespace, name), set()).add(uid)

    def collect_deleted(self, namespace: str, name: str, live_uid: str | None) -> None:
        """Deletes the studies of this key's deleted sweeps (never the live one's: a sweep
        re-created under the same name has another uid, so another study). A failure is
        logged and left to the periodic collection."""
        with self._guard:
            uids = self._deleted.pop((namespace, name), set()) - {live_uid}
        for uid in sorted(uids):
            study = sweep_study_name(namespace, name, uid)
            try:
                if delete_if_uid(get_storage(self.settings.study_storage), study, uid):
                    metrics.STUDIES_DELETED.labels("deleted").inc()
                    log.info("sweep %s/%s deleted: study %s deleted", namespace, name, study)
            except Exception as exc:
                log.warning(
                    "deleting study %s of the deleted sweep %s/%s failed (%s); the periodic "
                    "study garbage collection retries",
                    study,
                    namespace,
                    name,
                    exc,
                )

    def collect_garbage(
        self, list_live_uids: Callable[[], set[str] | None], namespaces: list[str] | None
    ) -> list[str] | None:
        """Deletes every study whose sweep no longer exists; returns their names (None:
        the sweeps could not be listed, nothing was decided).

        The studies are read first and the live sweeps listed after (`list_live_uids`: a
        complete, current listing, or None when there is none: then nothing is deleted). A
        study is only ever created for a sweep that exists, so a study read first whose
        sweep is still live has its uid in the later listing."""
        storage = get_storage(self.settings.study_storage)
        studies = stored_studies(storage)
        if not studies:
            return []
        live = list_live_uids()
        if live is None:
            return None
        with self._guard:  # and whatever this process has opened meanwhile
            live |= set(self._uids.values()) | set(self._studies)
        by_name = {s.name: s for s in studies}
        deleted = []
        for name in studies_to_delete(studies, live, namespaces):
            uid = by_name[name].uid
            # with a recorded uid, deleted only if it is still that uid's study
            ok = delete_study(name, storage) if len(uid) == 8 else delete_if_uid(storage, name, uid)
            if ok:
                deleted.append(name)
                metrics.STUDIES_DELETED.labels("collected").inc()
                log.info("study %s belongs to no existing sweep: deleted", name)
        return deleted

    def check_volume(self) -> float | None:
        """The SQLite study volume's used fraction (a gauge; a warning above 80 %)."""
        usage = volume_usage(self.settings.study_storage)
        if usage is None:
            return None
        directory, used = usage
        metrics.STUDY_VOLUME_USED.set(used)
        now = time.monotonic()
        if used > STUDY_VOLUME_WARN and now - self._volume_warned >= VOLUME_WARN_INTERVAL:
            self._volume_warned = now
            log.warning(
                "the study volume %s is %.0f%% full: sweeps fail once it is full; raise the "
                "chart value studyStorage.persistence.size (or delete finished sweeps)",
                directory,
                100 * used,
            )
        return used

    def _disk_full(self, obj: dict[str, Any], exc: BaseException) -> None:
        """A study write failed for want of space: say so on the sweep (rate-limited)."""
        uid = obj["metadata"]["uid"]
        now = time.monotonic()
        if now - self._full_events.get(uid, -1e9) < DISK_FULL_EVENT_INTERVAL:
            return
        self._full_events[uid] = now
        usage = volume_usage(self.settings.study_storage)
        where = f"the volume at {usage[0]}" if usage else "the study database"
        msg = (
            f"the study storage is full ({where}): trials cannot be recorded. Raise the chart "
            "value studyStorage.persistence.size (or use an external database: "
            "studyStorage.url) and delete finished sweeps to free space"
        )
        meta = obj["metadata"]
        log.error("sweep %s/%s: %s (%s)", meta["namespace"], meta["name"], msg, exc)
        self.kube.event(obj, "Warning", R.REASON_STUDY_STORAGE_FULL, msg)

    # --- reconcile --------------------------------------------------------------------------
    def reconcile(self, obj: dict[str, Any], children: list[dict[str, Any]]) -> Result:
        """Converges one sweep; `children` are its trial FineTuneJobs (from the cache)."""
        meta = obj["metadata"]
        if meta.get("deletionTimestamp"):
            return Result()
        with self._guard:
            self._uids[(meta["namespace"], meta["name"])] = meta["uid"]
        status: dict[str, Any] = dict(obj.get("status") or {})
        if status.get("phase") in R.TERMINAL_PHASES:
            return Result()
        before = json.loads(json.dumps(status))
        try:
            new = self._decide(obj, status, {c["metadata"]["name"]: c for c in children})
        except Exception as exc:
            if is_disk_full(exc):
                self._disk_full(obj, exc)
            raise
        patch = status_patch(before, new)
        if patch:
            stored = self.kube.patch_status(FTS_PLURAL, meta["namespace"], meta["name"], patch)
            if stored is not None:
                self.written(stored)
        if new.get("phase") in R.TERMINAL_PHASES:
            return Result()
        return Result(requeue_after=self.settings.resync_seconds)

    def _fail(
        self, obj: dict[str, Any], status: dict[str, Any], reason: str, msg: str
    ) -> dict[str, Any]:
        self.kube.event(obj, "Warning", reason, msg)
        conds = set_condition(status.get("conditions") or [], R.COND_FAILED, True, reason, msg)
        conds = set_condition(conds, R.COND_RUNNING, False, reason, msg)
        return {
            **status,
            "phase": R.PHASE_FAILED,
            "conditions": conds,
            "message": msg,
            "completionTime": now_iso(),
        }

    def _decide(
        self, obj: dict[str, Any], status: dict[str, Any], children: dict[str, dict[str, Any]]
    ) -> dict[str, Any]:
        meta = obj["metadata"]
        ns, name = meta["namespace"], meta["name"]
        try:
            spec = FineTuneSweepSpec.model_validate(obj.get("spec") or {})
            st = self.study(obj, spec)
        except ValidationError as exc:
            return self._fail(obj, status, R.REASON_INVALID_SPEC, format_errors(exc, "spec."))
        except SweepError as exc:
            return self._fail(obj, status, R.REASON_INVALID_SPEC, str(exc))
        problem = cluster_output_problem(spec.template.output.uri, "spec.template.output.uri")
        if problem:
            return self._fail(obj, status, R.REASON_INVALID_SPEC, problem)

        # 1. results of finished children reach the study (idempotent tells)
        for child in children.values():
            if self._tell_child(st, child):
                self._warn_if_unreported(obj, st, child)

        # 2. trials asked before a crash but never created (or blocked by a name held by
        # an object the sweep does not own: retried on every reconcile)
        blocked: NameConflict | PreviousOwner | None = None
        for trial in st.unlaunched(children):
            blocked = self._create_trial(obj, spec, st, trial.number) or blocked

        # 3. launch up to parallelism, within maxTrials (none while a trial's name is held)
        # one at a time: a refused (infeasible) trial frees its slot for the next ask at once
        plan = st.plan()
        for _ in range(spec.max_trials):
            if plan.launch <= 0 or blocked is not None:
                break
            number, _params, job = st.ask(lambda n: trial_name(name, n))
            if job is not None:  # None: an identical earlier trial's result was reused
                blocked = self._create_trial(obj, spec, st, number)
            plan = st.plan()
        if plan.stop_running:
            for child in list(children.values()):
                if (child.get("status") or {}).get("phase") not in R.TERMINAL_PHASES:
                    self.kube.delete_custom(FTJ_PLURAL, ns, child["metadata"]["name"])
                    trial = child["metadata"]["labels"].get(L.LABEL_TRIAL)
                    if trial is not None:
                        st.tell_failed(int(trial), "stopped: the sweep failed")
            plan = st.plan()

        # 4. status
        counts = st.counts()
        for state in ("running", "succeeded", "failed", "pruned"):
            metrics.SWEEP_TRIALS.labels(ns, name, state).set(getattr(counts, state))
        best = st.best()
        new = dict(status)
        new["trials"] = counts.to_wire()
        new["studyName"] = st.study.study_name
        new["observedGeneration"] = meta.get("generation")
        new["startTime"] = status.get("startTime") or now_iso()
        if best is not None:
            new["bestTrial"] = best.to_wire()
        front = st.pareto_front()
        if front:
            new["paretoFront"] = [t.to_wire() for t in front]
        new["trialList"] = [r.to_wire() for r in st.records(TRIAL_LIST_LIMIT)]
        conds = list(status.get("conditions") or [])
        if blocked is not None:
            conds = self._blocked(obj, {"conditions": conds}, blocked)["conditions"]
        elif (get_condition(conds, R.COND_CREATED) or {}).get("status") == "False":
            conds = set_condition(
                conds, R.COND_CREATED, True, R.REASON_CREATED, "the blocked trial was created"
            )
        if plan.done and plan.failed:
            return self._fail(obj, new, plan.reason, plan.message)
        if plan.done:
            conds = set_condition(conds, R.COND_RUNNING, False, plan.reason, plan.message)
            conds = set_condition(conds, R.COND_SUCCEEDED, True, plan.reason, plan.message)
            if status.get("phase") != R.PHASE_SUCCEEDED:
                self.kube.event(obj, "Normal", R.REASON_SUCCEEDED, plan.message)
            return {
                **new,
                "phase": R.PHASE_SUCCEEDED,
                "conditions": conds,
                "message": plan.message,
                "completionTime": now_iso(),
            }
        conds = set_condition(conds, R.COND_RUNNING, True, plan.reason, plan.message)
        return {**new, "phase": R.PHASE_RUNNING, "conditions": conds, "message": plan.message}

    def _blocked(
        self, obj: dict[str, Any], status: dict[str, Any], exc: NameConflict | PreviousOwner
    ) -> dict[str, Any]:
        """A name the sweep needs is held by an object it does not own: condition Created
        False (NameConflict, or WaitingForCleanup for an earlier sweep's leftover)."""
        conds, changed = blocked_condition(list(status.get("conditions") or []), exc)
        if changed:
            self.kube.event(obj, exc.event_type, exc.reason, exc.message)
        return {
            **status,
            "phase": status.get("phase") or R.PHASE_PENDING,
            "conditions": conds,
            "message": exc.message,
        }

    def _tell_child(self, st: SweepStudy, child: dict[str, Any]) -> bool:
        """Tells a finished trial's result; True when a succeeded trial was told just now."""
        cstatus = child.get("status") or {}
        phase = cstatus.get("phase")
        trial = (child["metadata"].get("labels") or {}).get(L.LABEL_TRIAL)
        if trial is None or phase not in R.TERMINAL_PHASES:
            return False
        number = int(trial)
        if phase == R.PHASE_SUCCEEDED:
            return st.tell_metrics(
                number, cstatus.get("metrics") or {}, artifact=cstatus.get("artifact")
            )
        reason = next(
            (
                c.get("reason")
                for c in cstatus.get("conditions") or []
                if c.get("type") == R.COND_FAILED
            ),
            None,
        )
        if reason == R.REASON_TRIAL_PRUNED:
            st.tell_pruned(number, cstatus.get("message") or "stopped early by the pruner")
        elif reason == R.REASON_BUDGET_INFEASIBLE:
            # the trial's pod refused its budget before downloading the model: the search
            # space is at fault, so (as a refusal before launch) it costs no failure budget
            st.refuse(number, cstatus.get("message") or "parameter budget not reachable")
        else:
            st.tell_failed(number, cstatus.get("message") or "the trial job failed")
        return False

    def _warn_if_unreported(
        self, obj: dict[str, Any], st: SweepStudy, child: dict[str, Any]
    ) -> None:
        """A trial that trained to the end with a pruner configured but never got one
        intermediate value to the study: its reports are failing (wrong URL, blocked by a
        NetworkPolicy, bad token), and pruning silently does nothing. Say so."""
        if st.cfg.pruner == "none":
            return
        number = int(child["metadata"]["labels"][L.LABEL_TRIAL])
        if st.reported(number):
            return
        self.kube.event(
            obj,
            "Warning",
            R.REASON_REPORTS_MISSING,
            f"trial {number} ({child['metadata']['name']}) finished without a single "
            f"intermediate report reaching the controller at {self.settings.report_url}: the "
            f"{st.cfg.pruner} pruner cannot act. Look for 'metrics report ... failed' in the "
            "trial's log (a wrong KUBETUNE_REPORT_URL, a NetworkPolicy, a rejected token)",
        )

    def _create_trial(
        self, obj: dict[str, Any], spec: FineTuneSweepSpec, st: SweepStudy, number: int
    ) -> NameConflict | PreviousOwner | None:
        """Creates trial `number` (its token Secret, then its FineTuneJob); returns why not
        when a name it needs is held by an object the sweep does not own."""
        meta = obj["metadata"]
        sweep = meta["name"]
        params = st.params(number)
        job_name = trial_name(sweep, number)
        try:
            job_spec = apply_overrides(spec.template, params)
        except ValueError as exc:
            # e.g. a sampled combination the job schema rejects: costs no GPU time
            self._refuse(obj, st, number, f"infeasible parameters {params}: {exc}")
            return None
        reason = self.budget.infeasible(meta["uid"], job_spec)
        if reason:
            self._refuse(obj, st, number, f"trial {number} not launched: {reason}")
            return None
        try:
            trial_obj = self.kube.create_custom(
                FTJ_PLURAL,
                render_trial(
                    meta,
                    job_name,
                    number,
                    params,
                    job_spec.to_wire(),
                ),
            )
        except (NameConflict, PreviousOwner) as exc:
            return exc  # the study keeps the trial; it is created once the name is free
        self.written(trial_obj)
        self.kube.event(
            obj,
            "Normal",
            "TrialCreated",
            f"trial {number}: {job_name} with {json.dumps(params, sort_keys=True)}",
        )
        return None

    def _refuse(self, obj: dict[str, Any], st: SweepStudy, number: int, reason: str) -> None:
        st.refuse(number, reason)
        self.kube.event(obj, "Warning", R.REASON_BUDGET_INFEASIBLE, reason)

    # --- intermediate reports (pruning) -----------------------------------------------------
    def learn_model(self, sweep: dict[str, Any], trial: dict[str, Any], facts: Any) -> None:
        """A trial reported its base model's config.json (read in its pod with its own
        credentials): later trials of this sweep get the budget check before launch."""
        uri = ((trial.get("spec") or {}).get("model") or {}).get("uri")
        if isinstance(uri, str):
            self.budget.learn(sweep["metadata"]["uid"], uri, model_facts(facts))

    def record(
        self, sweep: dict[str, Any], number: int, step: int, values: dict[str, float]
    ) -> bool:
        """An authenticated intermediate report reaches the study; True: prune the trial."""
        spec = FineTuneSweepSpec.model_validate(sweep["spec"])
        st = self.study(sweep, spec)
        metric = st.cfg.metrics[0]
        if metric not in values:
            return False  # e.g. progress only: nothing for the pruner
        st.report(number, step, float(values[metric]))
        return bool(st.should_prune(number))

    def tell_pruned(self, sweep: dict[str, Any], number: int, step: int) -> None:
        spec = FineTuneSweepSpec.model_validate(sweep["spec"])
        self.study(sweep, spec).tell_pruned(number, f"stopped early by the pruner at step {step}")

    @staticmethod
    def was_pruned(trial: dict[str, Any]) -> bool:
        return any(
            c.get("type") == R.COND_FAILED and c.get("reason") == R.REASON_TRIAL_PRUNED
            for c in (trial.get("status") or {}).get("conditions") or []
        )
