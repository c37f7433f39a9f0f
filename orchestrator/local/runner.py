"""Local runners: a FineTuneJob or a FineTuneSweep as processes on this machine.

The sweep runner is the controller's sweep loop without Kubernetes: the same durable
Optuna study (SQLite under the state dir), the same scheduling rule
(``SweepStudy.plan``), the same deterministic trial names and the same idempotent tells.
So Ctrl-C (or SIGTERM) leaves the interrupted trials RUNNING in the study, and the next run
relaunches exactly those (``SweepStudy.unlaunched``) before asking for new ones: finished
trials never run again and the sweep ends with exactly ``maxTrials`` trials.

Intermediate eval values reach the study through a small HTTP endpoint on 127.0.0.1 that
speaks the controller's report protocol (POST /report, per-trial HMAC bearer token), so the
trainer prunes locally exactly as it does in a cluster.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from orchestrator.api import (
    FineTuneJob,
    FineTuneJobSpec,
    FineTuneSweep,
    apply_overrides,
    format_errors,
    trial_name,
)
from orchestrator.api import labels as L
from orchestrator.api import reasons as R
from orchestrator.api.conditions import now_iso, set_condition
from orchestrator.api.trainer_config import SweepTrialRef
from orchestrator.local.executor import (
    LocalRunError,
    Outcome,
    TrainerProcess,
    check_nproc,
    default_nproc,
    has_cuda_device,
    report_token_env,
)
from orchestrator.local.state import JOB_PLURAL, SWEEP_PLURAL, LocalState

DEFAULT_NAMESPACE = "default"
POLL_SECONDS = 0.5


class Observer(Protocol):
    """Receives what a local run does; the CLI turns it into tables and progress bars."""

    def event(self, message: str) -> None: ...

    def tick(self, runner: Any) -> None: ...


class _Quiet:
    def event(self, message: str) -> None:
        pass

    def tick(self, runner: Any) -> None:
        pass


def gpu_ids() -> list[str]:
    """GPUs this process may use: CUDA_VISIBLE_DEVICES, else /dev/nvidiaN device nodes."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    return sorted((p.name[len("nvidia"):] for p in Path("/dev").glob("nvidia[0-9]*")), key=int)


def default_parallel(wanted: int, nproc: int) -> int:
    """Trials at once: spec.parallelism, limited by GPUs (nproc each) or by CPU cores (a
    CPU trial with nproc ranks keeps nproc cores busy)."""
    gpus = gpu_ids() if has_cuda_device() else []
    capacity = len(gpus) // nproc if gpus else (os.cpu_count() or 1) // nproc
    return max(1, min(wanted, capacity))


