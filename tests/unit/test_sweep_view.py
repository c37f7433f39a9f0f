"""Looking at a finished local sweep: `kubetune status --plot` writes a PNG of what the study
found, `kubetune dashboard --local` serves optuna-dashboard on its SQLite study, and the
trials table marks infeasible trials and reused results (no training: trials are told the
metrics a trainer would report)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from orchestrator.api import FineTuneSweep, trial_name
from orchestrator.cli import studyview
from orchestrator.cli.main import main
from orchestrator.local import LocalClient, LocalState, LocalSweepRunner

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N_TRIALS = 8


def finished(tmp: Path) -> LocalState:
    """A finished two-objective local sweep with a forgetting constraint, on a tiny space
    so the sampler repeats itself (reused results)."""
    state = LocalState(tmp / "state")
    sweep = FineTuneSweep.model_validate({
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneSweep",
        "metadata": {"name": "view"},
        "spec": {
            "template": {
                "model": {"uri": "file:///models/tiny"},
                "data": {"train": "file:///d/train.jsonl", "eval": "file:///d/eval.jsonl",
                         "general": "file:///d/general.jsonl"},
                "training": {"globalBatchSize": 8, "microBatchSize": 4},
                "distributed": {"gpusPerNode": 0},
                "output": {"uri": f"file://{tmp}/adapters/"},
            },
            "parameters": [{"name": "method.rank", "int": {"low": 2, "high": 5}}],
            "objectives": [{"metric": "evalLoss"}, {"metric": "trainableParamPercent"}],
            "constraints": [{"metric": "generalLossDelta", "max": 0.15}],
            "algorithm": {"sampler": "nsga2", "seed": 2},
            "maxTrials": N_TRIALS,
        },
    })
    runner = LocalSweepRunner(sweep, state, nproc=1, parallel=1)
    runner.open()
    for _ in range(N_TRIALS):
        number, params, job = runner.study.ask(lambda n: trial_name("view", n))
        if job is None:
            continue  # reused an identical trial's result
        rank = params["method.rank"]
        runner.study.tell_metrics(number, {"evalLoss": 2.0 / rank,
                                           "trainableParamPercent": 0.5 * rank,
                                           "generalLossDelta": 0.1 * (rank - 2)})
    runner.write_status()
    return state


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> LocalState:
    return finished(tmp_path_factory.mktemp("view"))


def test_status_plot_writes_a_png_of_every_trial(
    state: LocalState, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client = LocalClient(state)
    sweep = client.get_raw("view", "sweep")
    rows = client.trials(sweep)
    succeeded = [r for r in rows if r["state"] == "Succeeded"]
    assert len(succeeded) == N_TRIALS
    infeasible = [r for r in succeeded if r["feasible"] is False]
    assert {r["parameters"]["method.rank"] for r in infeasible} == {4}  # delta 0.2 > 0.15
    out = tmp_path / "plots" / "view.png"
    code = main(["--state-dir", str(state.root), "status", "view", "--local", "--plot",
                 str(out)], prog="kubetune")
    assert code == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    printed = capsys.readouterr()
    front = sweep["status"]["paretoFront"]
    assert f"{N_TRIALS} succeeded trials ({len(infeasible)} infeasible), {len(front)} on the " \
           "Pareto front" in " ".join(printed.err.split())
    # the trials table marks what was infeasible and what was reused
    assert "✗ infeasible" in printed.out and "↺ reused" in printed.out
    assert len(front) == 2  # ranks 2 and 3 trade loss for size; rank 4 breaks the constraint
    drawn = studyview.plot_sweep(sweep, rows, tmp_path / "again.png")
    assert drawn == {"trials": N_TRIALS, "infeasible": len(infeasible), "front": 2}
    from PIL import Image

    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (1200, 450)


def test_dashboard_serves_the_local_study(state: LocalState) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "--state-dir", str(state.root), "dashboard",
         "view", "--local", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "optuna-dashboard for sweep view" in line, line
        url = line.split()[-3]  # ... http://127.0.0.1:PORT/dashboard/studies/ID  (Ctrl-C stops)
        base = url.split("/dashboard/")[0]
        studies = _get(f"{base}/api/studies")["study_summaries"]
        study = next(s for s in studies if s["study_name"] == "default.view")
        assert url.endswith(f"/dashboard/studies/{study['study_id']}")
        detail = _get(f"{base}/api/studies/{study['study_id']}?after=0")
        assert len(detail["trials"]) == N_TRIALS
        assert all(t["state"] == "Complete" for t in detail["trials"])
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _get(url: str) -> Any:
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return json.loads(resp.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_dashboard_in_a_cluster_needs_a_study_url() -> None:
    sweep = {"metadata": {"name": "s"}, "status": {"studyName": "ns.s.1234abcd"}}
    with pytest.raises(Exception, match="--storage"):
        studyview.study_url_and_name(sweep, None, None)
    assert studyview.study_url_and_name(sweep, "sqlite:///x.db", None) == (
        "sqlite:///x.db", "ns.s.1234abcd")
