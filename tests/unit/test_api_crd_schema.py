"""The generated CRDs are valid structural schemas that agree with the pydantic models.

A real API server is exercised by the cluster tests; here a small OpenAPI checker (types,
enums, ranges, patterns, required and unknown fields, defaulting as the API server does it)
proves that the CRD accepts what the models accept, fills in the same defaults, and rejects
at `kubectl apply` time every invalid spec that does not need the controller's eyes.
"""

from __future__ import annotations

import copy
import glob
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from orchestrator.api import FineTuneJobSpec, FineTuneSweepSpec, format_errors
from orchestrator.api.crdgen import crds

from .test_api_job import INVALID as JOB_INVALID
from .test_api_job import cel_messages, spec_with
from .test_api_sweep import INVALID as SWEEP_INVALID

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
ALLOWED = {
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
    "enum",
    "required",
    "items",
    "anyOf",
    "properties",
    "additionalProperties",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-int-or-string",
    "x-kubernetes-validations",
    "minProperties",
    "maxProperties",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
}


def schema_of(kind: str) -> dict[str, Any]:
    for crd in crds().values():
        if crd["spec"]["names"]["kind"] == kind:
            return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    raise KeyError(kind)


def walk(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = [(path, node)]
    for name, child in (node.get("properties") or {}).items():
        out += walk(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        out += walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        out += walk(node["additionalProperties"], f"{path}{{}}")
    return out


# --- structural schema rules ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["FineTuneJob", "FineTuneSweep"])
def test_schema_is_structural(kind: str) -> None:
    for path, node in walk(schema_of(kind)):
        assert set(node) <= ALLOWED, f"{path}: unexpected keys {set(node) - ALLOWED}"
        if node.get("x-kubernetes-int-or-string"):
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}], path
            assert "type" not in node, path
            continue
        assert "anyOf" not in node, f"{path}: anyOf only for int-or-string"
        if not node.get("x-kubernetes-preserve-unknown-fields"):
            assert node.get("type"), f"{path}: every node needs a type"
        if node.get("properties"):
            assert "additionalProperties" not in node, path
        if "default" in node:
            # the API server validates defaults as they are (CEL rules included)
            errors: list[str] = []
            assert default_and_validate(node, node["default"], path, errors) == node["default"]
            assert errors == [], path


