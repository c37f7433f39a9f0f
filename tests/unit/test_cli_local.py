"""`get`, `status`, `collect`, `artifacts ls` and `cancel` over the local state, and the local
report endpoint that prunes trials, with a real Optuna study and real file:// artifacts
(no training here: trials are told the metrics a trainer would report)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from orchestrator import storage
from orchestrator.api import FineTuneSweep, apply_overrides, trial_name
from orchestrator.cli.main import main
from orchestrator.local import LocalState, LocalSweepRunner
from orchestrator.local.runner import _job_object
from orchestrator.local.state import JOB_PLURAL

pytestmark = pytest.mark.unit

TEMPLATE = {
    "model": {"uri": "file:///models/tiny"},
    "data": {"train": "file:///data/train.jsonl", "eval": "file:///data/eval.jsonl"},
    "training": {"globalBatchSize": 8, "microBatchSize": 4},
    "distributed": {"gpusPerNode": 0},
    "output": {"uri": "file:///unused/"},
}


def sweep_object(name: str, *, objectives: list[dict[str, str]], output: str,
                 early: dict[str, Any] | None = None, max_trials: int = 6) -> FineTuneSweep:
    return FineTuneSweep.model_validate({
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneSweep",
        "metadata": {"name": name},
        "spec": {"template": {**TEMPLATE, "output": {"uri": output}},
                 "parameters": [
                     {"name": "method.rank", "int": {"low": 2, "high": 64, "log": True}},
                     {"name": "method.trainableParamPercent", "float": {"low": 0.5, "high": 4}}],
                 "objectives": objectives, "algorithm": {"sampler": "random", "seed": 3},
                 "earlyStopping": early or {"pruner": "none"}, "maxTrials": max_trials}})


def loss_of(params: dict[str, Any]) -> float:
    return round(2.0 / params["method.rank"] + 0.1 * params["method.trainableParamPercent"], 6)


def finished_sweep(tmp: Path) -> tuple[LocalState, dict[int, dict[str, Any]]]:
    """A finished two-objective local sweep: what `kubetune sweep --local` leaves behind,
    each trial with a real adapter directory uploaded to file:// storage."""
    state = LocalState(tmp / "state")
    sweep = sweep_object("demo", output=f"file://{tmp}/adapters/", objectives=[
        {"metric": "evalLoss"}, {"metric": "trainableParamPercent"}])
    runner = LocalSweepRunner(sweep, state, nproc=1, parallel=1)
    runner.open()
    trials: dict[int, dict[str, Any]] = {}
    for _ in range(6):
        number, params, name = runner.study.ask(lambda n: trial_name("demo", n))
        spec = apply_overrides(sweep.spec.template, params)
        src = tmp / "work" / name
        src.mkdir(parents=True)
        (src / "adapter_model.safetensors").write_bytes(f"weights of {name}".encode() * 100)
        (src / "kubetune.json").write_text(json.dumps({"jobName": name}))
        uri = spec.output.artifact_uri(name)
        manifest = storage.upload_dir(src, uri, progress=False)
        metrics = {"evalLoss": loss_of(params),
                   "trainableParamPercent": round(params["method.trainableParamPercent"], 6),
                   "generalLossDelta": 0.01 * number}
        artifact = {"uri": uri, "sha256": manifest.digest}
        obj = _job_object(name, "default", spec, labels={
            "kubetune.io/sweep": "demo", "kubetune.io/trial": str(number)})
        obj["status"] = {"phase": "Succeeded", "attempts": 1, "metrics": metrics,
                         "artifact": artifact, "progress": {"step": 40, "totalSteps": 40}}
        state.save(JOB_PLURAL, obj)
        runner.study.tell_metrics(number, metrics, artifact=artifact)
        trials[number] = {"name": name, "params": params, "metrics": metrics, "uri": uri}
    runner.write_status()
    return state, trials


