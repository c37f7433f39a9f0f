"""``kubetune`` and the kubectl plugin ``kubectl-tune`` (``kubectl tune …``).

Cluster commands talk to the API server through the kubernetes Python client (kubeconfig,
context and namespace work like kubectl's); ``--local`` commands read the local state of
``kubetune run/sweep --local``. Every failure ends as one line on stderr and a non-zero
exit code: 1 for errors, 2 for usage errors, 130 for Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from orchestrator import __version__
from orchestrator.client import (
    JOB,
    SWEEP,
    BaseClient,
    KubetuneError,
    kind_of,
    normalize_kind,
    resource_name,
)

try:  # typer >= 0.20 vendors click; its exceptions are the ones raised here
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older typer on the real click
    from click import exceptions as click_exceptions  # type: ignore[no-redef]

DEBUG_ENV = "KUBETUNE_DEBUG"


class Output(StrEnum):
    table = "table"
    json = "json"
    yaml = "yaml"


class CliError(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Opts:
    namespace: str | None = None
    context: str | None = None
    kubeconfig: str | None = None
    output: Output = Output.table
    local: bool = False
    state_dir: str | None = None


# --- shared options (accepted before or after the command, like kubectl) ----------------
NamespaceOpt = Annotated[str | None, typer.Option(
    "--namespace", "-n", help="Namespace (default: the kubeconfig context's, else default).")]
ContextOpt = Annotated[str | None, typer.Option(
    "--context", help="kubeconfig context to use.")]
KubeconfigOpt = Annotated[str | None, typer.Option(
    "--kubeconfig", help="Path to the kubeconfig (default: $KUBECONFIG, ~/.kube/config).")]
OutputOpt = Annotated[Output | None, typer.Option(
    "--output", "-o", help="Output format: table, json or yaml.", case_sensitive=False)]
LocalOpt = Annotated[bool, typer.Option(
    "--local", help="Use local runs (the state of `kubetune run/sweep --local`).")]
StateDirOpt = Annotated[str | None, typer.Option(
    "--state-dir", help="Local state directory (default: $KUBETUNE_STATE_DIR or ./.kubetune).")]
KindOpt = Annotated[str | None, typer.Option(
    "--kind", "-k", help="job or sweep, when both kinds have an object of that name.")]

app = typer.Typer(
    name="kubetune",
    help="Parameter-efficient fine-tuning on Kubernetes (and on this machine with --local).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
artifacts_app = typer.Typer(help="Adapters in object storage.", no_args_is_help=True)
app.add_typer(artifacts_app, name="artifacts")


def _stdout() -> Console:
    # wide enough for the trials table when piped (CI logs), terminal width otherwise
    width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200
    return Console(width=width, highlight=False)


def _stderr() -> Console:
    return Console(stderr=True, highlight=False)


@app.callback()
def _root(
    ctx: typer.Context,
    namespace: NamespaceOpt = None,
    context: ContextOpt = None,
    kubeconfig: KubeconfigOpt = None,
    output: OutputOpt = None,
    state_dir: StateDirOpt = None,
) -> None:
    ctx.obj = Opts(namespace, context, kubeconfig, output or Output.table, False, state_dir)


def _opts(ctx: typer.Context, **given: Any) -> Opts:
    """Options given after the command win over the same options given before it."""
    base = ctx.find_object(Opts) or Opts()
    return replace(base, **{k: v for k, v in given.items() if v not in (None, False)})


def _client(o: Opts) -> BaseClient:
    if o.local:
        from orchestrator.local import LocalClient

        return LocalClient(o.state_dir)
    from orchestrator.client import Client

    return Client(o.namespace, kubeconfig=o.kubeconfig, context=o.context)


def _dump(o: Opts, doc: Any) -> bool:
    """Print ``doc`` as JSON or YAML when asked; False for table output."""
    if o.output == Output.json:
        sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")
        return True
    if o.output == Output.yaml:
        import yaml

        sys.stdout.write(yaml.safe_dump(doc, sort_keys=False, default_flow_style=False))
        return True
    return False


def _as_list(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "List", "items": items}


# --- submit ----------------------------------------------------------------------------------
@app.command()
def submit(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="YAML with FineTuneJob/FineTuneSweep objects.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate only.")] = False,
    namespace: NamespaceOpt = None,
    context: ContextOpt = None,
    kubeconfig: KubeconfigOpt = None,
    output: OutputOpt = None,
) -> None:
    """Create the jobs and sweeps in FILE (validated against the API first)."""
    o = _opts(ctx, namespace=namespace, context=context, kubeconfig=kubeconfig, output=output)
    objects = _load(file)
    if dry_run:
        for obj in objects:
            _stdout().print(f"{resource_name(obj.to_wire())} valid (dry run)")
        return
    from orchestrator.client import Client

    client = _client(o)
    assert isinstance(client, Client)
    created = [client.submit(obj) for obj in objects]
    if _dump(o, created[0] if len(created) == 1 else _as_list(created)):
        return
    for obj in created:
        _stdout().print(f"{resource_name(obj)} created in namespace "
                        f"{obj['metadata']['namespace']}")


def _load(file: Path) -> list[Any]:
    from pydantic import ValidationError

    from orchestrator.api import format_errors, load_objects

    if not file.is_file():
        raise CliError(f"{file}: no such file")
    try:
        objects = load_objects(file)
    except ValidationError as exc:
        raise CliError(f"{file}: {format_errors(exc)}") from None
    except ValueError as exc:  # includes YAML errors
        raise CliError(f"{file}: {' '.join(str(exc).split())}") from None
    if not objects:
        raise CliError(f"{file}: no FineTuneJob or FineTuneSweep in it")
    return objects


# --- get / status ------------------------------------------------------------------------------
@app.command()
def get(
    ctx: typer.Context,
    kind: Annotated[str | None, typer.Argument(
        help="jobs (ftj), sweeps (fts) or trials; default: jobs and sweeps.")] = None,
    name: Annotated[str | None, typer.Argument(
        help="A job or sweep name; for trials, the sweep (required).")] = None,
    all_jobs: Annotated[bool, typer.Option(
        "--all", "-a", help="Include sweep trials in the job list.")] = False,
    namespace: NamespaceOpt = None,
    context: ContextOpt = None,
    kubeconfig: KubeconfigOpt = None,
    output: OutputOpt = None,
    local: LocalOpt = False,
    state_dir: StateDirOpt = None,
) -> None:
    """List jobs, sweeps or a sweep's trials."""
    o = _opts(ctx, namespace=namespace, context=context, kubeconfig=kubeconfig, output=output,
              local=local, state_dir=state_dir)
    what = (kind or "").lower()
    if what in ("trial", "trials"):
        if not name:
            raise CliError("get trials needs the sweep name: kubetune get trials SWEEP", 2)
        _show_trials(o, _client(o), name)
        return
    k = normalize_kind(kind) if kind else None
    client = _client(o)
    con = _stdout()
    from orchestrator.cli import format as F

    if name:
        assert k is not None
        obj = client.get_raw(name, k)
        if not _dump(o, obj):
            con.print(F.jobs_table([obj]) if k == JOB else F.sweeps_table([obj]))
        return
    jobs = client.jobs() if k in (None, JOB) else []
    if not all_jobs:
        jobs = [j for j in jobs if "kubetune.io/sweep" not in (j["metadata"].get("labels") or {})]
    sweeps = client.sweeps() if k in (None, SWEEP) else []
    if _dump(o, _as_list(jobs + sweeps)):
        return
    where = getattr(client, "_where", lambda: "")()
    if k in (None, JOB):
        con.print(F.jobs_table(jobs, title="FineTuneJobs") if jobs
                  else f"No FineTuneJobs in {where}.")
    if k is None:
        con.print()
    if k in (None, SWEEP):
        con.print(F.sweeps_table(sweeps, title="FineTuneSweeps") if sweeps
                  else f"No FineTuneSweeps in {where}.")


