"""Search space: sweep parameters → Optuna distributions, and back.

Optuna categorical choices must be None/bool/int/float/str. A choice such as
``[q_proj, v_proj]`` is stored as the string ``json:["q_proj","v_proj"]`` and decoded back
to the list; plain strings that happen to start with ``json:`` are encoded too, so decoding
never needs the spec (a restarted controller or the CLI can read params straight from the
study).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from orchestrator.sweep.errors import SweepConfigError

ParamKind = Literal["int", "float", "categorical"]
JSON_PREFIX = "json:"
MAX_GRID_POINTS = 100_000


def encode_choice(value: Any) -> bool | int | float | str | None:
    """A value Optuna can store, reversible with decode_choice."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str) and not value.startswith(JSON_PREFIX):
        return value
    try:
        return JSON_PREFIX + json.dumps(value, separators=(",", ":"), sort_keys=True)
    except TypeError as exc:
        raise SweepConfigError(f"categorical choice {value!r} is not JSON-serialisable") from exc


def decode_choice(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(JSON_PREFIX):
        return json.loads(value[len(JSON_PREFIX) :])
    return value


@dataclass(frozen=True)
class Param:
    name: str
    kind: ParamKind
    distribution: BaseDistribution

    def grid_values(self) -> list[Any]:
        """Every value a grid search visits (encoded, as Optuna stores them)."""
        d = self.distribution
        if isinstance(d, CategoricalDistribution):
            return list(d.choices)
        if isinstance(d, IntDistribution):
            if d.log:
                raise SweepConfigError(
                    f"parameter {self.name!r}: grid search cannot enumerate a log-scale int "
                    "range; use categorical values or a linear range with a step"
                )
            return list(range(d.low, d.high + 1, d.step))
        assert isinstance(d, FloatDistribution)
        if d.step is None:
            raise SweepConfigError(
                f"parameter {self.name!r}: grid search needs a step for float ranges "
                "(float: {low, high, step}) or categorical values"
            )
        n = math.floor((d.high - d.low) / d.step + 1e-9) + 1
        # Round away float noise (0.1 + 2*0.1 = 0.30000000000000004) so values match
        # what FloatDistribution(step=...) itself produces.
        digits = max(0, -math.floor(math.log10(d.step))) + 6
        return [round(d.low + i * d.step, digits) for i in range(n)]


class SearchSpace:
    """Ordered parameters with their Optuna distributions."""

    def __init__(self, params: Iterable[Param]) -> None:
        self.params = tuple(params)
        self._by_name = {p.name: p for p in self.params}
        if len(self._by_name) != len(self.params):
            names = [p.name for p in self.params]
            dup = next(n for n in names if names.count(n) > 1)
            raise SweepConfigError(f"parameter {dup!r} appears twice")

    def __len__(self) -> int:
        return len(self.params)

    def __getitem__(self, name: str) -> Param:
        return self._by_name[name]

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    @property
    def distributions(self) -> dict[str, BaseDistribution]:
        return {p.name: p.distribution for p in self.params}

    def decode(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Optuna params → the values written into the trial's FineTuneJob spec."""
        out: dict[str, Any] = {}
        for name, value in params.items():
            p = self._by_name.get(name)
            if p is not None and p.kind == "int":
                out[name] = int(value)
            else:
                out[name] = decode_choice(value)
        return out

    def encode(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The inverse of decode (for enqueueing known points)."""
        return {
            k: encode_choice(v)
            if self._by_name.get(k, None) and self[k].kind == "categorical"
            else v
            for k, v in values.items()
        }

    def grid(self) -> dict[str, list[Any]]:
        """Search space for Optuna's GridSampler; errors clearly on a non-finite grid."""
        grid = {p.name: p.grid_values() for p in self.params}
        size = math.prod(len(v) for v in grid.values())
        if size > MAX_GRID_POINTS:
            raise SweepConfigError(
                f"the grid has {size} points (more than {MAX_GRID_POINTS}): use larger steps, "
                "fewer categorical values, or a non-grid sampler"
            )
        return grid

    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.grid().values())


def _field(obj: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    for n in names:
        if n in obj and obj[n] is not None:
            return obj[n]
    return default


def build_param(spec: Mapping[str, Any]) -> Param:
    """One wire-format parameter ``{name, int|float|categorical}`` → Param."""
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise SweepConfigError(f"parameter without a name: {dict(spec)!r}")
    kinds = [k for k in ("int", "float", "categorical") if spec.get(k) is not None]
    if len(kinds) != 1:
        raise SweepConfigError(
            f"parameter {name!r} needs exactly one of int, float or categorical "
            f"(found {', '.join(kinds) or 'none'})"
        )
    kind = kinds[0]
    body = spec[kind]
    try:
        if kind == "categorical":
            if not isinstance(body, list | tuple) or not body:
                raise SweepConfigError(f"parameter {name!r}: categorical needs a non-empty list")
            choices = [encode_choice(v) for v in body]
            if len(set(map(json.dumps, choices))) != len(choices):
                raise SweepConfigError(f"parameter {name!r}: categorical choices repeat")
            return Param(name, "categorical", CategoricalDistribution(choices))
        low, high = body["low"], body["high"]
        log = bool(_field(body, "log", default=False))
        step = _field(body, "step")
        if low > high:
            raise SweepConfigError(f"parameter {name!r}: low ({low}) must be <= high ({high})")
        if log and step is not None and not (kind == "int" and step == 1):
            raise SweepConfigError(f"parameter {name!r}: step cannot be combined with log")
        if kind == "int":
            if log and low < 1:
                raise SweepConfigError(f"parameter {name!r}: a log-scale int range needs low >= 1")
            return Param(
                name, "int", IntDistribution(int(low), int(high), log=log, step=int(step or 1))
            )
        if log and low <= 0:
            raise SweepConfigError(f"parameter {name!r}: a log-scale float range needs low > 0")
        return Param(
            name,
            "float",
            FloatDistribution(
                float(low), float(high), log=log, step=None if step is None else float(step)
            ),
        )
    except (KeyError, TypeError) as exc:
        raise SweepConfigError(f"parameter {name!r}: malformed {kind} range: {exc}") from exc
    except ValueError as exc:  # Optuna's own distribution checks
        raise SweepConfigError(f"parameter {name!r}: {exc}") from exc


def build_space(parameters: Iterable[Mapping[str, Any]]) -> SearchSpace:
    """Wire-format ``spec.parameters`` → SearchSpace (use ``to_wire``/``model_dump(by_alias=
    True)`` first for pydantic models; SweepConfig.from_spec does this)."""
    params = [build_param(p) for p in parameters]
    if not params:
        raise SweepConfigError("a sweep needs at least one parameter")
    return SearchSpace(params)
