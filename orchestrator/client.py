"""The kubetune Python SDK: submit, watch, collect and cancel FineTuneJobs and sweeps.

::

    from orchestrator import Client, FineTuneJob, FineTuneSweep

    job = FineTuneJob(metadata={"name": "support-lora"}, spec={...})   # the API models
    c = Client(namespace="team-a")                   # kubeconfig / context like kubectl
    c.submit(job)
    done = c.wait("support-lora", timeout=3600)      # the object in a terminal phase
    [adapter] = c.collect("support-lora", "./adapter")   # verified download
    c.collect("support-sweep", best=True)            # the best trial of a sweep

``orchestrator.local.LocalClient`` offers the same reads (get, trials, collect, ...) over
the state of ``kubetune run/sweep --local``. Importing this module is light: the
kubernetes client is imported when a Client is created, never torch.
"""

from __future__ import annotations

import abc
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.api import FineTuneJob, FineTuneSweep, trial_name
from orchestrator.api import labels as L
from orchestrator.api import reasons as R
from orchestrator.api.base import GROUP, VERSION

JOB = "job"
SWEEP = "sweep"
PLURALS = {JOB: "finetunejobs", SWEEP: "finetunesweeps"}
KIND_NAMES = {JOB: "FineTuneJob", SWEEP: "FineTuneSweep"}
_KIND_ALIASES = {
    JOB: ("job", "jobs", "ftj", "finetunejob", "finetunejobs", "finetunejob.kubetune.io"),
    SWEEP: ("sweep", "sweeps", "fts", "finetunesweep", "finetunesweeps",
            "finetunesweep.kubetune.io"),
}
METADATA_FILE = "kubetune.json"
TRIAL_COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"


class KubetuneError(Exception):
    """A failure with a one-line, user-facing message."""


class NotFoundError(KubetuneError):
    pass


def normalize_kind(kind: str | None) -> str | None:
    if kind is None:
        return None
    k = kind.lower()
    for canonical, aliases in _KIND_ALIASES.items():
        if k in aliases or k == KIND_NAMES[canonical].lower():
            return canonical
    raise KubetuneError(f"unknown kind {kind!r}: use job (ftj) or sweep (fts)")


def kind_of(obj: Mapping[str, Any]) -> str:
    return SWEEP if obj.get("kind") == "FineTuneSweep" else JOB


def resource_name(obj: Mapping[str, Any]) -> str:
    """``finetunejob.kubetune.io/NAME`` as kubectl prints it."""
    return f"{obj.get('kind', 'FineTuneJob').lower()}.{GROUP}/{obj['metadata']['name']}"


# --- artifacts --------------------------------------------------------------------------------
@dataclass
class ArtifactRef:
    """A trained adapter in object storage, as a job's status points at it."""

    name: str  # the FineTuneJob (trial) that produced it
    uri: str
    sha256: str | None = None
    trial: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)
    endpoint: str | None = None  # spec.storage.endpoint of the job
    region: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in (None, {}, [])}


@dataclass
class Collected:
    ref: ArtifactRef
    path: Path
    files: int
    bytes: int
    manifest_sha256: str | None
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.ref.name, "trial": self.ref.trial, "uri": self.ref.uri,
                "path": str(self.path), "files": self.files, "bytes": self.bytes,
                "sha256": self.manifest_sha256, "metrics": self.ref.metrics,
                "parameters": self.ref.parameters}


def storage_options(ref: ArtifactRef, endpoint: str | None = None) -> dict[str, Any]:
    """S3 connection for collect: an explicit endpoint wins, then the environment
    (KUBETUNE_S3_ENDPOINT / AWS_ENDPOINT_URL: what this machine can reach), then the job's
    spec.storage.endpoint (often a cluster-internal name)."""
    if not ref.uri.startswith("s3://"):
        return {}
    from orchestrator.storage import S3Config
    from orchestrator.storage.s3 import ENDPOINT_ENVS

    env_endpoint = any(os.environ.get(e) for e in ENDPOINT_ENVS)
    chosen = endpoint or (None if env_endpoint else ref.endpoint)
    return {"s3": S3Config(endpoint_url=chosen, region=ref.region)}


def _storage_of(job_or_template: Mapping[str, Any]) -> tuple[str | None, str | None]:
    st = (job_or_template or {}).get("storage") or {}
    return st.get("endpoint"), st.get("region")