def _show_trials(o: Opts, client: BaseClient, sweep: str) -> None:
    from orchestrator.cli import format as F

    obj = client.get_raw(sweep, SWEEP)
    rows = client.trials(obj)
    if _dump(o, rows):
        return
    con = _stdout()
    con.print(F.trials_table(obj, rows, title=f"Trials of {sweep}"))
    front = F.pareto_table(obj, rows)
    if front is not None:
        con.print()
        con.print(front)


@app.command()
def status(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="A FineTuneJob or FineTuneSweep.")],
    kind: KindOpt = None,
    watch: Annotated[bool, typer.Option("--watch", "-w",
                                        help="Refresh until it finishes.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes.")] = 2.0,
    namespace: NamespaceOpt = None,
    context: ContextOpt = None,
    kubeconfig: KubeconfigOpt = None,
    output: OutputOpt = None,
    local: LocalOpt = False,
    state_dir: StateDirOpt = None,
    plot: Annotated[Path | None, typer.Option(
        "--plot", help="Sweeps: also write the optimisation history and Pareto front as a PNG "
        "(needs the dashboard extra).")] = None,
) -> None:
    """Details of a job (progress, metrics) or a sweep (trials, best, Pareto front)."""
    o = _opts(ctx, namespace=namespace, context=context, kubeconfig=kubeconfig, output=output,
              local=local, state_dir=state_dir)
    client = _client(o)
    if plot is not None:
        from orchestrator.cli import studyview

        obj = client.get_raw(name, kind)
        if kind_of(obj) != SWEEP:
            raise CliError(f"--plot draws sweeps; {name} is a FineTuneJob")
        drawn = studyview.plot_sweep(obj, client.trials(obj), plot)
        _stderr().print(f"wrote {plot}: {drawn['trials']} succeeded trials "
                        f"({drawn['infeasible']} infeasible), {drawn['front']} on the Pareto "
                        "front", soft_wrap=True)
    if watch and o.output == Output.table:
        _watch(client, name, kind, interval)
        return
    obj = client.get_raw(name, kind)
    if _dump(o, obj):
        return
    _stdout().print(_detail(client, obj))


