"""FineTuneJob reconciler: level-triggered and idempotent.

Every call reads the FineTuneJob and its children, decides, creates what is missing (child
names are deterministic, so a restarted controller finds rather than duplicates them) and
writes status only when it changed. Attempts: attempt N runs as Job `<job>-aN`; any failed
pod fails that Job (a torch gang cannot continue without a rank) and attempt N+1 starts from
the latest checkpoint, until spec.backoffLimit restarts are used up.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from orchestrator.api import FineTuneJobSpec, format_errors
from orchestrator.api import labels as L
from orchestrator.api import reasons as R
from orchestrator.api.conditions import get_condition, now_iso, set_condition
from orchestrator.api.trainer_config import SweepTrialRef
from orchestrator.controller.kube import FTJ_PLURAL, Kube
from orchestrator.controller.settings import ControllerSettings
from orchestrator.render import RenderDefaults, child_names, render_all

log = logging.getLogger("kubetune.jobs")

# Trainer termination reasons after which a retry cannot succeed (bad data, missing model,
# impossible config) or must not happen (pruned on purpose). Mirrors the trainer's table
# (orchestrator/trainer/errors.py) without importing the trainer.
PERMANENT_TRAINER_REASONS = frozenset(
    {"InvalidData", "ModelUnavailable", "InvalidConfig", "Pruned"}
)
PERMANENT_EXIT_CODES = frozenset({65, 66, 78, 80})
PRUNED_EXIT_CODE = 80

TOKEN_SECRET_SUFFIX = "-report-token"


def render_defaults(settings: ControllerSettings) -> RenderDefaults:
    return RenderDefaults(
        image=settings.trainer_image,
        storage_endpoint=settings.s3_endpoint,
        credentials_secret=settings.s3_credentials_secret,
        region=settings.s3_region,
    )


def sweep_ref(obj: dict[str, Any], settings: ControllerSettings) -> SweepTrialRef | None:
    """Trial FineTuneJobs (labelled by their sweep) report intermediate values for pruning."""
    labels = obj["metadata"].get("labels") or {}
    sweep, trial = labels.get(L.LABEL_SWEEP), labels.get(L.LABEL_TRIAL)
    if not sweep or trial is None:
        return None
    annotations = obj["metadata"].get("annotations") or {}
    try:
        params = json.loads(annotations.get(L.ANNOTATION_TRIAL_PARAMETERS, "{}"))
    except ValueError:
        params = {}
    return SweepTrialRef(
        name=sweep,
        trial_number=int(trial),
        report_url=settings.report_url,
        token_secret=obj["metadata"]["name"] + TOKEN_SECRET_SUFFIX,
        parameters=params,
    )


@dataclass
class PodOutcome:
    """What the fake or real kubelet recorded about a finished trainer container."""

    pod: str
    index: str
    exit_code: int | None
    reason: str | None
    message: str
    report: dict[str, Any] | None  # parsed trainer termination message, when it is JSON
    finished: str | None = None  # RFC 3339 finishedAt


def _outcomes(pods: list[dict[str, Any]]) -> list[PodOutcome]:
    out = []
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            term = (cs.get("state") or {}).get("terminated")
            if not term:
                continue
            msg = term.get("message") or ""
            report = None
            try:
                doc = json.loads(msg) if msg.strip().startswith("{") else None
                report = doc if isinstance(doc, dict) else None
            except ValueError:
                report = None
            out.append(
                PodOutcome(
                    pod=pod["metadata"]["name"],
                    index=(pod["metadata"].get("annotations") or {}).get(
                        "batch.kubernetes.io/job-completion-index", "?"
                    ),
                    exit_code=term.get("exitCode"),
                    reason=term.get("reason"),
                    message=msg,
                    report=report,
                    finished=term.get("finishedAt"),
                )
            )
    return sorted(out, key=lambda o: o.index)


KILLED_EXIT_CODES = frozenset({137, 143})  # SIGKILL / SIGTERM: stopped, not the cause


def _failure(outcomes: list[PodOutcome]) -> PodOutcome | None:
    """The pod that explains the failure: when one rank dies the Job controller stops the
    others (137/143), and the survivors may die of the broken collective afterwards — so
    prefer a real error over a kill, then the earliest to finish, then the lowest rank."""
    failed = [o for o in outcomes if o.exit_code not in (0, None)]
    if not failed:
        return None
    return min(failed, key=lambda o: (o.exit_code in KILLED_EXIT_CODES, o.finished or "",
                                      o.index))


def _describe(o: PodOutcome) -> str:
    text = o.report.get("message", "") if o.report else o.message
    text = " ".join(text.split())[-600:]
    return f"pod {o.pod} (node rank {o.index}) exited with code {o.exit_code}" + (
        f": {text}" if text else ""
    )


def _is_permanent(o: PodOutcome) -> bool:
    if o.report and o.report.get("reason") in PERMANENT_TRAINER_REASONS:
        return True
    return o.exit_code in PERMANENT_EXIT_CODES


def _scheduling_message(pods: list[dict[str, Any]]) -> str | None:
    for pod in pods:
        for c in (pod.get("status") or {}).get("conditions") or []:
            if c.get("type") == "PodScheduled" and c.get("status") == "False":
                return f"pod {pod['metadata']['name']} unschedulable: {c.get('message', '')}"
    return None


class JobReconciler:
    def __init__(self, kube: Kube, settings: ControllerSettings) -> None:
        self.kube = kube
        self.settings = settings
        self.defaults = render_defaults(settings)

    # ------------------------------------------------------------------------------------
    def reconcile(self, obj: dict[str, Any]) -> str | None:
        """Converges one FineTuneJob; returns its phase."""
        meta = obj["metadata"]
        if meta.get("deletionTimestamp"):
            return None  # children go with the owner (garbage collector)
        status: dict[str, Any] = dict(obj.get("status") or {})
        before = json.dumps(status, sort_keys=True)
        new = self._decide(obj, status)
        if json.dumps(new, sort_keys=True) != before:
            self.kube.patch_status(FTJ_PLURAL, meta["namespace"], meta["name"], new)
        return new.get("phase")

    # ------------------------------------------------------------------------------------
    def _event(self, obj: dict[str, Any], reason: str, message: str, warning: bool = False) -> None:
        self.kube.event(obj, "Warning" if warning else "Normal", reason, message)

    def _fail(
        self, obj: dict[str, Any], status: dict[str, Any], reason: str, message: str
    ) -> dict[str, Any]:
        if status.get("phase") != R.PHASE_FAILED:
            self._event(obj, reason, message, warning=True)
        conds = status.get("conditions") or []
        conds = set_condition(conds, R.COND_RUNNING, False, reason, message)
        conds = set_condition(conds, R.COND_FAILED, True, reason, message)
        return {
            **status,
            "phase": R.PHASE_FAILED,
            "conditions": conds,
            "message": message,
            "completionTime": status.get("completionTime") or now_iso(),
        }

    def _decide(self, obj: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        ns, name = meta["namespace"], meta["name"]
        if status.get("phase") in R.TERMINAL_PHASES:
            return status
        status.setdefault("conditions", [])
        status["observedGeneration"] = meta.get("generation")

        # 1. the spec (the CRD already enforced the schema; this repeats the pydantic rules)
        try:
            spec = FineTuneJobSpec.model_validate(obj.get("spec") or {})
        except ValidationError as exc:
            return self._fail(obj, status, R.REASON_INVALID_SPEC, format_errors(exc, "spec."))

        # 2. what only the controller can see: the credentials Secret
        secret = spec.storage.credentials_secret or self.defaults.credentials_secret
        if secret and not self.kube.secret_exists(ns, secret):
            msg = (
                f"Secret {secret!r} (spec.storage.credentialsSecret) not found in namespace "
                f"{ns}: create it with keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            )
            cond = get_condition(status["conditions"], R.COND_VALID)
            if not cond or cond.get("reason") != R.REASON_SECRET_MISSING:
                self._event(obj, R.REASON_SECRET_MISSING, msg, warning=True)
            status["conditions"] = set_condition(
                status["conditions"], R.COND_VALID, False, R.REASON_SECRET_MISSING, msg
            )
            return {**status, "phase": R.PHASE_PENDING, "message": msg}
        status["conditions"] = set_condition(
            status["conditions"], R.COND_VALID, True, R.REASON_VALID, "spec and references valid"
        )

        # 3. the current attempt's children
        attempt = max(int(status.get("attempts") or 0), 1)
        if not status.get("attempts"):
            status["attempts"] = 1
            status["startTime"] = status.get("startTime") or now_iso()
        names = child_names(name, attempt)
        # a brand-new FineTuneJob has no Job yet: skip the lookup (create tolerates 409)
        first_sight = not get_condition(status["conditions"], R.COND_CREATED)
        job = None if first_sight else self.kube.get_job(ns, names.job)
        if job is None:
            self._create_children(obj, spec, attempt)
            status["conditions"] = set_condition(
                status["conditions"],
                R.COND_CREATED,
                True,
                R.REASON_CREATED,
                f"attempt {attempt}: Job {names.job} created",
            )
            self._event(
                obj,
                R.REASON_CREATED,
                f"attempt {attempt}: created Job {names.job} "
                f"({spec.distributed.nodes} node(s) x {spec.distributed.gpus_per_node} GPU)",
            )
            status.setdefault("phase", R.PHASE_PENDING)
            if not status.get("message"):
                status["message"] = f"attempt {attempt} created"
            return status
        return self._observe(obj, spec, status, attempt, job)

    def _create_children(self, obj: dict[str, Any], spec: FineTuneJobSpec, attempt: int) -> None:
        meta = obj["metadata"]
        job_meta = {
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
            "labels": meta.get("labels") or {},
        }
        # The Job first: it is what the scheduler waits for (pods only start once the
        # ConfigMap exists, so the order is safe); a crash in between converges on retry.
        children = render_all(job_meta, spec, attempt, self.defaults, sweep_ref(obj, self.settings))
        for child in sorted(children, key=lambda c: c["kind"] != "Job"):
            self.kube.create(child)

    def _observe(
        self,
        obj: dict[str, Any],
        spec: FineTuneJobSpec,
        status: dict[str, Any],
        attempt: int,
        job: dict[str, Any],
    ) -> dict[str, Any]:
        meta = obj["metadata"]
        ns, name = meta["namespace"], meta["name"]
        names = child_names(name, attempt)
        jstatus = job.get("status") or {}
        jconds = {
            c["type"]: c for c in jstatus.get("conditions") or [] if c.get("status") == "True"
        }
        selector = f"{L.LABEL_JOB}={name},{L.LABEL_ATTEMPT}={attempt}"

        # suspension: spec.suspend wins; a queued job stays suspended until Kueue admits it
        want_suspend = spec.suspend
        job_suspended = bool((job.get("spec") or {}).get("suspend"))
        if not spec.queue_name and want_suspend != job_suspended:
            self.kube.patch_job(ns, names.job, {"spec": {"suspend": want_suspend}})
            job_suspended = want_suspend
            self._event(
                obj,
                R.REASON_SUSPENDED if want_suspend else R.REASON_RESUMED,
                f"Job {names.job} {'suspended' if want_suspend else 'resumed'}",
            )

        if "Complete" in jconds or "SuccessCriteriaMet" in jconds:
            outcomes = _outcomes(self.kube.list_pods(ns, selector))
            report = (
                next((o.report for o in outcomes if o.report and o.index == "0"), None)
                or next((o.report for o in outcomes if o.report), None)
                or {}
            )
            metrics = {
                k: v
                for k, v in (report.get("metrics") or {}).items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            }
            msg = f"training finished after {attempt} attempt(s)"
            if "evalLoss" in metrics:
                msg += f"; evalLoss {metrics['evalLoss']:.4g}"
            conds = set_condition(
                status["conditions"], R.COND_RUNNING, False, R.REASON_COMPLETED, msg
            )
            conds = set_condition(conds, R.COND_SUCCEEDED, True, R.REASON_SUCCEEDED, msg)
            new = {
                **status,
                "phase": R.PHASE_SUCCEEDED,
                "conditions": conds,
                "message": msg,
                "completionTime": now_iso(),
            }
            if metrics:
                new["metrics"] = metrics
            if isinstance(report.get("artifact"), dict) and report["artifact"].get("uri"):
                new["artifact"] = {
                    k: v for k, v in report["artifact"].items() if k in ("uri", "sha256")
                }
            if isinstance(report.get("progress"), dict):
                new["progress"] = report["progress"]
            self._event(obj, R.REASON_SUCCEEDED, msg)
            return new

        if "Failed" in jconds or "FailureTarget" in jconds:
            outcomes = _outcomes(self.kube.list_pods(ns, selector))
            failed = _failure(outcomes)
            detail = (
                _describe(failed)
                if failed
                else (
                    jconds.get("Failed", jconds.get("FailureTarget", {})).get("message")
                    or "the Job failed"
                )
            )
            if (failed and failed.report and failed.report.get("status") == "Pruned") or (
                failed and failed.exit_code == PRUNED_EXIT_CODE
            ):
                return self._fail(
                    obj,
                    status,
                    R.REASON_TRIAL_PRUNED,
                    f"stopped early by the sweep's pruner ({detail})",
                )
            if failed and _is_permanent(failed):
                reason = (failed.report or {}).get("reason") or R.REASON_TRAINER_ERROR
                return self._fail(
                    obj,
                    status,
                    reason,
                    f"{detail}; not retried: this error cannot go away on retry",
                )
            if attempt <= spec.backoff_limit:
                nxt = attempt + 1
                msg = (
                    f"attempt {attempt} failed: {detail}; restarting the gang as attempt "
                    f"{nxt} of {spec.backoff_limit + 1} (resumes from the latest checkpoint)"
                )
                self._event(obj, R.REASON_RESTARTING, msg, warning=True)
                # record the attempt first: a crash right after still converges to attempt nxt
                status = {**status, "attempts": nxt, "phase": R.PHASE_PENDING, "message": msg}
                status["conditions"] = set_condition(
                    status["conditions"], R.COND_RUNNING, False, R.REASON_RESTARTING, msg
                )
                self.kube.patch_status(FTJ_PLURAL, ns, name, status)
                self.kube.delete_job(ns, names.job)
                self._create_children(obj, spec, nxt)
                return status
            return self._fail(
                obj,
                status,
                R.REASON_BACKOFF_LIMIT_EXCEEDED,
                f"{detail}; gave up after {attempt} attempt(s) (backoffLimit {spec.backoff_limit})",
            )

        if job_suspended:
            reason = R.REASON_QUEUED if spec.queue_name and not spec.suspend else R.REASON_SUSPENDED
            msg = (
                f"waiting for Kueue queue {spec.queue_name} to admit Job {names.job}"
                if reason == R.REASON_QUEUED
                else "suspended (spec.suspend)"
            )
            status["conditions"] = set_condition(
                status["conditions"], R.COND_SUSPENDED, True, reason, msg
            )
            status["conditions"] = set_condition(
                status["conditions"], R.COND_RUNNING, False, reason, msg
            )
            return {**status, "phase": R.PHASE_PENDING, "message": msg}
        status["conditions"] = set_condition(
            status["conditions"], R.COND_SUSPENDED, False, R.REASON_RESUMED, "not suspended"
        )

        pods = self.kube.list_pods(ns, selector)
        running = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]
        nodes = spec.distributed.nodes
        if len(running) >= nodes:
            msg = f"attempt {attempt}: all {nodes} pod(s) running"
            status["conditions"] = set_condition(
                status["conditions"], R.COND_RUNNING, True, R.REASON_RUNNING, msg
            )
            if status.get("phase") != R.PHASE_RUNNING:
                self._event(obj, R.REASON_RUNNING, msg)
            return {**status, "phase": R.PHASE_RUNNING, "message": msg}
        # a partially scheduled gang is not running: say which pod waits and why
        msg = _scheduling_message(pods) or (
            f"attempt {attempt}: {len(running)}/{nodes} pod(s) running"
        )
        status["conditions"] = set_condition(
            status["conditions"], R.COND_RUNNING, False, R.REASON_PENDING, msg
        )
        return {**status, "phase": R.PHASE_PENDING, "message": msg}