# --- trials of a sweep ------------------------------------------------------------------------
def trial_rows(sweep: Mapping[str, Any], jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per trial, merging status.trialList (every trial the study knows, including
    ones without a job) with the trial FineTuneJobs (progress, metrics, artifact)."""
    status = sweep.get("status") or {}
    rows: dict[int, dict[str, Any]] = {}
    for rec in status.get("trialList") or []:
        rows[int(rec["number"])] = {
            "number": int(rec["number"]), "name": rec.get("name"), "state": rec.get("state"),
            "parameters": rec.get("parameters") or {}, "values": rec.get("values"),
            "message": rec.get("message"), "metrics": {}, "progress": None, "artifact": None,
            "feasible": rec.get("feasible"), "reusedFrom": rec.get("reusedFrom")}
    for job in jobs:
        meta = job.get("metadata") or {}
        trial = (meta.get("labels") or {}).get(L.LABEL_TRIAL)
        if trial is None:
            continue
        number = int(trial)
        jstatus = job.get("status") or {}
        row = rows.setdefault(number, {
            "number": number, "name": meta.get("name"), "state": None, "values": None,
            "message": None, "metrics": {}, "progress": None, "artifact": None,
            "parameters": _annotation_params(meta)})
        row["name"] = row.get("name") or meta.get("name")
        row["metrics"] = dict(jstatus.get("metrics") or {})
        row["progress"] = jstatus.get("progress")
        row["artifact"] = jstatus.get("artifact")
        row["jobPhase"] = jstatus.get("phase")
        if not row.get("state"):
            row["state"] = _trial_state(jstatus)
        if not row.get("message") and jstatus.get("phase") == R.PHASE_FAILED:
            row["message"] = jstatus.get("message")
    summaries = [*(status.get("paretoFront") or []), status.get("bestTrial") or {}]
    for s in summaries:
        if s and int(s.get("number", -1)) in rows:
            row = rows[int(s["number"])]
            row["metrics"] = {**(s.get("metrics") or {}), **row["metrics"]}
            row["artifact"] = row["artifact"] or s.get("artifact")
    front = {int(t["number"]) for t in status.get("paretoFront") or []}
    best = (status.get("bestTrial") or {}).get("number")
    for number, row in rows.items():
        row["pareto"] = number in front
        row["best"] = number == best
        source = rows.get(row["reusedFrom"]) if row.get("reusedFrom") is not None else None
        if source is not None:  # no job of its own: show the reused trial's metrics
            row["metrics"] = row["metrics"] or dict(source.get("metrics") or {})
        elif row.get("reusedFrom") is None:
            row["name"] = row.get("name") or trial_name(sweep["metadata"]["name"], number)
    return [rows[n] for n in sorted(rows)]


def _annotation_params(meta: Mapping[str, Any]) -> dict[str, Any]:
    try:
        doc = json.loads((meta.get("annotations") or {}).get(L.ANNOTATION_TRIAL_PARAMETERS, "{}"))
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _trial_state(jstatus: Mapping[str, Any]) -> str:
    phase = jstatus.get("phase")
    if phase == R.PHASE_SUCCEEDED:
        return R.TRIAL_SUCCEEDED
    if phase == R.PHASE_FAILED:
        pruned = any(c.get("reason") == R.REASON_TRIAL_PRUNED
                     for c in jstatus.get("conditions") or [])
        return R.TRIAL_PRUNED if pruned else R.TRIAL_FAILED
    return R.TRIAL_RUNNING if phase == R.PHASE_RUNNING else R.TRIAL_PENDING


def objective_directions(sweep: Mapping[str, Any]) -> list[tuple[str, str]]:
    objs = (sweep.get("spec") or {}).get("objectives") or [{"metric": "evalLoss"}]
    return [(o.get("metric", "evalLoss"), o.get("direction", "minimize")) for o in objs]


def _first_value(row: Mapping[str, Any], metric: str) -> float | None:
    values = row.get("values") or []
    if values:
        return float(values[0])
    value = (row.get("metrics") or {}).get(metric)
    return float(value) if isinstance(value, int | float) else None


def ranked_trials(sweep: Mapping[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Succeeded trials, best first by the first objective (ties: lower trial number).
    Infeasible trials (breaking spec.constraints) and reused results (no adapter of their
    own) are left out."""
    metric, direction = objective_directions(sweep)[0]
    done = [r for r in rows if r.get("state") == R.TRIAL_SUCCEEDED
            and r.get("feasible") is not False and r.get("reusedFrom") is None
            and _first_value(r, metric) is not None]
    sign = -1.0 if direction == "maximize" else 1.0
    return sorted(done, key=lambda r: (sign * (_first_value(r, metric) or 0.0), r["number"]))


def best_trial_number(sweep: Mapping[str, Any], rows: list[dict[str, Any]]) -> int | None:
    """status.bestTrial with one objective; with two, the Pareto-front trial that is best
    on the first objective (the front is what the study returns as best trials)."""
    status = sweep.get("status") or {}
    objectives = objective_directions(sweep)
    front = status.get("paretoFront") or []
    if len(objectives) > 1 and front:
        _, direction = objectives[0]
        sign = -1.0 if direction == "maximize" else 1.0
        chosen = min(front, key=lambda t: (sign * float((t.get("values") or [0.0])[0]),
                                           int(t["number"])))
        return int(chosen["number"])
    best = status.get("bestTrial")
    if best:
        return int(best["number"])
    ranked = ranked_trials(sweep, rows)
    return ranked[0]["number"] if ranked else None


def select_artifacts(obj: Mapping[str, Any], rows: list[dict[str, Any]] | None = None, *,
                     best: bool = False, top: int | None = None,
                     trial: int | None = None) -> list[ArtifactRef]:
    """Which adapters `collect` downloads: a job's own, or a sweep's best / top K / trial N."""
    name = obj["metadata"]["name"]
    chosen = [x for x in (best, top is not None, trial is not None) if x]
    if len(chosen) > 1:
        raise KubetuneError("choose one of --best, --top K and --trial N")
    if kind_of(obj) == JOB:
        if chosen:
            raise KubetuneError(f"{name} is a FineTuneJob: --best, --top and --trial apply to "
                                "sweeps (collect the job by its name alone)")
        return [_job_ref(obj)]
    rows = rows or []
    template = (obj.get("spec") or {}).get("template") or {}
    endpoint, region = _storage_of(template)
    by_number = {r["number"]: r for r in rows}
    if trial is not None:
        if trial not in by_number:
            raise NotFoundError(f"sweep {name} has no trial {trial} (trials: "
                                f"{', '.join(str(n) for n in sorted(by_number)) or 'none yet'})")
        picks = [by_number[trial]]
    elif top is not None:
        if top < 1:
            raise KubetuneError("--top needs K >= 1")
        picks = ranked_trials(obj, rows)[:top]
        if not picks:
            raise NotFoundError(f"sweep {name} has no succeeded trial yet")
    else:
        number = best_trial_number(obj, rows)
        if number is None or number not in by_number:
            phase = (obj.get("status") or {}).get("phase") or "Pending"
            raise NotFoundError(f"sweep {name} has no succeeded trial yet (phase {phase})")
        picks = [by_number[number]]
    refs = []
    for row in picks:
        art = row.get("artifact") or {}
        if not art.get("uri"):
            raise NotFoundError(f"trial {row['number']} ({row['name']}) of sweep {name} has no "
                                f"artifact (state {row.get('state') or 'unknown'})")
        refs.append(ArtifactRef(row["name"], art["uri"], art.get("sha256"), row["number"],
                                dict(row.get("metrics") or {}), dict(row.get("parameters") or {}),
                                endpoint, region))
    return refs


def _job_ref(job: Mapping[str, Any]) -> ArtifactRef:
    status = job.get("status") or {}
    art = status.get("artifact") or {}
    name = job["metadata"]["name"]
    if not art.get("uri"):
        raise NotFoundError(f"FineTuneJob {name} has no artifact yet (phase "
                            f"{status.get('phase') or 'Pending'})")
    endpoint, region = _storage_of(job.get("spec") or {})
    trial = (job["metadata"].get("labels") or {}).get(L.LABEL_TRIAL)
    return ArtifactRef(name, art["uri"], art.get("sha256"),
                       int(trial) if trial is not None else None,
                       dict(status.get("metrics") or {}),
                       _annotation_params(job["metadata"]), endpoint, region)


# --- clients ----------------------------------------------------------------------------------
class BaseClient(abc.ABC):
    """Reads shared by the cluster Client and the LocalClient, which supply the two
    primitives below (API server vs the local state directory)."""

    namespace: str = "default"

    @abc.abstractmethod
    def _get(self, kind: str, name: str) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    def _list(
        self, kind: str, labels: Mapping[str, str] | None = None
    ) -> list[dict[str, Any]]: ...

    # objects
    def get_raw(self, name: str, kind: str | None = None) -> dict[str, Any]:
        """The object as the API server returns it (a dict with status)."""
        k = normalize_kind(kind)
        if k is not None:
            obj = self._get(k, name)
            if obj is None:
                raise NotFoundError(f"{KIND_NAMES[k]} {name!r} not found in {self._where()}")
            return obj
        found = [o for o in (self._get(JOB, name), self._get(SWEEP, name)) if o is not None]
        if not found:
            raise NotFoundError(f"no FineTuneJob or FineTuneSweep named {name!r} in "
                                f"{self._where()}")
        if len(found) > 1:
            raise KubetuneError(f"both a FineTuneJob and a FineTuneSweep are named {name!r}: "
                                "pass --kind job or --kind sweep")
        return found[0]

    def get(self, name: str, kind: str | None = None) -> FineTuneJob | FineTuneSweep:
        """The object as the API model (spec and status parsed)."""
        obj = self.get_raw(name, kind)
        model = FineTuneSweep if kind_of(obj) == SWEEP else FineTuneJob
        keep = {k: obj[k] for k in ("apiVersion", "kind", "metadata", "spec", "status")
                if k in obj}
        return model.model_validate(keep)

    def list_raw(self, kind: str, labels: Mapping[str, str] | None = None
                 ) -> list[dict[str, Any]]:
        k = normalize_kind(kind)
        assert k is not None
        return sorted(self._list(k, labels), key=lambda o: o["metadata"]["name"])

    def jobs(self) -> list[dict[str, Any]]:
        return self.list_raw(JOB)

    def sweeps(self) -> list[dict[str, Any]]:
        return self.list_raw(SWEEP)

    def trial_jobs(self, sweep: str) -> list[dict[str, Any]]:
        return self.list_raw(JOB, {L.LABEL_SWEEP: sweep})

    def trials(self, sweep: str | Mapping[str, Any]) -> list[dict[str, Any]]:
        """The sweep's trials, one merged row each (see trial_rows)."""
        obj = self.get_raw(sweep, SWEEP) if isinstance(sweep, str) else sweep
        return trial_rows(obj, self.trial_jobs(obj["metadata"]["name"]))

    def wait(self, name: str, kind: str | None = None, *, timeout: float | None = None,
             poll: float = 2.0, on_update: Callable[[dict[str, Any]], None] | None = None
             ) -> dict[str, Any]:
        """Poll until the job or sweep reaches Succeeded or Failed; returns the object."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            obj = self.get_raw(name, kind)
            kind = kind_of(obj)
            if on_update is not None:
                on_update(obj)
            phase = (obj.get("status") or {}).get("phase")
            if phase in R.TERMINAL_PHASES:
                return obj
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{KIND_NAMES[kind]} {name} is still {phase or 'Pending'} "
                                   f"after {timeout:.0f}s")
            time.sleep(poll)

    # artifacts
    def artifact_refs(self, name: str, kind: str | None = None) -> list[ArtifactRef]:
        """Every adapter of a job (one) or a sweep (one per succeeded trial, best first)."""
        obj = self.get_raw(name, kind)
        if kind_of(obj) == JOB:
            return [_job_ref(obj)]
        rows = self.trials(obj)
        refs = []
        for number in (r["number"] for r in ranked_trials(obj, rows)
                       if (r.get("artifact") or {}).get("uri")):
            refs += select_artifacts(obj, rows, trial=number)
        return refs

    def select(self, name: str, *, kind: str | None = None, best: bool = False,
               top: int | None = None, trial: int | None = None) -> list[ArtifactRef]:
        obj = self.get_raw(name, kind)
        rows = self.trials(obj) if kind_of(obj) == SWEEP else None
        return select_artifacts(obj, rows, best=best, top=top, trial=trial)

    def collect(self, name: str, dest: str | os.PathLike[str] | None = None, *,
                kind: str | None = None, best: bool = False, top: int | None = None,
                trial: int | None = None, progress: bool | None = None,
                endpoint: str | None = None) -> list[Collected]:
        """Download adapters (PEFT files + kubetune.json) and verify every file's sha256
        against the upload's manifest, and the manifest against the digest in status."""
        refs = self.select(name, kind=kind, best=best, top=top, trial=trial)
        return [download(ref, _dest_for(ref, dest, len(refs)), progress=progress,
                         endpoint=endpoint) for ref in refs]

    def _where(self) -> str:
        return f"namespace {self.namespace}"


def _dest_for(ref: ArtifactRef, dest: str | os.PathLike[str] | None, count: int) -> Path:
    if dest is None:
        return Path(ref.name)
    return Path(dest) / ref.name if count > 1 else Path(dest)


def download(ref: ArtifactRef, dest: Path, *, progress: bool | None = None,
             endpoint: str | None = None) -> Collected:
    from orchestrator import storage

    manifest = storage.download_dir(ref.uri, dest, require_manifest=True,
                                    expected_digest=ref.sha256, progress=progress,
                                    **storage_options(ref, endpoint))
    assert manifest is not None
    metadata: dict[str, Any] = {}
    meta_file = dest / METADATA_FILE
    if meta_file.is_file():
        try:
            metadata = json.loads(meta_file.read_text())
        except ValueError:
            metadata = {}
    digest = storage.sha256_file(dest / storage.MANIFEST_NAME)
    return Collected(ref, dest, len(manifest.files), manifest.total_size, digest, metadata)


class Client(BaseClient):
    """FineTuneJobs and FineTuneSweeps in a cluster, through the kubernetes Python client.

    ``kubeconfig`` and ``context`` work like kubectl's flags (default: $KUBECONFIG or
    ~/.kube/config, then the in-cluster service account); ``namespace`` defaults to the
    context's namespace, else ``default``.
    """

    def __init__(self, namespace: str | None = None, *, kubeconfig: str | None = None,
                 context: str | None = None, api_client: Any = None) -> None:
        self.api = api_client if api_client is not None else _load_api(kubeconfig, context)
        self.namespace = namespace or _context_namespace(kubeconfig, context) or "default"
        from kubernetes import client

        # Any: the generated client's stubs type bodies as object; we handle plain dicts
        self.custom: Any = client.CustomObjectsApi(self.api)
        self.core: Any = client.CoreV1Api(self.api)

    def _where(self) -> str:
        return f"namespace {self.namespace}"

    def _get(self, kind: str, name: str) -> dict[str, Any] | None:
        with api_errors():
            try:
                return dict(self.custom.get_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURALS[kind], name))
            except _api_exception() as exc:
                if exc.status == 404 and "could not find the requested resource" not in str(
                        exc.body or ""):
                    return None
                raise

    def _list(self, kind: str, labels: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        selector = ",".join(f"{k}={v}" for k, v in (labels or {}).items())
        with api_errors():
            res = self.custom.list_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURALS[kind],
                **({"label_selector": selector} if selector else {}))
        return list(res.get("items") or [])

    def submit(self, obj: FineTuneJob | FineTuneSweep | Mapping[str, Any]) -> dict[str, Any]:
        """Create the object (validated by the API models first); returns it as created."""
        from orchestrator.api import parse_object

        model = obj if isinstance(obj, FineTuneJob | FineTuneSweep) else parse_object(dict(obj))
        body = model.to_wire()
        body.pop("status", None)
        meta = dict(body.get("metadata") or {})
        if not meta.get("name"):
            raise KubetuneError(f"the {model.kind} has no metadata.name")
        ns = meta.get("namespace")
        if ns and ns != self.namespace:
            raise KubetuneError(f"{model.kind} {meta['name']} names namespace {ns} but the "
                                f"target namespace is {self.namespace}: drop one of them")
        meta["namespace"] = self.namespace
        body["metadata"] = meta
        kind = kind_of(body)
        with api_errors():
            try:
                return dict(self.custom.create_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURALS[kind], body))
            except _api_exception() as exc:
                if exc.status == 409:
                    raise KubetuneError(
                        f"{resource_name(body)} already exists in namespace {self.namespace} "
                        f"(cancel it first, or choose another name)") from None
                raise

    def cancel(self, name: str, kind: str | None = None) -> dict[str, Any]:
        """Delete the job or sweep: its pods stop and the garbage collector removes its
        children (a sweep's trials too). Adapters already uploaded stay in storage."""
        obj = self.get_raw(name, kind)
        with api_errors():
            from kubernetes import client

            try:
                self.custom.delete_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURALS[kind_of(obj)], name,
                    body=client.V1DeleteOptions(propagation_policy="Background"))
            except _api_exception() as exc:
                if exc.status != 404:
                    raise
        return obj

    def attempt_pods(self, name: str) -> dict[int, list[dict[str, Any]]]:
        """The job's trainer pods that still exist, by attempt, each as ``{name, attempt,
        rank, phase}`` sorted by rank: the current attempt's, and those the controller keeps
        of failed attempts (see the controller's failed-attempt retention)."""
        with api_errors():
            pods = self.core.list_namespaced_pod(
                self.namespace,
                label_selector=f"{L.LABEL_JOB}={name},"
                f"{L.LABEL_COMPONENT}={L.COMPONENT_TRAINER}",
            ).items
        out: dict[int, list[dict[str, Any]]] = {}
        for p in sorted(pods, key=lambda p: str(p.metadata.creation_timestamp or "")):
            labels = p.metadata.labels or {}
            ann = p.metadata.annotations or {}
            attempt = str(labels.get(L.LABEL_ATTEMPT) or "")
            rank = str(labels.get(TRIAL_COMPLETION_INDEX) or ann.get(TRIAL_COMPLETION_INDEX) or "")
            if not attempt.isdigit() or not rank.isdigit():
                continue
            row = {"name": p.metadata.name, "attempt": int(attempt), "rank": int(rank),
                   "phase": p.status.phase if p.status else None}
            ranks = out.setdefault(int(attempt), [])
            # one pod per rank (the newest, should a replacement ever exist)
            ranks[:] = [r for r in ranks if r["rank"] != row["rank"]] + [row]
        return {a: sorted(rows, key=lambda r: r["rank"]) for a, rows in sorted(out.items())}

    def log_pod(self, name: str, *, attempt: int | None = None, rank: int | None = None
                ) -> dict[str, Any]:
        """The pod whose log ``logs`` reads: rank ``rank`` (default 0) of attempt ``attempt``
        (default: the current one, ``status.attempts``); a clear error naming the attempts
        (or ranks) that still have pods when it is gone."""
        job = self.get_raw(name, JOB)
        status = job.get("status") or {}
        current = int(status.get("attempts") or 0)
        pods = self.attempt_pods(name)
        have = ", ".join(str(a) for a in pods)
        if attempt is None and not current and pods:
            current = max(pods)  # status not written yet: the newest pods
        want = attempt if attempt is not None else current
        if want not in pods:
            phase = status.get("phase") or "Pending"
            if attempt is None or attempt == current:
                msg = (f"FineTuneJob {name} has no trainer pods" if not current else
                       f"attempt {current} (the current one) of FineTuneJob {name} has no pods")
                msg += f" yet (phase {phase})" if phase not in R.TERMINAL_PHASES else ""
            elif attempt < 1 or attempt > current:
                msg = (f"FineTuneJob {name} has no attempt {attempt}: it has had "
                       f"{current} attempt(s)")
            else:
                msg = (f"attempt {attempt} of FineTuneJob {name} has no pods left (the "
                       "controller keeps the pods of the last few failed attempts, for a "
                       "limited time)")
            msg += (f"; attempts with logs: {have} (pass --attempt N)" if have
                    else "; no attempt has pods left")
            raise NotFoundError(msg)
        want_rank = 0 if rank is None else rank
        pod = next((p for p in pods[want] if p["rank"] == want_rank), None)
        if pod is None:
            ranks = ", ".join(str(p["rank"]) for p in pods[want])
            raise NotFoundError(
                f"attempt {want} of FineTuneJob {name} has no pod of rank {want_rank}; ranks "
                f"with logs: {ranks} (when one rank fails, Kubernetes deletes the pods it "
                "stops, and their logs with them)")
        return pod

    def trainer_pod(self, name: str) -> dict[str, Any]:
        """Rank 0's pod (completion index 0) of the job's current attempt."""
        return self.log_pod(name)

    def logs(self, name: str, *, attempt: int | None = None, rank: int | None = None,
             follow: bool = False, tail: int | None = None) -> Iterator[str]:
        """Lines of one trainer pod's log: rank ``rank`` (default 0) of attempt ``attempt``
        (default: the current one; failed attempts' pods are kept for a while); ``follow``
        streams them."""
        pod = self.log_pod(name, attempt=attempt, rank=rank)
        from orchestrator.render import CONTAINER_NAME

        kwargs: dict[str, Any] = {"container": CONTAINER_NAME, "follow": follow,
                                  "_preload_content": False}
        if tail is not None:
            kwargs["tail_lines"] = tail
        what = f"pod {pod['name']} (attempt {pod['attempt']}, rank {pod['rank']})"
        try:
            with api_errors():
                resp = self.core.read_namespaced_pod_log(pod["name"], self.namespace, **kwargs)
        except KubetuneError as exc:
            raise KubetuneError(f"cannot read the log of {what}: {exc}") from None
        buf = ""
        with api_errors():
            for chunk in resp.stream(amt=4096, decode_content=True):
                buf += chunk.decode("utf-8", errors="replace")
                *lines, buf = buf.split("\n")
                yield from lines
        if buf:
            yield buf


