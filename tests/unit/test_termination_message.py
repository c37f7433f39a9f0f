"""The termination message the controller reads: always valid JSON within the kubelet's 4 KiB,
whatever the trainer had to say."""

from __future__ import annotations

import json

import pytest

from orchestrator.trainer.artifact import MAX_TERMINATION_BYTES, termination_message
from orchestrator.trainer.errors import ExitCode

pytestmark = pytest.mark.unit

ARTIFACT = {"uri": "s3://adapters/team/job/", "sha256": "ab" * 32}


@pytest.mark.parametrize("text", ["x" * 10_000, "é€😀" * 3_000, "line\n" * 2_000])
def test_long_messages_are_shortened_never_cut_json(text: str) -> None:
    raw = termination_message(ExitCode.INTERNAL, text, artifact=ARTIFACT,
                              progress={"step": 3, "totalSteps": 9})
    assert len(raw) <= MAX_TERMINATION_BYTES
    doc = json.loads(raw)
    assert doc["exitCode"] == 1 and doc["reason"] == "TrainerError"
    assert doc["message"].endswith("…") and text.startswith(doc["message"][:-1])
    assert doc["artifact"] == ARTIFACT and doc["progress"] == {"step": 3, "totalSteps": 9}


def test_oversized_parts_are_dropped_least_important_first() -> None:
    metrics = {f"metric{i}": float(i) for i in range(400)}
    raw = termination_message(ExitCode.OK, "", metrics=metrics, artifact=ARTIFACT,
                              budget={"note": "n" * 500}, progress={"step": 9, "totalSteps": 9})
    doc = json.loads(raw)
    assert len(raw) <= MAX_TERMINATION_BYTES
    assert doc["status"] == "Succeeded" and doc["artifact"] == ARTIFACT
    assert "budget" not in doc and "progress" not in doc and "metrics" not in doc


def test_stopped_has_its_own_status() -> None:
    doc = json.loads(termination_message(ExitCode.STOPPED, "stopped by SIGTERM at step 7"))
    assert (doc["status"], doc["exitCode"], doc["reason"]) == ("Stopped", 75, "Stopped")
