"""Experiment tracking (MLflow, W&B) through HF's callbacks, on only when the tracker's own
environment is set: real training, real clients (an MLflow file store, W&B offline), read
back with the trackers' own formats."""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

from orchestrator.trainer import tracking
from orchestrator.trainer.errors import ConfigError, ExitCode
from tests.trainer import helpers

pytestmark = pytest.mark.trainer


def _env(tmp: Path, extra: dict[str, str]) -> dict[str, str]:
    """The trainer env without the developer's own tracker settings, plus ``extra``."""
    env = helpers.trainer_env(tmp, {"KUBETUNE_LOG_EVERY": "2"})
    for name in list(env):
        if name.startswith(("MLFLOW_", "WANDB_")) or name == "DISABLE_MLFLOW_INTEGRATION":
            del env[name]
    env.update(extra)
    return env


def _train(tmp: Path, model: Path, data_dir: Path, env: dict[str, str], *, job: str,
           nprocs: int, sweep: dict[str, Any] | None = None) -> dict[str, Any]:
    cfg = helpers.trainer_config(
        tmp / "c.json", job=job, model_dir=model, data_dir=data_dir,
        output=f"file://{tmp}/store", nprocs=nprocs, sweep=sweep,
        data={"general": f"file://{data_dir}/general.jsonl"},
        training={"maxSteps": 8, "evalEvery": 4})
    proc = helpers.run_trainer(cfg, tmp, nprocs=nprocs, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return helpers.termination(tmp)


def test_mlflow_run_named_after_the_job_with_params_and_loss_history(
        tmp_path: Path, tiny_models: dict[str, Path], data_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    uri = f"file://{tmp_path}/mlruns"
    # MLflow 3 refuses a file store unless asked (a server or database is the normal case)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    env = _env(tmp_path, {"MLFLOW_TRACKING_URI": uri, "MLFLOW_ALLOW_FILE_STORE": "true",
                          "MLFLOW_EXPERIMENT_NAME": "support"})
    msg = _train(tmp_path, tiny_models["llama"], data_dir, env, job="support-lora", nprocs=2)

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("support")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    # one run: rank 1 logs nothing, and no log after training starts a second (unnamed) run
    assert [r.info.run_name for r in runs] == ["support-lora"]
    run = runs[0]
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["kubetune.method"] == "lora" and p["kubetune.rank"] == "4"
    assert p["kubetune.job"] == "support-lora" and p["kubetune.attempt"] == "1"
    assert float(p["learning_rate"]) == pytest.approx(5e-3)  # HF's training arguments
    assert run.data.tags["kubetune.method"] == "lora"
    assert run.data.tags["kubetune.artifact"] == msg["artifact"]["uri"]

    def history(key: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}

    assert sorted(history("loss")) == [2, 4, 6, 8]
    assert set(history("eval_task_loss")) >= {0, 4, 8}
    assert set(history("eval_general_loss")) >= {0, 4, 8}  # the forgetting check
    assert set(history("eval_general_baseline_loss")) >= {0}
    m = msg["metrics"]
    assert history("eval_task_loss")[8] == pytest.approx(m["evalLoss"], abs=1e-5)
    for key in ("evalLoss", "generalLossDelta", "trainableParamPercent", "trainLoss"):
        assert history(f"final/{key}") == {8: pytest.approx(m[key], abs=1e-5)}, key


def test_pruned_trial_ends_its_mlflow_run_killed(
        tmp_path: Path, tiny_models: dict[str, Path], data_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    uri = f"file://{tmp_path}/mlruns"
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    with helpers.report_endpoint("prune") as (url, _):
        cfg = helpers.trainer_config(
            tmp_path / "c.json", job="s-7", model_dir=tiny_models["llama"], data_dir=data_dir,
            output=f"file://{tmp_path}/store", training={"maxSteps": 40, "evalEvery": 5},
            sweep={"name": "s", "trialNumber": 7, "reportUrl": url, "tokenEnv": "KT_TOKEN"})
        proc = helpers.run_trainer(cfg, tmp_path, env=_env(tmp_path, {
            "MLFLOW_TRACKING_URI": uri, "MLFLOW_ALLOW_FILE_STORE": "true", "KT_TOKEN": "t"}))
    assert proc.returncode == ExitCode.PRUNED, proc.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [(r.info.run_name, r.info.status) for r in runs] == [("s-7", "KILLED")]
    p = runs[0].data.params
    assert p["kubetune.sweep"] == "s" and p["kubetune.trial"] == "7"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "eval_task_loss")]
    assert steps == [0, 5]  # logged up to the prune, nothing final
    assert not client.get_metric_history(runs[0].info.run_id, "final/evalLoss")