@pytest.mark.parametrize("kind", ["FineTuneJob", "FineTuneSweep"])
def test_crd_metadata(kind: str) -> None:
    crd = next(c for c in crds().values() if c["spec"]["names"]["kind"] == kind)
    names = crd["spec"]["names"]
    assert names["shortNames"] == [{"FineTuneJob": "ftj", "FineTuneSweep": "fts"}[kind]]
    assert names["categories"] == ["kubetune"]
    (version,) = crd["spec"]["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}
    schema = version["schema"]["openAPIV3Schema"]
    for col in version["additionalPrinterColumns"]:
        if col["jsonPath"] == ".metadata.creationTimestamp":
            continue
        node = schema
        for part in col["jsonPath"].strip(".").split("."):
            node = node["properties"][part]
        assert node.get("type") == col["type"], col


def test_printer_columns_are_the_documented_ones() -> None:
    cols = {
        k: [
            c["name"]
            for c in schema_crd["spec"]["versions"][0]["additionalPrinterColumns"]
            if not c.get("priority")
        ]
        for k, schema_crd in ((c["spec"]["names"]["kind"], c) for c in crds().values())
    }
    assert cols["FineTuneJob"] == [
        "Phase",
        "Nodes",
        "GPUs",
        "Method",
        "Rank",
        "Trainable%",
        "EvalLoss",
        "Progress",
        "Age",
    ]
    assert cols["FineTuneSweep"] == ["Phase", "Done", "Max", "Running", "Best", "Age"]


# --- CEL rules: references resolve, cost inputs are bounded ------------------------------------

_REF = re.compile(r"\b(self|[a-z])((?:\.[A-Za-z_][A-Za-z0-9_]*)+)")
_MACRO = re.compile(r"\b(self(?:\.[A-Za-z_]\w*)+)\.(?:all|exists_one|exists|filter)\((\w+),")
_METHODS = {"matches", "startsWith", "size", "all", "exists", "exists_one", "filter"}


def _resolve(node: dict[str, Any], parts: list[str]) -> dict[str, Any] | None:
    for part in parts:
        props = node.get("properties") or {}
        if part not in props:
            return None
        node = props[part]
    return node


@pytest.mark.parametrize("kind", ["FineTuneJob", "FineTuneSweep"])
def test_cel_rules_reference_real_bounded_fields(kind: str) -> None:
    seen = 0
    for path, node in walk(schema_of(kind)):
        for rule in node.get("x-kubernetes-validations", []):
            seen += 1
            text = rule["rule"]
            assert rule["message"] and len(rule["message"]) < 300
            if "fieldPath" in rule:
                assert _resolve(node, rule["fieldPath"].strip(".").split(".")), rule
            variables = {"self": node}
            for base, var in _MACRO.findall(text):
                lst = _resolve(node, base.split(".")[1:])
                assert lst is not None and lst.get("type") == "array", (path, base)
                assert "maxItems" in lst, f"{path}: {base} needs maxItems for CEL cost"
                variables[var] = lst["items"]
            guarded = set(re.findall(r"has\(((?:self|[a-z])(?:\.\w+)+)\)", text))
            for var, dotted in _REF.findall(text):
                if var not in variables:
                    continue
                parts = [p for p in dotted.strip(".").split(".") if p not in _METHODS]
                if var == "self" and path == "" and parts[:1] == ["metadata"]:
                    continue  # metadata.name is always available to root rules
                target = _resolve(variables[var], parts)
                assert target is not None, f"{path}: {text!r} references unknown {dotted}"
                # untyped (free-form) fields are invisible to CEL
                assert target.get("type") or target.get("x-kubernetes-int-or-string"), dotted
                if target.get("type") == "array":
                    assert target["items"].get("type"), f"{dotted}: untyped items hide it"
                if target.get("type") == "string" and ".matches(" in text:
                    assert "maxLength" in target, f"{path}: {dotted} needs maxLength"
                # an unguarded reference must always be present (required or defaulted)
                cur = variables[var]
                for i, part in enumerate(parts):
                    prefix = var + "." + ".".join(parts[: i + 1])
                    child = cur["properties"][part]
                    if prefix not in guarded and not any(g.startswith(prefix) for g in guarded):
                        assert part in cur.get("required", []) or "default" in child, (
                            f"{path}: {text!r} reads {prefix} which may be absent"
                        )
                    cur = child
            if node.get("type") == "string":
                assert "maxLength" in node, f"{path}: string with CEL rule needs maxLength"
    assert seen >= 10


# --- a small OpenAPI checker with API-server defaulting ---------------------------------------


def default_and_validate(node: dict[str, Any], value: Any, path: str, errors: list[str]) -> Any:
    """Apply `default`s like the API server and collect schema violations."""
    if node.get("x-kubernetes-int-or-string"):
        if isinstance(value, bool) or not isinstance(value, int | str):
            errors.append(f"{path}: must be integer or string")
        elif isinstance(value, str) and "pattern" in node and not re.search(node["pattern"], value):
            errors.append(f"{path}: does not match {node['pattern']}")
        return value
    typ = node.get("type")
    if typ is None:
        return value
    checks = {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "boolean": lambda v: isinstance(v, bool),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    }
    if not checks[typ](value):
        errors.append(f"{path}: must be {typ}")
        return value
    if "enum" in node and value not in node["enum"]:
        errors.append(f"{path}: must be one of {node['enum']}")
    if typ in ("integer", "number"):
        lo, hi = node.get("minimum"), node.get("maximum")
        if lo is not None and (value < lo or (node.get("exclusiveMinimum") and value == lo)):
            errors.append(f"{path}: below minimum")
        if hi is not None and (value > hi or (node.get("exclusiveMaximum") and value == hi)):
            errors.append(f"{path}: above maximum")
    if typ == "string":
        if len(value) > node.get("maxLength", 1 << 30) or len(value) < node.get("minLength", 0):
            errors.append(f"{path}: bad length")
        if "pattern" in node and not re.search(node["pattern"], value):
            errors.append(f"{path}: does not match {node['pattern']}")
    if typ == "array":
        if len(value) > node.get("maxItems", 1 << 30) or len(value) < node.get("minItems", 0):
            errors.append(f"{path}: bad number of items")
        return [
            default_and_validate(node["items"], v, f"{path}[{i}]", errors)
            for i, v in enumerate(value)
        ]
    if typ == "object":
        value = dict(value)
        if not node.get("minProperties", 0) <= len(value) <= node.get("maxProperties", 1 << 30):
            errors.append(f"{path}: wrong number of properties")
        props = node.get("properties")
        if props is not None:
            for name, child in props.items():
                if name not in value and "default" in child:
                    value[name] = copy.deepcopy(child["default"])
            for name in list(value):
                if name in props:
                    value[name] = default_and_validate(
                        props[name], value[name], f"{path}.{name}", errors
                    )
                elif not node.get("x-kubernetes-preserve-unknown-fields"):
                    errors.append(f"{path}.{name}: unknown field")
            for name in node.get("required", []):
                if name not in value:
                    errors.append(f"{path}.{name}: required")
        elif isinstance(node.get("additionalProperties"), dict):
            value = {
                k: default_and_validate(node["additionalProperties"], v, f"{path}.{k}", errors)
                for k, v in value.items()
            }
    return value


def apply_crd(kind: str, spec: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    errors: list[str] = []
    out = default_and_validate(schema_of(kind)["properties"]["spec"], spec, "spec", errors)
    return out, errors


EXAMPLES = sorted(glob.glob(str(ROOT / "examples" / "*.yaml")))


@pytest.mark.parametrize("path", EXAMPLES, ids=[Path(p).name for p in EXAMPLES])
def test_examples_pass_the_crd_and_get_the_models_defaults(path: str) -> None:
    for doc in yaml.safe_load_all(Path(path).read_text()):
        kind = doc["kind"]
        model = FineTuneJobSpec if kind == "FineTuneJob" else FineTuneSweepSpec
        defaulted, errors = apply_crd(kind, doc["spec"])
        assert errors == []
        # what the API server stores is what the controller's models produce
        assert defaulted == model.model_validate(doc["spec"]).to_wire()
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])


