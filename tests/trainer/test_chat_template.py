"""data.chatTemplate replaces the tokenizer's chat template: the training text is rendered
with it (and the loss still covers exactly the assistant turns), the artifact's tokenizer
carries it, the generation samples' prompts use it, and a template that does not compile
fails the job before anything is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator import storage
from orchestrator.api import TrainerConfig
from orchestrator.trainer.data import IGNORE
from orchestrator.trainer.run import TASK, Run
from tests.trainer import helpers

pytestmark = pytest.mark.trainer

TEMPLATE = ("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}### assistant: {% endif %}")


def test_training_text_is_rendered_with_the_override(
        tmp_path: Path, tiny_models: dict[str, Path], data_dir: Path) -> None:
    model_dir = tiny_models["llama"]
    path = helpers.trainer_config(
        tmp_path / "c.json", job="tpl", model_dir=model_dir, data_dir=data_dir,
        output=f"file://{tmp_path}/store", fmt="chat", data={"chatTemplate": TEMPLATE})
    run = Run(TrainerConfig.from_file(path))
    tok = run.load_tokenizer(model_dir)
    ds = run.tokenize_data({TASK: run.read_data()[TASK]}, tok, 128)[TASK]
    record = json.loads((data_dir / "eval.jsonl").read_text().splitlines()[0])
    user, answer = (m["content"] for m in record["messages"])
    ex = ds[0]
    text = tok.decode(ex["input_ids"])
    assert text == f"### user: {user}\n### assistant: {answer}\n"
    assert "<|user|>" not in text  # not the tokenizer's own template
    trained = tok.decode([t for t, lab in zip(ex["input_ids"], ex["labels"], strict=True)
                          if lab != IGNORE])
    assert trained.strip() == answer  # the assistant turn (and its newline) only


def test_artifact_and_samples_use_the_override(tmp_path: Path, tiny_models: dict[str, Path],
                                               data_dir: Path) -> None:
    cfg = helpers.trainer_config(
        tmp_path / "c.json", job="tpl-run", model_dir=tiny_models["llama"], data_dir=data_dir,
        output=f"file://{tmp_path}/store", fmt="chat", data={"chatTemplate": TEMPLATE},
        training={"maxSteps": 2, "evalEvery": 2}, output_options={"samples": 1})
    proc = helpers.run_trainer(cfg, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    art = tmp_path / "collected"
    storage.download_dir(helpers.termination(tmp_path)["artifact"]["uri"], art)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(art)).chat_template == TEMPLATE
    sample = json.loads((art / "kubetune.json").read_text())["samples"][0]
    assert sample["prompt"].startswith("### user: ")
    assert sample["prompt"].endswith("### assistant: ")


def test_a_template_that_does_not_compile_fails_fast(
        tmp_path: Path, tiny_models: dict[str, Path], data_dir: Path) -> None:
    cfg = helpers.trainer_config(
        tmp_path / "c.json", job="tpl-bad", model_dir=tiny_models["llama"], data_dir=data_dir,
        output=f"file://{tmp_path}/store", fmt="chat",
        data={"chatTemplate": "{% for m in messages %}{{ m['content'] }}"})
    proc = helpers.run_trainer(cfg, tmp_path)
    assert proc.returncode == 78, proc.stderr[-2000:]
    msg = helpers.termination(tmp_path)
    assert "data.chatTemplate is not a valid Jinja template" in msg["message"]