def _detail(client: BaseClient, obj: dict[str, Any]) -> Any:
    from orchestrator.cli import format as F

    if kind_of(obj) == JOB:
        return F.job_detail(obj, _samples(obj))
    return F.sweep_detail(obj, client.trials(obj))


_SAMPLES: dict[str, list[dict[str, Any]] | None] = {}


def _samples(job: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The generation samples in a succeeded job's kubetune.json (output.samples), read
    once per artifact; None when there are none or the store cannot be read (best effort:
    status must not fail over them)."""
    st = job.get("status") or {}
    art = st.get("artifact") or {}
    if st.get("phase") != "Succeeded" or not art.get("uri"):
        return None
    key = f"{art['uri']}@{art.get('sha256')}"
    if key not in _SAMPLES:
        from orchestrator import storage
        from orchestrator.client import _job_ref, storage_options

        try:
            ref = _job_ref(job)
            opts = storage_options(ref)
            if "s3" in opts:  # one quick try: status must stay fast when the store is away
                opts["s3"] = replace(opts["s3"], max_attempts=1, connect_timeout=3.0,
                                     read_timeout=10.0)
            doc = json.loads(storage.read_text(ref.uri.rstrip("/") + "/kubetune.json", **opts))
            _SAMPLES[key] = [s for s in doc.get("samples") or [] if isinstance(s, dict)]
        except Exception as exc:  # unreachable store, no credentials here, old artifact
            logging.getLogger("orchestrator.cli").debug("no samples for %s: %s", key, exc)
            _SAMPLES[key] = None
    return _SAMPLES[key]


def _watch(client: BaseClient, name: str, kind: str | None, interval: float) -> None:
    from rich.live import Live

    con = _stdout()
    if not con.is_terminal:
        last: list[str] = []

        def show(obj: dict[str, Any]) -> None:
            st = obj.get("status") or {}
            line = f"{st.get('phase') or 'Pending'}: {st.get('message') or ''}".strip()
            if [line] != last:
                last[:] = [line]
                con.print(f"{name} {line}")

        final = client.wait(name, kind, poll=interval, on_update=show)
        con.print(_detail(client, final))
        return
    with Live(console=con, refresh_per_second=2) as live:
        final = client.wait(name, kind, poll=interval,
                            on_update=lambda obj: live.update(_detail(client, obj)))
        live.update(_detail(client, final))


@app.command()
def dashboard(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="A FineTuneSweep.")],
    storage: Annotated[str | None, typer.Option(
        "--storage", help="Study storage URL to read (cluster sweeps: see docs/sweeps.md); "
        "--local uses the local state's SQLite file.")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: any free port).")] = 8080,
    namespace: NamespaceOpt = None,
    context: ContextOpt = None,
    kubeconfig: KubeconfigOpt = None,
    local: LocalOpt = False,
    state_dir: StateDirOpt = None,
) -> None:
    """Open optuna-dashboard on a sweep's Optuna study (needs the dashboard extra)."""
    from orchestrator.cli import studyview

    o = _opts(ctx, namespace=namespace, context=context, kubeconfig=kubeconfig, local=local,
              state_dir=state_dir)
    client = _client(o)
    obj = client.get_raw(name, SWEEP)
    local_url = client.state.study_url if o.local else None  # type: ignore[attr-defined]
    url, study = studyview.study_url_and_name(obj, storage, local_url)
    studyview.require("optuna_dashboard", "kubetune dashboard")
    sid = studyview.study_id(url, study)
    server = studyview.serve_dashboard(url, host, port)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    _stdout().print(f"optuna-dashboard for sweep {name} (study {study}): "
                    f"http://{shown}:{server.server_port}/dashboard/studies/{sid}  (Ctrl-C stops)")
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


# --- logs ------------------------------------------------------------------------------------
@app.command()
def logs(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="A FineTuneJob, or a sweep with --trial.")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream new lines.")] = False,
    trial: Annotated[int | None, typer.Option("--trial", "-t",
                                              help="Trial number of the sweep NAME.")] = None,
    attempt: Annotated[int | None, typer.Option(
        "--attempt", "-a", min=1,
        help="Attempt N (default: the current one); failed attempts' pods are kept a while.",
    )] = None,
    rank: Annotated[int | None, typer.Option(
        "--rank", "-r", min=0, help="Node rank (the pod's completion index; default 0).",
    )] = None,
    tail: Annotated[int | None, typer.Option(help="Only the last N lines.")] = None,
    namespace: NamespaceOpt = None,
    context: ContextOpt = None,
    kubeconfig: KubeconfigOpt = None,
    local: LocalOpt = False,
    state_dir: StateDirOpt = None,
) -> None:
    """A trainer pod's log: rank 0 of the current attempt, or --attempt N / --rank R."""
    o = _opts(ctx, namespace=namespace, context=context, kubeconfig=kubeconfig, local=local,
              state_dir=state_dir)
    client = _client(o)
    job = name
    if trial is not None:
        from orchestrator.api import trial_name

        client.get_raw(name, SWEEP)
        job = trial_name(name, trial)
    else:
        obj = client.get_raw(name)
        if kind_of(obj) == SWEEP:
            raise CliError(f"{name} is a FineTuneSweep: pass --trial N for one trial's log", 2)
    out = sys.stdout
    lines = client.logs(job, attempt=attempt, rank=rank,  # type: ignore[attr-defined]
                        follow=follow, tail=tail)
    for line in lines:
        out.write(line + "\n")
        if follow:
            out.flush()