def run(capsys: pytest.CaptureFixture[str], state: LocalState, *args: str
        ) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what the fixtures printed
    code = main(["--state-dir", str(state.root), *args], prog="kubetune")
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[LocalState, dict[int, dict[str, Any]]]:
    """Shared by the read-only tests (each collect writes to its own directory)."""
    return finished_sweep(tmp_path_factory.mktemp("finished"))


def front_of(trials: dict[int, dict[str, Any]]) -> set[int]:
    pts = {n: (t["metrics"]["evalLoss"], t["metrics"]["trainableParamPercent"])
           for n, t in trials.items()}
    return {n for n, a in pts.items()
            if not any(b[0] <= a[0] and b[1] <= a[1] and b != a for b in pts.values())}


def test_get_lists_the_sweep_not_its_trials(capsys: pytest.CaptureFixture[str],
                                            finished: Any) -> None:
    state, _ = finished
    code, out, _ = run(capsys, state, "get", "--local")
    assert code == 0
    assert "No FineTuneJobs" in out
    line = next(line for line in out.splitlines() if line.startswith("demo "))
    assert "Succeeded" in line and "6/6" in line
    code, out, _ = run(capsys, state, "get", "jobs", "--all", "--local")
    assert all(f"demo-{n}" in out for n in range(6))


def test_trials_table_and_pareto_front(capsys: pytest.CaptureFixture[str],
                                       finished: Any) -> None:
    state, trials = finished
    code, out, _ = run(capsys, state, "get", "trials", "demo", "--local")
    assert code == 0
    front = front_of(trials)
    marked = {int(line.split()[0]) for line in out.splitlines()
              if "★ front" in line and line.split()[0].isdigit()}
    assert marked == front
    assert "Pareto front: evalLoss vs trainableParamPercent" in out
    code, out, _ = run(capsys, state, "get", "trials", "demo", "--local", "-o", "json")
    rows = json.loads(out)
    assert [r["number"] for r in rows] == sorted(trials)
    assert {r["number"] for r in rows if r["pareto"]} == front
    for r in rows:
        assert r["metrics"]["evalLoss"] == trials[r["number"]]["metrics"]["evalLoss"]


def test_status_shows_best_trial_and_its_adapter(capsys: pytest.CaptureFixture[str],
                                                 finished: Any) -> None:
    state, trials = finished
    best = min(front_of(trials), key=lambda n: (trials[n]["metrics"]["evalLoss"], n))
    code, out, _ = run(capsys, state, "status", "demo", "--local")
    assert code == 0
    best_line = next(line for line in out.splitlines() if line.startswith("Best trial"))
    assert f"demo-{best} (#{best})" in best_line
    assert trials[best]["uri"] in out
    code, out, _ = run(capsys, state, "status", "demo", "--local", "-o", "yaml")
    assert "kind: FineTuneSweep" in out and "paretoFront:" in out


def test_collect_best_downloads_the_best_trials_adapter(
    capsys: pytest.CaptureFixture[str], finished: Any, tmp_path: Path
) -> None:
    state, trials = finished
    best = min(front_of(trials), key=lambda n: (trials[n]["metrics"]["evalLoss"], n))
    dest = tmp_path / "best"
    code, out, err = run(capsys, state, "collect", "demo", "--best", "--local", "-o", str(dest))
    assert code == 0, err
    assert (dest / "adapter_model.safetensors").read_bytes().startswith(
        f"weights of demo-{best}".encode())
    assert json.loads((dest / "kubetune.json").read_text())["jobName"] == f"demo-{best}"
    assert "sha256 verified" in out and f"trial {best} (demo-{best})" in out


