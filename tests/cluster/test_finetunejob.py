"""FineTuneJob controller against the real control plane, running with its own RBAC."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
import yaml

from tests.cluster.controller_support import (
    ControllerProcess,
    end_pod,
    get,
    items,
    trainer_metrics,
    wait_phase,
)
from tests.support import REPO, Cluster, wait_for

pytestmark = pytest.mark.cluster

EXAMPLES = sorted(
    p
    for p in (REPO / "examples").glob("*.yaml")
    if yaml.safe_load(p.read_text())["kind"] == "FineTuneJob"
)


def _secret(cluster: Cluster, namespace: str, name: str = "s3-credentials") -> None:
    cluster.kubectl(
        "create",
        "secret",
        "generic",
        name,
        "-n",
        namespace,
        "--from-literal=AWS_ACCESS_KEY_ID=test",
        "--from-literal=AWS_SECRET_ACCESS_KEY=test-secret",
    )


def _job(name: str, nodes: int = 2, gpus: int = 8, backoff: int = 2, **spec_extra: object) -> dict:
    spec: dict = {
        "model": {"uri": "s3://models/tiny-llama"},
        "data": {
            "train": "s3://data/train.jsonl",
            "eval": "s3://data/eval.jsonl",
            "format": "chat",
        },
        "method": {"type": "lora", "rank": 8, "alpha": 16},
        "training": {"globalBatchSize": 8 * nodes * gpus, "microBatchSize": 4},
        "distributed": {"nodes": nodes, "gpusPerNode": gpus},
        "output": {"uri": "s3://adapters/test/"},
        "storage": {"endpoint": "http://s3.local:9000", "credentialsSecret": "s3-credentials"},
        "backoffLimit": backoff,
    }
    spec.update(spec_extra)
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": spec,
    }


def _apply(cluster: Cluster, namespace: str, obj: dict) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj))


def _running_pods(cluster: Cluster, namespace: str, job: str, attempt: int, n: int) -> list[dict]:
    sel = f"kubetune.io/job={job},kubetune.io/attempt={attempt}"

    def check() -> list[dict] | None:
        pods = [
            p
            for p in items(cluster, "pods", namespace, sel)
            if p["status"].get("phase") == "Running"
        ]
        return pods if len(pods) == n else None

    return wait_for(check, timeout=60, what=f"{n} running pods of {job} attempt {attempt}")


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs_to_success_with_metrics(
    cluster: Cluster, namespace: str, controller: ControllerProcess, example: Path
) -> None:
    doc = yaml.safe_load(example.read_text())
    name = doc["metadata"]["name"]
    spec = doc["spec"]
    nodes, gpus = spec["distributed"]["nodes"], spec["distributed"].get("gpusPerNode", 0)
    # the fake nodes carry the example's GPU product label but no taints
    _secret(cluster, namespace, spec.get("storage", {}).get("credentialsSecret", "s3-credentials"))
    cluster.kubectl("apply", "-n", namespace, "-f", str(example))

    # children appear within seconds, named deterministically
    wait_for(lambda: get(cluster, "job", namespace, f"{name}-a1"), timeout=15, what="Job")
    svc = get(cluster, "service", namespace, f"{name}-workers")
    assert svc["spec"]["clusterIP"] == "None"
    cm = get(cluster, "configmap", namespace, f"{name}-a1-config")
    config = json.loads(cm["data"]["config.json"])
    assert config["jobName"] == name and config["attempt"] == 1
    ds = json.loads(cm["data"]["ds_config.json"])
    assert ds["zero_optimization"]["stage"] == spec["distributed"].get("deepspeed", {}).get(
        "zeroStage", ds["zero_optimization"]["stage"]
    )

    pods = _running_pods(cluster, namespace, name, 1, nodes)
    assert len({p["spec"]["nodeName"] for p in pods}) == nodes  # one pod per node
    for pod in pods:
        c = pod["spec"]["containers"][0]
        assert c["args"][0] == "torchrun"
        assert f"--nnodes={nodes}" in c["args"]
        assert any(
            a.startswith("--master-addr=" + f"{name}-a1-0.{name}-workers") for a in c["args"]
        )
        if gpus:
            assert c["resources"]["limits"]["nvidia.com/gpu"] == str(gpus)
        env = {e["name"]: e for e in c["env"]}
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"]
        assert "value" not in env["AWS_SECRET_ACCESS_KEY"]  # referenced, never copied

    wait_phase(cluster, "ftj", namespace, name, "Running", timeout=30)
    table = cluster.kubectl("get", "ftj", name, "-n", namespace).stdout
    for column in ("PHASE", "METHOD", "RANK", "EVAL"):
        assert column in table.upper()

    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        end_pod(
            cluster,
            namespace,
            pod["metadata"]["name"],
            0,
            trainer_metrics(1.234, percent=0.42, generalLossDelta=0.02),
        )
    cluster.kubectl(
        "wait", "--for=condition=Succeeded", f"ftj/{name}", "-n", namespace, "--timeout=60s"
    )
    status = get(cluster, "ftj", namespace, name)["status"]
    assert status["phase"] == "Succeeded"
    assert status["metrics"]["evalLoss"] == pytest.approx(1.234)
    assert status["metrics"]["trainableParamPercent"] == pytest.approx(0.42)
    assert status["artifact"]["uri"] == "s3://adapters/x/"
    assert "1.234" in cluster.kubectl("get", "ftj", name, "-n", namespace).stdout


def test_failed_pod_restarts_gang_until_backoff_limit(
    cluster: Cluster, namespace: str, controller: ControllerProcess
) -> None:
    _secret(cluster, namespace)
    _apply(cluster, namespace, _job("flaky", nodes=2, backoff=1))
    for attempt in (1, 2):
        pods = _running_pods(cluster, namespace, "flaky", attempt, 2)
        # rank 1 dies (NCCL timeout, say); rank 0 keeps running: the whole gang must restart
        victim = next(
            p
            for p in pods
            if p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "1"
        )
        end_pod(
            cluster,
            namespace,
            victim["metadata"]["name"],
            1,
            "RuntimeError: NCCL watchdog timeout on rank 9",
        )
        if attempt == 1:
            wait_for(
                lambda: get(cluster, "ftj", namespace, "flaky")["status"].get("attempts") == 2,
                timeout=30,
                what="attempts == 2",
            )
            # a new Job runs attempt 2; the failed one stays (its pods' logs), with a TTL
            wait_for(
                lambda: (
                    get(cluster, "job", namespace, "flaky-a1")["spec"].get(
                        "ttlSecondsAfterFinished"
                    )
                    == 86400
                ),
                timeout=30,
                what="attempt 1's Job kept with its TTL",
            )

    obj = wait_phase(cluster, "ftj", namespace, "flaky", "Failed", timeout=60)
    failed = next(c for c in obj["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "BackoffLimitExceeded"
    assert "NCCL watchdog timeout" in failed["message"]
    assert obj["status"]["attempts"] == 2
    described = cluster.kubectl("describe", "ftj", "flaky", "-n", namespace).stdout
    assert "BackoffLimitExceeded" in described and "Restarting" in described


def test_bad_data_is_not_retried(
    cluster: Cluster, namespace: str, controller: ControllerProcess
) -> None:
    _secret(cluster, namespace)
    _apply(cluster, namespace, _job("baddata", nodes=1, backoff=3))
    pod = _running_pods(cluster, namespace, "baddata", 1, 1)[0]
    end_pod(
        cluster,
        namespace,
        pod["metadata"]["name"],
        65,
        {
            "format": "kubetune.trainer/v1",
            "status": "Failed",
            "exitCode": 65,
            "reason": "InvalidData",
            "message": "s3://data/train.jsonl:17: expected a JSON object (field 'messages')",
        },
    )
    obj = wait_phase(cluster, "ftj", namespace, "baddata", "Failed")
    failed = next(c for c in obj["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidData"
    assert "train.jsonl:17" in failed["message"]
    assert obj["status"]["attempts"] == 1


def test_missing_secret_is_a_condition_not_a_crash(
    cluster: Cluster, namespace: str, controller: ControllerProcess
) -> None:
    _apply(cluster, namespace, _job("nosecret", nodes=1))

    def reported() -> dict | None:
        st = get(cluster, "ftj", namespace, "nosecret").get("status") or {}
        return next((c for c in st.get("conditions", []) if c["reason"] == "SecretMissing"), None)

    cond = wait_for(reported, timeout=30, what="SecretMissing condition")
    assert "s3-credentials" in cond["message"] and "AWS_ACCESS_KEY_ID" in cond["message"]
    assert items(cluster, "jobs", namespace) == []  # nothing launched without credentials
    # fixing the problem lets the job proceed without any user action on the job
    _secret(cluster, namespace)
    wait_for(lambda: get(cluster, "job", namespace, "nosecret-a1"), timeout=30)
    assert controller.proc is not None and controller.proc.poll() is None


def test_controller_sigkill_mid_job_no_duplicates(
    cluster: Cluster, namespace: str, controller: ControllerProcess
) -> None:
    _secret(cluster, namespace)
    rng = random.Random(7)
    names = [f"crash-{i}" for i in range(6)]
    for i, name in enumerate(names):
        _apply(cluster, namespace, _job(name, nodes=1, gpus=1))
        if i == 2:
            time.sleep(rng.uniform(0.0, 0.5))
            controller.kill()
            controller.start()
    for name in names:
        _running_pods(cluster, namespace, name, 1, 1)
    controller.kill()
    for name in names[:3]:
        pod = _running_pods(cluster, namespace, name, 1, 1)[0]
        end_pod(cluster, namespace, pod["metadata"]["name"], 0, trainer_metrics(0.5))
    time.sleep(1)
    controller.start()
    for name in names[:3]:
        wait_phase(cluster, "ftj", namespace, name, "Succeeded", timeout=60)
    for name in names[3:]:
        wait_phase(cluster, "ftj", namespace, name, "Running", timeout=60)
    jobs = [j["metadata"]["name"] for j in items(cluster, "jobs", namespace)]
    assert sorted(jobs) == sorted(f"{n}-a1" for n in names)
    assert len(items(cluster, "services", namespace)) == len(names)
    assert len(
        [
            c
            for c in items(cluster, "configmaps", namespace)
            if c["metadata"]["name"].startswith("crash-")
        ]
    ) == len(names)


def test_suspend_and_queue(cluster: Cluster, namespace: str, controller: ControllerProcess) -> None:
    _secret(cluster, namespace)
    _apply(cluster, namespace, _job("queued", nodes=1, queueName="gpu-queue"))
    job = wait_for(lambda: get(cluster, "job", namespace, "queued-a1"), timeout=15)
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    wait_for(
        lambda: any(
            c["reason"] == "Queued"
            for c in (get(cluster, "ftj", namespace, "queued").get("status") or {}).get(
                "conditions", []
            )
        ),
        timeout=20,
    )

    _apply(cluster, namespace, _job("pausable", nodes=1))
    _running_pods(cluster, namespace, "pausable", 1, 1)
    cluster.kubectl(
        "patch",
        "ftj",
        "pausable",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec":{"suspend":true}}',
    )
    wait_for(
        lambda: get(cluster, "job", namespace, "pausable-a1")["spec"]["suspend"] is True, timeout=20
    )
    wait_for(
        lambda: items(cluster, "pods", namespace, "kubetune.io/job=pausable") == [],
        timeout=60,
        what="pods stopped while suspended",
    )


def test_deleting_the_job_cleans_up_children(
    cluster: Cluster, namespace: str, controller: ControllerProcess
) -> None:
    _secret(cluster, namespace)
    _apply(cluster, namespace, _job("tidy", nodes=2))
    _running_pods(cluster, namespace, "tidy", 1, 2)
    cluster.kubectl("delete", "ftj", "tidy", "-n", namespace)
    wait_for(
        lambda: (
            items(cluster, "jobs", namespace) == []
            and items(cluster, "pods", namespace, "kubetune.io/job=tidy") == []
            and [s for s in items(cluster, "services", namespace)] == []
        ),
        timeout=90,
        what="children garbage-collected",
    )
