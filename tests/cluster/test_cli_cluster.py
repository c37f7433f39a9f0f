"""The kubetune CLI (and `kubectl tune`) against the real control plane, the real controller
and the S3 server: submit, get, status, collect (`--best` picks the right trial), cancel.

The test plays the kubelet and the trainer: it uploads a small adapter per trial to the
bucket with the storage module, then ends the pod with the termination message the real
trainer writes (pointing at that upload), exactly what the controller reads in a cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator import storage
from tests.cluster.controller_support import (
    ControllerProcess,
    end_pod,
    get,
    items,
    trainer_metrics,
    wait_phase,
)
from tests.support import REPO, TESTBIN, Cluster, S3Bucket, free_port, wait_for

pytestmark = pytest.mark.cluster
VENV_BIN = Path(sys.executable).parent


def template(output: str) -> dict[str, Any]:
    return {
        "model": {"uri": "s3://models/tiny-llama"},
        "data": {"train": "s3://data/train.jsonl", "eval": "s3://data/eval.jsonl"},
        "method": {"type": "lora", "rank": 8},
        "training": {"globalBatchSize": 8, "microBatchSize": 1},
        "distributed": {"nodes": 1, "gpusPerNode": 1},
        "output": {"uri": output},
        "backoffLimit": 0,
    }


def cli_env(s3: S3Bucket | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("KUBECONFIG", None)
    # the CLI as installed (console scripts next to this interpreter), importable from here
    env["PATH"] = os.pathsep.join([str(VENV_BIN), str(TESTBIN), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["COLUMNS"] = "220"
    if s3 is not None:
        env.update(s3.env())
    return env


def kubetune(cluster: Cluster, namespace: str, *args: str, s3: S3Bucket | None = None,
             ok: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args, "-n", namespace, "--kubeconfig",
         cluster.kubeconfig],
        capture_output=True, text=True, timeout=120, env=cli_env(s3), cwd=cwd or REPO)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def one_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def upload_adapter(s3: S3Bucket, name: str, tmp: Path) -> dict[str, str]:
    """What the trainer leaves in the bucket: adapter files + kubetune.json + manifest."""
    src = tmp / "uploads" / name
    src.mkdir(parents=True, exist_ok=True)
    (src / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    (src / "adapter_model.safetensors").write_bytes(f"weights of {name}\n".encode() * 64)
    (src / "kubetune.json").write_text(json.dumps({"jobName": name}))
    uri = f"s3://{s3.bucket}/adapters/{name}/"
    cfg = storage.S3Config(endpoint_url=s3.endpoint, region=s3.region,
                           access_key_id=s3.access_key, secret_access_key=s3.secret_key)
    manifest = storage.upload_dir(src, uri, s3=cfg, progress=False)
    return {"uri": uri, "sha256": manifest.digest}


def credentials(cluster: Cluster, namespace: str, s3: S3Bucket) -> None:
    """The Secret the controller's default spec.storage.credentialsSecret names."""
    cluster.kubectl("create", "secret", "generic", "s3-credentials", "-n", namespace,
                    f"--from-literal=AWS_ACCESS_KEY_ID={s3.access_key}",
                    f"--from-literal=AWS_SECRET_ACCESS_KEY={s3.secret_key}")


def running_pods(cluster: Cluster, namespace: str, selector: str) -> list[dict[str, Any]]:
    return [p for p in items(cluster, "pods", namespace, selector)
            if p["status"].get("phase") == "Running"
            and not p["metadata"].get("deletionTimestamp")]


