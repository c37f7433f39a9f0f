"""The chart's CRDs are the generated ones (manifests/crds/), byte for byte: never hand-copied,
never stale."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from tests.support import REPO

pytestmark = pytest.mark.unit

GENERATED = REPO / "manifests" / "crds"
CHART_CRDS = REPO / "helm" / "kubetune" / "crds"


def _crd_files(directory):  # type: ignore[no-untyped-def]
    return {p.name: p for p in directory.glob("*.yaml") if p.name != "kustomization.yaml"}


def test_chart_crds_are_the_generated_crds() -> None:
    generated, chart = _crd_files(GENERATED), _crd_files(CHART_CRDS)
    assert generated, "no generated CRDs: run python -m orchestrator.api.crdgen"
    assert sorted(chart) == sorted(generated), "run tools/sync-chart-crds.sh"
    stale = [n for n in generated if chart[n].read_bytes() != generated[n].read_bytes()]
    assert not stale, f"helm/kubetune/crds/{stale} differ from manifests/crds: " \
                      "run tools/sync-chart-crds.sh"


def test_sync_script_check_mode_agrees() -> None:
    proc = subprocess.run([str(REPO / "tools" / "sync-chart-crds.sh"), "--check"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_kustomize_lists_every_generated_crd() -> None:
    kustomization = yaml.safe_load((GENERATED / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(_crd_files(GENERATED)), \
        "manifests/crds/kustomization.yaml must list every generated CRD"
