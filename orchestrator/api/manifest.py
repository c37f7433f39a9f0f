"""Parse whole kubetune objects (apiVersion/kind/metadata/spec) from YAML documents."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.api.base import API_VERSION
from orchestrator.api.job import FineTuneJob
from orchestrator.api.sweep import FineTuneSweep

KINDS: dict[str, type[FineTuneJob] | type[FineTuneSweep]] = {
    "FineTuneJob": FineTuneJob,
    "FineTuneSweep": FineTuneSweep,
}


def parse_object(doc: dict[str, Any]) -> FineTuneJob | FineTuneSweep:
    """Validate one object; raises ValueError naming the kind problem or pydantic's
    ValidationError naming the field."""
    kind = doc.get("kind")
    if doc.get("apiVersion") != API_VERSION:
        raise ValueError(f"apiVersion must be {API_VERSION}, not {doc.get('apiVersion')!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be FineTuneJob or FineTuneSweep, not {kind!r}")
    return KINDS[kind].model_validate(doc)


def load_objects(path: str | Path) -> list[FineTuneJob | FineTuneSweep]:
    """All kubetune objects in a (multi-document) YAML file."""
    import yaml

    with open(path, encoding="utf-8") as fh:
        docs = [d for d in yaml.safe_load_all(fh) if d]
    return [parse_object(d) for d in docs]