def test_submit_get_status_collect_and_cancel_a_job(
    cluster: Cluster, namespace: str, controller: ControllerProcess, s3: S3Bucket,
    tmp_path: Path
) -> None:
    credentials(cluster, namespace, s3)
    job = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
           "metadata": {"name": "cli-job"}, "spec": template(f"s3://{s3.bucket}/adapters/")}
    f = tmp_path / "job.yaml"
    f.write_text(yaml.safe_dump(job))
    out = kubetune(cluster, namespace, "submit", str(f)).stdout
    assert out.strip() == f"finetunejob.kubetune.io/cli-job created in namespace {namespace}"
    again = kubetune(cluster, namespace, "submit", str(f), ok=False)
    assert "already exists" in one_error(again)

    pods = wait_for(lambda: running_pods(cluster, namespace, "kubetune.io/job=cli-job"),
                    timeout=60, what="trainer pod running")
    wait_phase(cluster, "ftj", namespace, "cli-job", "Running")
    table = kubetune(cluster, namespace, "get", "jobs").stdout
    assert any(line.split()[:2] == ["cli-job", "Running"] for line in table.splitlines())

    artifact = upload_adapter(s3, "cli-job", tmp_path)
    report = trainer_metrics(1.25, percent=0.75)
    report["artifact"] = artifact
    report["progress"] = {"step": 90, "totalSteps": 90}
    end_pod(cluster, namespace, pods[0]["metadata"]["name"], 0, report)
    wait_phase(cluster, "ftj", namespace, "cli-job", "Succeeded")

    detail = kubetune(cluster, namespace, "status", "cli-job").stdout
    assert "Succeeded" in detail and artifact["uri"] in detail and "1.25" in detail
    as_json = json.loads(kubetune(cluster, namespace, "get", "jobs", "cli-job", "-o",
                                  "json").stdout)
    assert as_json["status"]["metrics"]["evalLoss"] == 1.25

    dest = tmp_path / "collected"
    out = kubetune(cluster, namespace, "collect", "cli-job", "-o", str(dest), s3=s3).stdout
    assert "sha256 verified" in out
    assert (dest / "adapter_model.safetensors").read_bytes().startswith(b"weights of cli-job")
    assert json.loads((dest / "kubetune.json").read_text())["jobName"] == "cli-job"

    out = kubetune(cluster, namespace, "cancel", "cli-job").stdout
    assert out.startswith("finetunejob.kubetune.io/cli-job cancelled")
    wait_for(lambda: cluster.kubectl("get", "ftj", "cli-job", "-n", namespace,
                                     check=False).returncode != 0, timeout=30,
             what="FineTuneJob deleted")
    wait_for(lambda: not items(cluster, "pods", namespace, "kubetune.io/job=cli-job"),
             timeout=60, what="trainer pods garbage-collected")
    gone = kubetune(cluster, namespace, "status", "cli-job", ok=False)
    assert "not found" in one_error(gone).lower() or "no FineTuneJob" in one_error(gone)


def loss(params: dict[str, Any]) -> float:
    """A known objective: the best trial is the one with the largest rank."""
    return round(1.0 + 8.0 / params["method.rank"], 6)


