"""FineTuneJobs train in real pods: the controller runs as a pod installed by the Helm chart,
trainer pods run kubetune/trainer:dev on the real node, rendezvous over the headless
Service's DNS and talk to the S3 server on the pod bridge."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.node.pods import NODE_LABEL, RealNode
from tests.support import REPO, TESTBIN, Cluster, S3Bucket, wait_for

pytestmark = pytest.mark.node

TOLERATION = {"key": NODE_LABEL, "operator": "Exists", "effect": "NoSchedule"}


def job_spec(bucket: str, **over: Any) -> dict[str, Any]:
    b = f"s3://{bucket}"
    spec: dict[str, Any] = {
        "model": {"uri": f"{b}/models/llama"},
        "data": {
            "train": f"{b}/data/train.jsonl",
            "eval": f"{b}/data/eval.jsonl",
            "format": "instruction",
            "maxSeqLength": 64,
        },
        "method": {"type": "lora", "rank": 4},
        "training": {
            "maxSteps": 12,
            "learningRate": 5e-3,
            "globalBatchSize": 8,
            "microBatchSize": 4,
            "precision": "fp32",
            "evalEvery": 6,
            "checkpointEvery": 6,
            "seed": 7,
        },
        "distributed": {"nodes": 2, "gpusPerNode": 0, "deepspeed": {"zeroStage": 2}},
        "resources": {
            "cpu": "200m",
            "memory": "3Gi",
            "nodeSelector": {NODE_LABEL: "true"},
            "tolerations": [TOLERATION],
        },
        "output": {"uri": f"{b}/adapters/"},
        "backoffLimit": 1,
    }
    for key, value in over.items():
        spec[key] = value
    return spec


def apply_job(cluster: Cluster, namespace: str, name: str, spec: dict[str, Any]) -> None:
    body = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(body))


def get_job(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    return dict(
        json.loads(cluster.kubectl("get", "ftj", "-n", namespace, name, "-o", "json").stdout)
    )


def describe(cluster: Cluster, namespace: str) -> str:
    """What to look at when a node-tier job does not end as expected."""
    parts = [
        cluster.kubectl("get", "ftj,jobs,pods", "-n", namespace, "-o", "wide", check=False).stdout,
        cluster.kubectl("get", "events", "-n", namespace, check=False).stdout[-4000:],
    ]
    pods = cluster.kubectl("get", "pods", "-n", namespace, "-o", "name", check=False).stdout
    for pod in pods.split():
        parts.append(
            f"--- {pod}\n"
            + cluster.kubectl("logs", "-n", namespace, pod, "--tail=40", check=False).stdout
        )
    return "\n".join(parts)


def wait_job_phase(
    cluster: Cluster,
    namespace: str,
    name: str,
    phases: set[str],
    timeout: float = 600,
    live: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Waits for one of `phases`; `live` collects every status.progress seen on the way."""

    def ended() -> dict[str, Any] | None:
        job = get_job(cluster, namespace, name)
        status = job.get("status", {})
        if live is not None and status.get("progress") and status["progress"] not in live:
            live.append(status["progress"])
        return job if status.get("phase") in phases else None

    try:
        return wait_for(ended, timeout=timeout, interval=2, what=f"ftj {name} in {phases}")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{describe(cluster, namespace)}") from None


