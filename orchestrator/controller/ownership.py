"""Who owns an object that already has a child's name: the controller adopts nothing.

Child names are deterministic (`render.names`), so anyone allowed to create a ConfigMap,
Service, Job, Secret or FineTuneJob in a namespace can create one with a child's name first.
Adopting it would hand the trainer pods someone else's config, rendezvous Service, report
key or Job (and its result). So whenever a create answers 409 AlreadyExists, or the
controller reads a child by name, the existing object's *controller* ownerReference is
compared with the one the controller would have set (the rendered body carries it):

- the same owner uid: ours (created before a crash, or the cache lags) — use it;
- an owner of the same kind and name but another uid: the child of an earlier object with
  the same name, deleted and re-applied while the garbage collector has not yet removed its
  children — wait (never take its result), the GC deletes it;
- anything else (no controller, another owner): a foreign object — `NameConflict`, nothing
  is overwritten; the user renames or deletes it.

Pure: no API calls here (`Kube` reads the existing object and calls `check`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from orchestrator.api import reasons as R
from orchestrator.api.conditions import get_condition, set_condition

Ownership = Literal["owned", "previous", "foreign"]


def controller_ref(obj: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ownerReference with `controller: true`, if any."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return dict(ref)
    return None


def ownership(existing: Mapping[str, Any], expected: Mapping[str, Any]) -> Ownership:
    """How `existing` relates to `expected`, the controller ownerReference we would set."""
    ref = controller_ref(existing)
    if ref is None:
        return "foreign"
    if expected.get("uid") and ref.get("uid") == expected.get("uid"):
        return "owned"
    same_owner_name = (
        ref.get("kind") == expected.get("kind")
        and ref.get("name") == expected.get("name")
        and str(ref.get("apiVersion", "")).split("/")[0]
        == str(expected.get("apiVersion", "")).split("/")[0]
    )
    return "previous" if same_owner_name else "foreign"


class NameConflict(Exception):
    """A foreign object holds a child's name; the parent gets a `NameConflict` condition."""

    #: the parent's Created=False reason and the type of the Event that announces it
    reason = R.REASON_NAME_CONFLICT
    event_type = "Warning"

    def __init__(self, kind: str, name: str, owner: Mapping[str, Any], holder: str) -> None:
        self.kind, self.name = kind, name
        self.message = (
            f"{kind} {name} already exists and is not owned by this {owner.get('kind')} "
            f"({holder}); the controller does not adopt it and has overwritten nothing: "
            f"delete {kind} {name}, or rename this {owner.get('kind')}"
        )
        super().__init__(self.message)


class PreviousOwner(Exception):
    """A child of an earlier object with the same name still exists (garbage collection
    pending): the parent waits for it to go, never uses it."""

    reason = R.REASON_WAITING_FOR_CLEANUP
    event_type = "Normal"

    def __init__(self, kind: str, name: str, owner: Mapping[str, Any], old_uid: str) -> None:
        self.kind, self.name = kind, name
        self.message = (
            f"{kind} {name} still belongs to an earlier {owner.get('kind')} named "
            f"{owner.get('name')} (uid {old_uid}) and is being garbage-collected; waiting "
            f"for it to go (if it stays, e.g. held by a finalizer, delete {kind} {name})"
        )
        super().__init__(self.message)


def _holder(existing: Mapping[str, Any]) -> str:
    ref = controller_ref(existing)
    if ref is None:
        return "it has no controller ownerReference"
    return f"its controller is {ref.get('kind')} {ref.get('name')} uid {ref.get('uid')}"


def check(existing: Mapping[str, Any], expected: Mapping[str, Any], kind: str) -> None:
    """Returns when `existing` is ours; raises PreviousOwner or NameConflict otherwise."""
    name = str((existing.get("metadata") or {}).get("name"))
    verdict = ownership(existing, expected)
    if verdict == "owned":
        return
    if verdict == "previous":
        old = controller_ref(existing) or {}
        raise PreviousOwner(kind, name, expected, str(old.get("uid")))
    raise NameConflict(kind, name, expected, _holder(existing))


def expected_owner(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """The controller ownerReference a rendered body carries (None: no ownership check)."""
    return controller_ref(body)


def blocked_condition(
    conditions: list[dict[str, Any]], exc: NameConflict | PreviousOwner
) -> tuple[list[dict[str, Any]], bool]:
    """The parent's `Created` condition while a child's name is held (False, reason
    NameConflict or WaitingForCleanup); True in second place when it changed (emit then)."""
    old = get_condition(conditions, R.COND_CREATED) or {}
    changed = old.get("reason") != exc.reason or old.get("message") != exc.message
    return set_condition(conditions, R.COND_CREATED, False, exc.reason, exc.message), changed