# --- one job (a FineTuneJob or one sweep trial), with the controller's retry rule ----------
class JobRun:
    def __init__(
        self,
        state: LocalState,
        obj: dict[str, Any],
        spec: FineTuneJobSpec,
        *,
        nproc: int,
        sweep: SweepTrialRef | None = None,
        token: str | None = None,
        threads: int | None = None,
        gpus: list[str] | None = None,
    ) -> None:
        self.state = state
        self.obj = obj
        self.spec = spec
        self.name: str = obj["metadata"]["name"]
        self.namespace: str = obj["metadata"]["namespace"]
        self.nproc = nproc
        self.sweep = sweep
        self.threads = threads
        self.env = report_token_env(token)
        if gpus is not None:
            self.env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        self.status: dict[str, Any] = dict(obj.get("status") or {})
        self.failures = 0
        self.process: TrainerProcess | None = None
        self.outcome: Outcome | None = None

    @property
    def attempt(self) -> int:
        return int(self.status.get("attempts") or 0)

    def start(self) -> None:
        attempt = self.attempt + 1
        self.process = TrainerProcess(
            self.state, self.name, self.namespace, self.spec, attempt, nproc=self.nproc,
            sweep=self.sweep, env=self.env, threads=self.threads)
        self.process.start()
        msg = f"attempt {attempt}: {self.nproc} process(es) running (log {self.process.log_path})"
        conds = set_condition(self.status.get("conditions") or [], R.COND_RUNNING, True,
                              R.REASON_RUNNING, msg)
        self.status.update({"phase": R.PHASE_RUNNING, "attempts": attempt, "message": msg,
                            "conditions": conds, "startTime": self.status.get("startTime")
                            or now_iso()})
        self.status.pop("completionTime", None)
        self.save()

    def poll(self) -> Outcome | None:
        """The final outcome (after retries), or None while it runs."""
        if self.outcome is not None:
            return self.outcome
        assert self.process is not None
        outcome = self.process.poll()
        self.status["progress"] = self.process.progress.to_wire()
        if outcome is None:
            return None
        if not outcome.succeeded and not outcome.permanent and self.failures < \
                self.spec.backoff_limit:
            # same rule as the controller: a new attempt resumes from the latest checkpoint
            self.failures += 1
            self.status["message"] = (f"attempt {self.attempt} failed: {outcome.message}; "
                                      f"restarting as attempt {self.attempt + 1}")
            self.start()
            return None
        self.finish(outcome)
        return outcome

    def finish(self, outcome: Outcome) -> None:
        self.outcome = outcome
        conds = self.status.get("conditions") or []
        if outcome.succeeded:
            msg = f"training finished after {self.attempt} attempt(s)"
            if "evalLoss" in outcome.metrics:
                msg += f"; evalLoss {outcome.metrics['evalLoss']:.4g}"
            conds = set_condition(conds, R.COND_RUNNING, False, R.REASON_COMPLETED, msg)
            conds = set_condition(conds, R.COND_SUCCEEDED, True, R.REASON_SUCCEEDED, msg)
            phase = R.PHASE_SUCCEEDED
        else:
            if outcome.pruned:
                reason, msg = R.REASON_TRIAL_PRUNED, (
                    f"stopped early by the sweep's pruner at step "
                    f"{self.process.progress.step if self.process else '?'}")
            elif outcome.permanent:
                reason, msg = outcome.reason or R.REASON_TRAINER_ERROR, (
                    f"{outcome.message}; not retried: this error cannot go away on retry")
            else:
                reason, msg = R.REASON_BACKOFF_LIMIT_EXCEEDED, (
                    f"{outcome.message}; gave up after {self.attempt} attempt(s) "
                    f"(backoffLimit {self.spec.backoff_limit})")
            conds = set_condition(conds, R.COND_RUNNING, False, reason, msg)
            conds = set_condition(conds, R.COND_FAILED, True, reason, msg)
            phase = R.PHASE_FAILED
        self.status.update({"phase": phase, "conditions": conds, "message": msg,
                            "completionTime": now_iso()})
        if outcome.metrics:
            self.status["metrics"] = outcome.metrics
        if outcome.artifact and outcome.artifact.get("uri"):
            self.status["artifact"] = {k: v for k, v in outcome.artifact.items()
                                       if k in ("uri", "sha256")}
        if outcome.progress:
            self.status["progress"] = outcome.progress
        self.save()

    def interrupt(self) -> None:
        """Ctrl-C: stop the processes; the job waits to be resumed (phase Pending)."""
        if self.process is not None:
            self.process.stop()
        if self.outcome is None:
            msg = "interrupted; run the same command again to resume"
            conds = set_condition(self.status.get("conditions") or [], R.COND_RUNNING, False,
                                  "Interrupted", msg)
            self.status.update({"phase": R.PHASE_PENDING, "message": msg, "conditions": conds})
            self.save()

    def kill(self, reason: str) -> None:
        """Stop for good (the sweep failed)."""
        if self.process is not None:
            self.process.stop()
        self.finish(Outcome("Failed", None, reason, "stopped: the sweep failed"))

    def save(self) -> None:
        self.obj["status"] = self.status
        self.state.save(JOB_PLURAL, self.obj)


def _job_object(name: str, namespace: str, spec: FineTuneJobSpec, *,
                labels: Mapping[str, str] | None = None,
                annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": namespace, "uid": str(uuid.uuid4()),
                     "creationTimestamp": now_iso(),
                     "labels": {L.LABEL_NAME: L.APP_NAME, L.LABEL_MANAGED_BY: "kubetune-local",
                                **(labels or {})},
                     "annotations": dict(annotations or {})},
        "spec": spec.to_wire(),
    }


def _carried_status(previous: dict[str, Any] | None, spec: FineTuneJobSpec) -> dict[str, Any]:
    """The attempt count of an earlier run of the same spec (attempt numbers keep going, so
    logs of earlier attempts stay); a changed spec starts over."""
    if previous and previous.get("spec") == spec.to_wire():
        status = previous.get("status") or {}
        return {"attempts": int(status.get("attempts") or 0),
                "startTime": status.get("startTime")}
    return {}