def cli(cluster: Cluster, namespace: str, *args: str, env: dict[str, str]) -> str:
    run_env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    run_env.update(env)
    run_env["PATH"] = os.pathsep.join(
        [str(Path(sys.executable).parent), str(TESTBIN), run_env.get("PATH", "")]
    )
    run_env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.cli",
            *args,
            "-n",
            namespace,
            "--kubeconfig",
            cluster.kubeconfig,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=run_env,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_two_pod_job_trains_and_its_adapter_is_collected(
    cluster: Cluster, real_node: RealNode, job_ns: str, inputs: dict[str, Any], tmp_path: Path
) -> None:
    namespace, s3 = job_ns, inputs["s3"]
    t0 = time.monotonic()
    apply_job(cluster, namespace, "two-pods", job_spec(inputs["bucket"]))
    live: list[dict[str, Any]] = []
    job = wait_job_phase(cluster, namespace, "two-pods", {"Succeeded", "Failed"}, live=live)
    assert job["status"]["phase"] == "Succeeded", describe(cluster, namespace)
    print(f"two-pod job Succeeded in {time.monotonic() - t0:.0f}s")
    # While it trained, rank 0's live progress came through the report Service (kube-proxy)
    # with the job's own token and reached status.progress.
    during = [p for p in live if "trainLoss" in p]
    assert during, f"no live progress seen in status while training: {live}"
    assert during[0]["tokensPerSecond"] > 0 and during[0]["totalSteps"] >= during[0]["step"]

    # Both ranks ran in pods of the real node, rendezvous through pod 0's DNS name.
    pods = json.loads(
        cluster.kubectl(
            "get", "pods", "-n", namespace, "-l", "kubetune.io/job=two-pods", "-o", "json"
        ).stdout
    )
    assert {p["spec"]["nodeName"] for p in pods["items"]} == {real_node.name}
    assert len(pods["items"]) == 2
    # the Helm release's trainer.* defaults reached the pods
    for p in pods["items"]:
        assert p["metadata"]["labels"]["team"] == "node-tier"
        env = {e["name"]: e.get("value") for e in p["spec"]["containers"][0]["env"]}
        assert env["NCCL_DEBUG"] == "WARN"
    rank0 = next(
        p
        for p in pods["items"]
        if p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "0"
    )
    message = json.loads(rank0["status"]["containerStatuses"][0]["state"]["terminated"]["message"])

    # status.metrics and the artifact come from the real kubelet's termination message.
    metrics = job["status"]["metrics"]
    assert metrics["evalLoss"] == pytest.approx(message["metrics"]["evalLoss"])
    assert 0 < metrics["trainableParamPercent"] < 100
    artifact = job["status"]["artifact"]
    assert artifact["uri"] == f"s3://{inputs['bucket']}/adapters/two-pods/"
    assert artifact["sha256"] == message["artifact"]["sha256"]

    dest = tmp_path / "collected"
    collect(cluster, namespace, "two-pods", dest, s3)
    meta = json.loads((dest / "kubetune.json").read_text())
    from tests.trainer.test_train import reload_logits

    got = reload_logits("lora", inputs["model_dir"], dest, meta["probe"]["inputIds"])
    assert got == pytest.approx(meta["probe"]["lastTokenLogits"], abs=1e-4)


def trainer_pods(cluster: Cluster, namespace: str, job: str) -> list[dict[str, Any]]:
    out = cluster.kubectl(
        "get", "pods", "-n", namespace, "-l", f"kubetune.io/job={job}", "-o", "json"
    ).stdout
    return list(json.loads(out)["items"])


def pod_of(pods: list[dict[str, Any]], index: int, attempt: int) -> dict[str, Any] | None:
    for p in pods:
        ann = p["metadata"].get("annotations", {})
        if ann.get("batch.kubernetes.io/job-completion-index") == str(index) and p["metadata"][
            "labels"
        ].get("kubetune.io/attempt") == str(attempt):
            return p
    return None


def wait_training_step(
    cluster: Cluster, namespace: str, job: str, step: int, timeout: float = 400
) -> str:
    """Waits until rank 0 of attempt 1 logged an optimizer step >= `step`; returns its pod."""
    import re

    def reached() -> str | None:
        pod = pod_of(trainer_pods(cluster, namespace, job), 0, 1)
        if pod is None or pod["status"].get("phase") != "Running":
            return None
        name = pod["metadata"]["name"]
        logs = cluster.kubectl("logs", "-n", namespace, name, check=False).stdout
        steps = [int(s) for s in re.findall(r"step (\d+)/\d+", logs)]
        return name if steps and max(steps) >= step else None

    try:
        return wait_for(reached, timeout=timeout, interval=1, what=f"{job} at step {step}")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{describe(cluster, namespace)}") from None


