"""FineTuneSweep reconciler: one durable Optuna study per sweep; trials are child FineTuneJobs.

Source of truth: the study in RDB storage (SQLite on a volume by default). The trial's job
name is derived from its number and stored on the trial, so after a crash between `ask` and
the child's creation the next reconcile finds the RUNNING trial without a job and creates it
(deterministic name: a create that already happened is a no-op). No trial is lost and none
runs twice. Results come back from the children's status: Succeeded -> tell values,
Failed -> tell FAIL, pruned -> tell PRUNED (all idempotent).
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from pydantic import ValidationError

from orchestrator.api import FineTuneSweepSpec, apply_overrides, format_errors, trial_name
from orchestrator.api import labels as L
from orchestrator.api import reasons as R
from orchestrator.api.conditions import now_iso, set_condition
from orchestrator.controller import metrics
from orchestrator.controller.feasibility import BudgetChecker
from orchestrator.controller.jobs import TOKEN_SECRET_SUFFIX
from orchestrator.controller.kube import FTJ_PLURAL, FTS_PLURAL, Kube
from orchestrator.controller.settings import ControllerSettings
from orchestrator.sweep import SweepConfig, SweepStudy, generate_secret, mint_token, open_study
from orchestrator.sweep import study_name as make_study_name
from orchestrator.sweep.errors import SweepError

log = logging.getLogger("kubetune.sweeps")

KEY_SECRET_SUFFIX = "-report-key"
TRIAL_LIST_LIMIT = 50


def _b64(text: str) -> str:
    import base64

    return base64.b64encode(text.encode()).decode()


def _unb64(text: str) -> str:
    import base64

    return base64.b64decode(text).decode()


class SweepReconciler:
    def __init__(self, kube: Kube, settings: ControllerSettings) -> None:
        self.kube = kube
        self.settings = settings
        self._studies: dict[str, Any] = {}  # sweep uid -> optuna.Study (config may change)
        self._guard = threading.Lock()
        self._keys: dict[str, str] = {}  # sweep uid -> report-token HMAC key
        self.budget = BudgetChecker(kube, settings.s3_credentials_secret, settings.s3_endpoint)

    # --- study and report key -------------------------------------------------------------
    def study(self, obj: dict[str, Any], spec: FineTuneSweepSpec) -> SweepStudy:
        cfg = SweepConfig.from_spec(spec)
        uid = obj["metadata"]["uid"]
        with self._guard:
            study = self._studies.get(uid)
            if study is None:
                name = make_study_name(obj["metadata"]["namespace"], obj["metadata"]["name"])
                study = open_study(cfg, f"{name}.{uid[:8]}", self.settings.study_storage)
                self._studies[uid] = study
        return SweepStudy(cfg, study)

    def report_key(self, obj: dict[str, Any], create: bool = True) -> str | None:
        """The sweep's HMAC key, kept in a Secret owned by the sweep (survives restarts)."""
        meta = obj["metadata"]
        if meta["uid"] in self._keys:  # a key never changes for a sweep: read it once
            return self._keys[meta["uid"]]
        name = meta["name"] + KEY_SECRET_SUFFIX
        data = self.kube.get_secret_data(meta["namespace"], name)
        if data and data.get("key"):
            self._keys[meta["uid"]] = _unb64(data["key"])
            return self._keys[meta["uid"]]
        if not create:
            return None
        self.kube.create(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": "Opaque",
                "metadata": {
                    "name": name,
                    "namespace": meta["namespace"],
                    "labels": {
                        L.LABEL_NAME: L.APP_NAME,
                        L.LABEL_MANAGED_BY: L.MANAGED_BY,
                        L.LABEL_SWEEP: meta["name"],
                    },
                    "ownerReferences": [_owner(obj)],
                },
                "data": {"key": _b64(generate_secret())},
            }
        )
        data = self.kube.get_secret_data(meta["namespace"], name) or {}  # the winner's, on a race
        self._keys[meta["uid"]] = _unb64(data["key"])
        return self._keys[meta["uid"]]

    # --- reconcile --------------------------------------------------------------------------
    def reconcile(self, obj: dict[str, Any]) -> str | None:
        meta = obj["metadata"]
        if meta.get("deletionTimestamp"):
            return None
        status: dict[str, Any] = dict(obj.get("status") or {})
        if status.get("phase") in R.TERMINAL_PHASES:
            return status.get("phase")
        before = json.dumps(status, sort_keys=True)
        new = self._decide(obj, status)
        if json.dumps(new, sort_keys=True) != before:
            self.kube.patch_status(FTS_PLURAL, meta["namespace"], meta["name"], new)
        return new.get("phase")

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

    def _decide(self, obj: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        ns, name = meta["namespace"], meta["name"]
        try:
            spec = FineTuneSweepSpec.model_validate(obj.get("spec") or {})
            st = self.study(obj, spec)
        except ValidationError as exc:
            return self._fail(obj, status, R.REASON_INVALID_SPEC, format_errors(exc, "spec."))
        except SweepError as exc:
            return self._fail(obj, status, R.REASON_INVALID_SPEC, str(exc))

        children = {
            c["metadata"]["name"]: c
            for c in self.kube.list_custom(FTJ_PLURAL, ns, f"{L.LABEL_SWEEP}={name}")
        }

        # 1. results of finished children reach the study (idempotent tells)
        for child in children.values():
            self._tell_child(st, child)

        # 2. trials asked before a crash but never created
        for trial in st.unlaunched(children):
            self._create_trial(obj, spec, st, trial.number)

        # 3. launch up to parallelism, within maxTrials
        # one at a time: a refused (infeasible) trial frees its slot for the next ask at once
        plan = st.plan()
        for _ in range(spec.max_trials):
            if plan.launch <= 0:
                break
            number, _params, job = st.ask(lambda n: trial_name(name, n))
            if job is not None:  # None: an identical earlier trial's result was reused
                self._create_trial(obj, spec, st, number)
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
        new["trials"] = (
            counts.to_wire() if hasattr(counts, "to_wire") else counts.model_dump(by_alias=True)
        )
        new["studyName"] = st.study.study_name
        new["observedGeneration"] = meta.get("generation")
        new["startTime"] = status.get("startTime") or now_iso()
        if best is not None:
            new["bestTrial"] = _wire(best)
        front = st.pareto_front()
        if front:
            new["paretoFront"] = [_wire(t) for t in front]
        new["trialList"] = [_wire(r) for r in st.records(TRIAL_LIST_LIMIT)]
        conds = list(status.get("conditions") or [])
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

    def _tell_child(self, st: SweepStudy, child: dict[str, Any]) -> None:
        cstatus = child.get("status") or {}
        phase = cstatus.get("phase")
        trial = (child["metadata"].get("labels") or {}).get(L.LABEL_TRIAL)
        if trial is None or phase not in R.TERMINAL_PHASES:
            return
        number = int(trial)
        if phase == R.PHASE_SUCCEEDED:
            st.tell_metrics(number, cstatus.get("metrics") or {}, artifact=cstatus.get("artifact"))
            return
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
        else:
            st.tell_failed(number, cstatus.get("message") or "the trial job failed")

    def _create_trial(
        self, obj: dict[str, Any], spec: FineTuneSweepSpec, st: SweepStudy, number: int
    ) -> None:
        meta = obj["metadata"]
        ns, sweep = meta["namespace"], meta["name"]
        params = st.params(number)
        job_name = trial_name(sweep, number)
        try:
            job_spec = apply_overrides(spec.template, params)
        except ValueError as exc:
            # e.g. a sampled combination the job schema rejects: costs no GPU time
            self._refuse(obj, st, number, f"infeasible parameters {params}: {exc}")
            return
        reason = self.budget.infeasible(ns, job_spec)
        if reason:
            self._refuse(obj, st, number, f"trial {number} not launched: {reason}")
            return
        key = self.report_key(obj)
        assert key is not None
        self.kube.create(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": "Opaque",
                "metadata": {
                    "name": job_name + TOKEN_SECRET_SUFFIX,
                    "namespace": ns,
                    "labels": {
                        L.LABEL_NAME: L.APP_NAME,
                        L.LABEL_MANAGED_BY: L.MANAGED_BY,
                        L.LABEL_SWEEP: sweep,
                        L.LABEL_TRIAL: str(number),
                    },
                    "ownerReferences": [_owner(obj)],
                },
                "data": {"token": _b64(mint_token(key, meta["uid"], number))},
            }
        )
        self.kube.create_custom(
            FTJ_PLURAL,
            {
                "apiVersion": "kubetune.io/v1alpha1",
                "kind": "FineTuneJob",
                "metadata": {
                    "name": job_name,
                    "namespace": ns,
                    "labels": {
                        L.LABEL_NAME: L.APP_NAME,
                        L.LABEL_MANAGED_BY: L.MANAGED_BY,
                        L.LABEL_COMPONENT: L.COMPONENT_TRIAL,
                        L.LABEL_SWEEP: sweep,
                        L.LABEL_TRIAL: str(number),
                    },
                    "annotations": {
                        L.ANNOTATION_TRIAL_PARAMETERS: json.dumps(params, sort_keys=True)
                    },
                    "ownerReferences": [_owner(obj)],
                },
                "spec": job_spec.to_wire()
                if hasattr(job_spec, "to_wire")
                else job_spec.model_dump(by_alias=True, exclude_none=True, mode="json"),
            },
        )
        self.kube.event(
            obj,
            "Normal",
            "TrialCreated",
            f"trial {number}: {job_name} with {json.dumps(params, sort_keys=True)}",
        )

    def _refuse(self, obj: dict[str, Any], st: SweepStudy, number: int, reason: str) -> None:
        st.refuse(number, reason)
        self.kube.event(obj, "Warning", R.REASON_BUDGET_INFEASIBLE, reason)

    # --- intermediate reports (pruning) -----------------------------------------------------
    def handle_report(self, body: dict[str, Any], token: str | None) -> tuple[int, dict[str, Any]]:
        """POST /report from a trial pod. Returns (HTTP status, JSON answer)."""
        ns, job = body.get("namespace"), body.get("job")
        if not isinstance(ns, str) or not isinstance(job, str):
            return 400, {"error": "namespace and job are required"}
        child = self.kube.get_custom(FTJ_PLURAL, ns, job)
        labels = (child or {}).get("metadata", {}).get("labels") or {}
        sweep_name, trial = labels.get(L.LABEL_SWEEP), labels.get(L.LABEL_TRIAL)
        if child is None or not sweep_name or trial is None:
            return 404, {"error": f"{ns}/{job} is not a sweep trial"}
        sweep = self.kube.get_custom(FTS_PLURAL, ns, sweep_name)
        if sweep is None:
            return 404, {"error": f"sweep {ns}/{sweep_name} not found"}
        key = self.report_key(sweep, create=False)
        from orchestrator.sweep import verify_token

        number = int(trial)
        if not key or not verify_token(key, token, sweep["metadata"]["uid"], number):
            metrics.INTERMEDIATE_REPORTS.labels("unauthorized").inc()
            return 403, {"error": "token does not belong to this trial"}
        spec = FineTuneSweepSpec.model_validate(sweep["spec"])
        st = self.study(sweep, spec)
        metric = st.cfg.metrics[0]
        values = body.get("metrics") or {}
        if metric not in values:
            return 400, {"error": f"metrics.{metric} missing (the sweep's first objective)"}
        step = int(body.get("step") or 0)
        st.report(number, step, float(values[metric]))
        prune = st.should_prune(number)
        metrics.INTERMEDIATE_REPORTS.labels("prune" if prune else "continue").inc()
        if prune:
            self._stop_pruned(child, st, number, step)
        return 200, {"action": "prune" if prune else "continue"}

    def _stop_pruned(self, child: dict[str, Any], st: SweepStudy, number: int, step: int) -> None:
        """Tell PRUNED, mark the trial job terminal and stop its pods now (the trainer also
        stops on the 'prune' answer; this frees GPUs even if it does not)."""
        meta = child["metadata"]
        msg = f"stopped early by the pruner at step {step}"
        st.tell_pruned(number, msg)
        status = dict(child.get("status") or {})
        conds = set_condition(
            status.get("conditions") or [], R.COND_FAILED, True, R.REASON_TRIAL_PRUNED, msg
        )
        conds = set_condition(conds, R.COND_RUNNING, False, R.REASON_TRIAL_PRUNED, msg)
        self.kube.patch_status(
            FTJ_PLURAL,
            meta["namespace"],
            meta["name"],
            {
                **status,
                "phase": R.PHASE_FAILED,
                "conditions": conds,
                "message": msg,
                "completionTime": now_iso(),
            },
        )
        attempt = int(status.get("attempts") or 1)
        from orchestrator.render import child_names

        self.kube.delete_job(meta["namespace"], child_names(meta["name"], attempt).job)
        self.kube.event(child, "Normal", R.REASON_TRIAL_PRUNED, msg)

    def start_report_server(self, controller: Any) -> None:
        from orchestrator.controller.report_server import serve

        serve(self, self.settings.report_port, controller)


def _owner(obj: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": obj.get("apiVersion", "kubetune.io/v1alpha1"),
        "kind": obj.get("kind", "FineTuneSweep"),
        "name": obj["metadata"]["name"],
        "uid": obj["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _wire(model: Any) -> dict[str, Any]:
    if hasattr(model, "to_wire"):
        return dict(model.to_wire())
    return dict(model.model_dump(by_alias=True, exclude_none=True, mode="json"))
