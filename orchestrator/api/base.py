"""Shared pydantic base classes, constrained types and helpers for the v1alpha1 API.

Everything on the wire is camelCase (Kubernetes convention); Python code uses snake_case.
Spec models reject unknown fields so a misspelt field fails loudly instead of being ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
)
from pydantic.alias_generators import to_camel
from pydantic_core import core_schema

GROUP = "kubetune.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# Bounds that keep CEL rules within the API server's cost budget and child names within
# Kubernetes' 63-character limits (see orchestrator/render/names.py).
MAX_URI_LENGTH = 2048
MAX_NAME_LENGTH = 253
MAX_SHORT_STRING = 256
MAX_LIST_ITEMS = 64


def cel(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    """One `x-kubernetes-validations` entry; the pydantic validator next to it enforces the
    same rule in Python so the controller, the CLI and `--local` runs agree with kubectl."""
    out = {"rule": rule, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    return out


def cel_rules(*rules: dict[str, str]) -> dict[str, Any]:
    return {"x-kubernetes-validations": list(rules)}


class ApiModel(BaseModel):
    """Base for spec models: camelCase aliases, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
    )

    def to_wire(self) -> dict[str, Any]:
        """The object as it appears in YAML/JSON: camelCase keys, unset optionals omitted."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class StatusModel(BaseModel):
    """Base for status models: tolerant of fields written by newer controllers."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="ignore",
    )

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# --- URIs ---------------------------------------------------------------------------------

_URI_FORMS = {
    "s3": "s3://<bucket>/<key>",
    "pvc": "pvc://<claim>/<path>",
    "hf": "hf://<org>/<name>",
    "file": "file:///<absolute path>",
}
_PVC_URI = r"pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?/.*"


def _uri_regex(schemes: tuple[str, ...]) -> str:
    """One regex for pydantic and CEL; pvc:// must name a valid claim."""
    plain = [s for s in schemes if s != "pvc"]
    alternatives = [f"({'|'.join(plain)})://.+"] if plain else []
    if "pvc" in schemes:
        alternatives.append(_PVC_URI)
    return "^(" + "|".join(alternatives) + ")$"


def _uri_message(schemes: tuple[str, ...], what: str) -> str:
    forms = ", ".join(_URI_FORMS[s] for s in schemes)
    return f"{what} must be a URI of the form {forms}"


@dataclass(frozen=True)
class UriCheck:
    """Annotated metadata: restrict a string URI to `schemes`, checked by pydantic and by a
    CEL rule in the generated CRD (same regex, same message)."""

    schemes: tuple[str, ...]
    what: str

    @property
    def regex(self) -> str:
        return _uri_regex(self.schemes)

    @property
    def message(self) -> str:
        return _uri_message(self.schemes, self.what)

    def _check(self, value: str) -> str:
        if not re.match(self.regex, value):
            raise ValueError(f"{self.message} (got {value!r})")
        return value

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self._check, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> dict[str, Any]:
        out = dict(handler(schema))
        out["x-kubernetes-validations"] = [cel(f"self.matches('{self.regex}')", self.message)]
        return out


MODEL_SCHEMES = ("s3", "pvc", "hf", "file")
DATA_SCHEMES = ("s3", "pvc", "hf", "file")
OUTPUT_SCHEMES = ("s3", "pvc", "file")

# --- Kubernetes names and quantities --------------------------------------------------------

DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# resource.Quantity's grammar, non-negative (a resource amount): a decimal number with at
# most one point and an optional binary (Ki..Ei) or SI (n, u, m, k, M..E) suffix or exponent.
# Stricter than the API server's own OpenAPI pattern, which lets '1.2.3', '-1Gi' and '.'
# through to fail later in the pod.
QUANTITY = r"^\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+|[KMGTPE]i|[numkMGTPE])?$"


def _pattern_checker(pattern: str, what: str, example: str) -> Any:
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if not compiled.match(value):
            raise ValueError(f"{value!r} is not a valid {what} (for example {example})")
        return value

    return check


def _quantity_to_str(value: Any) -> Any:
    # YAML `cpu: 16` arrives as an int; Kubernetes quantities are int-or-string.
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return str(value)
    return value


Quantity = Annotated[
    str,
    BeforeValidator(_quantity_to_str),
    Field(
        max_length=64,
        json_schema_extra={"x-kubernetes-int-or-string": True, "pattern": QUANTITY},
    ),
    AfterValidator(_pattern_checker(QUANTITY, "Kubernetes quantity", "'16', '500m', '200Gi'")),
]
