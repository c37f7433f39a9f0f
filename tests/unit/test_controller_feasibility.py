"""The budget pre-check of sweep trials runs in the controller, the most privileged pod:
it must never become a way to make that pod fetch from an address a user chose, or read a
file of its own filesystem."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from orchestrator.api import FineTuneJobSpec
from orchestrator.controller.feasibility import BudgetChecker

pytestmark = pytest.mark.unit

CONFIG = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
          "vocab_size": 256}


class FakeKube:
    def __init__(self) -> None:
        self.secret_reads: list[tuple[str, str]] = []

    def get_secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        self.secret_reads.append((namespace, name))
        return {}


def _spec(model: str, **storage: Any) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate({
        "model": {"uri": model},
        "data": {"train": "s3://d/train.jsonl", "eval": "s3://d/eval.jsonl"},
        "method": {"type": "lora", "rank": 8, "trainableParamPercent": 1.0},
        "output": {"uri": "s3://out/"},
        "storage": {"credentialsSecret": "creds", **storage},
    })


def test_only_the_platforms_object_store_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    fetched: list[tuple[str, str | None]] = []

    def read_text(uri: str, **opts: Any) -> str:
        fetched.append((uri, opts["s3"].endpoint_url))
        return json.dumps(CONFIG)

    monkeypatch.setattr("orchestrator.storage.read_text", read_text)
    kube = FakeKube()
    checker = BudgetChecker(kube, default_secret="creds",  # type: ignore[arg-type]
                            default_endpoint="http://s3.storage:8333")

    # the platform's store: read with the job's Secret, the shape comes back
    assert checker.shape("team", _spec("s3://models/llama")) is not None
    assert fetched == [("s3://models/llama/config.json", "http://s3.storage:8333")]
    assert kube.secret_reads == [("team", "creds")]

    # a user-chosen endpoint (an internal service, the cloud metadata address): no request,
    # no Secret read; the trainer checks the budget in its own pod instead
    for endpoint in ("http://169.254.169.254", "http://kubernetes.default.svc"):
        fetched.clear()
        kube.secret_reads.clear()
        assert checker.shape("team", _spec("s3://models/other", endpoint=endpoint)) is None
        assert fetched == [] and kube.secret_reads == []


def test_a_file_model_is_never_read_from_the_controllers_filesystem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    reads: list[str] = []
    monkeypatch.setattr("orchestrator.storage.read_text", lambda uri, **_: reads.append(uri))
    checker = BudgetChecker(FakeKube())  # type: ignore[arg-type]
    assert checker.shape("team", _spec(f"file://{tmp_path}")) is None
    assert reads == []


def test_an_endpoint_the_operator_trusts_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    fetched: list[str | None] = []

    def read_text(uri: str, **opts: Any) -> str:
        fetched.append(opts["s3"].endpoint_url)
        return json.dumps(CONFIG)

    monkeypatch.setattr("orchestrator.storage.read_text", read_text)
    checker = BudgetChecker(FakeKube(), default_endpoint="http://s3.storage:8333",  # type: ignore[arg-type]
                            trusted_endpoints=["http://minio.team-a:9000"])
    assert checker.shape("team", _spec("s3://m/x", endpoint="http://minio.team-a:9000"))
    assert fetched == ["http://minio.team-a:9000"]