# --- kubernetes plumbing (imported lazily: `import orchestrator` stays light) -------------
def _api_exception() -> Any:
    from kubernetes.client.exceptions import ApiException

    return ApiException


def _load_api(kubeconfig: str | None, context: str | None) -> Any:
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    path = kubeconfig or os.environ.get("KUBECONFIG")
    if kubeconfig and not Path(kubeconfig).is_file():
        raise KubetuneError(f"kubeconfig {kubeconfig} not found")
    default = Path("~/.kube/config").expanduser()
    if path is None and not default.is_file() and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
        return client.ApiClient()
    if path is None and not default.is_file():
        raise KubetuneError("no Kubernetes configuration: set KUBECONFIG or pass --kubeconfig "
                            "(or run locally with --local)")
    try:
        api = config.new_client_from_config(config_file=path, context=context,
                                            persist_config=False)
    except ConfigException as exc:
        raise KubetuneError(f"invalid Kubernetes configuration: {exc}") from None
    api.configuration.retries = 1  # fail in seconds when the API server is unreachable
    return api


def _context_namespace(kubeconfig: str | None, context: str | None) -> str | None:
    try:
        from kubernetes import config

        contexts, active = config.list_kube_config_contexts(
            config_file=kubeconfig or os.environ.get("KUBECONFIG"))
    except Exception:  # in-cluster, or no config: the caller falls back to "default"
        sa_ns = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        return sa_ns.read_text().strip() if sa_ns.is_file() else None
    chosen = next((c for c in contexts if c["name"] == context), None) if context else active
    return ((chosen or {}).get("context") or {}).get("namespace")


