"""Progress of local runs: a live trials table on a terminal, plain lines elsewhere (CI
logs and pipes get one line per event and per evaluation, never a redrawn screen)."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.text import Text

from orchestrator.cli import format as F
from orchestrator.client import trial_rows
from orchestrator.local.state import JOB_PLURAL


class ConsoleObserver:
    def __init__(self, console: Console, interactive: bool | None = None) -> None:
        self.console = console
        self.interactive = console.is_terminal if interactive is None else interactive
        self.live: Live | None = None
        self._shown: dict[str, tuple[int, int | None]] = {}
        self._last_render = 0.0

    def __enter__(self) -> ConsoleObserver:
        if self.interactive:
            self.live = Live(Text("starting…"), console=self.console, refresh_per_second=2,
                             transient=True)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)
            self.live = None

    def event(self, message: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        self.console.print(Text(f"{stamp} ", style="dim") + Text(message), soft_wrap=True)

    def tick(self, runner: Any) -> None:
        if self.live is not None:
            now = time.monotonic()
            if now - self._last_render >= 0.5:
                self._last_render = now
                self.live.update(self.render(runner))
            return
        self._progress_lines(runner)

    # --- rendering ------------------------------------------------------------------------
    def render(self, runner: Any) -> RenderableType:
        if hasattr(runner, "study"):
            rows = _sweep_rows(runner)
            counts = (runner.obj.get("status") or {}).get("trials") or {}
            head = Text(f"sweep {runner.name}: {counts.get('completed', 0)}/"
                        f"{runner.spec.max_trials} finished, {len(runner.running)} running "
                        f"(parallel {runner.parallel}, {runner.nproc} process(es) each)  "
                        "Ctrl-C stops; re-run to resume", style="bold")
            return Group(head, F.trials_table(runner.obj, rows, runner.live))
        run = runner.run
        if run is None:
            return Text("starting…")
        evals = run.process.progress.evals if run.process else {}
        extra = "  ".join(f"{k} {F.fmt_number(v)}" for k, v in evals.items())
        return Group(F.jobs_table([run.obj]), Text(f"latest eval: {extra}" if extra else ""))

    def _progress_lines(self, runner: Any) -> None:
        runs = list(runner.running.values()) if hasattr(runner, "running") else runner.runs
        for run in runs:
            if run.process is None:
                continue
            p = run.process.progress
            key = (p.eval_step or -1, p.total)
            if p.eval_step is None or self._shown.get(run.name) == key:
                continue
            self._shown[run.name] = key
            # every value of a report comes from the same evaluation (evalLoss, generalLoss…)
            evals = ", ".join(f"{k} {F.fmt_number(v)}" for k, v in p.evals.items())
            total = f"/{p.total}" if p.total else ""
            self.event(f"{run.name}: step {p.eval_step}{total}, {evals}")


def _sweep_rows(runner: Any) -> list[dict[str, Any]]:
    jobs = [j for j in runner.state.list(JOB_PLURAL)
            if (j["metadata"].get("labels") or {}).get("kubetune.io/sweep") == runner.name]
    live_jobs = {r.name: r.obj for r in runner.running.values()}
    jobs = [live_jobs.get(j["metadata"]["name"], j) for j in jobs]
    return trial_rows(runner.obj, jobs)
