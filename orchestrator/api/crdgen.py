"""Generate the CustomResourceDefinitions from the pydantic models.

    python -m orchestrator.api.crdgen [--check] [--out manifests/crds]

The pydantic JSON schema is turned into a Kubernetes *structural* schema: every `$ref`
inlined, Optional unions collapsed, int|string turned into `x-kubernetes-int-or-string`,
other mixed unions and free-form dicts into `x-kubernetes-preserve-unknown-fields`, JSON
Schema 2020 numeric exclusives turned into OpenAPI v3.0 booleans, and only keys that
apiextensions.k8s.io/v1 knows kept. CEL rules come from the models' `json_schema_extra`.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import PydanticUndefined, core_schema, to_jsonable_python

from orchestrator.api.base import GROUP, VERSION
from orchestrator.api.job import FineTuneJobSpec, FineTuneJobStatus
from orchestrator.api.sweep import FineTuneSweepSpec, FineTuneSweepStatus

CRD_DIR = Path(__file__).resolve().parents[2] / "manifests" / "crds"
# Child Job `<name>-a<attempt>` and pod host names `<job>-<index>` must fit in 63 characters
# (backoffLimit <= 20, nodes <= 256); trial jobs are `<sweep>-<number>` (number < 10000).
MAX_JOB_NAME = 52
MAX_SWEEP_NAME = MAX_JOB_NAME - 5
DNS1035_LABEL = "^[a-z]([-a-z0-9]*[a-z0-9])?$"

# Keys of apiextensions.k8s.io/v1 JSONSchemaProps that we emit.
_ALLOWED_KEYS = {
    "description",
    "type",
    "format",
    "default",
    "maximum",
    "exclusiveMaximum",
    "minimum",
    "exclusiveMinimum",
    "maxLength",
    "minLength",
    "pattern",
    "maxItems",
    "minItems",
    "multipleOf",
    "enum",
    "maxProperties",
    "minProperties",
    "required",
    "items",
    "anyOf",
    "properties",
    "additionalProperties",
    "nullable",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-int-or-string",
    "x-kubernetes-validations",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
}


class _FactoryDefaults(GenerateJsonSchema):
    """Also emit defaults produced by `default_factory` (pydantic skips them), so that
    `kubectl explain` and the docs show them and the API server can fill them in."""

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> dict[str, Any]:
        factory = schema.get("default_factory")
        if factory is not None and not schema.get("default_factory_takes_data"):
            inner = self.generate_inner(schema["schema"])
            value = factory()  # type: ignore[call-arg]
            if isinstance(value, BaseModel):
                value = value.model_dump(mode="json", by_alias=True, exclude_none=True)
            elif isinstance(value, list):
                value = [
                    v.model_dump(mode="json", by_alias=True, exclude_none=True)
                    if isinstance(v, BaseModel)
                    else v
                    for v in value
                ]
            inner["default"] = to_jsonable_python(value)
            return inner
        if schema.get("default", PydanticUndefined) is PydanticUndefined:
            return self.generate_inner(schema["schema"])
        return super().default_schema(schema)


def model_schema(
    model: type[BaseModel], mode: Literal["validation", "serialization"] = "validation"
) -> dict[str, Any]:
    """The pydantic JSON schema (with $defs) of `model`, camelCase, factory defaults shown."""
    return model.model_json_schema(
        by_alias=True,
        mode=mode,
        schema_generator=_FactoryDefaults,  # type: ignore[arg-type]
    )


class _Converter:
    def __init__(self, defs: dict[str, Any], status: bool) -> None:
        self.defs = defs
        self.status = status  # status schemas: no defaults, nothing required but list keys

    def _deref(self, node: dict[str, Any]) -> dict[str, Any]:
        """Inline $ref / single allOf; the referring node's keys win (description, default)."""
        node = dict(node)
        while True:
            if "$ref" in node:
                target = self.defs[node.pop("$ref").split("/")[-1]]
            elif "allOf" in node and len(node["allOf"]) == 1:
                target = node.pop("allOf")[0]
            else:
                return node
            merged = copy.deepcopy(target)
            rules = merged.get("x-kubernetes-validations", []) + node.pop(
                "x-kubernetes-validations", []
            )
            merged.update(node)
            if rules:
                merged["x-kubernetes-validations"] = rules
            node = merged

    def convert(self, node: dict[str, Any]) -> dict[str, Any]:
        node = self._deref(node)
        if "anyOf" in node:
            branches = [self._deref(b) for b in node.pop("anyOf") if b.get("type") != "null"]
            if len(branches) == 1:
                outer = {k: v for k, v in node.items() if k != "default" or v is not None}
                merged = {**branches[0], **outer}
                rules = branches[0].get("x-kubernetes-validations", []) + outer.get(
                    "x-kubernetes-validations", []
                )
                if rules:
                    merged["x-kubernetes-validations"] = rules
                return self.convert(merged)
            types = {b.get("type") for b in branches}
            if types == {"integer", "string"} or any(
                b.get("x-kubernetes-int-or-string") for b in branches
            ):
                string = next((b for b in branches if b.get("type") == "string"), {})
                return self._finish(
                    {
                        **{k: v for k, v in node.items() if k in ("description", "default")},
                        "x-kubernetes-int-or-string": True,
                        "anyOf": [{"type": "integer"}, {"type": "string"}],
                        **({"pattern": string["pattern"]} if "pattern" in string else {}),
                    }
                )
            # A union of unrelated types (string | list) cannot be structural: keep the
            # value as is; the controller's pydantic validation checks it.
            return self._finish(
                {
                    **{k: v for k, v in node.items() if k in ("description", "default")},
                    "x-kubernetes-preserve-unknown-fields": True,
                }
            )
        if "const" in node:
            node["enum"] = [node.pop("const")]
        if node.get("x-kubernetes-int-or-string"):
            node.pop("type", None)
            node.pop("maxLength", None)
            node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        typ = node.get("type")
        if typ is None and not node.get("x-kubernetes-int-or-string"):
            # `Any`: free-form JSON value
            node["x-kubernetes-preserve-unknown-fields"] = True
        elif typ == "object":
            props = node.get("properties")
            extra = node.pop("additionalProperties", None)
            if props is not None:
                node["properties"] = {k: self.convert(v) for k, v in props.items()}
                if extra is True:  # known fields plus any others (status.metrics)
                    node["x-kubernetes-preserve-unknown-fields"] = True
            elif isinstance(extra, dict) and extra:
                node["additionalProperties"] = self.convert(extra)
            else:
                node["x-kubernetes-preserve-unknown-fields"] = True
        elif typ == "array":
            node["items"] = self.convert(node.get("items", {}))
        elif typ == "string" and "enum" in node and "maxLength" not in node:
            # bounds CEL cost estimates for rules comparing enum fields
            node["maxLength"] = max(len(str(e)) for e in node["enum"])
        for key in ("exclusiveMinimum", "exclusiveMaximum"):
            if isinstance(node.get(key), int | float) and not isinstance(node.get(key), bool):
                node["minimum" if key == "exclusiveMinimum" else "maximum"] = node[key]
                node[key] = True
        return self._finish(node)

    def _finish(self, node: dict[str, Any]) -> dict[str, Any]:
        if "default" in node:
            default = node["default"]
            # Object defaults stay complete (not `{}`): the API server checks each default
            # against the CEL rules as is, without filling in the nested defaults first.
            if default is None or self.status:
                del node["default"]
        if self.status and "required" in node and "x-kubernetes-list-map-keys" not in node:
            node.pop("required")
        return {k: v for k, v in node.items() if k in _ALLOWED_KEYS}