# --- collect / artifacts -------------------------------------------------------------------
@app.command()
def collect(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="A FineTuneJob or FineTuneSweep.")],
    best: Annotated[bool, typer.Option(
        "--best", help="The sweep's best trial (the default for sweeps).")] = False,
    top: Annotated[int | None, typer.Option(
        "--top", help="The sweep's K best trials by the first objective.")] = None,
    trial: Annotated[int | None, typer.Option("--trial", help="Trial number N.")] = None,
    output_dir: Annotated[Path | None, typer.Option(
        "--output-dir", "-o", help="Where to put it (default ./<job name>; with --top, "
        "one subdirectory per trial).")] = None,
    endpoint: Annotated[str | None, typer.Option(
        help="S3 endpoint to download from (default: $AWS_ENDPOINT_URL, then the job's "
        "spec.storage.endpoint).")] = None,
    kind: KindOpt = None,
    namespace: NamespaceOpt = None,
    context: ContextOpt = None,
    kubeconfig: KubeconfigOpt = None,
    output: Annotated[Output | None, typer.Option(
        "--output", help="Output format: table, json or yaml.")] = None,
    local: LocalOpt = False,
    state_dir: StateDirOpt = None,
) -> None:
    """Download adapters (PEFT files + kubetune.json) and verify their checksums."""
    o = _opts(ctx, namespace=namespace, context=context, kubeconfig=kubeconfig, output=output,
              local=local, state_dir=state_dir)
    _storage_logging()
    client = _client(o)
    items = client.collect(name, output_dir, kind=kind, best=best, top=top, trial=trial,
                           endpoint=endpoint)
    if _dump(o, [c.to_dict() for c in items]):
        return
    from orchestrator.cli import format as F

    for line in F.collected_lines(items):
        _stdout().print(line, soft_wrap=True)


