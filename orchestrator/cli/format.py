"""Rich tables for jobs, sweeps, trials and artifacts; the same for cluster and local runs
(both hand over the objects as the API server returns them)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from orchestrator.api import labels as L
from orchestrator.client import ArtifactRef, Collected, best_trial_number, objective_directions

PHASE_STYLE = {
    "Succeeded": "green", "Failed": "red", "Running": "cyan", "Pending": "yellow",
    "Pruned": "magenta",
}
METRIC_COLUMNS = (("evalLoss", "EVAL LOSS"), ("trainableParamPercent", "TRAINABLE %"),
                  ("generalLossDelta", "FORGETTING Δ"))


def fmt_number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10000 else str(value)
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3e}"
        return f"{value:.4g}"
    if isinstance(value, list | dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def fmt_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover


def phase_text(phase: str | None) -> Text:
    phase = phase or "Pending"
    return Text(phase, style=PHASE_STYLE.get(phase, ""))


def age(timestamp: str | None, now: dt.datetime | None = None) -> str:
    if not timestamp:
        return "-"
    try:
        then = dt.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    except ValueError:
        return "-"
    secs = int(((now or dt.datetime.now(dt.UTC)) - then).total_seconds())
    if secs < 120:
        return f"{max(secs, 0)}s"
    if secs < 7200:
        return f"{secs // 60}m"
    if secs < 172800:
        return f"{secs // 3600}h"
    return f"{secs // 86400}d"


UNSERVED_AFTER_S = 30  # a controller writes a first status within seconds of a create


def unserved_hint(obj: Mapping[str, Any], now: dt.datetime | None = None) -> str | None:
    """Why an object may have no status at all some time after its creation: no kubetune
    controller serves its namespace (a namespaced install watches only its own namespaces)
    or none is running. None when it has a status or is too new to tell."""
    meta = obj.get("metadata") or {}
    if obj.get("status") or not meta.get("creationTimestamp"):
        return None
    try:
        then = dt.datetime.strptime(meta["creationTimestamp"], "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return None
    waited = ((now or dt.datetime.now(dt.UTC)) - then.replace(tzinfo=dt.UTC)).total_seconds()
    if waited < UNSERVED_AFTER_S:
        return None
    ns = meta.get("namespace", "default")
    return (f"no controller has written a status in {int(waited)}s: check that the kubetune "
            f"controller is running and serves namespace {ns} (helm value watchNamespaces, "
            "or clusterWide: true)")


def progress_text(progress: Mapping[str, Any] | None, width: int = 10) -> Text:
    if not progress:
        return Text("-")
    step, total = int(progress.get("step") or 0), progress.get("totalSteps")
    if not total:
        return Text(f"step {step}")
    frac = min(max(step / float(total), 0.0), 1.0)
    filled = round(frac * width)
    bar = Text("█" * filled, style="cyan") + Text("░" * (width - filled), style="dim")
    return bar + Text(f" {step}/{total}")


def throughput_text(progress: Mapping[str, Any]) -> str | None:
    """tokens/s, MFU and ETA of a running job, as far as the trainer reported them."""
    parts = []
    if progress.get("tokensPerSecond") is not None:
        parts.append(f"{fmt_number(progress['tokensPerSecond'])} tokens/s")
    if progress.get("mfu") is not None:
        parts.append(f"MFU {100 * float(progress['mfu']):.1f}%")
    if progress.get("etaSeconds") is not None and progress.get("step") != progress.get(
            "totalSteps"):
        parts.append(f"ETA {dt.timedelta(seconds=int(progress['etaSeconds']))}")
    return " · ".join(parts) or None


def _table(*columns: str, title: str | None = None) -> Table:
    table = Table(title=title, title_justify="left", box=None, header_style="bold",
                  pad_edge=False, show_edge=False)
    for c in columns:
        table.add_column(c, no_wrap=c not in ("MESSAGE",), overflow="fold")
    return table


def jobs_table(jobs: Iterable[Mapping[str, Any]], title: str | None = None) -> Table:
    table = _table("NAME", "PHASE", "PROGRESS", *(h for _, h in METRIC_COLUMNS), "ATTEMPTS",
                   "AGE", title=title)
    for job in jobs:
        st = job.get("status") or {}
        m = st.get("metrics") or {}
        table.add_row(job["metadata"]["name"], phase_text(st.get("phase")),
                      progress_text(st.get("progress")),
                      *(fmt_number(m.get(k)) for k, _ in METRIC_COLUMNS),
                      str(st.get("attempts") or 0), age(job["metadata"].get("creationTimestamp")))
    return table


def _objective_values(sweep: Mapping[str, Any], summary: Mapping[str, Any] | None) -> str:
    if not summary:
        return "-"
    values = summary.get("values") or []
    names = [m for m, _ in objective_directions(sweep)]
    return ", ".join(f"{n} {fmt_number(v)}" for n, v in zip(names, values, strict=False)) or "-"


def sweeps_table(sweeps: Iterable[Mapping[str, Any]], title: str | None = None) -> Table:
    table = _table("NAME", "PHASE", "TRIALS", "RUNNING", "SUCCEEDED", "PRUNED", "FAILED",
                   "BEST", "BEST VALUES", "AGE", title=title)
    for sweep in sweeps:
        st = sweep.get("status") or {}
        t = st.get("trials") or {}
        spec = sweep.get("spec") or {}
        best = st.get("bestTrial")
        table.add_row(
            sweep["metadata"]["name"], phase_text(st.get("phase")),
            f"{t.get('created', 0)}/{spec.get('maxTrials', '?')}", str(t.get("running", 0)),
            str(t.get("succeeded", 0)), str(t.get("pruned", 0)), str(t.get("failed", 0)),
            (best or {}).get("name") or "-", _objective_values(sweep, best),
            age(sweep["metadata"].get("creationTimestamp")))
    return table


def _param_label(name: str) -> str:
    short = {"method.trainableParamPercent": "TARGET %", "method.rank": "RANK",
             "training.learningRate": "LR", "method.targetModules": "MODULES"}
    return short.get(name, name.rsplit(".", 1)[-1].upper())


def trials_table(sweep: Mapping[str, Any], rows: list[dict[str, Any]],
                 live: Mapping[int, Mapping[str, float]] | None = None,
                 title: str | None = None) -> Table:
    """One row per trial: parameters, state, final (or latest live) metrics, progress.
    ★ marks the Pareto front (two objectives) or the best trial (one)."""
    params = [p["name"] for p in (sweep.get("spec") or {}).get("parameters") or []]
    multi = len(objective_directions(sweep)) > 1
    best = best_trial_number(sweep, rows)
    table = _table("#", "NAME", "STATE", *(_param_label(p) for p in params), "PROGRESS",
                   *(h for _, h in METRIC_COLUMNS), "", "MESSAGE", title=title)
    for row in rows:
        metrics = dict(row.get("metrics") or {})
        latest = (live or {}).get(row["number"]) or {}
        shown = []
        for key, _ in METRIC_COLUMNS:
            if key in metrics:
                shown.append(fmt_number(metrics[key]))
            elif key in latest:  # intermediate value while the trial runs
                shown.append(f"{fmt_number(latest[key])}…")
            else:
                shown.append("-")
        mark, style = "", "bold green"
        if multi and row.get("pareto"):
            mark = "★ front" + (" (best)" if row["number"] == best else "")
        elif not multi and row["number"] == best:
            mark = "★ best"
        elif row.get("feasible") is False:
            mark, style = "✗ infeasible", "bold red"
        elif row.get("reusedFrom") is not None:
            mark, style = f"↺ reused #{row['reusedFrom']}", "cyan"
        table.add_row(str(row["number"]), row.get("name") or "-", phase_text(row.get("state")),
                      *(fmt_number((row.get("parameters") or {}).get(p)) for p in params),
                      progress_text(row.get("progress")), *shown, Text(mark, style=style),
                      Text(_one_line(row.get("message")), style="dim"))
    return table


def _one_line(text: Any, limit: int = 80) -> str:
    if not text:
        return ""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def pareto_table(sweep: Mapping[str, Any], rows: list[dict[str, Any]]) -> Table | None:
    """The Pareto front, sorted by the first objective (trade-off curve order)."""
    front = (sweep.get("status") or {}).get("paretoFront") or []
    if not front:
        return None
    objectives = objective_directions(sweep)
    params = [p["name"] for p in (sweep.get("spec") or {}).get("parameters") or []]
    by_number = {r["number"]: r for r in rows}
    table = _table("#", "NAME", *(f"{m} ({'min' if d == 'minimize' else 'max'})"
                                  for m, d in objectives),
                   *(_param_label(p) for p in params), "FORGETTING Δ",
                   title=f"Pareto front: {' vs '.join(m for m, _ in objectives)}")
    for t in sorted(front, key=lambda t: (t.get("values") or [0.0])[0]):
        metrics = {**(t.get("metrics") or {}),
                   **((by_number.get(t["number"]) or {}).get("metrics") or {})}
        table.add_row(str(t["number"]), t.get("name", "-"),
                      *(fmt_number(v) for v in t.get("values") or []),
                      *(fmt_number((t.get("parameters") or {}).get(p)) for p in params),
                      fmt_number(metrics.get("generalLossDelta")))
    return table


def _kv(rows: Iterable[tuple[str, Any]]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    for key, value in rows:
        if value is None or value == "":
            continue
        grid.add_row(key, value if isinstance(value, Text) else str(value))
    return grid


def conditions_table(conditions: list[Mapping[str, Any]]) -> Table | None:
    if not conditions:
        return None
    table = _table("CONDITION", "STATUS", "REASON", "MESSAGE", title="Conditions")
    for c in conditions:
        table.add_row(c.get("type", ""), c.get("status", ""), c.get("reason") or "",
                      _one_line(c.get("message"), 120))
    return table


def samples_table(samples: list[dict[str, Any]]) -> Table:
    table = _table("PROMPT", "COMPLETION", title="Samples (greedy, from kubetune.json)")
    for s in samples:
        table.add_row(_tail(str(s.get("prompt", "")), 300),
                      str(s.get("completion", ""))[:600])
    return table


def _tail(text: str, limit: int) -> str:
    return text if len(text) <= limit else "…" + text[-(limit - 1):]


def job_detail(job: Mapping[str, Any],
               samples: list[dict[str, Any]] | None = None) -> RenderableType:
    meta, st = job["metadata"], job.get("status") or {}
    spec = job.get("spec") or {}
    method = spec.get("method") or {}
    labels = meta.get("labels") or {}
    head = _kv([
        ("FineTuneJob", meta["name"]),
        ("Namespace", meta.get("namespace")),
        ("Sweep", f"{labels[L.LABEL_SWEEP]} (trial {labels.get(L.LABEL_TRIAL)})"
         if L.LABEL_SWEEP in labels else None),
        ("Phase", phase_text(st.get("phase"))),
        ("Message", st.get("message") or unserved_hint(job)),
        ("Method", ", ".join(f"{k} {fmt_number(v)}" for k, v in method.items())),
        ("Model", (spec.get("model") or {}).get("uri")),
        ("Attempts", st.get("attempts")),
        ("Progress", progress_text(st.get("progress"), 20) if st.get("progress") else None),
        ("Throughput", throughput_text(st.get("progress") or {})),
        ("Artifact", (st.get("artifact") or {}).get("uri")),
        ("Artifact sha256", (st.get("artifact") or {}).get("sha256")),
        ("Started", st.get("startTime")),
        ("Finished", st.get("completionTime")),
    ])
    parts: list[RenderableType] = [head]
    metrics = st.get("metrics") or {}
    if metrics:
        mt = _table("METRIC", "VALUE", title="Metrics")
        for key in sorted(metrics):
            mt.add_row(key, fmt_number(metrics[key]))
        parts += [Text(""), mt]
    if samples:
        parts += [Text(""), samples_table(samples)]
    conds = conditions_table(st.get("conditions") or [])
    if conds is not None:
        parts += [Text(""), conds]
    return Group(*parts)


def sweep_summary(sweep: Mapping[str, Any], rows: list[dict[str, Any]]) -> RenderableType:
    meta, st = sweep["metadata"], sweep.get("status") or {}
    spec = sweep.get("spec") or {}
    t = st.get("trials") or {}
    objectives = objective_directions(sweep)
    best_number = best_trial_number(sweep, rows)
    best = next((r for r in rows if r["number"] == best_number), None)
    algorithm = spec.get("algorithm") or {}
    pruner = (spec.get("earlyStopping") or {}).get("pruner", "none")
    return _kv([
        ("FineTuneSweep", meta["name"]),
        ("Namespace", meta.get("namespace")),
        ("Phase", phase_text(st.get("phase"))),
        ("Message", st.get("message") or unserved_hint(sweep)),
        ("Objectives", ", ".join(f"{m} ({d})" for m, d in objectives)),
        ("Search", f"{algorithm.get('sampler', 'tpe')} sampler"
         + (f", seed {algorithm['seed']}" if algorithm.get("seed") is not None else "")
         + f", pruner {pruner}, parallelism {spec.get('parallelism', 1)}"),
        ("Trials", f"{t.get('created', 0)}/{spec.get('maxTrials', '?')} created, "
         f"{t.get('running', 0)} running, {t.get('succeeded', 0)} succeeded, "
         f"{t.get('pruned', 0)} pruned, {t.get('failed', 0)} failed"
         + (f" ({t['infeasible']} succeeded but infeasible)" if t.get("infeasible") else "")
         + (f"; {t['reused']} reused an identical trial's result" if t.get("reused") else "")),
        ("Constraints", ", ".join(_constraint_text(c) for c in spec.get("constraints") or [])
         or None),
        ("Best trial", _best_line(sweep, best) if best else None),
        ("Best adapter", ((best or {}).get("artifact") or {}).get("uri")),
        ("Study", st.get("studyName")),
    ])


def _constraint_text(c: Mapping[str, Any]) -> str:
    lo, hi = c.get("min"), c.get("max")
    if lo is not None and hi is not None:
        return f"{fmt_number(lo)} <= {c.get('metric')} <= {fmt_number(hi)}"
    if hi is not None:
        return f"{c.get('metric')} <= {fmt_number(hi)}"
    return f"{c.get('metric')} >= {fmt_number(lo)}"


def _best_line(sweep: Mapping[str, Any], best: Mapping[str, Any]) -> str:
    metrics = best.get("metrics") or {}
    values = ", ".join(f"{k} {fmt_number(metrics[k])}" for k, _ in METRIC_COLUMNS
                       if k in metrics)
    params = ", ".join(f"{k}={fmt_number(v)}" for k, v in (best.get("parameters") or {}).items())
    return f"{best['name']} (#{best['number']}): {values}" + (f"  [{params}]" if params else "")


def sweep_detail(sweep: Mapping[str, Any], rows: list[dict[str, Any]],
                 live: Mapping[int, Mapping[str, float]] | None = None) -> RenderableType:
    parts: list[RenderableType] = [sweep_summary(sweep, rows), Text("")]
    parts.append(trials_table(sweep, rows, live, title="Trials"))
    front = pareto_table(sweep, rows)
    if front is not None:
        parts += [Text(""), front]
    return Group(*parts)


def artifacts_table(refs: list[ArtifactRef], title: str | None = None) -> Table:
    table = _table("NAME", "TRIAL", "EVAL LOSS", "TRAINABLE %", "URI", "SHA256", title=title)
    for ref in refs:
        table.add_row(ref.name, "-" if ref.trial is None else str(ref.trial),
                      fmt_number(ref.metrics.get("evalLoss")),
                      fmt_number(ref.metrics.get("trainableParamPercent")), ref.uri,
                      (ref.sha256 or "-")[:16])
    return table


def objects_table(objects: list[Any], base: str) -> Table:
    table = _table("SIZE", "SHA256", "OBJECT", title=base)
    strip = len(base.rstrip("/")) + 1
    for o in objects:
        table.add_row(fmt_bytes(o.size), (o.sha256 or "")[:16] or "-", o.key[strip:]
                      if o.key.startswith(base.rstrip("/")) else o.key)
    return table


def collected_lines(items: list[Collected]) -> list[str]:
    out = []
    for c in items:
        m = c.ref.metrics
        what = f"trial {c.ref.trial} ({c.ref.name})" if c.ref.trial is not None else c.ref.name
        metrics = ", ".join(f"{k} {fmt_number(m[k])}" for k, _ in METRIC_COLUMNS if k in m)
        out.append(f"collected {what}: {c.files} files, {fmt_bytes(c.bytes)}, sha256 verified "
                   f"(manifest {(c.manifest_sha256 or '')[:12]}) → {c.path}"
                   + (f"  [{metrics}]" if metrics else ""))
    return out
