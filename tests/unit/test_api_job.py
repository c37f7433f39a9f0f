"""FineTuneJob spec models: defaults, ranges, URI schemes and cross-field rules.

Each invalid spec must be rejected with a message that names the field (and, for rules that
the API server also checks, exactly the message of the CRD's CEL rule).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from pydantic import ValidationError

from orchestrator.api import FineTuneJobSpec, format_errors
from orchestrator.api.crdgen import crds

pytestmark = pytest.mark.unit

BASE: dict[str, Any] = {
    "model": {"uri": "s3://models/llama-3.2-1b"},
    "data": {"train": "s3://datasets/t.jsonl", "eval": "s3://datasets/e.jsonl"},
    "output": {"uri": "s3://adapters/support/"},
}


def spec_with(patch: dict[str, Any]) -> dict[str, Any]:
    """BASE with `patch` merged in (nested dicts merge, None deletes a key)."""
    out = copy.deepcopy(BASE)

    def merge(dst: dict[str, Any], src: dict[str, Any]) -> None:
        for k, v in src.items():
            if v is None:
                dst.pop(k, None)
            elif isinstance(v, dict) and isinstance(dst.get(k), dict):
                merge(dst[k], v)
            else:
                dst[k] = v

    merge(out, patch)
    return out


def errors_of(patch: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as info:
        FineTuneJobSpec.model_validate(spec_with(patch))
    return format_errors(info.value, "spec")


def cel_messages() -> set[str]:
    out: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for rule in node.get("x-kubernetes-validations", []):
                out.add(rule["message"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(crds())
    return out


def test_minimal_spec_gets_documented_defaults() -> None:
    spec = FineTuneJobSpec.model_validate(BASE)
    wire = spec.to_wire()
    assert wire["method"] == {
        "type": "lora",
        "dropout": 0.05,
        "targetModules": "all-linear",
        "useRslora": False,
    }
    assert wire["distributed"] == {
        "nodes": 1,
        "gpusPerNode": 1,
        "deepspeed": {"zeroStage": 2, "offload": "none", "config": {}},
        "rendezvousTimeoutSeconds": 600,
        "collectiveTimeoutSeconds": 600,
    }
    assert wire["pod"] == {"imagePullSecrets": [], "env": [], "annotations": {}, "labels": {}}
    assert wire["training"]["precision"] == "bf16"
    assert wire["backoffLimit"] == 3 and wire["suspend"] is False
    assert spec.method.effective_rank == 8 and spec.method.effective_alpha == 16.0
    # re-validating the wire form is lossless
    assert FineTuneJobSpec.model_validate(wire) == spec


def test_snake_case_names_are_accepted_from_python() -> None:
    spec = FineTuneJobSpec.model_validate(
        spec_with({"training": {"global_batch_size": 32, "micro_batch_size": 2}})
    )
    assert spec.training.global_batch_size == 32
    assert spec.to_wire()["training"]["globalBatchSize"] == 32


def test_budget_without_rank_leaves_rank_to_the_solver() -> None:
    spec = FineTuneJobSpec.model_validate(spec_with({"method": {"trainableParamPercent": 1.0}}))
    assert spec.method.rank is None and spec.method.effective_rank is None


def test_quantities_accept_yaml_integers() -> None:
    spec = FineTuneJobSpec.model_validate(spec_with({"resources": {"cpu": 16, "memory": "200Gi"}}))
    assert spec.resources.cpu == "16" and spec.resources.memory == "200Gi"


def test_world_size_and_gradient_accumulation() -> None:
    spec = FineTuneJobSpec.model_validate(
        spec_with(
            {
                "distributed": {"nodes": 2, "gpusPerNode": 8},
                "training": {"globalBatchSize": 64, "microBatchSize": 2},
            }
        )
    )
    assert spec.distributed.world_size == 16
    assert spec.gradient_accumulation_steps == 2
    cpu = FineTuneJobSpec.model_validate(spec_with({"distributed": {"nodes": 2, "gpusPerNode": 0}}))
    assert cpu.distributed.world_size == 2  # one CPU process per pod


# (patch, text the error must contain: the field path, and a hint of the fix)
INVALID: list[tuple[str, dict[str, Any], list[str]]] = [
    ("misspelt field", {"method": {"rnak": 8}}, ["spec.method.rnak", "did you mean 'rank'"]),
    ("misspelt top-level field", {"trainig": {}}, ["spec.trainig", "did you mean 'training'"]),
    ("unknown method", {"method": {"type": "lorax"}}, ["spec.method.type", "'lora'"]),
    ("negative rank", {"method": {"rank": -4}}, ["spec.method.rank", "greater than or equal to 1"]),
    ("rank as text", {"method": {"rank": "sixteen"}}, ["spec.method.rank", "integer"]),
    ("rank too large", {"method": {"rank": 4096}}, ["spec.method.rank", "less than or equal"]),
    ("dropout of 1", {"method": {"dropout": 1.0}}, ["spec.method.dropout", "less than 1"]),
    ("budget of 0%", {"method": {"trainableParamPercent": 0}}, ["trainableParamPercent"]),
    ("budget over 100%", {"method": {"trainableParamPercent": 150}}, ["trainableParamPercent"]),
    ("rank on ia3", {"method": {"type": "ia3", "rank": 8}}, ["method.rank applies only to lora"]),
    ("rank on full", {"method": {"type": "full", "rank": 8}}, ["method.rank applies only"]),
    ("alpha on adapter", {"method": {"type": "adapter", "alpha": 8}}, ["method.alpha"]),
    (
        "prefix without tokens",
        {"method": {"type": "prefix"}},
        ["method.numVirtualTokens is required"],
    ),
    (
        "prompt without tokens",
        {"method": {"type": "prompt"}},
        ["method.numVirtualTokens is required"],
    ),
    (
        "tokens on lora",
        {"method": {"numVirtualTokens": 10}},
        ["method.numVirtualTokens applies only"],
    ),
    ("bottleneck on lora", {"method": {"bottleneck": 64}}, ["method.bottleneck"]),
    ("placement on lora", {"method": {"adapterPlacement": "houlsby"}}, ["method.adapterPlacement"]),
    ("bad placement", {"method": {"type": "adapter", "adapterPlacement": "middle"}}, ["'houlsby'"]),
    (
        "budget on full",
        {"method": {"type": "full", "trainableParamPercent": 1}},
        ["method.type full"],
    ),
    ("rslora on ia3", {"method": {"type": "ia3", "useRslora": True}}, ["method.useRslora"]),
    ("init on ia3", {"method": {"type": "ia3", "init": "pissa"}}, ["method.init applies only"]),
    ("unknown init", {"method": {"init": "kaiming"}}, ["spec.method.init", "'pissa'"]),
    (
        "loftq on lora",
        {"method": {"init": "loftq"}},
        ["method.init loftq applies only to method.type qlora", "use pissa"],
    ),
    (
        "pissa on dora",
        {"method": {"type": "dora", "init": "pissa"}},
        ["cannot be used with method.type dora", "magnitude vector"],
    ),
    (
        "olora with zero3",
        {"method": {"init": "olora"}, "distributed": {"deepspeed": {"zeroStage": 3}}},
        ["method.init pissa, olora and loftq cannot be used with", "use zeroStage 2"],
    ),
    (
        "lora plus on prompt",
        {"method": {"type": "prompt", "numVirtualTokens": 4, "loraPlusLrRatio": 16}},
        ["method.loraPlusLrRatio applies only"],
    ),
    ("lora plus below 1", {"method": {"loraPlusLrRatio": 0.5}}, ["spec.method.loraPlusLrRatio"]),
    (
        "lora plus with offload",
        {"method": {"loraPlusLrRatio": 16}, "distributed": {"deepspeed": {"offload": "cpu"}}},
        ["method.loraPlusLrRatio cannot be used with distributed.deepspeed.offload cpu"],
    ),
    (
        "lora plus with deepspeed optimizer",
        {
            "method": {"loraPlusLrRatio": 16},
            "distributed": {"deepspeed": {"config": {"optimizer": {"type": "AdamW"}}}},
        },
        ["an optimizer in distributed.deepspeed.config", "remove the optimizer key"],
    ),
    (
        "train and trainMix",
        {"data": {"trainMix": [{"uri": "s3://d/a.jsonl", "weight": 1},
                               {"uri": "s3://d/b.jsonl", "weight": 3}]}},
        ["set exactly one of data.train"],
    ),
    (
        "neither train nor trainMix",
        {"data": {"train": None}},
        ["set exactly one of data.train"],
    ),
    (
        "trainMix weight zero",
        {"data": {"train": None, "trainMix": [{"uri": "s3://d/a.jsonl", "weight": 0},
                                              {"uri": "s3://d/b.jsonl", "weight": 1}]}},
        ["spec.data.trainMix.0.weight", "greater than 0"],
    ),
    (
        "trainMix of one set",
        {"data": {"train": None, "trainMix": [{"uri": "s3://d/a.jsonl", "weight": 1}]}},
        ["spec.data.trainMix", "at least 2"],
    ),
    (
        "trainMix too long",
        {"data": {"train": None, "trainMix": [{"uri": f"s3://d/{i}.jsonl", "weight": 1}
                                              for i in range(17)]}},
        ["spec.data.trainMix", "at most 16"],
    ),
    (
        "trainMix duplicate uri",
        {"data": {"train": None, "trainMix": [{"uri": "s3://d/a.jsonl", "weight": 1},
                                              {"uri": "s3://d/a.jsonl", "weight": 2}]}},
        ["lists a uri twice"],
    ),
    (
        "trainMix http uri",
        {"data": {"train": None, "trainMix": [{"uri": "http://d/a.jsonl", "weight": 1},
                                              {"uri": "s3://d/b.jsonl", "weight": 2}]}},
        ["data.trainMix[].uri must be a URI"],
    ),
    (
        "merged prefix tuning",
        {"method": {"type": "prefix", "numVirtualTokens": 8}, "output": {"merged": True}},
        ["output.merged needs method.type lora, dora or ia3", "set output.merged to false"],
    ),
    (
        "merged bottleneck adapter",
        {"method": {"type": "adapter"}, "output": {"merged": True}},
        ["output.merged needs method.type lora, dora or ia3", "bottleneck layers (adapter)"],
    ),
    (
        "merged qlora",
        {"method": {"type": "qlora"}, "distributed": {"gpusPerNode": 1},
         "output": {"merged": True}},
        ["a qlora adapter fits the 4-bit base"],
    ),
    (
        "target module string",
        {"method": {"targetModules": "q_proj"}},
        ["spec.method.targetModules", "[q_proj, v_proj]"],
    ),
    (
        "empty target list",
        {"method": {"targetModules": []}},
        ["method.targetModules must not be an empty list"],
    ),
    (
        "duplicate target",
        {"method": {"targetModules": ["q_proj", "q_proj"]}},
        ["lists a module twice"],
    ),
    (
        "batch not divisible",
        {"training": {"globalBatchSize": 30, "microBatchSize": 4}},
        ["training.globalBatchSize must be divisible", "4 x 1 x 1 = 4"],
    ),
    (
        "batch vs world size",
        {"training": {"globalBatchSize": 64}, "distributed": {"nodes": 3, "gpusPerNode": 8}},
        ["training.globalBatchSize must be divisible", "1 x 3 x 8 = 24"],
    ),
    ("zero micro batch", {"training": {"microBatchSize": 0}}, ["spec.training.microBatchSize"]),
    (
        "negative learning rate",
        {"training": {"learningRate": -1e-4}},
        ["spec.training.learningRate", "greater than 0"],
    ),
    (
        "unknown precision",
        {"training": {"precision": "fp8"}},
        ["spec.training.precision", "'bf16'"],
    ),
    ("warmup over 1", {"training": {"warmupRatio": 1.5}}, ["spec.training.warmupRatio"]),
    ("epochs 0", {"training": {"epochs": 0}}, ["spec.training.epochs"]),
    ("empty chat template", {"data": {"chatTemplate": ""}}, ["spec.data.chatTemplate"]),
    (
        "huge chat template",
        {"data": {"chatTemplate": "x" * 40000}},
        ["spec.data.chatTemplate", "at most 32768"],
    ),
    (
        "early stopping patience 0",
        {"training": {"earlyStopping": {"patience": 0}}},
        ["spec.training.earlyStopping.patience", "greater than or equal to 1"],
    ),
    (
        "negative early stopping delta",
        {"training": {"earlyStopping": {"minDelta": -0.1}}},
        ["spec.training.earlyStopping.minDelta"],
    ),
    (
        "prefix with gradient checkpointing",
        {"method": {"type": "prefix", "numVirtualTokens": 8},
         "training": {"gradientCheckpointing": True}},
        ["method.type prefix cannot be combined with training.gradientCheckpointing",
         "set gradientCheckpointing to false"],
    ),
    (
        "qlora without gpus",
        {"method": {"type": "qlora"}, "distributed": {"gpusPerNode": 0}},
        ["method.type qlora needs GPUs", "gpusPerNode"],
    ),
    ("zero nodes", {"distributed": {"nodes": 0}}, ["spec.distributed.nodes"]),
    ("too many gpus", {"distributed": {"gpusPerNode": 17}}, ["spec.distributed.gpusPerNode"]),
    (
        "zero stage 4",
        {"distributed": {"deepspeed": {"zeroStage": 4}}},
        ["spec.distributed.deepspeed.zeroStage"],
    ),
    (
        "offload on stage 0",
        {"distributed": {"deepspeed": {"zeroStage": 0, "offload": "cpu"}}},
        ["offload cpu needs zeroStage"],
    ),
    (
        "offload to nvme",
        {"distributed": {"deepspeed": {"offload": "nvme"}}},
        ["spec.distributed.deepspeed.offload"],
    ),
    (
        "batch size in deepspeed config",
        {"distributed": {"deepspeed": {"config": {"train_batch_size": 8}}}},
        ["distributed.deepspeed.config.train_batch_size", "globalBatchSize"],
    ),
    (
        "http model uri",
        {"model": {"uri": "http://example.com/model"}},
        [
            "spec.model.uri",
            "model.uri must be a URI of the form s3://<bucket>/<key>",
            "got 'http://example.com/model'",
        ],
    ),
    (
        "http data uri",
        {"data": {"train": "https://huggingface.co/datasets/x"}},
        ["spec.data.train", "data.train must be a URI of the form s3://"],
    ),
    ("bare path eval", {"data": {"eval": "/data/eval.jsonl"}}, ["spec.data.eval", "file:///"]),
    ("hf output uri", {"output": {"uri": "hf://me/adapter"}}, ["spec.output.uri"]),
    (
        "pvc without claim",
        {"model": {"uri": "pvc:///models/x"}},
        ["spec.model.uri", "pvc://<claim>/<path>"],
    ),
    (
        "pvc claim uppercase",
        {"data": {"train": "pvc://Data/t.jsonl"}},
        ["spec.data.train", "pvc://<claim>/<path>"],
    ),
    ("missing model", {"model": None}, ["spec.model", "required"]),
    ("missing eval data", {"data": {"eval": None}}, ["spec.data.eval", "required"]),
    ("unknown data format", {"data": {"format": "csv"}}, ["spec.data.format"]),
    ("tiny max seq length", {"data": {"maxSeqLength": 4}}, ["spec.data.maxSeqLength"]),
    ("cpu quantity", {"resources": {"cpu": "lots"}}, ["spec.resources.cpu", "Kubernetes quantity"]),
    ("quantity with two points", {"resources": {"memory": "1.2.3"}},
     ["spec.resources.memory", "'1.2.3' is not a valid Kubernetes quantity"]),
    ("negative quantity", {"resources": {"memory": "-1Gi"}},
     ["spec.resources.memory", "Kubernetes quantity"]),
    ("a point as quantity", {"resources": {"cpu": "."}},
     ["spec.resources.cpu", "Kubernetes quantity"]),
    ("affinity with a foreign field", {"resources": {"affinity": {"nodeSelector": {"a": "b"}}}},
     ["resources.affinity.nodeSelector is not a field of a core/v1 Affinity"]),
    ("affinity too large",
     {"resources": {"affinity": {"nodeAffinity": {"note": "x" * 20000}}}},
     ["resources.affinity is 200", "at most 16384 are allowed"]),
    ("deepspeed config too large",
     {"distributed": {"deepspeed": {"config": {"note": "x" * 40000}}}},
     ["distributed.deepspeed.config is 400", "at most 32768 are allowed"]),
    ("gpu resource name", {"resources": {"gpu": "gpu"}}, ["spec.resources.gpu", "nvidia.com/gpu"]),
    (
        "toleration Exists with value",
        {"resources": {"tolerations": [{"key": "k", "operator": "Exists", "value": "v"}]}},
        ["operator Exists must not set value"],
    ),
    (
        "storage endpoint scheme",
        {"storage": {"endpoint": "s3.storage:8333"}},
        ["spec.storage.endpoint", "http://"],
    ),
    (
        "secret name",
        {"storage": {"credentialsSecret": "S3_Creds"}},
        ["spec.storage.credentialsSecret"],
    ),
    ("queue name", {"queueName": "GPU Queue"}, ["spec.queueName", "LocalQueue"]),
    ("backoff limit", {"backoffLimit": 50}, ["spec.backoffLimit"]),
    # --- spec.pod, extra resources, model cache, timeouts: hostile input -----------------
    (
        "env shadows torchrun",
        {"pod": {"env": [{"name": "MASTER_ADDR", "value": "evil"}]}},
        ["spec.pod.env.0.name", "pod.env must not set a variable kubetune owns",
         "MASTER_ADDR is set by torchrun from spec.distributed"],
    ),
    (
        "env shadows kubetune",
        {"pod": {"env": [{"name": "KUBETUNE_CONFIG", "value": "/tmp/x"}]}},
        ["spec.pod.env.0.name", "KUBETUNE_CONFIG is set by kubetune", "remove it"],
    ),
    (
        "env widens gpus",
        {"pod": {"env": [{"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"}]}},
        ["spec.pod.env.0.name", "gpusPerNode through the device plugin"],
    ),
    (
        "env sets storage keys",
        {"pod": {"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}]}},
        ["spec.pod.env.0.name", "spec.storage", "serviceAccountName"],
    ),
    (
        "env name syntax",
        {"pod": {"env": [{"name": "1-BAD", "value": "x"}]}},
        ["spec.pod.env.0.name", "not a valid variable name"],
    ),
    (
        "env set twice",
        {"pod": {"env": [{"name": "NCCL_DEBUG", "value": "INFO"}, {"name": "NCCL_DEBUG"}]}},
        ["spec.pod.env", "sets NCCL_DEBUG twice"],
    ),
    (
        "too many env",
        {"pod": {"env": [{"name": f"V{i}"} for i in range(65)]}},
        ["spec.pod.env", "at most 64"],
    ),
    (
        "env value too long",
        {"pod": {"env": [{"name": "X", "value": "x" * 5000}]}},
        ["spec.pod.env.0.value"],
    ),
    (
        "kubetune label",
        {"pod": {"labels": {"kubetune.io/job": "other"}}},
        ["spec.pod.labels", "reserved kubetune.io prefix", "use a prefix of your own"],
    ),
    (
        "kubernetes label",
        {"pod": {"labels": {"app.kubernetes.io/instance": "x"}}},
        ["spec.pod.labels", "reserved kubernetes.io prefix"],
    ),
    (
        "label value",
        {"pod": {"labels": {"example.com/team": "a b"}}},
        ["spec.pod.labels", "not a valid label value"],
    ),
    (
        "label key",
        {"pod": {"labels": {"Example.com/team": "a"}}},
        ["spec.pod.labels", "not a valid Kubernetes key"],
    ),
    (
        "cdi annotation",
        {"pod": {"annotations": {"cdi.k8s.io/gpus": "nvidia.com/gpu=all"}}},
        ["spec.pod.annotations", "cdi.k8s.io", "remove it"],
    ),
    (
        "apparmor annotation",
        {"pod": {"annotations": {
            "container.apparmor.security.beta.kubernetes.io/trainer": "unconfined"}}},
        ["spec.pod.annotations", "reserved"],
    ),
    (
        "runtime annotation",
        {"pod": {"annotations": {"io.kubernetes.cri-o.Devices": "/dev/mem"}}},
        ["spec.pod.annotations", "reserved"],
    ),
    (
        "service account name",
        {"pod": {"serviceAccountName": "Cluster_Admin"}},
        ["spec.pod.serviceAccountName", "ServiceAccount name"],
    ),
    (
        "system priority class",
        {"pod": {"priorityClassName": "system-node-critical"}},
        ["spec.pod.priorityClassName", "system- priority class"],
    ),
    (
        "pull secret name",
        {"pod": {"imagePullSecrets": [{"name": "Reg Cred"}]}},
        ["spec.pod.imagePullSecrets.0.name"],
    ),
    (
        "gpu as extended resource",
        {"resources": {"extendedResources": {"nvidia.com/gpu": 8}}},
        ["spec.resources.extendedResources", "distributed.gpusPerNode"],
    ),
    (
        "core resource as extended",
        {"resources": {"extendedResources": {"memory": 8}}},
        ["spec.resources.extendedResources", "not an extended resource name"],
    ),
    (
        "kubernetes.io extended resource",
        {"resources": {"extendedResources": {"hugepages.kubernetes.io/x": 1}}},
        ["spec.resources.extendedResources", "kubernetes.io domain"],
    ),
    (
        "fractional extended resource",
        {"resources": {"extendedResources": {"vpc.amazonaws.com/efa": 0}}},
        ["spec.resources.extendedResources.vpc.amazonaws.com/efa", "greater than or equal to 1"],
    ),
    (
        "ephemeral storage quantity",
        {"resources": {"ephemeralStorage": "lots"}},
        ["spec.resources.ephemeralStorage", "Kubernetes quantity"],
    ),
    (
        "workspace size quantity",
        {"resources": {"workspaceSize": "big"}},
        ["spec.resources.workspaceSize", "Kubernetes quantity"],
    ),
    (
        "cache claim name",
        {"model": {"cacheClaim": "../etc"}},
        ["spec.model.cacheClaim", "PersistentVolumeClaim name"],
    ),
    (
        "rendezvous timeout too short",
        {"distributed": {"rendezvousTimeoutSeconds": 5}},
        ["spec.distributed.rendezvousTimeoutSeconds"],
    ),
    (
        "collective timeout too short",
        {"distributed": {"collectiveTimeoutSeconds": 10}},
        ["spec.distributed.collectiveTimeoutSeconds"],
    ),
]


@pytest.mark.parametrize(("case", "patch", "expected"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_spec_is_rejected_naming_the_field(
    case: str, patch: dict[str, Any], expected: list[str]
) -> None:
    message = errors_of(patch)
    for text in expected:
        assert text in message, f"{case}: {text!r} not in {message!r}"


def test_enough_distinct_invalid_cases() -> None:
    assert len(INVALID) >= 40


# Rules the API server enforces with CEL: the pydantic message must be the CEL message, so
# `kubectl apply` and the controller/local runs say the same thing.
CEL_PARITY = [
    {"method": {"type": "ia3", "rank": 8}},
    {"method": {"type": "prefix"}},
    {"method": {"numVirtualTokens": 10}},
    {"method": {"bottleneck": 64}},
    {"method": {"type": "full", "trainableParamPercent": 1}},
    {"training": {"globalBatchSize": 30, "microBatchSize": 4}},
    {"method": {"type": "qlora"}, "distributed": {"gpusPerNode": 0}},
    {"distributed": {"deepspeed": {"zeroStage": 0, "offload": "cpu"}}},
    {"resources": {"tolerations": [{"key": "k", "operator": "Exists", "value": "v"}]}},
    {"pod": {"env": [{"name": "WORLD_SIZE", "value": "1"}]}},
    {"pod": {"priorityClassName": "system-cluster-critical"}},
    {"method": {"type": "prompt", "numVirtualTokens": 4}, "output": {"merged": True}},
    {"data": {"train": None}},
    {"data": {"train": None, "trainMix": [{"uri": "s3://d/a.jsonl", "weight": 1},
                                          {"uri": "s3://d/a.jsonl", "weight": 2}]}},
]


@pytest.mark.parametrize("patch", CEL_PARITY)
def test_pydantic_and_cel_messages_agree(patch: dict[str, Any]) -> None:
    message = errors_of(patch)
    assert any(m in message for m in cel_messages()), message


def test_hf_datasets_are_data_uris() -> None:
    spec = FineTuneJobSpec.model_validate(spec_with({"data": {
        "train": "hf://org/chats@v1.0:train", "eval": "hf://org/chats:test",
        "general": "hf://org/wiki"}}))
    assert spec.data.train == "hf://org/chats@v1.0:train"


def test_train_mix_replaces_train() -> None:
    spec = FineTuneJobSpec.model_validate(spec_with({"data": {"train": None, "trainMix": [
        {"uri": "s3://d/a.jsonl", "weight": 1},
        {"uri": "pvc://data/b", "weight": 2.5, "format": "text"}]}}))
    assert spec.data.train is None
    assert spec.data.train_uris == ["s3://d/a.jsonl", "pvc://data/b"]
    assert spec.data.train_mix is not None and spec.data.train_mix[1].format == "text"
    assert spec.to_wire()["data"]["trainMix"][1] == {"uri": "pvc://data/b", "weight": 2.5,
                                                     "format": "text"}


def test_several_errors_are_all_reported() -> None:
    message = errors_of({"method": {"rank": 0}, "training": {"precision": "fp8"}})
    assert "spec.method.rank" in message and "spec.training.precision" in message
