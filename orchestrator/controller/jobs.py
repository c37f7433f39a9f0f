"""FineTuneJob reconciler: level-triggered and idempotent.

Every call gets a `Snapshot` (the FineTuneJob, its Jobs and the current attempt's pods, all
from the watch caches). `decide(snapshot)` is pure: it returns the next status and a list of
actions (create the attempt's children, patch or delete a Job, record a status first, emit
an Event), unit-tested without a cluster. `JobReconciler` applies the actions — child names
are deterministic, so a restarted controller finds rather than duplicates them — and
patches only the status fields that changed. Attempts: attempt N runs as Job `<job>-aN`; any failed
pod fails that Job (a torch gang cannot continue without a rank) and attempt N+1 starts from
the latest checkpoint, until spec.backoffLimit restarts are used up.

A failed attempt's Job is kept, not deleted, when the next one starts: its pods have ended
(the Job controller stops the survivors of a failed Job, and a failed Job never starts a pod
again), and they keep the logs users need to see why it failed (`kubetune logs --attempt N`).
`Retention` bounds what is kept: the newest `keep` superseded attempts' Jobs, each with
`ttlSecondsAfterFinished`; the FineTuneJob's deletion takes them all (ownerReferences). An
earlier attempt is never taken for the current one: the current attempt is
`status.attempts`, its Job is `<job>-a<attempts>` and only its pods are `Snapshot.pods`. And
nothing of an earlier attempt may run on: a superseded Job that has not finished, or whose
pods are still active (not terminating) a while after it failed, is deleted.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from orchestrator.api import FineTuneJobSpec, format_errors
from orchestrator.api import labels as L
from orchestrator.api import reasons as R
from orchestrator.api.conditions import get_condition, now_iso, set_condition
from orchestrator.api.exit_codes import KILLED, PERMANENT, PERMANENT_REASONS, ExitCode
from orchestrator.api.trainer_config import ProgressRef, SweepTrialRef
from orchestrator.controller.kube import FTJ_PLURAL, Kube, Rejected
from orchestrator.controller.ownership import NameConflict, PreviousOwner, blocked_condition
from orchestrator.controller.settings import ControllerSettings
from orchestrator.render import RenderDefaults, child_names, render_all, secret_refs
from orchestrator.render.sweep import SWEEP_KIND
from orchestrator.storage.errors import InvalidURIError
from orchestrator.storage.uri import parse_uri

log = logging.getLogger("kubetune.jobs")

# Trainer exits after which a retry cannot succeed (bad data, missing model, impossible
# config) or must not happen (pruned on purpose): the shared table in orchestrator.api.
PERMANENT_TRAINER_REASONS = PERMANENT_REASONS
PERMANENT_EXIT_CODES = frozenset(int(c) for c in PERMANENT)
PRUNED_EXIT_CODE = int(ExitCode.PRUNED)


def render_defaults(settings: ControllerSettings) -> RenderDefaults:
    """The controller's defaults for what a spec leaves out (image, storage, pod knobs)."""
    return settings.render_defaults()


def sweep_ref(obj: dict[str, Any], settings: ControllerSettings) -> SweepTrialRef | None:
    """Trial FineTuneJobs report intermediate values for pruning. A trial is labelled by its
    sweep *and* controller-owned by it: a `kubetune.io/trial` label alone is anyone's."""
    labels = obj["metadata"].get("labels") or {}
    sweep, trial = labels.get(L.LABEL_SWEEP), labels.get(L.LABEL_TRIAL)
    if not sweep or trial is None or not str(trial).isdigit():
        return None
    if not any(
        r.get("controller") and r.get("kind") == SWEEP_KIND and r.get("name") == sweep
        for r in obj["metadata"].get("ownerReferences") or []
    ):
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
        parameters=params,
    )


@dataclass
class Snapshot:
    """What the caches know about one FineTuneJob: the object, its batch Jobs by name (every
    attempt's), the pods of its current attempt and those of earlier attempts."""

    obj: dict[str, Any]
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    pods: list[dict[str, Any]] = field(default_factory=list)
    progress: dict[str, Any] | None = None  # live progress reported by the trainer, to write
    # pods of earlier attempts by attempt number: only checked to be over, never "the gang"
    old_pods: dict[int, list[dict[str, Any]]] = field(default_factory=dict)


@dataclass(frozen=True)
class Retention:
    """What is kept of failed (superseded) attempts: their Jobs, so their pods and logs."""

    keep: int = 3  # the newest `keep` superseded attempts' Jobs; older ones are deleted
    ttl_seconds: int = 86400  # ttlSecondsAfterFinished on a superseded Job (0: none)

    @classmethod
    def of(cls, settings: ControllerSettings) -> Retention:
        return cls(settings.failed_attempts_kept, settings.failed_attempt_ttl_seconds)


