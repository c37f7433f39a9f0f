"""Budget feasibility before a trial costs GPU time, learned from the sweep's own trials.

A sweep over (rank, trainableParamPercent, ...) can propose combinations the budget solver
cannot reach for the base model (e.g. rank 64 at 0.1 % of a small model). The controller
does not read the model itself: it is the most privileged pod of the cluster, and reading a
user's `config.json` would mean decoding the user's credentials Secret and sending requests
to storage on the user's behalf (a confused deputy). Instead each trial pod reads the
model's `config.json` with its own credentials in its first seconds, before any weight is
downloaded, and tells the controller the architecture sizes over its authenticated report
link (``model`` in the report body). From then on the controller runs the trainer's
deterministic solver (torch-free, ``orchestrator.api.architectures``) on every new trial of
that sweep and refuses the unreachable ones before launch. The trial pods themselves refuse
an unreachable budget before downloading the model (reason BudgetInfeasible), so at most the
first `parallelism` trials of a sweep cost a pod start each.

What a pod reports is only trusted for its own sweep (the cache is keyed by sweep uid, and
a trial token is bound to it), and it is bounded before use: a forged config can at worst
make its own sweep refuse or launch trials, which its author could do anyway.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from orchestrator.api import FineTuneJobSpec
from orchestrator.api.architectures import shape_from_config
from orchestrator.api.budget import ModelShape, unreachable_budget
from orchestrator.controller.bounded import BoundedMap

log = logging.getLogger("kubetune.feasibility")
MAX_KEYS = 64  # a config.json's scalar entries the solver may need (it reads about ten)
MAX_STR = 128


def model_facts(raw: Any) -> dict[str, Any] | None:
    """The scalar entries of a reported config.json (numbers, booleans, short strings), or
    None when the report carries nothing usable. Hostile input: anything else is dropped."""
    if not isinstance(raw, dict):
        return None
    out: dict[str, Any] = {}
    for k, v in raw.items():
        if len(out) >= MAX_KEYS:
            break
        if not isinstance(k, str) or len(k) > MAX_STR:
            continue
        number = isinstance(v, int | float) and math.isfinite(v) and abs(v) < 1 << 53
        if number or isinstance(v, bool) or (isinstance(v, str) and len(v) <= MAX_STR):
            out[k] = v
    return out or None


class BudgetChecker:
    def __init__(self, capacity: int = 1024) -> None:
        # (sweep uid, model uri) -> shape; bounded, so a deleted sweep's entries age out
        self._shapes: BoundedMap[tuple[str, str], ModelShape] = BoundedMap(capacity)

    @staticmethod
    def _key(sweep_uid: str, model_uri: str) -> tuple[str, str]:
        return sweep_uid, model_uri.rstrip("/")

    def learn(self, sweep_uid: str, model_uri: str, facts: dict[str, Any] | None) -> bool:
        """A trial of this sweep reported its base model's config; True when it gave a shape
        the solver can use (unknown architectures are left to the trainer)."""
        shape = shape_from_config(facts) if facts else None
        if shape is None:
            return False
        key = self._key(sweep_uid, model_uri)
        if self._shapes.get(key) is None:
            log.info("sweep %s: learned the shape of %s from a trial (%s, %d parameters); "
                     "unreachable budgets are refused before launch from now on",
                     sweep_uid, model_uri, shape.model_type, shape.total_params)
        self._shapes[key] = shape
        return True

    def infeasible(self, sweep_uid: str, spec: FineTuneJobSpec) -> str | None:
        """Why this spec's parameter budget cannot be met, or None when it can (or the
        model's shape is not known yet)."""
        if spec.method.trainable_param_percent is None:
            return None
        shape = self._shapes.get(self._key(sweep_uid, spec.model.uri))
        return None if shape is None else unreachable_budget(shape, spec.method, spec.model.uri)