def test_collect_top_k_and_trial(capsys: pytest.CaptureFixture[str], finished: Any,
                                 tmp_path: Path) -> None:
    state, trials = finished
    ranked = sorted(trials, key=lambda n: (trials[n]["metrics"]["evalLoss"], n))
    code, out, _ = run(capsys, state, "collect", "demo", "--top", "2", "--local", "-o",
                       str(tmp_path / "top"), "--output", "json")
    assert code == 0
    got = json.loads(out)
    assert [c["trial"] for c in got] == ranked[:2]
    for n in ranked[:2]:
        assert (tmp_path / "top" / f"demo-{n}" / "adapter_model.safetensors").is_file()
    code, out, _ = run(capsys, state, "collect", "demo", "--trial", "3", "--local", "-o",
                       str(tmp_path / "t3"))
    assert code == 0
    assert (tmp_path / "t3" / "adapter_model.safetensors").read_bytes().startswith(
        b"weights of demo-3")


def test_collect_detects_a_corrupted_adapter(capsys: pytest.CaptureFixture[str],
                                            tmp_path: Path) -> None:
    state, trials = finished_sweep(tmp_path)
    stored = Path(trials[2]["uri"][len("file://"):]) / "adapter_model.safetensors"
    stored.write_bytes(b"tampered" + stored.read_bytes()[8:])
    code, _, err = run(capsys, state, "collect", "demo", "--trial", "2", "--local", "-o",
                       str(tmp_path / "x"))
    assert code == 1
    # progress lines of the transfer may come first; the failure is one line, the last
    errors = [line for line in err.splitlines() if line.startswith("kubetune: error:")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0]
    assert "checksum mismatch" in errors[0] and "Traceback" not in err


@pytest.mark.parametrize(("args", "message"), [
    (["collect", "demo", "--best", "--trial", "1"], "choose one of"),
    (["collect", "demo", "--trial", "99"], "has no trial 99"),
    (["collect", "demo-1", "--best"], "apply to sweeps"),
    (["collect", "nothing"], "no FineTuneJob or FineTuneSweep named 'nothing'"),
    (["cancel", "demo"], "is not running locally"),
    (["logs", "demo"], "pass --trial N"),
])
def test_errors_are_one_line(capsys: pytest.CaptureFixture[str], finished: Any,
                             args: list[str], message: str) -> None:
    state, _ = finished
    code, _, err = run(capsys, state, *args, "--local")
    assert code in (1, 2)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err


def test_artifacts_ls(capsys: pytest.CaptureFixture[str], finished: Any) -> None:
    state, trials = finished
    code, out, _ = run(capsys, state, "artifacts", "ls", "demo", "--local", "-o", "json")
    assert code == 0
    refs = json.loads(out)
    assert [r["name"] for r in refs] == [
        f"demo-{n}" for n in sorted(trials, key=lambda n: (trials[n]["metrics"]["evalLoss"], n))]
    code, out, _ = run(capsys, state, "artifacts", "ls", trials[0]["uri"])
    assert code == 0
    assert "adapter_model.safetensors" in out and "manifest.json" in out


def _post(url: str, body: dict[str, Any], token: str) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_local_report_endpoint_records_values_and_prunes(tmp_path: Path) -> None:
    """The trainer's report protocol against the local runner: a trial's own token only,
    values reach the study, and the median pruner stops a clearly worse trial."""
    from orchestrator.sweep import mint_token

    sweep = sweep_object("prune", output=f"file://{tmp_path}/out/", objectives=[
        {"metric": "evalLoss"}], early={"pruner": "median", "startupTrials": 1})
    runner = LocalSweepRunner(sweep, LocalState(tmp_path / "state"), nproc=1, parallel=1)
    runner.open()
    url = runner.start_server()
    try:
        uid = runner.obj["metadata"]["uid"]
        numbers = [runner.study.ask(lambda n: trial_name("prune", n))[0] for _ in range(3)]
        tokens = {n: mint_token(runner._key, uid, n) for n in numbers}
        for n in numbers[:2]:
            for step, value in ((10, 1.0), (20, 0.8)):
                code, doc = _post(url, {"trial": n, "step": step,
                                        "metrics": {"evalLoss": value}}, tokens[n])
                assert (code, doc) == (200, {"action": "continue"})
            runner.study.tell_metrics(n, {"evalLoss": 0.8})
        code, _ = _post(url, {"trial": numbers[2], "step": 10, "metrics": {"evalLoss": 9.0}},
                        tokens[0])
        assert code == 403
        code, doc = _post(url, {"trial": numbers[2], "step": 10,
                                "metrics": {"evalLoss": 9.0}}, tokens[numbers[2]])
        assert (code, doc) == (200, {"action": "prune"})
        record = next(r for r in runner.study.records() if r.number == numbers[2])
        assert record.state == "Pruned"
        assert runner.live[numbers[2]] == {"evalLoss": 9.0}
    finally:
        assert runner._server is not None
        runner._server.shutdown()
        runner._server.server_close()