class api_errors:  # lowercase: reads as a `with` statement
    """Turns kubernetes client and connection errors into one-line KubetuneErrors."""

    def __enter__(self) -> api_errors:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None or isinstance(exc, KubetuneError):
            return
        ApiException = _api_exception()
        if isinstance(exc, ApiException):
            raise KubetuneError(_api_message(exc)) from None
        try:
            import urllib3

            if isinstance(exc, urllib3.exceptions.HTTPError):
                reason = getattr(exc, "reason", None) or exc
                raise KubetuneError(
                    f"cannot reach the Kubernetes API server: {_short(reason)}") from None
        except ImportError:  # pragma: no cover
            pass


def _short(exc: Any) -> str:
    text = str(exc)
    if "Connection refused" in text:
        return "connection refused"
    return " ".join(text.split())[:300]


def _api_message(exc: Any) -> str:
    message = ""
    try:
        body = json.loads(exc.body) if exc.body else {}
        message = body.get("message") or ""
    except (ValueError, TypeError, AttributeError):
        message = ""
    message = message or f"{exc.status} {exc.reason}".strip()
    if exc.status == 404 and "could not find the requested resource" in message:
        message += (" (are the kubetune CRDs installed? `helm install kubetune helm/kubetune` "
                    "installs them)")
    return " ".join(message.split())
