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

    artifact = spec["output"]["uri"].rstrip("/") + f"/{name}/"  # where the trainer writes
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        end_pod(
            cluster,
            namespace,
            pod["metadata"]["name"],
            0,
            trainer_metrics(1.234, percent=0.42, artifact=artifact, generalLossDelta=0.02),
        )
    cluster.kubectl(
        "wait", "--for=condition=Succeeded", f"ftj/{name}", "-n", namespace, "--timeout=60s"
    )
    status = get(cluster, "ftj", namespace, name)["status"]
    assert status["phase"] == "Succeeded"
    assert status["metrics"]["evalLoss"] == pytest.approx(1.234)
    assert status["metrics"]["trainableParamPercent"] == pytest.approx(0.42)
    assert status["artifact"]["uri"] == artifact
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
    wandb = {"name": "WANDB_API_KEY",
             "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "api-key"}}}
    _apply(cluster, namespace, _job("nosecret", nodes=1, pod={"env": [wandb]}))

    def reported(*wanted: str) -> dict | None:
        st = get(cluster, "ftj", namespace, "nosecret").get("status") or {}
        cond = next((c for c in st.get("conditions", []) if c["reason"] == "SecretMissing"),
                    None)
        return cond if cond and all(w in cond["message"] for w in wanted) else None

    # every Secret the pods would read is checked, each named with the field that names it
    cond = wait_for(lambda: reported("s3-credentials", "wandb"), timeout=30,
                    what="SecretMissing condition")
    assert "AWS_ACCESS_KEY_ID" in cond["message"]
    assert ("Secret 'wandb' (spec.pod.env[WANDB_API_KEY].valueFrom.secretKeyRef) not found in "
            f"namespace {namespace}: create it with key api-key") in cond["message"]
    assert items(cluster, "jobs", namespace) == []  # nothing launched without credentials
    # fixing the problems lets the job proceed without any user action on the job
    _secret(cluster, namespace)
    wait_for(lambda: (c := reported("wandb")) and "s3-credentials" not in c["message"],
             timeout=30, what="only wandb missing")
    assert items(cluster, "jobs", namespace) == []
    cluster.kubectl("create", "secret", "generic", "wandb", "-n", namespace,
                    "--from-literal=api-key=test-key")
    job = wait_for(lambda: get(cluster, "job", namespace, "nosecret-a1"), timeout=30)
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "wandb", "key": "api-key", "optional": False}
    assert "test-key" not in json.dumps(job)  # referenced, never copied
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
        report = trainer_metrics(0.5, artifact=f"s3://adapters/test/{name}/")
        end_pod(cluster, namespace, pod["metadata"]["name"], 0, report)
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


# --- ownership: a child's name held by someone else's object is never adopted ---------------
def _condition(cluster: Cluster, namespace: str, name: str, type_: str) -> dict | None:
    st = get(cluster, "ftj", namespace, name).get("status") or {}
    return next((c for c in st.get("conditions", []) if c["type"] == type_), None)


def _events(cluster: Cluster, namespace: str, name: str, reason: str) -> list[dict]:
    return [
        e
        for e in items(cluster, "events", namespace)
        if e["involvedObject"].get("name") == name and e.get("reason") == reason
    ]


def _owner_uids(obj: dict) -> list[str]:
    return [r["uid"] for r in obj["metadata"].get("ownerReferences") or []]