def _storage_logging() -> None:
    """Transfers log start/progress/done lines when stderr is not a terminal (no bar)."""
    logger = logging.getLogger("orchestrator.storage")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        logger.addHandler(_StderrHandler())
        logger.setLevel(logging.INFO)
        logger.propagate = False


class _StderrHandler(logging.Handler):
    """Writes to whatever sys.stderr is at the time (it may be swapped, e.g. by tests)."""

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.write(record.getMessage() + "\n")


@artifacts_app.command("ls")
def artifacts_ls(
    ctx: typer.Context,
    target: Annotated[str | None, typer.Argument(
        help="A storage URI (s3://…, file://…) or a job/sweep name; default: every job's "
        "adapter.")] = None,
    endpoint: Annotated[str | None, typer.Option(help="S3 endpoint for s3:// URIs.")] = None,
    kind: KindOpt = None,
    namespace: NamespaceOpt = None,
    context: ContextOpt = None,
    kubeconfig: KubeconfigOpt = None,
    output: OutputOpt = None,
    local: LocalOpt = False,
    state_dir: StateDirOpt = None,
) -> None:
    """List adapters of jobs and sweeps, or the objects under a storage URI."""
    o = _opts(ctx, namespace=namespace, context=context, kubeconfig=kubeconfig, output=output,
              local=local, state_dir=state_dir)
    from orchestrator.cli import format as F

    if target and ("://" in target or target.startswith(("/", "."))):
        from orchestrator import storage

        opts: dict[str, Any] = {}
        if target.startswith("s3://") and endpoint:
            opts["s3"] = storage.S3Config(endpoint_url=endpoint)
        objects = storage.list_objects(target, **opts)
        if _dump(o, [{"key": x.key, "size": x.size, "sha256": x.sha256} for x in objects]):
            return
        u = storage.parse_uri(target)
        _stdout().print(F.objects_table(objects, u.key) if objects
                        else f"Nothing under {target}.")
        return
    client = _client(o)
    if target:
        refs = client.artifact_refs(target, kind)
    else:
        from orchestrator.client import _job_ref

        refs = [_job_ref(j) for j in client.jobs() if ((j.get("status") or {}).get("artifact")
                                                         or {}).get("uri")]
    if _dump(o, [r.to_dict() for r in refs]):
        return
    _stdout().print(F.artifacts_table(refs) if refs else "No adapters yet.")