def _wandb_records(path: Path) -> list[Any]:
    """Records of a ``.wandb`` file, parsed with wandb's own protobufs. wandb 0.2x moved its
    reader into the Go service; the framing is LevelDB's log format (32 KiB blocks of
    crc32/length/type-headed chunks) after a 7-byte ``:W&B`` header."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    block, pos = 32768, 7
    chunks: list[bytes] = []
    pending = b""
    while pos + 7 <= len(data):
        room = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if room < 7 or (kind == 0 and length == 0):  # block trailer / zero padding
            pos += room
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:  # FULL
            chunks.append(chunk)
        elif kind == 2:  # FIRST
            pending = chunk
        elif kind == 3:  # MIDDLE
            pending += chunk
        elif kind == 4:  # LAST
            chunks.append(pending + chunk)
            pending = b""
    return [pb.Record.FromString(c) for c in chunks]


def test_wandb_offline_run_dir_holds_the_history(
        tmp_path: Path, tiny_models: dict[str, Path], data_dir: Path) -> None:
    wandb_dir = tmp_path / "wb"
    wandb_dir.mkdir()
    with helpers.report_endpoint() as (url, _):
        env = _env(tmp_path, {"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir),
                              "WANDB_SILENT": "true", "KT_TOKEN": "s3cret"})
        msg = _train(tmp_path, tiny_models["llama"], data_dir, env, job="sweep-a-3", nprocs=1,
                     sweep={"name": "sweep-a", "trialNumber": 3, "reportUrl": url,
                            "tokenEnv": "KT_TOKEN", "parameters": {"method.rank": 4}})

    runs = sorted((wandb_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    files = sorted(runs[0].glob("run-*.wandb"))
    assert len(files) == 1, sorted(p.name for p in runs[0].rglob("*"))
    records = _wandb_records(files[0])
    kinds = [r.WhichOneof("record_type") for r in records]
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.display_name == "sweep-a-3" and run.project == "kubetune"
    assert run.run_group == "sweep-a" and run.job_type == "trial"
    assert {"kubetune", "lora"} <= set(run.tags)

    config: dict[str, Any] = {}
    history: dict[str, dict[int, float]] = {}
    summary: dict[str, Any] = {}
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind in ("run", "config"):
            cfg_updates = r.run.config.update if kind == "run" else r.config.update
            config.update({u.key: json.loads(u.value_json) for u in cfg_updates})
        elif kind == "history":
            item = {"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                    for i in r.history.item}
            for key, value in item.items():
                if isinstance(value, (int, float)) and "train/global_step" in item:
                    history.setdefault(key, {})[int(item["train/global_step"])] = value
        elif kind == "summary":
            summary.update({"/".join(u.nested_key) or u.key: json.loads(u.value_json)
                            for u in r.summary.update})
    assert config["kubetune.method"] == "lora" and config["kubetune.rank"] == 4
    assert config["kubetune.sweep"] == "sweep-a" and config["kubetune.trial"] == 3
    assert config["sweep.method.rank"] == 4
    assert sorted(history["train/loss"]) == [2, 4, 6, 8]
    assert set(history["eval/task_loss"]) >= {0, 4, 8}
    assert set(history["eval/general_loss"]) >= {0, 4, 8}
    m = msg["metrics"]
    assert summary["final/evalLoss"] == pytest.approx(m["evalLoss"], abs=1e-5)
    assert summary["final/generalLossDelta"] == pytest.approx(m["generalLossDelta"], abs=1e-5)
    assert summary["kubetune/artifact"] == msg["artifact"]["uri"]
    # the run was finished before os._exit: the exit record closes the file
    assert kinds[-1] == "exit" and records[-1].exit.exit_code == 0, kinds[-5:]


@pytest.mark.parametrize(("env", "want"), [
    ({}, []),
    ({"MLFLOW_TRACKING_URI": "http://mlflow.mlops:5000"}, ["mlflow"]),
    ({"MLFLOW_TRACKING_URI": "http://x", "DISABLE_MLFLOW_INTEGRATION": "TRUE"}, []),
    ({"WANDB_API_KEY": "k"}, ["wandb"]),
    ({"WANDB_MODE": "offline"}, ["wandb"]),
    ({"WANDB_MODE": "online"}, ["wandb"]),
    ({"WANDB_API_KEY": "k", "WANDB_MODE": "disabled"}, []),
    ({"WANDB_PROJECT": "p", "WANDB_ENTITY": "e"}, []),  # settings alone switch nothing on
    ({"MLFLOW_TRACKING_URI": "http://x", "WANDB_MODE": "offline"}, ["mlflow", "wandb"]),
], ids=["default-off", "mlflow", "mlflow-disabled", "wandb-key", "wandb-offline",
        "wandb-online", "wandb-disabled", "wandb-settings-only", "both"])
def test_trackers_follow_their_standard_env(env: dict[str, str], want: list[str]) -> None:
    assert [t.name for t in tracking.requested(env)] == want


def test_default_adds_no_tracker_callback(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("MLFLOW_", "WANDB_")):
            monkeypatch.delenv(name)
    assert tracking.requested() == []
    assert tracking.callbacks(object()) == []


@pytest.mark.parametrize(("env", "package", "var"), [
    ({"MLFLOW_TRACKING_URI": "http://mlflow:5000"}, "mlflow-skinny", "MLFLOW_TRACKING_URI"),
    ({"WANDB_MODE": "offline"}, "wandb", "WANDB_MODE"),
    ({"WANDB_API_KEY": "k"}, "wandb", "WANDB_API_KEY"),
], ids=["mlflow", "wandb-mode", "wandb-key"])
def test_missing_client_is_a_config_error_naming_env_and_fix(
        monkeypatch: pytest.MonkeyPatch, env: dict[str, str], package: str, var: str) -> None:
    # None in sys.modules: the import raises ModuleNotFoundError, as in an image without it
    monkeypatch.setitem(sys.modules, package.split("-")[0], None)
    with pytest.raises(ConfigError) as err:
        tracking.check(tracking.requested(env))
    text = str(err.value)
    assert err.value.exit_code == ExitCode.CONFIG
    assert f"{var}" in text and f"no {package} package" in text
    assert f"--build-arg TRAINER_EXTRAS={package}" in text and f"or unset {var}" in text


@pytest.mark.parametrize(("code", "status"), [
    (ExitCode.OK, "FINISHED"), (ExitCode.PRUNED, "KILLED"), (ExitCode.STOPPED, "KILLED"),
    (ExitCode.DATA, "FAILED"), (ExitCode.INTERNAL, "FAILED")])
def test_mlflow_status_of_the_outcome(code: int, status: str) -> None:
    assert tracking.mlflow_status(code) == status