def test_collect_best_picks_the_right_trial_of_a_finished_sweep(
    cluster: Cluster, namespace: str, controller: ControllerProcess, s3: S3Bucket,
    tmp_path: Path
) -> None:
    credentials(cluster, namespace, s3)
    sweep = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneSweep",
             "metadata": {"name": "cli-sweep"},
             "spec": {"template": template(f"s3://{s3.bucket}/adapters/"),
                      "parameters": [{"name": "method.rank", "int": {"low": 2, "high": 64,
                                                                     "log": True}}],
                      "objectives": [{"metric": "evalLoss", "direction": "minimize"}],
                      # four distinct ranks: a repeated one is reused, not launched
                      "algorithm": {"sampler": "random", "seed": 3},
                      "maxTrials": 4, "parallelism": 2}}
    f = tmp_path / "sweep.yaml"
    f.write_text(yaml.safe_dump(sweep))
    out = kubetune(cluster, namespace, "submit", str(f)).stdout
    assert "finetunesweep.kubetune.io/cli-sweep created" in out

    results: dict[int, dict[str, Any]] = {}

    def play() -> bool:
        """End every running trial pod with metrics from the known objective."""
        for pod in running_pods(cluster, namespace, "kubetune.io/sweep=cli-sweep"):
            job = pod["metadata"]["labels"]["kubetune.io/job"]
            number = int(pod["metadata"]["labels"]["kubetune.io/trial"])
            if number in results:
                continue
            trial = get(cluster, "ftj", namespace, job)
            params = json.loads(trial["metadata"]["annotations"]["kubetune.io/trial-parameters"])
            report = trainer_metrics(loss(params), percent=0.1 * params["method.rank"])
            report["artifact"] = upload_adapter(s3, job, tmp_path)
            end_pod(cluster, namespace, pod["metadata"]["name"], 0, report)
            results[number] = {"name": job, "loss": loss(params), "params": params}
        phase = (get(cluster, "fts", namespace, "cli-sweep").get("status") or {}).get("phase")
        return phase in ("Succeeded", "Failed")

    wait_for(play, timeout=240, interval=0.5, what="sweep finished")
    assert len(results) == 4
    best = min(results, key=lambda n: (results[n]["loss"], n))

    table = kubetune(cluster, namespace, "get", "trials", "cli-sweep").stdout
    best_row = next(line for line in table.splitlines() if "★ best" in line)
    assert best_row.split()[:3] == [str(best), results[best]["name"], "Succeeded"]
    sweeps = kubetune(cluster, namespace, "get", "sweeps").stdout
    assert any(line.split()[:3] == ["cli-sweep", "Succeeded", "4/4"]
               for line in sweeps.splitlines())

    dest = tmp_path / "best"
    out = kubetune(cluster, namespace, "collect", "cli-sweep", "--best", "-o", str(dest),
                   s3=s3).stdout
    assert f"trial {best} ({results[best]['name']})" in out and "sha256 verified" in out
    assert (dest / "adapter_model.safetensors").read_bytes().startswith(
        f"weights of {results[best]['name']}".encode())

    ranked = sorted(results, key=lambda n: (results[n]["loss"], n))
    out = kubetune(cluster, namespace, "collect", "cli-sweep", "--top", "2", "-o",
                   str(tmp_path / "top"), "--output", "json", s3=s3).stdout
    assert [c["trial"] for c in json.loads(out)] == ranked[:2]

    refs = json.loads(kubetune(cluster, namespace, "artifacts", "ls", "cli-sweep", "-o",
                               "json").stdout)
    assert [r["trial"] for r in refs] == ranked

    # an S3 endpoint nobody listens on fails in one line, naming it
    dead = f"http://127.0.0.1:{free_port()}"
    failed = kubetune(cluster, namespace, "collect", "cli-sweep", "--trial", str(ranked[-1]),
                      "-o", str(tmp_path / "bad"), "--endpoint", dead, s3=s3, ok=False)
    assert failed.returncode == 1
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("kubetune: error:") and "127.0.0.1" in last, failed.stderr
    assert "Traceback" not in failed.stderr

    out = kubetune(cluster, namespace, "cancel", "cli-sweep").stdout
    assert out.startswith("finetunesweep.kubetune.io/cli-sweep cancelled")
    wait_for(lambda: not items(cluster, "ftj", namespace, "kubetune.io/sweep=cli-sweep"),
             timeout=60, what="trial jobs garbage-collected with their sweep")


def test_kubectl_tune_runs_through_kubectls_plugin_lookup(
    cluster: Cluster, namespace: str, crds: None
) -> None:
    kubectl = str(TESTBIN / "kubectl")
    env = cli_env()
    plugins = subprocess.run([kubectl, "plugin", "list"], capture_output=True, text=True,
                             env=env, timeout=60)
    assert str(VENV_BIN / "kubectl-tune") in plugins.stdout
    proc = subprocess.run([kubectl, "tune", "get", "sweeps", "-n", namespace, "--kubeconfig",
                           cluster.kubeconfig], capture_output=True, text=True, env=env,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"No FineTuneSweeps in namespace {namespace}."
    bad = subprocess.run([kubectl, "tune", "status", "nothing", "-n", namespace,
                          "--kubeconfig", cluster.kubeconfig], capture_output=True, text=True,
                         env=env, timeout=60)
    assert bad.returncode == 1
    assert bad.stderr.strip() == (f"kubectl tune: error: no FineTuneJob or FineTuneSweep named "
                                  f"'nothing' in namespace {namespace}")
