"""The controller's caches keyed by users' input stay bounded (issue: a user submitting many
distinct model URIs or Secret names must not grow the controller without limit)."""

from __future__ import annotations

import pytest

from orchestrator.controller.bounded import BoundedMap
from orchestrator.controller.feasibility import BudgetChecker
from orchestrator.controller.kube import Kube

pytestmark = pytest.mark.unit


def test_least_recently_used_entries_go_first() -> None:
    m: BoundedMap[str, int] = BoundedMap(3)
    for i, k in enumerate("abc"):
        m[k] = i
    assert m.get("a") == 0  # a is now the most recently used
    m["d"] = 3
    assert len(m) == 3 and m.get("b") is None and m.get("a") == 0 and m.get("d") == 3
    assert m.get("zz", 7) == 7 and m.pop("a") == 0 and len(m) == 2
    with pytest.raises(ValueError):
        BoundedMap(0)


def test_controller_caches_keyed_by_user_input_are_bounded() -> None:
    checker = BudgetChecker()
    kube = Kube.__new__(Kube)
    kube._secrets = BoundedMap(4096)
    for cache in (checker._shapes, kube._secrets):
        for i in range(cache.maxsize + 500):
            cache[("ns", f"s3://bucket/model-{i}")] = (0.0, None)  # type: ignore[index]
        assert len(cache) == cache.maxsize
