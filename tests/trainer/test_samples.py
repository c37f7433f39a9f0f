"""output.samples: the trained model completes the first N eval prompts greedily at the end;
kubetune.json holds them as {prompt, completion}, and `kubetune status` shows them."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from orchestrator import storage
from tests.trainer import helpers

pytestmark = pytest.mark.trainer


@pytest.mark.parametrize(("fmt", "n"), [("chat", 3), ("text", 0)])
def test_kubetune_json_holds_n_greedy_samples(tmp_path: Path, tiny_models: dict[str, Path],
                                              data_dir: Path, fmt: str, n: int) -> None:
    cfg = helpers.trainer_config(
        tmp_path / "c.json", job=f"samples-{fmt}", model_dir=tiny_models["qwen2"],
        data_dir=data_dir, output=f"file://{tmp_path}/store", fmt=fmt,
        training={"maxSteps": 4, "evalEvery": 4}, output_options={"samples": n})
    proc = helpers.run_trainer(cfg, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    msg = helpers.termination(tmp_path)
    meta = json.loads(storage.read_text(msg["artifact"]["uri"] + "kubetune.json"))
    assert "samplesError" not in meta, meta.get("samplesError")
    assert len(meta["samples"]) == n
    eval_records = [json.loads(line) for line in (data_dir / "eval.jsonl").read_text().split(
        "\n") if line]
    for s, record in zip(meta["samples"], eval_records, strict=False):
        assert set(s) == {"prompt", "completion"} and isinstance(s["completion"], str)
        # the chat prompt is the rendered history up to the assistant's turn
        question = record["messages"][0]["content"]
        assert s["prompt"] == f"<|user|>{question}<|end|><|assistant|>"

    if n:  # kubetune status shows them (the CLI reads the artifact's kubetune.json)
        from rich.console import Console

        from orchestrator.cli import format as F
        from orchestrator.cli.main import _samples

        job = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
               "metadata": {"name": "samples-chat", "namespace": "default"},
               "spec": {}, "status": {"phase": "Succeeded", "artifact": msg["artifact"]}}
        shown = _samples(job)
        assert shown == meta["samples"]
        out = io.StringIO()
        Console(file=out, width=200).print(F.job_detail(job, shown))
        assert "Samples" in out.getvalue()
        assert eval_records[0]["messages"][0]["content"] in out.getvalue()