def collect(
    cluster: Cluster, namespace: str, name: str, dest: Path, s3: S3Bucket, *flags: str
) -> None:
    """`kubetune collect NAME [FLAGS] -o DEST` against the node's S3 server."""
    cli(
        cluster,
        namespace,
        "collect",
        name,
        *flags,
        "-o",
        str(dest),
        "--endpoint",
        s3.endpoint,
        env={"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key},
    )


def resumed_run(
    cluster: Cluster, namespace: str, job: str, dest: Path, s3: S3Bucket
) -> dict[str, Any]:
    """The finished job's kubetune.json (collected)."""
    collect(cluster, namespace, job, dest, s3)
    return dict(json.loads((dest / "kubetune.json").read_text()))


LONG = {
    "maxSteps": 60,
    "learningRate": 5e-3,
    "globalBatchSize": 4,
    "microBatchSize": 2,
    "precision": "fp32",
    "evalEvery": 60,
    "seed": 7,
}


def test_graceful_delete_checkpoints_and_the_next_attempt_resumes_there(
    cluster: Cluster, real_node: RealNode, job_ns: str, inputs: dict[str, Any], tmp_path: Path
) -> None:
    namespace, s3 = job_ns, inputs["s3"]
    # No periodic checkpoint can exist (checkpointEvery > maxSteps): a resume from step N > 0
    # proves the SIGTERM checkpoint.
    spec = job_spec(inputs["bucket"], training={**LONG, "checkpointEvery": 1000})
    apply_job(cluster, namespace, "graceful", spec)
    wait_training_step(cluster, namespace, "graceful", 10)
    rank1 = pod_of(trainer_pods(cluster, namespace, "graceful"), 1, 1)
    assert rank1 is not None
    # A plain `kubectl delete pod`: SIGTERM, then the pod's grace period.
    cluster.kubectl("delete", "pod", "-n", namespace, rank1["metadata"]["name"], "--wait=false")

    job = wait_job_phase(cluster, namespace, "graceful", {"Succeeded", "Failed"})
    assert job["status"]["phase"] == "Succeeded", describe(cluster, namespace)
    assert job["status"]["attempts"] == 2
    meta = resumed_run(cluster, namespace, "graceful", tmp_path / "collected", s3)
    assert meta["resumedFromStep"] and 10 <= meta["resumedFromStep"] < 60


def test_killed_rank_restarts_the_gang_from_the_last_checkpoint(
    cluster: Cluster, real_node: RealNode, job_ns: str, inputs: dict[str, Any], tmp_path: Path
) -> None:
    namespace, s3 = job_ns, inputs["s3"]
    spec = job_spec(inputs["bucket"], training={**LONG, "checkpointEvery": 10})
    apply_job(cluster, namespace, "gang", spec)
    latest_key = "adapters/gang/checkpoints/latest.json"

    def checkpointed() -> bool:
        try:
            s3.client().head_object(Bucket=inputs["bucket"], Key=latest_key)
            return True
        except Exception:
            return False

    wait_for(checkpointed, timeout=400, interval=1, what="the first checkpoint")
    rank1 = pod_of(trainer_pods(cluster, namespace, "gang"), 1, 1)
    assert rank1 is not None
    # Every process of rank 1's container dies at once (SIGKILL), as in a crash or OOM kill:
    # no chance to checkpoint. Only tini (PID 1) survives, and exits with the entrypoint.
    cluster.kubectl(
        "exec",
        "-n",
        namespace,
        rank1["metadata"]["name"],
        "--",
        "python",
        "-c",
        "import os, signal\n"
        "for p in os.listdir('/proc'):\n"
        "    if p.isdigit() and int(p) not in (1, os.getpid()):\n"
        "        try: os.kill(int(p), signal.SIGKILL)\n"
        "        except OSError: pass\n",
        check=False,
    )
    body = s3.client().get_object(Bucket=inputs["bucket"], Key=latest_key)["Body"].read()
    seen_at_kill = json.loads(body)["step"]

    job = wait_job_phase(cluster, namespace, "gang", {"Succeeded", "Failed"})
    assert job["status"]["phase"] == "Succeeded", describe(cluster, namespace)
    assert job["status"]["attempts"] == 2
    # Attempt 2 resumes from the newest complete checkpoint of attempt 1: the one seen when
    # rank 1 was killed, or a later one rank 0 still finished uploading (a checkpoint in
    # flight at the kill completes when its step was done by both ranks).
    rank0 = pod_of(trainer_pods(cluster, namespace, "gang"), 0, 2)
    assert rank0 is not None
    logs = cluster.kubectl("logs", "-n", namespace, rank0["metadata"]["name"]).stdout
    found = re.search(r"resuming from checkpoint-(\d+) \(step (\d+)\)", logs)
    assert found and found.group(1) == found.group(2), logs[-3000:]
    last_checkpoint = int(found.group(1))
    assert last_checkpoint >= seen_at_kill and last_checkpoint % 10 == 0
    assert job["status"]["progress"]["resumedFromStep"] == last_checkpoint
    meta = resumed_run(cluster, namespace, "gang", tmp_path / "collected", s3)
    assert meta["resumedFromStep"] == last_checkpoint
