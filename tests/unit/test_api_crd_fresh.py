"""The committed CRDs and API reference are what the models generate (run
`python -m orchestrator.api.crdgen` and `python -m orchestrator.api.docgen` after a change)."""

from __future__ import annotations

import pytest

from orchestrator.api import crdgen, docgen

pytestmark = pytest.mark.unit


def test_committed_crds_are_fresh() -> None:
    expected = crdgen.crds()
    assert sorted(p.name for p in crdgen.CRD_DIR.glob("kubetune.io_*.yaml")) == sorted(expected)
    for name, obj in expected.items():
        committed = (crdgen.CRD_DIR / name).read_text(encoding="utf-8")
        assert committed == crdgen.render_yaml(obj), (
            f"manifests/crds/{name} is stale: run python -m orchestrator.api.crdgen"
        )


def test_crdgen_check_mode_reports_staleness(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert crdgen.main(["--out", str(tmp_path), "--check"]) == 1
    assert "stale" in capsys.readouterr().out
    assert crdgen.main(["--out", str(tmp_path)]) == 0
    assert crdgen.main(["--out", str(tmp_path), "--check"]) == 0


def test_api_reference_is_fresh() -> None:
    assert docgen.DOC_PATH.read_text(encoding="utf-8") == docgen.render_markdown(), (
        "docs/api-reference.md is stale: run python -m orchestrator.api.docgen"
    )
