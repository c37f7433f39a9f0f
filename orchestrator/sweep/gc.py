"""Garbage collection of sweep studies: a deleted FineTuneSweep's study leaves the storage.

The controller names a sweep's study ``<namespace>.<sweep>.<uid[:8]>`` and records the
sweep's namespace, name and full uid in the study's user attributes. A study is garbage
when no live sweep has its uid: a sweep deleted and re-created under the same name has a
new uid, and so a new study that is never collected with the old one.

``studies_to_delete`` is the pure decision; ``stored_studies`` and ``delete_studies`` are
the storage's part. Studies that are not the controller's (no recorded uid and a name not
of the form above, e.g. ``kubetune sweep --local``'s ``<namespace>.<sweep>``) are never
touched, nor are studies of namespaces this controller does not watch.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.storages import BaseStorage

ATTR_STUDY_NAMESPACE = "kubetune.io/namespace"
ATTR_STUDY_SWEEP = "kubetune.io/sweep"
ATTR_STUDY_UID = "kubetune.io/sweep-uid"

# <namespace (a DNS label: no dots)>.<sweep name (may hold dots)>.<first 8 hex of the uid>
_NAME = re.compile(r"^(?P<ns>[a-z0-9]([-a-z0-9]*[a-z0-9])?)\.(?P<sweep>.+)\.(?P<uid>[0-9a-f]{8})$")


def sweep_study_name(namespace: str, sweep: str, uid: str) -> str:
    """The controller's study of one sweep object (a re-created sweep gets a new one)."""
    return f"{namespace}.{sweep}.{uid[:8]}"


@dataclass(frozen=True)
class StoredStudy:
    """A controller study as found in the storage."""

    name: str
    namespace: str
    sweep: str
    uid: str  # the full uid, or only its first 8 characters for a study that has no record


def parse_study(name: str, user_attrs: dict[str, Any] | None = None) -> StoredStudy | None:
    """The sweep a study belongs to, or None when it is not a controller sweep study."""
    attrs = user_attrs or {}
    uid, ns, sweep = (
        attrs.get(k) for k in (ATTR_STUDY_UID, ATTR_STUDY_NAMESPACE, ATTR_STUDY_SWEEP)
    )
    if isinstance(uid, str) and isinstance(ns, str) and isinstance(sweep, str) and uid:
        return StoredStudy(name, ns, sweep, uid)
    m = _NAME.match(name)
    if m is None:
        return None
    return StoredStudy(name, m["ns"], m["sweep"], m["uid"])


def studies_to_delete(
    studies: Iterable[StoredStudy],
    live_uids: Collection[str],
    namespaces: Collection[str] | None = None,
) -> list[str]:
    """Names of the studies whose sweep no longer exists.

    ``live_uids``: the uid of every FineTuneSweep that exists (from a complete, current
    listing: an unsynced cache must not be passed here). ``namespaces``: the namespaces
    whose sweeps ``live_uids`` covers (None: all). A study is kept when its namespace is
    not covered, or when a live uid is its recorded uid (or, for a study without a record,
    starts with the 8 characters in its name)."""
    live = set(live_uids)
    prefixes = {u[:8] for u in live}
    doomed = []
    for s in studies:
        if namespaces is not None and s.namespace not in namespaces:
            continue
        if s.uid in live or (len(s.uid) == 8 and s.uid in prefixes):
            continue
        doomed.append(s.name)
    return sorted(doomed)


def stored_studies(storage: BaseStorage) -> list[StoredStudy]:
    """The controller sweep studies in ``storage`` (one query: no trials are read)."""
    out = []
    for fs in storage.get_all_studies():
        parsed = parse_study(fs.study_name, fs.user_attrs)
        if parsed is not None:
            out.append(parsed)
    return out


def delete_if_uid(storage: BaseStorage, name: str, uid: str) -> bool:
    """Deletes study ``name`` unless it records a uid other than ``uid`` (a different sweep
    that shares the name's 8-character uid prefix). False: nothing was deleted."""
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        return False
    recorded = storage.get_study_user_attrs(study_id).get(ATTR_STUDY_UID)
    if recorded is not None and recorded != uid:
        return False
    try:
        optuna.delete_study(study_name=name, storage=storage)
    except KeyError:
        return False
    return True


def is_disk_full(exc: BaseException) -> bool:
    """Whether a storage error (or one it was raised from) says the disk is full."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        text = str(e).lower()
        if "database or disk is full" in text or "no space left on device" in text:
            return True
        e = e.__cause__ or e.__context__ or getattr(e, "orig", None)
    return False


def sqlite_path(url: str) -> str | None:
    """The database file of a ``sqlite:///`` URL (None for other URLs and ``:memory:``)."""
    if not url.startswith("sqlite:///"):
        return None
    path = url[len("sqlite:///") :].split("?", 1)[0]
    return path if path and path != ":memory:" else None


def volume_usage(url: str) -> tuple[str, float] | None:
    """(directory, used fraction of its filesystem) for a SQLite study storage, else None."""
    path = sqlite_path(url)
    if path is None:
        return None
    directory = os.path.dirname(os.path.abspath(path))
    try:
        usage = shutil.disk_usage(directory)
    except OSError:
        return None
    return directory, (usage.used / usage.total if usage.total else 0.0)