def job_attempt(job: dict[str, Any]) -> int | None:
    """The attempt a batch Job runs: its kubetune.io/attempt label, else the `-a<N>` that
    ends its name (`render.names`); None when neither says."""
    meta = job["metadata"]
    value = str((meta.get("labels") or {}).get(L.LABEL_ATTEMPT) or "")
    if not value:
        value = str(meta.get("name") or "").rpartition("-a")[2]
    return int(value) if value.isdigit() else None


@dataclass
class Result:
    """When to look at the object again without an event (None: only on events)."""

    requeue_after: float | None = None


def status_patch(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """JSON merge patch from `before` to `after` (top-level status fields; None removes)."""
    patch = {k: v for k, v in after.items() if before.get(k) != v}
    patch.update({k: None for k in before if k not in after})
    return patch


def with_summary(progress: dict[str, Any]) -> dict[str, Any]:
    """Adds `summary` ("120/500"), what the Progress column of `kubectl get ftj` shows."""
    step, total = progress.get("step"), progress.get("totalSteps")
    if not isinstance(step, int):
        return progress
    return {**progress, "summary": f"{step}/{total}" if isinstance(total, int) else str(step)}


def created_attempt(status: dict[str, Any]) -> int:
    """The attempt whose children the controller recorded as created (0: none yet)."""
    cond = get_condition(status.get("conditions") or [], R.COND_CREATED)
    if not cond or cond.get("status") != "True":
        return 0
    word = str(cond.get("message") or "").split(":", 1)[0].removeprefix("attempt ")
    return int(word) if word.isdigit() else 0


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


KILLED_EXIT_CODES = KILLED  # SIGKILL / SIGTERM: stopped, not the cause


def _failure(outcomes: list[PodOutcome]) -> PodOutcome | None:
    """The pod that explains the failure: when one rank dies the Job controller stops the
    others (137/143), and the survivors may die of the broken collective afterwards — so
    prefer a real error over a kill, then the earliest to finish, then the lowest rank."""
    failed = [o for o in outcomes if o.exit_code not in (0, None)]
    if not failed:
        return None
    return min(failed, key=lambda o: (_collateral(o), o.finished or "", o.index))


def _collateral(o: PodOutcome) -> bool:
    """Killed from outside (137/143/stopped), unless the kernel's OOM killer did it: running
    out of memory is a cause, the kills of the other ranks that follow are not."""
    return o.exit_code in KILLED_EXIT_CODES and o.reason != R.REASON_OOM_KILLED


def _describe(o: PodOutcome) -> str:
    if o.reason == R.REASON_OOM_KILLED:
        return (
            f"pod {o.pod} (node rank {o.index}) was OOMKilled (exit code {o.exit_code}): it "
            "used more memory than its limit; raise spec.resources.memory, lower "
            "spec.training.microBatchSize or maxSeqLength, or offload with ZeRO"
        )
    text = o.report.get("message", "") if o.report else o.message
    text = _squeeze(text, 600)
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


def _squeeze(text: Any, keep: int) -> str:
    """One line, the last `keep` characters: the end of a message says what went wrong."""
    return " ".join(str(text or "").split())[-keep:]


def _true_conditions(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A batch Job's conditions that hold, by type."""
    return {
        c["type"]: c
        for c in (job.get("status") or {}).get("conditions") or []
        if c.get("status") == "True"
    }


def _start_problem(pods: list[dict[str, Any]]) -> tuple[str, str] | None:
    """(reason, message) when the kubelet cannot start a container of the gang: a missing or
    private image, a Secret or key the pod references that does not exist, ... — the pod
    waits forever without failing, so only its container status tells."""
    for pod in pods:
        st = pod.get("status") or {}
        for cs in (st.get("initContainerStatuses") or []) + (st.get("containerStatuses") or []):
            waiting = (cs.get("state") or {}).get("waiting") or {}
            reason = waiting.get("reason")
            if reason in R.POD_START_PROBLEMS:
                detail = _squeeze(waiting.get("message"), 600)
                return reason, (
                    f"pod {pod['metadata']['name']} container {cs.get('name')}: {reason}"
                    + (f": {detail}" if detail else "")
                )
    return None


def _disruption(pods: list[dict[str, Any]]) -> str | None:
    """The pod condition DisruptionTarget (eviction, preemption, drain, node pressure) of a
    pod of the gang, described; None when no pod is being disrupted."""
    for pod in pods:
        for c in (pod.get("status") or {}).get("conditions") or []:
            if c.get("type") == "DisruptionTarget" and c.get("status") == "True":
                why = _squeeze(c.get("message"), 300)
                return f"pod {pod['metadata']['name']}: {c.get('reason') or 'disrupted'}" + (
                    f" ({why})" if why else ""
                )
    return None


def _job_failed_by_disruption(jconds: dict[str, dict[str, Any]]) -> bool:
    """The Job's podFailurePolicy failed it for a DisruptionTarget pod (its only FailJob rule
    matches that condition); the evicted pod itself may be gone from the cache by now."""
    cond = jconds.get("FailureTarget") or jconds.get("Failed") or {}
    return cond.get("reason") == "PodFailurePolicy" and "DisruptionTarget" in str(
        cond.get("message") or ""
    )


def cluster_output_problem(uri: str, field_name: str = "spec.output.uri") -> str | None:
    """Why `uri` cannot be a cluster job's output (None: it can). A `file://` output would
    be written inside the pod and die with it; `kubetune run --local` accepts it."""
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else "file"
    if scheme != "file":
        return None
    return (
        f"{field_name} {uri!r} is a file:// location: in a cluster it would be written inside "
        f"the pod and lost with it; use s3://bucket/prefix/ or pvc://claim/path/ "
        "(file:// outputs are for `kubetune run --local`)"
    )


def artifact_problem(uri: Any, output: str, job_name: str) -> str | None:
    """Why the artifact URI a trainer reported is not this job's (None: it is). It must lie
    under `<spec.output.uri>/<job name>/`, where the trainer writes, compared as canonical
    URIs: no `.`/`..`/empty path segments and no percent-escapes (S3 keys are literal, so a
    normalised `a//b` would be another object than the one written), the same scheme and
    bucket or claim, and whole path segments (`out/job-2/` is not under `out/job/`)."""
    expected = f"{output.rstrip('/')}/{job_name}/"
    why = (
        f"the trainer reported artifact {str(uri)[:300]!r}, which is not under this job's "
        f"output {expected!r} (spec.output.uri + job name); refusing to record it as the "
        "job's result"
    )
    if not isinstance(uri, str) or "://" not in uri or "%" in uri:
        return why
    path = uri.split("://", 1)[1].partition("/")[2]
    segments = path.split("/")
    if segments and segments[-1] == "":
        segments = segments[:-1]  # one trailing slash: a prefix
    if any(seg in ("", ".", "..") for seg in segments):
        return why
    try:
        art, want = parse_uri(uri), parse_uri(expected)
    except InvalidURIError:
        return why
    inside = art.key == want.key or art.key.startswith(want.key + "/")
    if art.scheme != want.scheme or art.bucket != want.bucket or not inside:
        return why
    return None


# --- decisions: pure --------------------------------------------------------------------
@dataclass
class CheckSecret:
    """The decision needs to know whether this Secret exists (read, then decide again)."""

    name: str


@dataclass
class CreateChildren:
    """Create the attempt's ConfigMap, Service and Job (AlreadyExists is fine)."""

    spec: FineTuneJobSpec
    attempt: int
    again: bool = False  # recorded as created already: only a deleted Job is re-created


@dataclass
class PatchJob:
    name: str
    patch: dict[str, Any]


@dataclass
class DeleteJob:
    name: str


@dataclass
class RecordStatus:
    """Write this status before the actions that follow (a crash after it converges)."""

    status: dict[str, Any]


@dataclass
class Emit:
    """A Kubernetes Event on the FineTuneJob."""

    reason: str
    message: str
    warning: bool = False


@dataclass
class Wait:
    """Nothing to do until more is known; look again after `seconds`."""

    seconds: float


Action = CheckSecret | CreateChildren | PatchJob | DeleteJob | RecordStatus | Emit | Wait

# How long a finished Job's pods may lag behind it in the cache before the controller
# decides with what it has (a pod deleted meanwhile never catches up).
POD_CATCH_UP_SECONDS = 15.0
# How long after a superseded attempt's Job failed its pods may still be active without
# being deleted (the Job controller deletes them at once) before the controller deletes the
# whole Job (and with it their logs) so that they cannot hold GPUs.
STRAGGLER_SECONDS = 120.0
FINISHED_JOB_CONDITIONS = ("Failed", "FailureTarget", "Complete", "SuccessCriteriaMet")


def _since(cond: dict[str, Any]) -> float:
    """Seconds since the condition's lastTransitionTime (infinite when it has none)."""
    try:
        t = dt.datetime.fromisoformat(str(cond.get("lastTransitionTime")).replace("Z", "+00:00"))
    except ValueError:
        return float("inf")
    return (dt.datetime.now(dt.UTC) - t).total_seconds()


def _active(pod: dict[str, Any]) -> bool:
    """Still running or about to (not ended, not already being deleted)."""
    if pod["metadata"].get("deletionTimestamp"):
        return False
    return (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")


def _pods_caught_up(job: dict[str, Any], outcomes: list[PodOutcome], cond: dict[str, Any]) -> bool:
    st = job.get("status") or {}
    if len(outcomes) >= int(st.get("succeeded") or 0) + int(st.get("failed") or 0):
        return True
    return _since(cond) > POD_CATCH_UP_SECONDS


def decide(
    snap: Snapshot,
    defaults: RenderDefaults,
    secrets: dict[str, bool] | None = None,
    retention: Retention | None = None,
) -> tuple[dict[str, Any], list[Action]]:
    """The FineTuneJob's next status and the actions that get there, from the snapshot alone
    (and, when asked for with CheckSecret, whether the Secrets the pods read exist). Pure: no
    API call, nothing written; `JobReconciler` applies the actions."""
    d = _Decision(snap, defaults, secrets or {})
    before: dict[str, Any] = json.loads(json.dumps(snap.obj.get("status") or {}))
    status = d._decide(before)
    if snap.progress and status.get("phase") not in R.TERMINAL_PHASES:
        status["progress"] = with_summary({**(status.get("progress") or {}), **snap.progress})
    d._superseded(status, retention or Retention())
    return status, d.actions


class _Decision:
    def __init__(self, snap: Snapshot, defaults: RenderDefaults, secrets: dict[str, bool]):
        self.snap, self.defaults, self.secrets = snap, defaults, secrets
        self.actions: list[Action] = []

    def _emit(self, reason: str, message: str, warning: bool = False) -> None:
        self.actions.append(Emit(reason, message, warning))

    @staticmethod
    def _disrupted(status: dict[str, Any], attempt: int) -> bool:
        cond = get_condition(status.get("conditions") or [], R.COND_DISRUPTED) or {}
        return cond.get("status") == "True" and str(cond.get("message") or "").startswith(
            f"attempt {attempt}: "
        )

    def _fail(self, status: dict[str, Any], reason: str, message: str) -> dict[str, Any]:
        if status.get("phase") != R.PHASE_FAILED:
            self._emit(reason, message, warning=True)
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

    def _superseded(self, status: dict[str, Any], retention: Retention) -> None:
        """Earlier attempts' Jobs (`status` is the decided one: a restart just now makes the
        failed Job one of them): kept finished, bounded, and never running."""
        current = max(int(status.get("attempts") or 0), 1)
        old = sorted(
            (
                (n, name, job)
                for name, job in self.snap.jobs.items()
                if (n := job_attempt(job)) is not None and n < current
            ),
            reverse=True,
        )
        kept = 0
        for n, name, job in old:
            if job["metadata"].get("deletionTimestamp"):
                continue  # on its way out
            jconds = _true_conditions(job)
            ended = next((jconds[c] for c in FINISHED_JOB_CONDITIONS if c in jconds), None)
            if ended is None:
                # not a failed attempt (it never ended, e.g. created again by hand while a
                # later attempt runs): it could start pods and hold GPUs, nothing to keep
                self.actions.append(DeleteJob(name))
                self._emit(
                    R.REASON_ATTEMPT_STOPPED,
                    f"Job {name} of attempt {n} had not finished while attempt {current} "
                    "runs; deleted it",
                    warning=True,
                )
                continue
            kept += 1
            if kept > retention.keep:
                self.actions.append(DeleteJob(name))  # beyond the newest `keep`: its logs go
                continue
            active = [p for p in self.snap.old_pods.get(n, []) if _active(p)]
            if active:
                # The Job controller deletes the active pods of a failed Job at once; if
                # they are still not being deleted after a while, delete the whole Job.
                waited = _since(ended)
                if waited >= STRAGGLER_SECONDS:
                    self.actions.append(DeleteJob(name))
                    self._emit(
                        R.REASON_ATTEMPT_STOPPED,
                        f"attempt {n}'s pod(s) {', '.join(p['metadata']['name'] for p in active)}"
                        f" still active {int(waited)}s after Job {name} failed; deleted the "
                        "Job (and their logs) so that they cannot hold GPUs",
                        warning=True,
                    )
                    continue
                self.actions.append(Wait(max(1.0, STRAGGLER_SECONDS - waited)))
            ttl = retention.ttl_seconds
            if ttl and (job.get("spec") or {}).get("ttlSecondsAfterFinished") != ttl:
                self.actions.append(PatchJob(name, {"spec": {"ttlSecondsAfterFinished": ttl}}))

    def _decide(self, status: dict[str, Any]) -> dict[str, Any]:
        snap = self.snap
        obj = snap.obj
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
            return self._fail(status, R.REASON_INVALID_SPEC, format_errors(exc, "spec."))
        refused = cluster_output_problem(spec.output.uri)
        if refused:
            return self._fail(status, R.REASON_INVALID_SPEC, refused)

        attempt = max(int(status.get("attempts") or 0), 1)
        names = child_names(name, attempt)
        job = snap.jobs.get(names.job)
        if job is not None and created_attempt(status) == attempt:
            return self._observe(spec, status, attempt, job)

        # 2. what only the controller can see: the Secrets the pods would read (credentials,
        # env secretKeyRefs; checked before any child exists; a running job's Secrets are the
        # pods' business)
        refs = secret_refs(spec, self.defaults)
        unknown = list(dict.fromkeys(r.secret for r in refs if r.secret not in self.secrets))
        if unknown:
            self.actions.extend(CheckSecret(s) for s in unknown)  # inputs this decision needs
            return status
        missing: dict[str, tuple[list[str], list[str]]] = {}  # Secret -> fields, keys
        for r in refs:
            if not self.secrets[r.secret]:
                fields_, keys = missing.setdefault(r.secret, ([], []))
                fields_.append(r.field)
                keys.extend(k for k in r.keys if k not in keys)
        if missing:
            msg = "; ".join(
                f"Secret {secret!r} ({', '.join(fields_)}) not found in namespace {ns}: create "
                f"it with key{'s' if len(keys) > 1 else ''} {' and '.join(keys)}"
                for secret, (fields_, keys) in missing.items()
            )
            cond = get_condition(status["conditions"], R.COND_VALID)
            if not cond or cond.get("reason") != R.REASON_SECRET_MISSING or cond.get(
                "message"
            ) != msg:
                self._emit(R.REASON_SECRET_MISSING, msg, warning=True)
            status["conditions"] = set_condition(
                status["conditions"], R.COND_VALID, False, R.REASON_SECRET_MISSING, msg
            )
            return {**status, "phase": R.PHASE_PENDING, "message": msg}
        status["conditions"] = set_condition(
            status["conditions"], R.COND_VALID, True, R.REASON_VALID, "spec and references valid"
        )

        # 3. the current attempt's children: created when the cache has no Job, or when a
        # crash came between the Job's creation and the status that records it (409s then)
        if not status.get("attempts"):
            status["attempts"] = 1
            status["startTime"] = status.get("startTime") or now_iso()
        if job is None and created_attempt(status) == attempt:
            # recorded as created, not in the cache: the cache lags (the create answers 409)
            # or someone deleted the Job (it is created again)
            self.actions.append(CreateChildren(spec, attempt, again=True))
            return status
        if job is None or created_attempt(status) != attempt:
            self.actions.append(CreateChildren(spec, attempt))
            status["conditions"] = set_condition(
                status["conditions"],
                R.COND_CREATED,
                True,
                R.REASON_CREATED,
                f"attempt {attempt}: Job {names.job} created",
            )
            self._emit(
                R.REASON_CREATED,
                f"attempt {attempt}: created Job {names.job} "
                f"({spec.distributed.nodes} node(s) x {spec.distributed.gpus_per_node} GPU)",
            )
            status.setdefault("phase", R.PHASE_PENDING)
            if not status.get("message"):
                status["message"] = f"attempt {attempt} created"
            if job is None and not self.snap.pods:
                # Say now what the next reconcile would say on seeing the new Job (no pods
                # yet, suspended only if asked or queued): one status write per launch
                # instead of two (a burst of 1,000 jobs was 1.97 writes each)
                just_made = {"spec": {"suspend": bool(spec.suspend or spec.queue_name)}}
                return self._observe(spec, status, attempt, just_made)
            return status
        return self._observe(spec, status, attempt, job)

    def _observe(
        self,
        spec: FineTuneJobSpec,
        status: dict[str, Any],
        attempt: int,
        job: dict[str, Any],
    ) -> dict[str, Any]:
        snap = self.snap
        name = snap.obj["metadata"]["name"]
        names = child_names(name, attempt)
        jconds = _true_conditions(job)

        # suspension: spec.suspend wins; a queued job stays suspended until Kueue admits it
        want_suspend = spec.suspend
        job_suspended = bool((job.get("spec") or {}).get("suspend"))
        if not spec.queue_name and want_suspend != job_suspended:
            self.actions.append(PatchJob(names.job, {"spec": {"suspend": want_suspend}}))
            job_suspended = want_suspend
            self._emit(
                R.REASON_SUSPENDED if want_suspend else R.REASON_RESUMED,
                f"Job {names.job} {'suspended' if want_suspend else 'resumed'}",
            )

        # A disruption is recorded the moment a pod carries it: the evicted pod may be gone
        # by the time the attempt has ended, and the restart must not count against the
        # user's backoffLimit.
        disrupted = _disruption(snap.pods)
        if disrupted and not self._disrupted(status, attempt):
            msg = f"attempt {attempt}: {disrupted}"
            status["conditions"] = set_condition(
                status["conditions"], R.COND_DISRUPTED, True, R.REASON_PREEMPTED, msg
            )
            self._emit(R.REASON_PREEMPTED, msg, warning=True)

        finished = [
            c for c in ("Complete", "SuccessCriteriaMet", "Failed", "FailureTarget") if c in jconds
        ]
        if finished and not _pods_caught_up(job, _outcomes(snap.pods), jconds[finished[0]]):
            # The Job and its pods come from two watches: the Job's end can arrive before the
            # pods' termination messages (metrics, failure reasons). Wait for them briefly.
            self.actions.append(Wait(POD_CATCH_UP_SECONDS / 5))
            return status

        if "Complete" in jconds or "SuccessCriteriaMet" in jconds:
            outcomes = _outcomes(snap.pods)
            report = (
                next((o.report for o in outcomes if o.report and o.index == "0"), None)
                or next((o.report for o in outcomes if o.report), None)
                or {}
            )
            art = report.get("artifact")
            if isinstance(art, dict) and art.get("uri") is not None:
                outside = artifact_problem(art["uri"], spec.output.uri, name)
                if outside:
                    return self._fail(status, R.REASON_ARTIFACT_OUTSIDE_OUTPUT, outside)
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
                new["progress"] = with_summary(report["progress"])
            self._emit(R.REASON_SUCCEEDED, msg)
            return new

        if "Failed" in jconds or "FailureTarget" in jconds:
            outcomes = _outcomes(snap.pods)
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
                    status,
                    R.REASON_TRIAL_PRUNED,
                    f"stopped early by the sweep's pruner ({detail})",
                )
            if failed and _is_permanent(failed):
                reason = (failed.report or {}).get("reason") or R.REASON_TRAINER_ERROR
                return self._fail(
                    status,
                    reason,
                    f"{detail}; not retried: this error cannot go away on retry",
                )
            disruptions = int(status.get("disruptions") or 0)
            disrupted_now = self._disrupted(status, attempt) or _job_failed_by_disruption(jconds)
            if disrupted_now or attempt - disruptions <= spec.backoff_limit:
                nxt = attempt + 1
                if disrupted_now:
                    cond = get_condition(status["conditions"], R.COND_DISRUPTED) or {}
                    why = str(cond.get("message") or "").split(": ", 1)[-1] or detail
                    disruptions += 1
                    msg = (
                        f"attempt {attempt} was disrupted ({why}); restarting the gang as "
                        f"attempt {nxt} from the latest checkpoint (disruptions do not count "
                        f"against backoffLimit {spec.backoff_limit})"
                    )
                else:
                    msg = (
                        f"attempt {attempt} failed: {detail}; restarting the gang as attempt "
                        f"{nxt} ({attempt - disruptions} of {spec.backoff_limit + 1} failed "
                        "attempts allowed; resumes from the latest checkpoint)"
                    )
                reason = R.REASON_DISRUPTED if disrupted_now else R.REASON_RESTARTING
                self._emit(reason, msg, warning=True)
                # record the attempt first: a crash right after still converges to attempt nxt
                status = {
                    **status,
                    "attempts": nxt,
                    "phase": R.PHASE_PENDING,
                    "message": msg,
                    **({"disruptions": disruptions} if disruptions else {}),
                }
                status["conditions"] = set_condition(
                    status["conditions"], R.COND_RUNNING, False, reason, msg
                )
                self.actions.append(RecordStatus(json.loads(json.dumps(status))))
                # the failed Job stays (its pods have ended; their logs stay readable): from
                # now on it is a superseded attempt's, see `_superseded`
                self.actions.append(CreateChildren(spec, nxt))
                status["conditions"] = set_condition(
                    status["conditions"],
                    R.COND_CREATED,
                    True,
                    R.REASON_CREATED,
                    f"attempt {nxt}: Job {child_names(name, nxt).job} created",
                )
                return status
            return self._fail(
                status,
                R.REASON_BACKOFF_LIMIT_EXCEEDED,
                f"{detail}; gave up after {attempt} attempt(s) (backoffLimit {spec.backoff_limit}"
                + (f", {disruptions} disruption(s) not counted" if disruptions else "")
                + ")",
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

        pods = snap.pods
        running = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]
        nodes = spec.distributed.nodes
        if len(running) >= nodes:
            msg = f"attempt {attempt}: all {nodes} pod(s) running"
            status["conditions"] = set_condition(
                status["conditions"], R.COND_RUNNING, True, R.REASON_RUNNING, msg
            )
            if status.get("phase") != R.PHASE_RUNNING:
                self._emit(R.REASON_RUNNING, msg)
            return {**status, "phase": R.PHASE_RUNNING, "message": msg}
        # a partially scheduled gang is not running: say which pod waits and why
        problem = _start_problem(pods)
        if problem:
            reason, msg = problem
            msg = f"attempt {attempt}: {msg}"
            cond = get_condition(status["conditions"], R.COND_RUNNING) or {}
            if cond.get("reason") != reason:
                self._emit(reason, msg, warning=True)
        else:
            reason = R.REASON_PENDING
            msg = _scheduling_message(pods) or (
                f"attempt {attempt}: {len(running)}/{nodes} pod(s) running"
            )
        status["conditions"] = set_condition(
            status["conditions"], R.COND_RUNNING, False, reason, msg
        )
        return {**status, "phase": R.PHASE_PENDING, "message": msg}


# --- effects --------------------------------------------------------------------------------
class JobReconciler:
    """Applies `decide`'s actions with the API, then patches the status fields that changed."""

    def __init__(
        self,
        kube: Kube,
        settings: ControllerSettings,
        written: Any = None,
    ) -> None:
        self.kube = kube
        self.settings = settings
        self.defaults = render_defaults(settings)
        self.retention = Retention.of(settings)
        # called with every object this reconciler wrote (the caches' write-through)
        self.written = written or (lambda obj: None)
        # a sweep trial's report token (None: not a trial its sweep owns), and any job's
        # progress token (None: no report endpoint); both set by Controller
        self.trial_token: Callable[[dict[str, Any]], str | None] = lambda obj: None
        self.job_token: Callable[[dict[str, Any]], str | None] = lambda obj: None

    def reconcile(self, snap: Snapshot) -> Result:
        """Converges one FineTuneJob from what the caches know about it."""
        obj = snap.obj
        meta = obj["metadata"]
        if meta.get("deletionTimestamp"):
            return Result()  # children go with the owner (garbage collector)
        new, actions = decide(snap, self.defaults, retention=self.retention)
        needed = [a.name for a in actions if isinstance(a, CheckSecret)]
        if needed:  # the one read a decision may need: only before children exist
            secrets = {n: self.kube.secret_exists(meta["namespace"], n) for n in needed}
            new, actions = decide(snap, self.defaults, secrets, self.retention)
        before: dict[str, Any] = dict(obj.get("status") or {})
        blocked: NameConflict | PreviousOwner | None = None
        try:
            for action in actions:
                if isinstance(action, RecordStatus):
                    self.patch_status(obj, before, action.status)
                    before = action.status
                else:
                    self._apply(obj, action)
        except (NameConflict, PreviousOwner) as exc:
            # a child's name is held by an object this FineTuneJob does not own: nothing is
            # adopted or overwritten, the actions after the create are not taken
            blocked = exc
            conds, changed = blocked_condition(new.get("conditions") or [], exc)
            new = {**new, "conditions": conds, "message": exc.message}
            if new.get("phase") not in R.TERMINAL_PHASES:
                new["phase"] = R.PHASE_PENDING
            if changed:
                self.kube.event(obj, exc.event_type, exc.reason, exc.message)
        except Rejected as exc:
            # e.g. an affinity the CRD schema cannot check: fail with the server's words
            # instead of retrying the same create forever
            new = _Decision(snap, self.defaults, {})._fail(
                new,
                R.REASON_INVALID_SPEC,
                f"{exc}; the pods are built from spec.resources (affinity, nodeSelector, "
                "tolerations) and the fields the message names: fix them and create the "
                "FineTuneJob again",
            )
            new["conditions"] = set_condition(
                new["conditions"], R.COND_CREATED, False, R.REASON_INVALID_SPEC, new["message"]
            )
            self.kube.event(obj, "Warning", R.REASON_INVALID_SPEC, new["message"])
        self.patch_status(obj, before, new)
        if blocked is not None:
            # no watch says when someone else's object goes: look again soon (an earlier
            # FineTuneJob's leftovers usually go within seconds)
            return Result(requeue_after=10.0 if isinstance(blocked, NameConflict) else 2.0)
        waits = [a.seconds for a in actions if isinstance(a, Wait)]
        if waits:  # also after the end: an earlier attempt's pods may still be stopping
            return Result(requeue_after=min(waits))
        if new.get("phase") in R.TERMINAL_PHASES:
            return Result()
        if (
            new.get("phase") == R.PHASE_PENDING
            and (get_condition(new.get("conditions") or [], R.COND_VALID) or {}).get("status")
            == "False"
        ):
            # waiting for something no watch tells us about (a Secret): look again soon
            return Result(requeue_after=min(self.settings.resync_seconds, 10.0))
        return Result(requeue_after=self.settings.resync_seconds)

    def _apply(self, obj: dict[str, Any], action: Action) -> None:
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        if isinstance(action, Emit):
            self.kube.event(
                obj, "Warning" if action.warning else "Normal", action.reason, action.message
            )
        elif isinstance(action, CreateChildren):
            made = self._create_children(obj, action.spec, action.attempt)
            if made is not None and action.again:
                job = child_names(name, action.attempt).job
                self.kube.event(
                    obj,
                    "Warning",
                    R.REASON_CREATED,
                    f"attempt {action.attempt}: Job {job} was gone; created again",
                )
        elif isinstance(action, PatchJob):
            self.kube.patch_job(ns, action.name, action.patch)
        elif isinstance(action, DeleteJob):
            self.kube.delete_job(ns, action.name)

    def patch_status(
        self, obj: dict[str, Any], before: dict[str, Any], after: dict[str, Any]
    ) -> None:
        patch = status_patch(before, after)
        if not patch:
            return
        meta = obj["metadata"]
        stored = self.kube.patch_status(FTJ_PLURAL, meta["namespace"], meta["name"], patch)
        if stored is not None:
            self.written(stored)

    def prune(self, obj: dict[str, Any], step: int) -> dict[str, Any] | None:
        """The sweep's pruner stopped this trial: mark it terminal and stop its pods now (the
        trainer also stops on the 'prune' answer; this frees GPUs even if it does not)."""
        meta = obj["metadata"]
        msg = f"stopped early by the pruner at step {step}"
        before = dict(obj.get("status") or {})
        conds = set_condition(
            before.get("conditions") or [], R.COND_FAILED, True, R.REASON_TRIAL_PRUNED, msg
        )
        conds = set_condition(conds, R.COND_RUNNING, False, R.REASON_TRIAL_PRUNED, msg)
        after = {
            **before,
            "phase": R.PHASE_FAILED,
            "conditions": conds,
            "message": msg,
            "completionTime": now_iso(),
        }
        stored = self.kube.patch_status(
            FTJ_PLURAL, meta["namespace"], meta["name"], status_patch(before, after)
        )
        if stored is not None:
            self.written(stored)
        attempt = int(before.get("attempts") or 1)
        self.kube.delete_job(meta["namespace"], child_names(meta["name"], attempt).job)
        self.kube.event(obj, "Normal", R.REASON_TRIAL_PRUNED, msg)
        return stored

    def _create_children(
        self, obj: dict[str, Any], spec: FineTuneJobSpec, attempt: int
    ) -> dict[str, Any] | None:
        """Creates what is missing; returns the Job when this call created it."""
        meta = obj["metadata"]
        job_meta = {
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
            "labels": meta.get("labels") or {},
        }
        # The Job last: a ConfigMap or Service name held by someone else's object
        # (NameConflict) must stop the attempt before any pod could mount or resolve it; a
        # crash in between converges on retry (409s on the children that are ours).
        ref = sweep_ref(obj, self.settings)
        if ref is not None:
            ref = ref.model_copy(update={"token": self.trial_token(obj)})
        progress = None
        token = self.job_token(obj)
        if self.settings.report_url and token:
            progress = ProgressRef(
                url=self.settings.report_url,
                interval_seconds=self.settings.progress_seconds,
                token=token,
            )
        children = render_all(job_meta, spec, attempt, self.defaults, ref, progress)
        job = None
        for child in sorted(children, key=lambda c: c["kind"] == "Job"):
            made = self.kube.create(child)
            if made is not None and child["kind"] == "Job":
                self.written(made)
                job = made
        return job