class _Signals:
    """SIGTERM (e.g. `kubetune cancel --local`) ends the run like Ctrl-C. SIGINT is handled
    explicitly too: a process started in the background by a non-interactive shell inherits
    SIGINT *ignored*, and Ctrl-C / `kill -INT` must still stop and checkpoint the sweep."""

    def __enter__(self) -> _Signals:
        self.old: Any = None
        self.old_int: Any = None
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGTERM, self._raise)
            self.old_int = signal.signal(signal.SIGINT, self._raise)
        return self

    @staticmethod
    def _raise(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    def __exit__(self, *exc: object) -> None:
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)
        if self.old_int is not None:
            signal.signal(signal.SIGINT, self.old_int)


def _with_output(spec: FineTuneJobSpec, output_uri: str | None) -> FineTuneJobSpec:
    if not output_uri:
        return spec
    return spec.model_copy(update={"output": spec.output.model_copy(update={"uri": output_uri})})


# --- a FineTuneJob ------------------------------------------------------------------------
class LocalJobRunner:
    def __init__(self, job: FineTuneJob, state: LocalState, *, namespace: str | None = None,
                 nproc: int | None = None, output_uri: str | None = None,
                 observer: Observer | None = None) -> None:
        if not job.name:
            raise LocalRunError("the FineTuneJob has no metadata.name")
        self.state = state
        self.name = job.name
        self.namespace = namespace or job.metadata.get("namespace") or DEFAULT_NAMESPACE
        self.spec = _with_output(job.spec, output_uri)
        self.nproc = nproc or default_nproc(self.spec)
        check_nproc(self.spec, self.nproc)
        self.observer = observer or _Quiet()
        self.run: JobRun | None = None

    @property
    def runs(self) -> list[JobRun]:
        return [self.run] if self.run else []

    def execute(self) -> dict[str, Any]:
        """Run to the end; returns the FineTuneJob object with its final status."""
        previous = self.state.load(JOB_PLURAL, self.name)
        obj = _job_object(self.name, self.namespace, self.spec)
        obj["status"] = {**_carried_status(previous, self.spec), "phase": R.PHASE_PENDING}
        self.state.claim(self.name)
        self.run = JobRun(self.state, obj, self.spec, nproc=self.nproc,
                          threads=max(1, (os.cpu_count() or 1) // self.nproc))
        try:
            with _Signals():
                self.run.start()
                self.observer.event(f"{self.name}: started {self.nproc} process(es), log "
                                    f"{self.run.process.log_path if self.run.process else ''}")
                while (outcome := self.run.poll()) is None:
                    self.run.save()  # progress for `kubetune status --local` meanwhile
                    self.observer.tick(self)
                    time.sleep(POLL_SECONDS)
                self.observer.tick(self)
                self.observer.event(f"{self.name}: {_describe(outcome)}")
                return self.run.obj
        except KeyboardInterrupt:
            self.run.interrupt()
            raise
        finally:
            self.state.release(self.name)


def _describe(outcome: Outcome) -> str:
    if outcome.succeeded:
        m = outcome.metrics
        parts = [f"{k} {m[k]:.4g}" for k in ("evalLoss", "trainableParamPercent",
                                             "generalLossDelta") if k in m]
        return "succeeded" + (f": {', '.join(parts)}" if parts else "")
    if outcome.pruned:
        return "pruned"
    return f"failed: {outcome.message}"


# --- a FineTuneSweep ----------------------------------------------------------------------
class LocalSweepRunner:
    def __init__(self, sweep: FineTuneSweep, state: LocalState, *, namespace: str | None = None,
                 nproc: int | None = None, parallel: int | None = None,
                 output_uri: str | None = None, fresh: bool = False,
                 observer: Observer | None = None) -> None:
        if not sweep.name:
            raise LocalRunError("the FineTuneSweep has no metadata.name")
        self.state = state
        self.sweep = sweep
        self.name = sweep.name
        self.namespace = namespace or sweep.metadata.get("namespace") or DEFAULT_NAMESPACE
        self.spec = sweep.spec
        self.template = _with_output(sweep.spec.template, output_uri)
        self.nproc = nproc or default_nproc(self.template)
        check_nproc(self.template, self.nproc)
        self.parallel = parallel or default_parallel(self.spec.parallelism, self.nproc)
        if self.parallel < 1:
            raise LocalRunError(f"--parallel must be at least 1, not {self.parallel}")
        self.threads = max(1, (os.cpu_count() or 1) // (self.nproc * self.parallel))
        self.fresh = fresh
        self.observer = observer or _Quiet()
        self.running: dict[str, JobRun] = {}
        self.live: dict[int, dict[str, float]] = {}  # latest intermediate metrics per trial
        self.obj: dict[str, Any] = {}
        self.study: Any = None
        self._key = os.urandom(32).hex()  # per runner process: tokens are re-minted on resume
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._gpus = gpu_ids() if has_cuda_device() else []
        self._shapes: dict[str, Any] = {}

    # --- setup ----------------------------------------------------------------------------
    def open(self) -> None:
        import optuna

        from orchestrator.sweep import SweepStudy, delete_study, study_name
        from orchestrator.sweep.errors import SweepConfigError

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say it all

        previous = self.state.load(SWEEP_PLURAL, self.name)
        if self.fresh:
            delete_study(study_name(self.namespace, self.name), self.state.study_url)
            for job in self.state.list(JOB_PLURAL):
                if (job["metadata"].get("labels") or {}).get(L.LABEL_SWEEP) == self.name:
                    self.state.delete(JOB_PLURAL, job["metadata"]["name"])
            previous = None
        try:
            self.study = SweepStudy.open(self.spec, namespace=self.namespace, sweep=self.name,
                                         storage=self.state.study_url)
        except SweepConfigError as exc:
            raise LocalRunError(f"{exc}; or start over with --fresh") from None
        meta = (previous or {}).get("metadata") or {}
        self.obj = {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneSweep",
            "metadata": {"name": self.name, "namespace": self.namespace,
                         "uid": meta.get("uid") or str(uuid.uuid4()),
                         "creationTimestamp": meta.get("creationTimestamp") or now_iso(),
                         "labels": {L.LABEL_NAME: L.APP_NAME,
                                    L.LABEL_MANAGED_BY: "kubetune-local"}},
            "spec": {**self.spec.to_wire(), "template": self.template.to_wire()},
            "status": dict((previous or {}).get("status") or {}),
        }
        self.obj["status"]["studyName"] = self.study.study.study_name

    def start_server(self) -> str:
        runner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(min(length, 65536)) or b"{}")
                    code, doc = runner.handle_report(body, self.headers.get("Authorization"))
                except Exception as exc:  # an answer, never a dead endpoint
                    code, doc = 500, {"error": str(exc)}
                raw = json.dumps(doc).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, name="report", daemon=True).start()
        return f"http://127.0.0.1:{self._server.server_address[1]}/report"

    def handle_report(self, body: dict[str, Any], authorization: str | None
                      ) -> tuple[int, dict[str, Any]]:
        """The controller's /report contract: record the first objective's intermediate value
        and answer whether the pruner wants the trial stopped."""
        from orchestrator.sweep import bearer_token, verify_token

        try:
            number = int(body["trial"])
        except (KeyError, TypeError, ValueError):
            return 400, {"error": "trial is required"}
        uid = self.obj["metadata"]["uid"]
        if not verify_token(self._key, bearer_token(authorization), uid, number):
            return 403, {"error": "token does not belong to this trial"}
        if "model" in body and not body.get("metrics"):
            # a trial's model announcement: here the runner reads config.json itself
            return 200, {"action": "continue"}
        metrics = {k: float(v) for k, v in (body.get("metrics") or {}).items()
                   if isinstance(v, int | float)}
        with self._lock:
            self.live[number] = metrics
        metric = self.study.cfg.metrics[0]
        if metric not in metrics:
            return 400, {"error": f"metrics.{metric} missing (the sweep's first objective)"}
        step = int(body.get("step") or 0)
        self.study.report(number, step, metrics[metric])
        if self.study.should_prune(number):
            self.study.tell_pruned(number, f"stopped early by the pruner at step {step}")
            return 200, {"action": "prune"}
        return 200, {"action": "continue"}

    # --- trials ---------------------------------------------------------------------------
    def _free_gpus(self) -> list[str] | None:
        if not self._gpus:
            return None
        used = {g for r in self.running.values()
                for g in r.env.get("CUDA_VISIBLE_DEVICES", "").split(",") if g}
        free = [g for g in self._gpus if g not in used]
        return free[: self.nproc]

    def _launch(self, number: int, report_url: str, resumed: bool = False) -> None:
        from orchestrator.sweep import mint_token

        name = trial_name(self.name, number)
        params = self.study.params(number)
        try:
            spec = apply_overrides(self.template, params)
        except (ValueError, ValidationError) as exc:
            # a sampled combination the job schema rejects costs no training time
            detail = format_errors(exc) if isinstance(exc, ValidationError) else str(exc)
            self.study.tell_failed(number, f"infeasible parameters {params}: {detail}")
            self.observer.event(f"trial {number} infeasible: {detail}")
            return
        reason = self.budget_infeasible(spec)
        if reason:
            # as the controller does: refused before launch, no training time spent
            self.study.refuse(number, f"trial {number} not launched: {reason}")
            self.observer.event(f"trial {number} ({name}) not launched: {reason}")
            return
        previous = self.state.load(JOB_PLURAL, name)
        obj = _job_object(name, self.namespace, spec, labels={
            L.LABEL_COMPONENT: L.COMPONENT_TRIAL, L.LABEL_SWEEP: self.name,
            L.LABEL_TRIAL: str(number)},
            annotations={L.ANNOTATION_TRIAL_PARAMETERS: json.dumps(params, sort_keys=True)})
        obj["status"] = {**_carried_status(previous, spec), "phase": R.PHASE_PENDING}
        ref = SweepTrialRef(name=self.name, trial_number=number, report_url=report_url,
                            metric=self.study.cfg.metrics[0], parameters=params)
        run = JobRun(self.state, obj, spec, nproc=self.nproc, sweep=ref,
                     token=mint_token(self._key, self.obj["metadata"]["uid"], number),
                     threads=self.threads, gpus=self._free_gpus())
        run.start()
        self.running[name] = run
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in params.items())
        verb = "resumed" if resumed else "started"
        self.observer.event(f"trial {number} ({name}) {verb}: {shown}")

    def budget_infeasible(self, spec: FineTuneJobSpec) -> str | None:
        """Why the trial's trainableParamPercent cannot be met for this base model (the
        controller's check, same solver as the trainer), or None when it can or the model's
        config.json cannot be read here (the trainer then decides)."""
        if spec.method.trainable_param_percent is None:
            return None
        from orchestrator.api.budget import unreachable_budget

        uri = spec.model.uri.rstrip("/")
        if uri not in self._shapes:
            self._shapes[uri] = _read_shape(uri)
        shape = self._shapes[uri]
        return None if shape is None else unreachable_budget(shape, spec.method, spec.model.uri)

    def plan(self) -> Any:
        return self.study.plan()

    def _collect(self, name: str, run: JobRun, outcome: Outcome) -> None:
        number = int(run.obj["metadata"]["labels"][L.LABEL_TRIAL])
        if outcome.succeeded:
            self.study.tell_metrics(number, outcome.metrics, artifact=outcome.artifact)
        elif outcome.pruned:
            self.study.tell_pruned(number, run.status.get("message") or "stopped early")
        elif outcome.reason == R.REASON_BUDGET_INFEASIBLE:  # refused in its first seconds
            self.study.refuse(number, run.status.get("message") or "budget not reachable")
        else:
            self.study.tell_failed(number, run.status.get("message") or "the trial failed")
        elapsed = time.time() - (run.process.started if run.process else time.time())
        broken = self.study.cfg.violations(outcome.metrics) if outcome.succeeded else []
        note = f" — infeasible: {', '.join(broken)}" if broken else ""
        self.observer.event(f"trial {number} ({name}) {_describe(outcome)}{note} "
                            f"[{elapsed:.0f}s]")
        del self.running[name]

    # --- the loop -------------------------------------------------------------------------
    def execute(self) -> dict[str, Any]:
        """Run the sweep to its end; returns the FineTuneSweep object with final status.
        KeyboardInterrupt stops every trial and leaves the sweep resumable."""
        self.open()
        self.state.claim(self.name)
        try:
            with _Signals():
                url = self.start_server()
                counts = self.study.counts()
                if counts.created:
                    self.observer.event(
                        f"resuming sweep {self.name}: {counts.completed} of "
                        f"{self.spec.max_trials} trials finished, {counts.running} to relaunch")
                return self._loop(url)
        except KeyboardInterrupt:
            for run in list(self.running.values()):
                run.interrupt()
            self.running.clear()
            self.write_status(interrupted=True)
            raise
        finally:
            if self._server is not None:
                self._server.shutdown()
                self._server.server_close()
            self.state.release(self.name)

    def _loop(self, url: str) -> dict[str, Any]:
        while True:
            for name, run in list(self.running.items()):
                outcome = run.poll()
                if outcome is not None:
                    self._collect(name, run, outcome)
            plan = self.plan()
            if plan.stop_running:
                for run in list(self.running.values()):
                    run.kill(R.REASON_MAX_FAILED_TRIALS_EXCEEDED)
                    number = int(run.obj["metadata"]["labels"][L.LABEL_TRIAL])
                    self.study.tell_failed(number, "stopped: the sweep failed")
                self.running.clear()
                plan = self.plan()
            room = self.parallel - len(self.running)
            # trials asked before an interruption come first, under their old names
            for trial in self.study.unlaunched(self.running)[: max(room, 0)]:
                self._launch(trial.number, url, resumed=True)
            room = self.parallel - len(self.running)
            plan = self.plan()
            for _ in range(max(0, min(plan.launch, room))):
                number, _params, job = self.study.ask(lambda n: trial_name(self.name, n))
                if job is None:  # the sampler repeated a finished trial: result reused
                    self.observer.event(_reused_line(self.study, number))
                    continue
                self._launch(number, url)
            plan = self.plan()
            self.write_status(plan=plan)
            self.observer.tick(self)
            if plan.done and not self.running:
                self.observer.event(f"sweep {self.name}: {plan.message}")
                return self.obj
            time.sleep(POLL_SECONDS)

    def write_status(self, plan: Any = None, interrupted: bool = False) -> None:
        st = self.study
        status = self.obj["status"]
        status["trials"] = st.counts().to_wire()
        best = st.best()
        if best is not None:
            status["bestTrial"] = best.to_wire()
        front = st.pareto_front()
        if front:
            status["paretoFront"] = [t.to_wire() for t in front]
        status["trialList"] = [r.to_wire() for r in st.records()]
        status["startTime"] = status.get("startTime") or now_iso()
        conds = status.get("conditions") or []
        plan = plan or self.plan()
        if interrupted:
            msg = "interrupted; run the same command again to resume"
            conds = set_condition(conds, R.COND_RUNNING, False, "Interrupted", msg)
            status.update({"phase": R.PHASE_PENDING, "message": msg})
        elif plan.done and not self.running:
            if plan.failed:
                conds = set_condition(conds, R.COND_RUNNING, False, plan.reason, plan.message)
                conds = set_condition(conds, R.COND_FAILED, True, plan.reason, plan.message)
                status["phase"] = R.PHASE_FAILED
            else:
                conds = set_condition(conds, R.COND_RUNNING, False, plan.reason, plan.message)
                conds = set_condition(conds, R.COND_SUCCEEDED, True, plan.reason, plan.message)
                status["phase"] = R.PHASE_SUCCEEDED
            status["message"] = plan.message
            status["completionTime"] = status.get("completionTime") or now_iso()
        else:
            conds = set_condition(conds, R.COND_RUNNING, True, plan.reason, plan.message)
            status.update({"phase": R.PHASE_RUNNING, "message": plan.message})
            status.pop("completionTime", None)
        status["conditions"] = conds
        self.state.save(SWEEP_PLURAL, self.obj)
        for run in self.running.values():
            run.save()


def _reused_line(study: Any, number: int) -> str:
    from orchestrator.sweep.trials import ATTR_REUSED, get_trial

    source = get_trial(study.study, number).user_attrs.get(ATTR_REUSED)
    return (f"trial {number} repeats the parameters of trial {source}: its result was reused, "
            "no job launched")


def _read_shape(uri: str) -> Any:
    """Module shapes from the model's config.json (file://, or s3:// with the environment's
    credentials), without torch; None when unreadable or an unknown architecture."""
    from orchestrator import storage
    from orchestrator.api.architectures import shape_at

    return shape_at(uri, lambda u: storage.read_text(u, progress=False))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


Runner = LocalJobRunner | LocalSweepRunner
RunnerFactory = Callable[..., Runner]