_KEY_ORDER = [
    "description",
    "type",
    "format",
    "enum",
    "default",
    "minimum",
    "exclusiveMinimum",
    "maximum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "x-kubernetes-int-or-string",
    "anyOf",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "items",
    "required",
    "properties",
    "additionalProperties",
    "x-kubernetes-validations",
]


def _ordered(node: Any) -> Any:
    """Stable, readable key order (description and type first, rules last)."""
    if isinstance(node, list):
        return [_ordered(n) for n in node]
    if not isinstance(node, dict):
        return node
    if set(node) <= set(_KEY_ORDER):
        out = {k: node[k] for k in _KEY_ORDER if k in node}
        for key in ("items", "additionalProperties"):
            if isinstance(out.get(key), dict):
                out[key] = _ordered(out[key])
        if "properties" in out:
            out["properties"] = {k: _ordered(v) for k, v in out["properties"].items()}
        return out
    return node


def structural_schema(model: type[BaseModel], status: bool = False) -> dict[str, Any]:
    schema = model_schema(model, mode="serialization" if status else "validation")
    defs = schema.pop("$defs", {})
    return _ordered(_Converter(defs, status).convert(schema))


def _status_schema(model: type[BaseModel]) -> dict[str, Any]:
    schema = structural_schema(model, status=True)
    conditions = schema["properties"]["conditions"]
    conditions["x-kubernetes-list-type"] = "map"
    conditions["x-kubernetes-list-map-keys"] = ["type"]
    conditions["items"]["required"] = ["type", "status"]
    return _ordered(schema)