# --- cancel ------------------------------------------------------------------------------------
@app.command()
def cancel(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="A FineTuneJob or FineTuneSweep.")],
    kind: KindOpt = None,
    namespace: NamespaceOpt = None,
    context: ContextOpt = None,
    kubeconfig: KubeconfigOpt = None,
    local: LocalOpt = False,
    state_dir: StateDirOpt = None,
) -> None:
    """Stop a job or sweep (cluster: delete it; --local: stop the run, resumable).

    In a cluster the object is deleted: its pods and a sweep's trials go with it, adapters
    already uploaded stay in object storage. Locally the runner and every trainer process
    stop, and running the same command again resumes.
    """
    o = _opts(ctx, namespace=namespace, context=context, kubeconfig=kubeconfig, local=local,
              state_dir=state_dir)
    client = _client(o)
    obj = client.cancel(name, kind)  # type: ignore[attr-defined]
    if o.local:
        _stdout().print(f"{resource_name(obj)} stopped (run it again to resume)")
    else:
        _stdout().print(f"{resource_name(obj)} cancelled (deleted; adapters already uploaded "
                        "stay in object storage)")


# --- local runs --------------------------------------------------------------------------------
NprocOpt = Annotated[int | None, typer.Option(
    "--nproc", help="Processes per trial (default: the spec's nodes x gpusPerNode, >= 1).")]
ParallelOpt = Annotated[int | None, typer.Option(
    "--parallel", help="Trials at once (default: spec.parallelism, limited by this "
    "machine's GPUs or CPU cores).")]
OutputUriOpt = Annotated[str | None, typer.Option(
    "--output-uri", help="Override spec output.uri (e.g. file:///tmp/adapters/).")]
FreshOpt = Annotated[bool, typer.Option(
    "--fresh", help="Forget the previous local study of this sweep and start over.")]


@app.command()
def run(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="A FineTuneJob (or FineTuneSweep) YAML.")],
    local: LocalOpt = False,
    nproc: NprocOpt = None,
    parallel: ParallelOpt = None,
    output_uri: OutputUriOpt = None,
    fresh: FreshOpt = False,
    namespace: NamespaceOpt = None,
    context: ContextOpt = None,
    kubeconfig: KubeconfigOpt = None,
    output: OutputOpt = None,
    state_dir: StateDirOpt = None,
) -> None:
    """Run a job: on this machine with --local, else submit it and watch it finish."""
    o = _opts(ctx, namespace=namespace, context=context, kubeconfig=kubeconfig, output=output,
              local=local, state_dir=state_dir)
    objects = _load(file)
    if len(objects) != 1:
        raise CliError(f"{file}: run takes one object, found {len(objects)}", 2)
    _run(o, objects[0], nproc=nproc, parallel=parallel, output_uri=output_uri, fresh=fresh)


@app.command()
def sweep(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="A FineTuneSweep YAML.")],
    local: LocalOpt = False,
    nproc: NprocOpt = None,
    parallel: ParallelOpt = None,
    output_uri: OutputUriOpt = None,
    fresh: FreshOpt = False,
    namespace: NamespaceOpt = None,
    context: ContextOpt = None,
    kubeconfig: KubeconfigOpt = None,
    output: OutputOpt = None,
    state_dir: StateDirOpt = None,
) -> None:
    """Run a sweep: on this machine with --local (resumable), else submit and watch it."""
    o = _opts(ctx, namespace=namespace, context=context, kubeconfig=kubeconfig, output=output,
              local=local, state_dir=state_dir)
    objects = [x for x in _load(file) if x.kind == "FineTuneSweep"]
    if len(objects) != 1:
        raise CliError(f"{file}: expected one FineTuneSweep, found {len(objects)}", 2)
    _run(o, objects[0], nproc=nproc, parallel=parallel, output_uri=output_uri, fresh=fresh)


