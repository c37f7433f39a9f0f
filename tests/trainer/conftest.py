"""Trainer-tier fixtures: a tokenizer trained here, tiny models of four architectures built
from configs (hidden 32, 2 layers), and small generated datasets. Built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.trainer import helpers

pytest.importorskip("torch", reason="the trainer tier needs the [trainer] extra")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    helpers.build_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {a: helpers.build_model(root / a, a, tokenizer_dir) for a in helpers.ARCHS}


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train (128), eval (32) and general (16) records; every record carries the fields of
    all three formats, so one set of files serves text, instruction and chat."""
    root = tmp_path_factory.mktemp("data")
    records = helpers.corpus(160, 1)
    helpers.write_jsonl(root / "train.jsonl", records[:128])
    helpers.write_jsonl(root / "eval.jsonl", records[128:])
    helpers.write_jsonl(root / "general.jsonl", helpers.corpus(16, 99))
    return root