def test_a_foreign_configmap_with_a_childs_name_is_a_name_conflict_never_adopted(
    cluster: Cluster, namespace: str, controller: ControllerProcess
) -> None:
    _secret(cluster, namespace)
    cluster.kubectl(
        "create", "configmap", "clash-a1-config", "-n", namespace,
        "--from-literal=config.json={\"attacker\": true}",
    )
    _apply(cluster, namespace, _job("clash", nodes=1))

    def conflict() -> dict | None:
        cond = _condition(cluster, namespace, "clash", "Created")
        return cond if cond and cond["reason"] == "NameConflict" else None

    cond = wait_for(conflict, timeout=30, what="Created=False NameConflict")
    assert cond["status"] == "False"
    assert "ConfigMap clash-a1-config" in cond["message"]
    assert "delete ConfigMap clash-a1-config" in cond["message"] and "rename" in cond["message"]
    wait_for(lambda: _events(cluster, namespace, "clash", "NameConflict"), timeout=30,
             what="NameConflict event")
    assert _events(cluster, namespace, "clash", "NameConflict")[0]["type"] == "Warning"
    obj = get(cluster, "ftj", namespace, "clash")
    assert obj["status"]["phase"] == "Pending"
    # nothing overwritten, nothing started on someone else's config
    time.sleep(4)
    cm = get(cluster, "configmap", namespace, "clash-a1-config")
    assert cm["data"] == {"config.json": '{"attacker": true}'} and _owner_uids(cm) == []
    assert items(cluster, "jobs", namespace) == []
    # the user deletes the foreign object: the job proceeds by itself
    cluster.kubectl("delete", "configmap", "clash-a1-config", "-n", namespace)
    job = wait_for(lambda: get(cluster, "job", namespace, "clash-a1"), timeout=40, what="Job")
    assert _owner_uids(job) == [obj["metadata"]["uid"]]
    cm = get(cluster, "configmap", namespace, "clash-a1-config")
    assert _owner_uids(cm) == [obj["metadata"]["uid"]] and "jobName" in cm["data"]["config.json"]
    wait_for(
        lambda: (c := _condition(cluster, namespace, "clash", "Created")) and c["status"] == "True",
        timeout=30,
        what="Created=True",
    )


def test_a_foreign_job_with_a_childs_name_and_labels_is_a_name_conflict(
    cluster: Cluster, namespace: str, controller: ControllerProcess
) -> None:
    """A Job named and labelled like the attempt's (so the controller's Job watch sees it)
    but not owned by the FineTuneJob: never taken as the attempt, never patched."""
    _secret(cluster, namespace)
    labels = {
        "app.kubernetes.io/managed-by": "kubetune",
        "kubetune.io/job": "impostor",
        "kubetune.io/attempt": "1",
    }
    foreign = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "impostor-a1", "labels": labels},
        "spec": {
            "suspend": True,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "trainer", "image": "registry.example/x:1"}],
                },
            },
        },
    }
    _apply(cluster, namespace, foreign)
    _apply(cluster, namespace, _job("impostor", nodes=1))

    def conflict() -> dict | None:
        cond = _condition(cluster, namespace, "impostor", "Created")
        return cond if cond and cond["reason"] == "NameConflict" else None

    cond = wait_for(conflict, timeout=30, what="Created=False NameConflict")
    assert "Job impostor-a1" in cond["message"] and "no controller ownerReference" in cond[
        "message"]
    time.sleep(4)
    job = get(cluster, "job", namespace, "impostor-a1")
    assert job["spec"]["suspend"] is True and _owner_uids(job) == []  # not resumed, not adopted
    assert get(cluster, "ftj", namespace, "impostor")["status"]["phase"] == "Pending"


