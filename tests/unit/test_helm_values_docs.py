"""Every value in helm/kubetune/values.yaml is documented in the chart README's values table,
with its real default, and the table documents nothing that does not exist."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml

from tests.support import REPO

pytestmark = pytest.mark.unit

CHART = REPO / "helm" / "kubetune"
ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|\s*`(.*)`\s*\|\s*(.*?)\s*\|\s*$")


def _documented() -> dict[str, tuple[Any, str]]:
    rows: dict[str, tuple[Any, str]] = {}
    for line in (CHART / "README.md").read_text().splitlines():
        m = ROW.match(line)
        if m:
            key, default, description = m.groups()
            assert key not in rows, f"{key} documented twice"
            rows[key] = (json.loads(default), description)
    return rows


def _leaves(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        path = prefix + key
        if isinstance(value, dict) and value:
            out.update(_leaves(value, path + "."))
        else:
            out[path] = value
    return out


def _lookup(values: dict[str, Any], path: str) -> Any:
    node: Any = values
    for part in path.split("."):
        assert isinstance(node, dict) and part in node, f"README documents {path}: no such value"
        node = node[part]
    return node


def test_every_value_is_documented_with_its_default() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    docs = _documented()
    assert docs, "no values table in helm/kubetune/README.md"
    # A documented key covers itself and, for objects documented whole (resources,
    # securityContext, ...), everything below it.
    undocumented = [leaf for leaf in _leaves(values)
                    if not any(leaf == key or leaf.startswith(key + ".") for key in docs)]
    assert not undocumented, f"values missing from helm/kubetune/README.md: {undocumented}"
    for key, (default, description) in docs.items():
        assert _lookup(values, key) == default, \
            f"README default of {key} is {default!r}, values.yaml has {_lookup(values, key)!r}"
        assert description, f"{key} has no description"


def test_no_key_is_documented_twice_at_different_depths() -> None:
    keys = list(_documented())
    nested = [(a, b) for a in keys for b in keys if b.startswith(a + ".")]
    assert not nested, f"documented both as a whole and in parts: {nested}"