# Invalid specs that only the controller can reject (a CRD cannot express them without
# unbounded CEL cost or a non-structural union); they become an InvalidSpec condition.
CONTROLLER_ONLY = {
    "target module string",
    "empty target list",
    "duplicate target",
    "batch size in deepspeed config",
    "lora plus with deepspeed optimizer",  # deepspeed.config is free-form: invisible to CEL
    # map keys: a CEL rule over unbounded keys would exceed the API server's cost budget
    "env set twice",
    "kubetune label",
    "kubernetes label",
    "label value",
    "label key",
    "cdi annotation",
    "apparmor annotation",
    "runtime annotation",
    "gpu as extended resource",
    "core resource as extended",
    "kubernetes.io extended resource",
    # free-form objects: the schema bounds their key count, the model their fields and size
    "affinity with a foreign field",
    "affinity too large",
    "deepspeed config too large",
}


@pytest.mark.parametrize(
    ("case", "patch", "expected"), JOB_INVALID, ids=[c[0] for c in JOB_INVALID]
)
def test_invalid_specs_are_rejected_at_apply_time(
    case: str, patch: dict[str, Any], expected: list[str]
) -> None:
    doc = spec_with(patch)
    _, schema_errors = apply_crd("FineTuneJob", doc)
    if schema_errors:
        # the schema error names the same field as the model's error
        field = schema_errors[0].split(":")[0]
        with pytest.raises(ValidationError) as info:
            FineTuneJobSpec.model_validate(doc)
        assert field.split("[")[0] in format_errors(info.value, "spec").replace(".0.", "."), case
        return
    if case in CONTROLLER_ONLY:
        return
    # otherwise a CEL rule catches it, with the model's own message
    with pytest.raises(ValidationError) as info:
        FineTuneJobSpec.model_validate(doc)
    message = format_errors(info.value, "spec")
    assert any(m in message for m in cel_messages()), f"{case}: no CRD rule for {message!r}"


def test_unknown_fields_are_pruned_or_rejected_by_the_schema() -> None:
    _, errors = apply_crd("FineTuneJob", spec_with({"method": {"rnak": 8}}))
    assert errors == ["spec.method.rnak: unknown field"]
    _, errors = apply_crd(
        "FineTuneSweep",
        {
            "template": spec_with({}),
            "parameters": [{"name": "method.rank", "int": {"low": 1, "high": 4, "lgo": True}}],
        },
    )
    assert errors == ["spec.parameters[0].int.lgo: unknown field"]


# Sweep values checked against the target field's own limits need the job schema per name.
SWEEP_CONTROLLER_ONLY = {"range outside the field's limits", "bad categorical choice"}


@pytest.mark.parametrize(
    ("case", "doc", "expected"), SWEEP_INVALID, ids=[c[0] for c in SWEEP_INVALID]
)
def test_invalid_sweeps_are_rejected_at_apply_time(
    case: str, doc: dict[str, Any], expected: list[str]
) -> None:
    _, schema_errors = apply_crd("FineTuneSweep", doc)
    if schema_errors or case in SWEEP_CONTROLLER_ONLY:
        return
    with pytest.raises(ValidationError) as info:
        FineTuneSweepSpec.model_validate(doc)
    message = format_errors(info.value, "spec")
    assert any(m in message for m in cel_messages()), f"{case}: no CRD rule for {message!r}"