def _name_rule(max_len: int, kind: str) -> dict[str, str]:
    return {
        "rule": f"self.metadata.name.size() <= {max_len} && "
        f"self.metadata.name.matches('{DNS1035_LABEL}')",
        "message": f"metadata.name of a {kind} must be at most {max_len} characters, start with "
        "a letter and contain only lowercase letters, digits and '-' (child Job and pod host "
        "names are derived from it)",
    }


def _crd(
    kind: str,
    plural: str,
    short: str,
    spec_model: type[BaseModel],
    status_model: type[BaseModel],
    description: str,
    columns: list[dict[str, Any]],
    max_name: int,
) -> dict[str, Any]:
    schema = {
        "type": "object",
        "description": description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": structural_schema(spec_model),
            "status": _status_schema(status_model),
        },
        "x-kubernetes-validations": [_name_rule(max_name, kind)],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "kubetune"},
        },
        "spec": {
            "group": GROUP,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short],
                "categories": ["kubetune"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


def _col(name: str, typ: str, path: str, desc: str, priority: int = 0) -> dict[str, Any]:
    col: dict[str, Any] = {"name": name, "type": typ, "jsonPath": path, "description": desc}
    if priority:
        col["priority"] = priority
    return col


def crds() -> dict[str, dict[str, Any]]:
    """The CRDs keyed by file name (what `manifests/crds/` must contain)."""
    ftj = _crd(
        "FineTuneJob",
        "finetunejobs",
        "ftj",
        FineTuneJobSpec,
        FineTuneJobStatus,
        "FineTuneJob fine-tunes a base model with a parameter-efficient method (LoRA, DoRA, "
        "QLoRA, IA3, adapters, prefix/prompt tuning) on one or more GPU nodes with DeepSpeed "
        "and writes the adapter to object storage.",
        [
            _col("Phase", "string", ".status.phase", "Pending, Running, Succeeded or Failed."),
            _col("Nodes", "integer", ".spec.distributed.nodes", "Pods in the training gang."),
            _col("GPUs", "integer", ".spec.distributed.gpusPerNode", "GPUs per node."),
            _col("Method", "string", ".spec.method.type", "PEFT method."),
            _col("Rank", "integer", ".spec.method.rank", "LoRA rank (if set)."),
            _col(
                "Trainable%",
                "number",
                ".status.metrics.trainableParamPercent",
                "Trainable / all parameters, percent.",
            ),
            _col("EvalLoss", "number", ".status.metrics.evalLoss", "Loss on data.eval."),
            _col("Attempts", "integer", ".status.attempts", "Gang attempts started.", 1),
            _col("Progress", "string", ".status.progress.summary", "Steps done / planned."),
            _col("Age", "date", ".metadata.creationTimestamp", "Time since creation."),
        ],
        MAX_JOB_NAME,
    )
    fts = _crd(
        "FineTuneSweep",
        "finetunesweeps",
        "fts",
        FineTuneSweepSpec,
        FineTuneSweepStatus,
        "FineTuneSweep searches FineTuneJob hyperparameters (LoRA rank, parameter budget, "
        "learning rate, ...) with Optuna, running trials as child FineTuneJobs, pruning bad "
        "ones early and reporting the best trial or the Pareto front.",
        [
            _col("Phase", "string", ".status.phase", "Pending, Running, Succeeded or Failed."),
            _col("Done", "integer", ".status.trials.completed", "Finished trials."),
            _col("Max", "integer", ".spec.maxTrials", "Trials to run in total."),
            _col("Running", "integer", ".status.trials.running", "Trials running now."),
            _col("Best", "number", ".status.bestTrial.value", "Best first-objective value."),
            _col("BestTrial", "string", ".status.bestTrial.name", "Best trial's job.", 1),
            _col("Sampler", "string", ".spec.algorithm.sampler", "Optuna sampler.", 1),
            _col("Pruner", "string", ".spec.earlyStopping.pruner", "Optuna pruner.", 1),
            _col("Age", "date", ".metadata.creationTimestamp", "Time since creation."),
        ],
        MAX_SWEEP_NAME,
    )
    return {
        f"{GROUP}_finetunejobs.yaml": ftj,
        f"{GROUP}_finetunesweeps.yaml": fts,
    }


_HEADER = "# Generated by `python -m orchestrator.api.crdgen` from orchestrator/api; do not edit.\n"


def render_yaml(obj: dict[str, Any]) -> str:
    return _HEADER + yaml.safe_dump(obj, sort_keys=False, width=100, allow_unicode=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=CRD_DIR)
    parser.add_argument("--check", action="store_true", help="fail if the files are stale")
    args = parser.parse_args(argv)
    stale = []
    for name, obj in crds().items():
        path = args.out / name
        text = render_yaml(obj)
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(str(path))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}")
    if stale:
        print("stale: " + ", ".join(stale) + " (run python -m orchestrator.api.crdgen)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
