"""Render: what the controller creates for a FineTuneJob (ConfigMap, Service, Indexed Job)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from orchestrator.api import FineTuneJobSpec, ProgressRef, SweepTrialRef, TrainerConfig
from orchestrator.render import (
    RenderDefaults,
    child_names,
    config_hash,
    render_all,
    render_configmap,
    render_deepspeed_config,
    render_job,
    render_service,
    render_trainer_config,
)

pytestmark = pytest.mark.unit

META = {"name": "support-lora", "namespace": "team-a", "uid": "uid-1"}
DEFAULTS = RenderDefaults(
    storage_endpoint="http://s3.default:8333", credentials_secret="default-s3"
)


def make_spec(**patch: Any) -> FineTuneJobSpec:
    doc: dict[str, Any] = {
        "model": {"uri": "s3://models/llama"},
        "data": {"train": "s3://d/t.jsonl", "eval": "s3://d/e.jsonl"},
        "output": {"uri": "s3://adapters/support/"},
        "training": {"globalBatchSize": 64, "microBatchSize": 2},
        "distributed": {"nodes": 2, "gpusPerNode": 8},
    }
    doc.update(patch)
    return FineTuneJobSpec.model_validate(doc)


def pod_spec(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["template"]["spec"]


def container(job: dict[str, Any]) -> dict[str, Any]:
    (c,) = pod_spec(job)["containers"]
    return c


def env_of(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container(job)["env"]}


def test_child_names_are_deterministic_per_attempt() -> None:
    names = child_names("support-lora", 3)
    assert (names.job, names.configmap, names.service) == (
        "support-lora-a3",
        "support-lora-a3-config",
        "support-lora-workers",
    )
    assert names.master_addr == "support-lora-a3-0.support-lora-workers"
    with pytest.raises(ValueError, match="attempt numbers start at 1"):
        child_names("x", 0)


def test_longest_allowed_names_fit_dns_labels() -> None:
    # CRD limits: name <= 52, backoffLimit <= 20 (attempt <= 21), nodes <= 256
    names = child_names("a" * 52, 21)
    assert len(f"{names.job}-255") <= 63 and len(names.service) <= 63


def test_indexed_job_gang() -> None:
    job = render_job(META, make_spec(), 1, DEFAULTS)
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    assert spec["backoffLimit"] == 0  # the controller restarts the whole gang
    assert spec["podFailurePolicy"]["rules"] == [
        {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    ]
    assert spec["suspend"] is False
    ps = pod_spec(job)
    assert ps["restartPolicy"] == "Never"
    assert ps["subdomain"] == "support-lora-workers"


def test_torchrun_rendezvous_on_pod_zero() -> None:
    job = render_job(META, make_spec(), 2, DEFAULTS)
    assert container(job)["args"] == [
        "torchrun",
        "--nnodes=2",
        "--nproc-per-node=8",
        "--node-rank=$(JOB_COMPLETION_INDEX)",
        "--master-addr=support-lora-a2-0.support-lora-workers",
        "--master-port=29500",
        "--rdzv-conf=timeout=600",  # spec.distributed.rendezvousTimeoutSeconds' default
        "-m",
        "orchestrator.trainer",
        "--config",
        "/etc/kubetune/config.json",
    ]
    env = env_of(job)
    assert env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    assert env["KUBETUNE_ATTEMPT"]["value"] == "2"


def test_gpu_cpu_memory_and_shm() -> None:
    spec = make_spec(
        resources={"gpu": "amd.com/gpu", "cpu": 32, "memory": "256Gi", "shmSize": "32Gi"}
    )
    job = render_job(META, spec, 1, DEFAULTS)
    res = container(job)["resources"]
    assert res["requests"] == {"amd.com/gpu": "8", "cpu": "32", "memory": "256Gi"}
    assert res["limits"] == {"amd.com/gpu": "8", "memory": "256Gi"}
    shm = next(v for v in pod_spec(job)["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container(job)["volumeMounts"]


def test_cpu_only_job_runs_one_process_per_pod_without_gpus() -> None:
    spec = make_spec(
        distributed={"nodes": 2, "gpusPerNode": 0},
        training={"globalBatchSize": 4, "microBatchSize": 2},
    )
    job = render_job(META, spec, 1, DEFAULTS)
    assert "--nproc-per-node=1" in container(job)["args"]
    assert "nvidia.com/gpu" not in json.dumps(container(job)["resources"])


def test_placement_is_copied() -> None:
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}
                ]
            }
        }
    }
    spec = make_spec(
        resources={
            "nodeSelector": {"nvidia.com/gpu.product": "H100"},
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ],
            "affinity": affinity,
        }
    )
    ps = pod_spec(render_job(META, spec, 1, DEFAULTS))
    assert ps["nodeSelector"] == {"nvidia.com/gpu.product": "H100"}
    assert ps["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert ps["affinity"] == affinity


def test_credentials_are_referenced_never_copied() -> None:
    spec = make_spec(storage={"endpoint": "http://s3.team:8333", "credentialsSecret": "team-s3"})
    objs = render_all(META, spec, 1, DEFAULTS)
    env = env_of(objs[2])
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key] == {
            "name": key,
            "valueFrom": {"secretKeyRef": {"name": "team-s3", "key": key}},
        }
    assert env["AWS_ENDPOINT_URL_S3"]["value"] == "http://s3.team:8333"  # the spec wins
    # the only places the Secret appears are references (by name)
    config = json.loads(objs[0]["data"]["config.json"])
    assert config["spec"]["storage"]["credentialsSecret"] == "team-s3"
    assert "envFrom" not in container(objs[2])


def test_controller_defaults_fill_missing_storage_and_image() -> None:
    job = render_job(META, make_spec(), 1, DEFAULTS)
    env = env_of(job)
    assert env["AWS_ENDPOINT_URL_S3"]["value"] == "http://s3.default:8333"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "default-s3"
    assert container(job)["image"] == DEFAULTS.image
    custom = render_job(META, make_spec(image="registry.local/trainer:dev"), 1, DEFAULTS)
    assert container(custom)["image"] == "registry.local/trainer:dev"
    bare = render_job(META, make_spec(), 1, RenderDefaults())
    assert not any(k.startswith("AWS_") for k in env_of(bare))


def test_pod_security() -> None:
    job = render_job(META, make_spec(), 1, DEFAULTS)
    ps = pod_spec(job)
    assert ps["securityContext"]["runAsNonRoot"] is True
    assert ps["automountServiceAccountToken"] is False
    c = container(job)
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
    }
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert c["terminationMessagePath"] == "/dev/termination-log"


def test_labels_and_owner_references() -> None:
    for obj in render_all(META, make_spec(), 1, DEFAULTS):
        meta = obj["metadata"]
        assert meta["namespace"] == "team-a"
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "kubetune.io/v1alpha1",
                "kind": "FineTuneJob",
                "name": "support-lora",
                "uid": "uid-1",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        labels = meta["labels"]
        assert labels["app.kubernetes.io/name"] == "kubetune"
        assert labels["app.kubernetes.io/managed-by"] == "kubetune"
        assert labels["kubetune.io/job"] == "support-lora"
        assert "kubetune.io/sweep" not in labels


def test_service_selects_the_trainer_pods() -> None:
    svc = render_service(META, make_spec())
    job = render_job(META, make_spec(), 1, DEFAULTS)
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert svc["metadata"]["name"] == pod_spec(job)["subdomain"]


def test_sweep_trial_labels_and_report_token() -> None:
    ref = SweepTrialRef(name="sw", trial_number=4, report_url="http://ctl:8081", token="kt1.t")
    meta = {**META, "name": "sw-4"}
    objs = render_all(meta, make_spec(), 1, DEFAULTS, ref)
    for obj in objs:
        assert obj["metadata"]["labels"]["kubetune.io/sweep"] == "sw"
        assert obj["metadata"]["labels"]["kubetune.io/trial"] == "4"
    assert objs[2]["spec"]["template"]["metadata"]["labels"]["kubetune.io/trial"] == "4"
    assert env_of(objs[2])["KUBETUNE_REPORT_TOKEN"] == {"name": "KUBETUNE_REPORT_TOKEN",
                                                        "value": "kt1.t"}
    config = json.loads(objs[0]["data"]["config.json"])
    assert config["sweep"]["reportUrl"] == "http://ctl:8081"
    # the token lives in the pods' env only: never in the ConfigMap (kubetune.json) or a repr
    assert "kt1.t" not in objs[0]["data"]["config.json"] and "kt1.t" not in repr(ref)
    # labels already on the FineTuneJob are enough too
    labelled = {**meta, "labels": {"kubetune.io/sweep": "sw", "kubetune.io/trial": "4"}}
    assert render_service(labelled)["metadata"]["labels"]["kubetune.io/trial"] == "4"


def test_progress_link_and_token_reach_every_job() -> None:
    progress = ProgressRef(url="http://ctl:8081/report", interval_seconds=5, token="kt1.job")
    cm, _, job = render_all(META, make_spec(), 1, DEFAULTS, None, progress)
    assert env_of(job)["KUBETUNE_REPORT_TOKEN"]["value"] == "kt1.job"
    config = json.loads(cm["data"]["config.json"])
    assert config["progress"] == {"url": "http://ctl:8081/report",
                                  "tokenEnv": "KUBETUNE_REPORT_TOKEN", "intervalSeconds": 5.0}
    assert "kt1.job" not in cm["data"]["config.json"]
    # a trial's pods hold the trial token (it posts progress too): one variable, one value
    ref = SweepTrialRef(name="sw", trial_number=1, report_url="http://ctl:8081", token="kt1.t")
    _, _, trial = render_all({**META, "name": "sw-1"}, make_spec(), 1, DEFAULTS, ref, progress)
    names = [e["name"] for e in container(trial)["env"]]
    assert names.count("KUBETUNE_REPORT_TOKEN") == 1
    assert env_of(trial)["KUBETUNE_REPORT_TOKEN"]["value"] == "kt1.t"


def test_queue_name_creates_a_suspended_job_for_kueue() -> None:
    job = render_job(META, make_spec(queueName="gpu-queue"), 1, DEFAULTS)
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    suspended = render_job(META, make_spec(suspend=True), 1, DEFAULTS)
    assert suspended["spec"]["suspend"] is True
    assert "kueue.x-k8s.io/queue-name" not in suspended["metadata"]["labels"]


def test_pvc_uris_are_mounted() -> None:
    spec = make_spec(
        model={"uri": "pvc://models/llama"},
        data={"train": "pvc://data/t.jsonl", "eval": "pvc://data/e.jsonl"},
        output={"uri": "pvc://adapters/out/"},
    )
    job = render_job(META, spec, 1, DEFAULTS)
    pvcs = {
        v["persistentVolumeClaim"]["claimName"]: v["persistentVolumeClaim"]["readOnly"]
        for v in pod_spec(job)["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert pvcs == {"adapters": False, "data": True, "models": True}
    mounts = {m["mountPath"] for m in container(job)["volumeMounts"]}
    assert {"/mnt/pvc/adapters", "/mnt/pvc/data", "/mnt/pvc/models"} <= mounts
    config = render_trainer_config(META, spec, 1, DEFAULTS)
    assert config.local_path(spec.model.uri) == "/mnt/pvc/models/llama"


def test_train_mix_and_replay_claims_are_mounted() -> None:
    spec = make_spec(
        data={"train": None, "eval": "s3://d/e.jsonl",
              "trainMix": [{"uri": "pvc://mix-a/a.jsonl", "weight": 1},
                           {"uri": "pvc://mix-b/b/", "weight": 2}],
              "replay": {"uri": "pvc://general/g.jsonl"}},
    )
    job = render_job(META, spec, 1, DEFAULTS)
    pvcs = {
        v["persistentVolumeClaim"]["claimName"]: v["persistentVolumeClaim"]["readOnly"]
        for v in pod_spec(job)["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert pvcs == {"general": True, "mix-a": True, "mix-b": True}


def test_configmap_carries_the_trainer_config() -> None:
    spec = make_spec()
    cm = render_configmap(META, spec, 3, DEFAULTS)
    assert cm["metadata"]["name"] == "support-lora-a3-config"
    config = TrainerConfig.from_json(cm["data"]["config.json"])
    assert config == render_trainer_config(META, spec, 3, DEFAULTS)
    assert config.attempt == 3 and config.spec.storage.endpoint == "http://s3.default:8333"
    assert json.loads(cm["data"]["ds_config.json"]) == config.deepspeed
    assert {"name": "config", "mountPath": "/etc/kubetune", "readOnly": True} in container(
        render_job(META, spec, 3, DEFAULTS)
    )["volumeMounts"]


def test_spec_hash_changes_with_the_spec() -> None:
    a = render_trainer_config(META, make_spec(), 1, DEFAULTS)
    b = render_trainer_config(META, make_spec(method={"rank": 32}), 1, DEFAULTS)
    assert config_hash(a) != config_hash(b)
    job = render_job(META, make_spec(), 1, DEFAULTS)
    assert job["metadata"]["annotations"]["kubetune.io/spec-hash"] == config_hash(a)


# --- DeepSpeed ---------------------------------------------------------------------------------


def test_deepspeed_batch_arithmetic_and_precision() -> None:
    ds = render_deepspeed_config(make_spec())
    assert ds["train_batch_size"] == 64
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 2  # 64 / (2 x 2 nodes x 8 GPUs)
    assert ds["gradient_clipping"] == 1.0
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    assert ds["zero_optimization"]["stage"] == 2
    fp16 = render_deepspeed_config(
        make_spec(training={"globalBatchSize": 64, "microBatchSize": 2, "precision": "fp16"})
    )
    assert fp16["fp16"]["enabled"] is True and fp16["fp16"]["loss_scale"] == 0


def test_deepspeed_offload_and_stage3() -> None:
    ds = render_deepspeed_config(
        make_spec(
            distributed={
                "nodes": 2,
                "gpusPerNode": 8,
                "deepspeed": {"zeroStage": 3, "offload": "cpu"},
            }
        )
    )
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    # bucket sizes and the persistence threshold are sized from the model by transformers
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size",
                "stage3_param_persistence_threshold"):
        assert zero[key] == "auto", key
    stage2 = render_deepspeed_config(
        make_spec(
            distributed={
                "nodes": 2,
                "gpusPerNode": 8,
                "deepspeed": {"zeroStage": 2, "offload": "cpu"},
            }
        )
    )
    assert "offload_param" not in stage2["zero_optimization"]
    # Offloaded optimizer states are stepped by DeepSpeed's CPUAdam ("auto" = the trainer's
    # hyperparameters), never by a client torch optimizer.
    for offloaded in (ds, stage2):
        assert offloaded["optimizer"] == {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        }
    on_gpu = render_deepspeed_config(
        make_spec(distributed={"nodes": 1, "gpusPerNode": 8, "deepspeed": {"zeroStage": 2}})
    )
    assert "optimizer" not in on_gpu


def test_user_deepspeed_config_is_deep_merged_over_the_generated_one() -> None:
    ds = render_deepspeed_config(
        make_spec(
            distributed={
                "nodes": 2,
                "gpusPerNode": 8,
                "deepspeed": {
                    "zeroStage": 2,
                    "config": {
                        "zero_optimization": {
                            "overlap_comm": False,
                            "reduce_bucket_size": 500000000,
                        },
                        "gradient_clipping": 0.3,
                        "flops_profiler": {"enabled": True},
                    },
                },
            }
        )
    )
    assert ds["zero_optimization"] == {
        "stage": 2,
        "overlap_comm": False,
        "contiguous_gradients": True,
        "reduce_bucket_size": 500000000,
    }
    assert ds["gradient_clipping"] == 0.3
    assert ds["flops_profiler"] == {"enabled": True}
    assert ds["train_batch_size"] == 64  # generated keys the user did not touch survive
