"""docs/api-reference.md documents every field with its type, default and description."""

from __future__ import annotations

import pytest

from orchestrator.api import docgen
from orchestrator.api.paths import field_catalogue

pytestmark = pytest.mark.unit


def test_every_spec_field_is_documented() -> None:
    text = docgen.render_markdown()
    for path in field_catalogue():
        section, _, leaf = ("spec." + path).rpartition(".")
        assert f"### `{section}`" in text, section
        assert f"| `{leaf}` |" in text, path


def test_rows_show_type_default_and_rules() -> None:
    text = docgen.render_markdown()
    assert "| `rank` | integer, [1, 1024] |  | LoRA rank" in text
    assert '| `format` | string, `chat` \\| `instruction` \\| `text` | `"chat"` |' in text
    assert "| `model` | object | **required** |" in text
    assert "training.globalBatchSize must be divisible" in text
    assert "`kubectl get` columns: Phase, Nodes, GPUs, Method, Rank, Trainable%, EvalLoss" in text