def test_sdk_reads_local_runs_as_api_models(finished: Any, tmp_path: Path) -> None:
    from orchestrator import FineTuneSweep as Sweep
    from orchestrator import LocalClient

    state, trials = finished
    client = LocalClient(state)
    sweep = client.get("demo")
    assert isinstance(sweep, Sweep)
    assert sweep.status is not None and sweep.status.trials.succeeded == len(trials)
    assert {t.number for t in sweep.status.pareto_front} == front_of(trials)
    done = client.wait("demo", timeout=1)
    assert done["status"]["phase"] == "Succeeded"
    [got] = client.collect("demo", tmp_path / "sdk", trial=4)
    assert got.ref.name == "demo-4" and got.files == 2
    assert got.metadata == {"jobName": "demo-4"}


def test_progress_is_read_from_the_trainers_log_lines() -> None:
    """The rank-0 lines of orchestrator.trainer (callbacks/reporting) drive local progress."""
    from orchestrator.local.executor import LiveProgress

    p = LiveProgress()
    lines = [
        "2026-11-30 05:05:03,071 rank0 INFO orchestrator.trainer: training: 24 steps (from "
        "step 0), 1 epoch(s), world size 2, global batch 8",
        "2026-11-30 05:05:03,163 rank0 INFO orchestrator.trainer: eval at step 0: "
        "evalLoss=5.7904",
        "2026-11-30 05:05:03,842 rank0 INFO orchestrator.trainer: step 10/24 (42%) loss 5.6178 "
        "lr 0.005 tokens/s 1467 ETA 0:00:01",
        "2026-11-30 05:05:04,035 rank0 INFO orchestrator.trainer: eval at step 12: "
        "evalLoss=5.5073, generalLoss=2.1",
    ]
    for line in lines:
        assert p.feed(line)
    assert not p.feed("Loading weights: 100%")
    assert p.to_wire() == {"step": 12, "totalSteps": 24}
    assert p.evals == {"evalLoss": 5.5073, "generalLoss": 2.1} and p.eval_step == 12


def test_unreachable_budget_is_refused_before_launch(tmp_path: Path) -> None:
    """Like the controller: a trial whose trainableParamPercent the solver cannot reach for
    this base model fails at once (no process started) and does not count against
    maxFailedTrials."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 512}))
    doc = sweep_object("budget", output=f"file://{tmp_path}/out/", objectives=[
        {"metric": "evalLoss"}]).to_wire()
    doc["spec"]["template"]["model"] = {"uri": f"file://{model}"}
    doc["spec"]["maxFailedTrials"] = 0
    state = LocalState(tmp_path / "state")
    runner = LocalSweepRunner(FineTuneSweep.model_validate(doc), state, nproc=1, parallel=1)
    runner.open()
    runner.study.study.enqueue_trial({"method.rank": 64, "method.trainableParamPercent": 0.5})
    number, _, _ = runner.study.ask(lambda n: trial_name("budget", n))
    runner._launch(number, "http://127.0.0.1:9/report")
    assert not runner.running
    [record] = runner.study.records()
    assert record.state == "Failed"
    assert "not launched" in (record.message or "") and "0.5%" in (record.message or "")
    plan = runner.plan()
    assert not plan.failed and plan.launch == 1
    assert state.load(JOB_PLURAL, "budget-0") is None
