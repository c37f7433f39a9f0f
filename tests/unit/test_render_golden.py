"""Golden files: the exact children rendered for each example (and a sweep trial).

After an intended change, regenerate with
    KUBETUNE_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_render_golden.py
and review the diff of tests/golden/render/.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.api import (
    FineTuneJob,
    FineTuneSweep,
    SweepTrialRef,
    apply_overrides,
    load_objects,
)
from orchestrator.render import RenderDefaults, render_all

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden" / "render"
DEFAULTS = RenderDefaults(
    image="ghcr.io/kubetune/trainer:0.1.0",
    storage_endpoint="http://s3.kubetune-system:8333",
    credentials_secret="kubetune-s3",
    region="us-east-1",
)
UID = "6f1c2a9e-0000-4000-8000-000000000001"


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    # multi-line strings (the JSON configs) as literal blocks, so diffs stay readable
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump(objs: list[dict[str, Any]]) -> str:
    return yaml.dump_all(objs, Dumper=_Dumper, sort_keys=False, width=100)


def _example(name: str) -> FineTuneJob | FineTuneSweep:
    (obj,) = load_objects(ROOT / "examples" / name)
    return obj


def case_objects(case: str) -> list[dict[str, Any]]:
    if case == "sweep-trial":
        sweep = _example("sweep-rank-tpe.yaml")
        assert isinstance(sweep, FineTuneSweep)
        params = {
            "method.rank": 16,
            "method.trainableParamPercent": 1.2,
            "training.learningRate": 2.5e-4,
            "method.targetModules": ["q_proj", "v_proj"],
        }
        spec = apply_overrides(sweep.spec.template, params)
        ref = SweepTrialRef(
            name=sweep.name,
            trial_number=7,
            report_url="http://kubetune-controller.kubetune-system:8081",
            token="kt1.example-token-for-trial-7",
            parameters=params,
        )
        meta = {"name": f"{sweep.name}-7", "namespace": "team-a", "uid": UID}
        return render_all(meta, spec, 1, DEFAULTS, ref)
    job = _example(f"{case}.yaml")
    assert isinstance(job, FineTuneJob)
    attempt = 2 if case == "zero3-2node" else 1  # shows per-attempt naming
    return render_all(
        {"name": job.name, "namespace": "team-a", "uid": UID}, job.spec, attempt, DEFAULTS
    )


CASES = ["lora-llama-8gpu", "zero3-2node", "qlora-single-gpu", "prefix-tuning", "sweep-trial"]


@pytest.mark.parametrize("case", CASES)
def test_rendered_children_match_golden(case: str) -> None:
    text = dump(case_objects(case))
    path = GOLDEN / f"{case}.yaml"
    if os.environ.get("KUBETUNE_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"missing {path}: run with KUBETUNE_UPDATE_GOLDEN=1"
    assert text == path.read_text(encoding="utf-8"), (
        f"{path.name} differs: review, then regenerate with KUBETUNE_UPDATE_GOLDEN=1"
    )


def test_rendering_is_deterministic() -> None:
    assert dump(case_objects("zero3-2node")) == dump(case_objects("zero3-2node"))
