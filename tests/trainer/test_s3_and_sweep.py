"""The real S3 server: model, data and artifact all in s3://; and sweep pruning over HTTP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator import storage
from orchestrator.trainer.errors import ExitCode
from tests.support import S3Bucket
from tests.trainer import helpers
from tests.trainer.test_train import reload_logits

pytestmark = pytest.mark.trainer


def test_s3_model_data_and_artifact(tmp_path: Path, tiny_models: dict[str, Path],
                                    data_dir: Path, s3: S3Bucket,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    b = f"s3://{s3.bucket}"
    model_manifest = storage.upload_dir(tiny_models["llama"], f"{b}/models/llama")
    for name in ("train.jsonl", "eval.jsonl"):
        storage.upload_file(data_dir / name, f"{b}/data/{name}")
    cfg = helpers.trainer_config(tmp_path / "c.json", job="s3-lora",
                                 model_dir=f"{b}/models/llama", data_dir=data_dir,
                                 output=f"{b}/adapters", data={"train": f"{b}/data/train.jsonl",
                                                               "eval": f"{b}/data/eval.jsonl"},
                                 training={"maxSteps": 12, "evalEvery": 6})
    proc = helpers.run_trainer(cfg, tmp_path, env=helpers.trainer_env(tmp_path, s3.env()))
    assert proc.returncode == 0, proc.stderr[-3000:]
    msg = helpers.termination(tmp_path)
    assert msg["artifact"]["uri"] == f"{b}/adapters/s3-lora/"

    dl = tmp_path / "collected"
    storage.download_dir(msg["artifact"]["uri"], dl, require_manifest=True,
                         expected_digest=msg["artifact"]["sha256"])
    meta = json.loads((dl / "kubetune.json").read_text())
    # The base model is identified by the digest of the manifest it was uploaded with.
    assert meta["baseModel"] == {"uri": f"{b}/models/llama", "sha256": model_manifest.digest}
    got = reload_logits("lora", tiny_models["llama"], dl, meta["probe"]["inputIds"])
    assert got == pytest.approx(meta["probe"]["lastTokenLogits"], abs=1e-4)


def test_sweep_prune_stops_training(tmp_path: Path, tiny_models: dict[str, Path],
                                    data_dir: Path) -> None:
    with helpers.report_endpoint("prune") as (url, seen):
        cfg = helpers.trainer_config(
            tmp_path / "c.json", job="trial-3", model_dir=tiny_models["llama"],
            data_dir=data_dir, output=f"file://{tmp_path}/store",
            training={"maxSteps": 40, "evalEvery": 5},
            sweep={"name": "s", "trialNumber": 3, "reportUrl": url, "tokenEnv": "KT_TOKEN"})
        proc = helpers.run_trainer(cfg, tmp_path,
                                   env=helpers.trainer_env(tmp_path, {"KT_TOKEN": "s3cret"}))
    assert proc.returncode == ExitCode.PRUNED, proc.stderr[-3000:]
    msg = helpers.termination(tmp_path)
    assert msg["status"] == "Pruned" and msg["reason"] == "Pruned"
    assert "pruned by the sweep at step 5" in msg["message"]
    assert msg["progress"] == {"step": 5, "totalSteps": 40} and "evalLoss" in msg["metrics"]
    # first the model's config (the sweep's budget pre-check), then the evaluations: step 0
    # is reported, never pruned
    assert "model" in seen[0]["body"] and "metrics" not in seen[0]["body"]
    evals = seen[1:]
    assert [s["body"]["step"] for s in evals] == [0, 5]
    assert all(s["auth"] == "Bearer s3cret" for s in seen)
    assert evals[1]["body"]["trial"] == 3 and evals[1]["body"]["sweep"] == "s"
    assert "evalLoss" in evals[1]["body"]["metrics"]
    assert not (tmp_path / "store/trial-3/manifest.json").exists()


def test_a_trial_refuses_an_unreachable_budget_before_downloading_the_model(
        tmp_path: Path, tiny_models: dict[str, Path], data_dir: Path, s3: S3Bucket,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The controller never reads a user's model; the trial's pod does, in its first seconds:
    it announces the model's config.json over its report link (the sweep then refuses the
    unreachable trials before launch) and refuses its own unreachable budget before a byte of
    weights is downloaded (exit 78, BudgetInfeasible: no failure budget is spent)."""
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    model = f"s3://{s3.bucket}/models/llama"
    storage.upload_dir(tiny_models["llama"], model)
    with helpers.report_endpoint() as (url, seen):
        cfg = helpers.trainer_config(
            tmp_path / "c.json", job="trial-1", model_dir=model, data_dir=data_dir,
            output=f"file://{tmp_path}/store",
            method={"type": "lora", "rank": 64, "trainableParamPercent": 0.01},
            sweep={"name": "s", "trialNumber": 1, "reportUrl": url, "tokenEnv": "KT_TOKEN"})
        proc = helpers.run_trainer(
            cfg, tmp_path, env=helpers.trainer_env(tmp_path, {**s3.env(), "KT_TOKEN": "t0k"}))
    assert proc.returncode == ExitCode.CONFIG, proc.stderr[-3000:]
    msg = helpers.termination(tmp_path)
    assert msg["reason"] == "BudgetInfeasible"
    assert "trainableParamPercent 0.01% is not reachable" in msg["message"]
    # nothing but the config was read: no weights in the pod's model cache
    assert not list((tmp_path / "cache").rglob("*.safetensors"))
    (announce,) = seen
    assert announce["auth"] == "Bearer t0k" and announce["body"]["step"] == 1  # attempt 1
    config = json.loads((tiny_models["llama"] / "config.json").read_text())
    assert announce["body"]["model"]["model_type"] == "llama"
    assert announce["body"]["model"]["num_hidden_layers"] == config["num_hidden_layers"]
    assert "architectures" not in announce["body"]["model"]  # scalars only