def _run(o: Opts, obj: Any, *, nproc: int | None, parallel: int | None,
         output_uri: str | None, fresh: bool) -> None:
    if not o.local:
        if any(x is not None for x in (nproc, parallel, output_uri)) or fresh:
            raise CliError("--nproc, --parallel, --output-uri and --fresh apply to --local "
                           "runs", 2)
        from orchestrator.client import Client

        client = _client(o)
        assert isinstance(client, Client)
        created = client.submit(obj)
        _stderr().print(f"{resource_name(created)} created; watching (Ctrl-C stops watching, "
                        "not the job)")
        _watch(client, created["metadata"]["name"], kind_of(created), 2.0)
        final = client.get_raw(created["metadata"]["name"], kind_of(created))
        _finish(o, client, final)
        return
    from orchestrator.cli.live import ConsoleObserver
    from orchestrator.local import LocalClient, LocalJobRunner, LocalState, LocalSweepRunner

    state = LocalState(o.state_dir)
    con = _stdout()
    runner: LocalJobRunner | LocalSweepRunner
    if obj.kind == "FineTuneSweep":
        runner = LocalSweepRunner(obj, state, namespace=o.namespace, nproc=nproc,
                                  parallel=parallel, output_uri=output_uri, fresh=fresh)
    else:
        if parallel is not None or fresh:
            raise CliError("--parallel and --fresh apply to sweeps", 2)
        runner = LocalJobRunner(obj, state, namespace=o.namespace, nproc=nproc,
                                output_uri=output_uri)
    _quiet_libraries()
    with ConsoleObserver(con) as observer:
        runner.observer = observer
        try:
            final = runner.execute()
        except KeyboardInterrupt:
            raise CliError(f"interrupted: every trainer process was stopped; run the same "
                           f"command again to resume {runner.name}", 130) from None
    _finish(o, LocalClient(state), final)


def _finish(o: Opts, client: BaseClient, final: dict[str, Any]) -> None:
    if not _dump(o, final):
        _stdout().print(_detail(client, final))
    st = final.get("status") or {}
    if st.get("phase") != "Succeeded":
        raise CliError(f"{resource_name(final)} {st.get('phase') or 'did not finish'}: "
                       f"{st.get('message') or 'no message'}")


def _quiet_libraries() -> None:
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    except ImportError:  # pragma: no cover
        pass


@app.command()
def version() -> None:
    """Print the kubetune version."""
    _stdout().print(f"kubetune {__version__}")


# --- entry point: one line per error ---------------------------------------------------------
def _prog(argv0: str | None) -> str:
    base = os.path.basename(argv0 or "kubetune")
    return "kubectl tune" if base == "kubectl-tune" else "kubetune"


def _error(prog: str, message: str) -> None:
    flat = " ".join(str(message).split())
    sys.stderr.write(f"{prog}: error: {flat}\n")


def main(argv: Iterable[str] | None = None, prog: str | None = None) -> int:
    """Run the CLI; returns the exit code (the console scripts exit with it)."""
    args = list(sys.argv[1:] if argv is None else argv)
    prog = prog or _prog(sys.argv[0] if argv is None else None)
    command = typer.main.get_command(typer_app)
    try:
        rv = command.main(args=args, prog_name=prog, standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except typer.Exit as exc:
        return int(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        _error(prog, "interrupted")
        return 130
    except click_exceptions.UsageError as exc:
        sub = exc.ctx.command_path if exc.ctx is not None else prog
        _error(prog, f"{exc.format_message()} (see '{sub} --help')")
        return 2
    except click_exceptions.ClickException as exc:
        _error(prog, exc.format_message())
        return exc.exit_code
    except CliError as exc:
        _error(prog, str(exc))
        return exc.code
    except BrokenPipeError:  # `kubetune logs … | head`
        return 0
    except Exception as exc:  # the one place that turns any failure into a line
        if os.environ.get(DEBUG_ENV):
            raise
        _error(prog, _describe(exc))
        return 1


def _describe(exc: BaseException) -> str:
    from pydantic import ValidationError

    from orchestrator.storage import StorageError

    if isinstance(exc, KubetuneError | StorageError):
        return str(exc)
    if isinstance(exc, ValidationError):
        from orchestrator.api import format_errors

        return format_errors(exc)
    if isinstance(exc, TimeoutError | ValueError | RuntimeError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
    return f"{type(exc).__name__}: {exc} (set {DEBUG_ENV}=1 for the traceback)"


class _Entry:
    """What the console scripts call: ``app()`` runs main() and exits with its code."""

    def __call__(self) -> None:
        sys.exit(main())


# The console scripts point at `orchestrator.cli.main:app`; the Typer object stays reachable
# as `typer_app` for typer's test runner.
typer_app = app
app = _Entry()  # type: ignore[assignment]
