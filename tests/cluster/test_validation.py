"""Invalid FineTuneJobs are rejected by `kubectl apply` itself (CRD schema + CEL rules),
with a message naming the field: nothing reaches the controller."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from tests.support import Cluster

pytestmark = pytest.mark.cluster

VALID: dict[str, Any] = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "v"},
    "spec": {
        "model": {"uri": "s3://models/llama"},
        "data": {"train": "s3://d/train.jsonl", "eval": "s3://d/eval.jsonl", "format": "chat"},
        "method": {"type": "lora", "rank": 16, "alpha": 32},
        "training": {"globalBatchSize": 64, "microBatchSize": 4},
        "distributed": {"nodes": 2, "gpusPerNode": 8},
        "output": {"uri": "s3://adapters/x/"},
    },
}


def _set(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    node = out
    keys = path.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    if value is _DELETE:
        node.pop(keys[-1], None)
    else:
        node[keys[-1]] = value
    return out


_DELETE = object()

# (case id, field path in the object, new value, text the error must contain)
CASES = [
    ("rank-negative", "spec.method.rank", -4, "rank"),
    ("rank-string", "spec.method.rank", "sixteen", "rank"),
    ("rank-zero", "spec.method.rank", 0, "rank"),
    ("unknown-method", "spec.method.type", "lorax", "type"),
    ("bad-model-scheme", "spec.model.uri", "ftp://models/llama", "uri"),
    ("bad-data-scheme", "spec.data.train", "http://x/train.jsonl", "train"),
    ("bad-output-scheme", "spec.output.uri", "gs://bucket/x", "uri"),
    ("missing-model", "spec.model", _DELETE, "model"),
    ("missing-output", "spec.output", _DELETE, "output"),
    ("batch-not-divisible", "spec.training.globalBatchSize", 60, "globalBatchSize"),
    ("micro-batch-zero", "spec.training.microBatchSize", 0, "microBatchSize"),
    ("lr-negative", "spec.training.learningRate", -0.1, "learningRate"),
    ("epochs-zero", "spec.training.epochs", 0, "epochs"),
    ("unknown-precision", "spec.training.precision", "fp8x", "precision"),
    ("dropout-above-one", "spec.method.dropout", 1.5, "dropout"),
    ("unknown-format", "spec.data.format", "csv", "format"),
    ("nodes-zero", "spec.distributed.nodes", 0, "nodes"),
    ("zero-stage-5", "spec.distributed.deepspeed", {"zeroStage": 5}, "zeroStage"),
    ("percent-too-high", "spec.method.trainableParamPercent", 150.0, "trainableParamPercent"),
    ("misspelt-field", "spec.method.rnak", 8, "rnak"),
    ("misspelt-top-field", "spec.trainng", {"epochs": 1}, "trainng"),
    ("negative-backoff", "spec.backoffLimit", -1, "backoffLimit"),
    ("seq-length-tiny", "spec.data.maxSeqLength", 1, "maxSeqLength"),
    ("env-value-and-secret", "spec.pod.env",
     [{"name": "WANDB_API_KEY", "value": "k",
       "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "api-key"}}}],
     "spec.pod.env[0].valueFrom: Invalid value: \"object\": pod.env: set either value"),
    ("env-secret-bad-name", "spec.pod.env",
     [{"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "W&B", "key": "k"}}}],
     "spec.pod.env[0].valueFrom.secretKeyRef.name"),
    ("env-secret-dotdot-key", "spec.pod.env",
     [{"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "wandb", "key": ".."}}}],
     "secretKeyRef.key: a Secret key is letters"),
    ("env-secret-reserved-name", "spec.pod.env",
     [{"name": "AWS_SECRET_ACCESS_KEY",
       "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "k"}}}],
     "pod.env must not set a variable kubetune owns"),
    ("env-too-many-secrets", "spec.pod.env",
     [{"name": f"V{i}", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}
      for i in range(9)],
     "pod.env may take at most 8 variables from Secrets"),
]


@pytest.mark.parametrize(
    ("path", "value", "needle"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_invalid_spec_rejected_naming_the_field(
    cluster: Cluster, namespace: str, crds: None, path: str, value: Any, needle: str
) -> None:
    doc = _set(VALID, path, value)
    res = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(doc), check=False)
    assert res.returncode != 0, f"{path}={value!r} was accepted"
    assert needle in res.stderr, res.stderr
    assert cluster.kubectl("get", "ftj", "-n", namespace, "-o", "name").stdout.strip() == ""


def test_cross_field_rules(cluster: Cluster, namespace: str, crds: None) -> None:
    qlora_cpu = _set(
        _set(_set(VALID, "spec.method.type", "qlora"), "spec.distributed.gpusPerNode", 0),
        "spec.training.globalBatchSize",
        8,
    )
    res = cluster.kubectl(
        "apply", "-n", namespace, "-f", "-", input=json.dumps(qlora_cpu), check=False
    )
    assert res.returncode != 0 and "qlora" in res.stderr and "gpusPerNode" in res.stderr

    prefix = _set(_set(VALID, "spec.method", {"type": "prefix"}), "spec.method.type", "prefix")
    res = cluster.kubectl(
        "apply", "-n", namespace, "-f", "-", input=json.dumps(prefix), check=False
    )
    assert res.returncode != 0 and "numVirtualTokens" in res.stderr


def test_valid_spec_gets_defaults(cluster: Cluster, namespace: str, crds: None) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(VALID))
    obj = json.loads(cluster.kubectl("get", "ftj", "v", "-n", namespace, "-o", "json").stdout)
    assert obj["spec"]["training"]["epochs"] >= 1
    assert obj["spec"]["backoffLimit"] == 3
    explained = cluster.kubectl("explain", "ftj.spec.method").stdout
    assert "rank" in explained and "trainableParamPercent" in explained
