"""Dotted field paths into a FineTuneJob spec (`method.rank`), used by sweep parameters.

`apply_overrides` is how a sweep turns a trial's parameters into a concrete job spec; the
path catalogue also feeds the CEL rule that rejects unknown parameter names at apply time.
"""

from __future__ import annotations

import copy
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, Union

from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from orchestrator.api.job import FineTuneJobSpec

# dict-valued fields whose keys may be swept too (free-form DeepSpeed keys).
FREE_FORM_PREFIXES: tuple[str, ...] = ("distributed.deepspeed.config.",)
# Fields that make no sense to sweep (placement, credentials, the output location).
_NOT_SWEEPABLE: frozenset[str] = frozenset(
    {
        "resources.nodeSelector",
        "resources.tolerations",
        "resources.affinity",
        "storage.credentialsSecret",
        "storage.endpoint",
        "storage.region",
        "output.uri",
        "queueName",
        "suspend",
        "backoffLimit",
        "image",
        "model.cacheClaim",
        "resources.ephemeralStorage",
        "resources.workspaceSize",
        "distributed.rendezvousTimeoutSeconds",
        "distributed.collectiveTimeoutSeconds",
        "pod.serviceAccountName",
        "pod.priorityClassName",
        "pod.imagePullSecrets",
        "pod.env",
    }
)


class InvalidOverride(ValueError):
    """An override path or value that does not fit the FineTuneJob spec."""


@dataclass(frozen=True)
class FieldRef:
    path: str  # camelCase dotted path
    names: tuple[str, ...]  # python attribute names along the path
    field: FieldInfo

    @property
    def base_type(self) -> Any:
        """The annotation without Optional/None."""
        return _strip_optional(self.field.annotation)

    @property
    def is_integer(self) -> bool:
        return self.base_type is int

    @property
    def is_number(self) -> bool:
        return self.base_type in (int, float)

    def validate(self, value: Any) -> Any:
        """Validate a value against this field alone (type, range, URI scheme)."""
        return _adapter(self.path).validate_python(value)


@cache
def _adapter(path: str) -> TypeAdapter[Any]:
    # Annotated with the field's own metadata keeps ranges (ge/le) and URI checks.
    field = field_catalogue()[path].field
    annotation: Any = field.annotation
    if field.metadata:
        annotation = Annotated[(annotation, *field.metadata)]
    return TypeAdapter(annotation)


def _strip_optional(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _alias(name: str, field: FieldInfo) -> str:
    return field.alias or name


@cache
def field_catalogue(model: type[BaseModel] = FineTuneJobSpec) -> dict[str, FieldRef]:
    """Every leaf field path of `model` (camelCase), nested models flattened."""
    out: dict[str, FieldRef] = {}

    def walk(m: type[BaseModel], prefix: str, names: tuple[str, ...]) -> None:
        for name, field in m.model_fields.items():
            path = prefix + _alias(name, field)
            base = _strip_optional(field.annotation)
            if isinstance(base, type) and issubclass(base, BaseModel):
                walk(base, path + ".", (*names, name))
            else:
                out[path] = FieldRef(path, (*names, name), field)

    walk(model, "", ())
    return out


def sweepable_paths() -> list[str]:
    """Field paths a FineTuneSweep parameter may name (besides FREE_FORM_PREFIXES keys)."""
    return [
        p
        for p, ref in field_catalogue().items()
        if p not in _NOT_SWEEPABLE and typing.get_origin(ref.base_type) is not dict
    ]


def resolve_path(path: str) -> FieldRef | None:
    """The field a parameter path names; None for free-form keys and unknown paths."""
    return field_catalogue().get(path)


def is_free_form(path: str) -> bool:
    return any(path.startswith(p) and len(path) > len(p) for p in FREE_FORM_PREFIXES)


def check_parameter_path(path: str) -> None:
    """Raise InvalidOverride unless `path` names a sweepable FineTuneJob spec field."""
    if is_free_form(path) or path in sweepable_paths():
        return
    hint = _closest(path, sweepable_paths())
    raise InvalidOverride(
        f"{path!r} is not a FineTuneJob spec field that can be swept"
        + (f"; did you mean {hint!r}?" if hint else "")
        + " (examples: method.rank, method.trainableParamPercent, training.learningRate)"
    )


def _closest(word: str, candidates: list[str]) -> str | None:
    import difflib

    matches = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return matches[0] if matches else None


def apply_overrides(spec: FineTuneJobSpec, overrides: Mapping[str, Any]) -> FineTuneJobSpec:
    """A new spec with each dotted path (`method.rank`) set to its value, fully validated.

    Raises InvalidOverride naming the offending path when a path is unknown or the result
    breaks a rule (e.g. `method.rank` on an ia3 template).
    """
    data = copy.deepcopy(spec.model_dump(mode="json", by_alias=True, exclude_unset=True))
    for path, value in overrides.items():
        if not (is_free_form(path) or path in field_catalogue()):
            check_parameter_path(path)  # raises with a suggestion
        node = data
        keys = path.split(".")
        for key in keys[:-1]:
            child = node.get(key)
            if not isinstance(child, dict):
                child = {}
                node[key] = child
            node = child
        node[keys[-1]] = copy.deepcopy(value)
    try:
        return FineTuneJobSpec.model_validate(data)
    except ValidationError as exc:
        where = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
        raise InvalidOverride(
            f"overrides {where} give an invalid spec: {format_errors(exc)}"
        ) from exc


def format_errors(exc: ValidationError, prefix: str = "") -> str:
    """One line per error, `field.path: message`, with a hint for misspelt fields."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
        base = prefix.rstrip(".")
        loc = f"{base}.{loc}" if base and loc else (base or loc)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
            hint = _closest(str(err["loc"][-1]), _sibling_names(err["loc"]))
            if hint:
                msg += f"; did you mean {hint!r}?"
        lines.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(lines)


def _sibling_names(loc: tuple[Any, ...]) -> list[str]:
    parent = ".".join(str(p) for p in loc[:-1] if isinstance(p, str))
    prefix = parent + "." if parent else ""
    for root in ("spec.", "template.", ""):
        if prefix.startswith(root):
            rel = prefix[len(root) :]
            names = {p[len(rel) :].split(".")[0] for p in field_catalogue() if p.startswith(rel)}
            if names:
                return sorted(names)
    return []