def test_reapplying_a_deleted_job_while_its_old_job_lingers_never_takes_the_old_result(
    cluster: Cluster, namespace: str, controller: ControllerProcess
) -> None:
    """Delete a finished FineTuneJob and apply the same name again while the garbage
    collector has not removed the old Job and pods (held here by finalizers): the new
    FineTuneJob waits for them, then runs its own attempt and reports its own result."""
    hold = "kubetune.io/test-hold"
    _secret(cluster, namespace)
    _apply(cluster, namespace, _job("again", nodes=1))
    old_pod = _running_pods(cluster, namespace, "again", 1, 1)[0]
    old_name = old_pod["metadata"]["name"]
    end_pod(cluster, namespace, old_name, 0,
            trainer_metrics(0.25, artifact="s3://adapters/test/again/"))
    old = wait_phase(cluster, "ftj", namespace, "again", "Succeeded")
    assert old["status"]["metrics"]["evalLoss"] == pytest.approx(0.25)
    old_job_uid = get(cluster, "job", namespace, "again-a1")["metadata"]["uid"]
    # hold the old Job and its (ended) pod past the garbage collector; the FineTuneJob is
    # Succeeded, so the Job controller has already removed its pod tracking finalizer
    held = json.dumps({"metadata": {"finalizers": [hold]}})
    for kind, obj_name in (("job", "again-a1"), ("pod", old_name)):
        cluster.kubectl("patch", kind, obj_name, "-n", namespace, "--type=merge", "-p", held)
    try:
        cluster.kubectl("delete", "ftj", "again", "-n", namespace, "--wait=false")
        wait_for(
            lambda: get(cluster, "job", namespace, "again-a1")["metadata"].get(
                "deletionTimestamp"),
            timeout=60,
            what="the old Job marked for deletion by the garbage collector",
        )
        _apply(cluster, namespace, _job("again", nodes=1))
        new_uid = wait_for(lambda: get(cluster, "ftj", namespace, "again")["metadata"]["uid"],
                           timeout=10)
        assert new_uid != old["metadata"]["uid"]

        def waiting() -> dict | None:
            cond = _condition(cluster, namespace, "again", "Created")
            ok = cond and cond["reason"] == "WaitingForCleanup" and "Job again-a1" in cond[
                "message"]
            return cond if ok else None

        wait_for(waiting, timeout=30, what="Created=False WaitingForCleanup on Job again-a1")
        for _ in range(10):  # the old Job's Complete and its pod's result are not ours
            assert get(cluster, "ftj", namespace, "again")["status"].get("phase") == "Pending"
            time.sleep(0.5)
        cluster.kubectl("patch", "job", "again-a1", "-n", namespace, "--type=merge",
                        "-p", '{"metadata":{"finalizers":null}}')

        def new_job() -> dict | None:
            job = get(cluster, "job", namespace, "again-a1")
            return job if job["metadata"]["uid"] != old_job_uid else None

        job = wait_for(new_job, timeout=60, what="the new FineTuneJob's own Job")
        assert _owner_uids(job) == [new_uid]
        # the old pod (its Job gone, held by our finalizer) still carries the old result
        assert get(cluster, "pod", namespace, old_name)["status"]["phase"] == "Succeeded"
        pods = _running_pods(cluster, namespace, "again", 1, 1)  # the new Job's pod
        end_pod(cluster, namespace, pods[0]["metadata"]["name"], 0,
                trainer_metrics(2.5, artifact="s3://adapters/test/again/"))
        new = wait_phase(cluster, "ftj", namespace, "again", "Succeeded")
        assert new["status"]["metrics"]["evalLoss"] == pytest.approx(2.5)
    finally:
        for kind, name in (("job", "again-a1"), ("pod", old_name)):
            cluster.kubectl("patch", kind, name, "-n", namespace, "--type=merge",
                            "-p", '{"metadata":{"finalizers":null}}', check=False)


# --- artifacts -----------------------------------------------------------------------------
def test_a_file_output_is_refused_in_the_cluster(
    cluster: Cluster, namespace: str, controller: ControllerProcess
) -> None:
    _secret(cluster, namespace)
    _apply(cluster, namespace, _job("local-out", nodes=1, output={"uri": "file:///tmp/out/"}))
    obj = wait_phase(cluster, "ftj", namespace, "local-out", "Failed", timeout=30)
    failed = next(c for c in obj["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert "spec.output.uri" in failed["message"]
    assert "s3://" in failed["message"] and "pvc://" in failed["message"]
    assert items(cluster, "jobs", namespace) == []


def test_an_artifact_outside_the_jobs_output_is_not_recorded(
    cluster: Cluster, namespace: str, controller: ControllerProcess
) -> None:
    _secret(cluster, namespace)
    _apply(cluster, namespace, _job("escape", nodes=1))
    pod = _running_pods(cluster, namespace, "escape", 1, 1)[0]
    end_pod(cluster, namespace, pod["metadata"]["name"], 0,
            trainer_metrics(0.1, artifact="s3://adapters/test/escape/../other-job/"))
    obj = wait_phase(cluster, "ftj", namespace, "escape", "Failed", timeout=60)
    failed = next(c for c in obj["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "ArtifactOutsideOutput"
    assert "s3://adapters/test/escape/" in failed["message"]
    assert "artifact" not in obj["status"]
