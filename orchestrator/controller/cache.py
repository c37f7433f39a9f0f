"""Watch caches: the controller's picture of the cluster, kept current by watches.

Reconciles read actual state from here, never from a GET or LIST per object (client-go's
informer + lister, or kopf's indexes). Each `Store` holds the latest version of every watched
object of one kind, trimmed to the fields the reconcilers read (a 1,000-job cluster costs a
few MB), with one secondary index (e.g. Jobs by their FineTuneJob).

`Informer` keeps a Store current for the child kinds (batch Jobs, Pods) with a list+watch
that carries a *server-side* label selector (`app.kubernetes.io/managed-by=kubetune`): the
API server never streams foreign Jobs or Pods to us. The custom resources arrive through
kopf's watches (every FineTuneJob is ours) and are put into their Stores by the handlers.

Writes go through: after a create or a status patch the worker puts the API server's answer
into the Store, so the next reconcile of that key never acts on the state before its own
write. A watch event older than what the Store holds (a smaller resourceVersion) is ignored.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from typing import Any

from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from orchestrator.api import labels as L

log = logging.getLogger("kubetune.cache")

Obj = dict[str, Any]
MANAGED_SELECTOR = f"{L.LABEL_MANAGED_BY}={L.MANAGED_BY}"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


def _rv(obj: Obj) -> int | None:
    try:
        return int(obj["metadata"]["resourceVersion"])
    except (KeyError, TypeError, ValueError):
        return None


class Store:
    """Thread-safe map (namespace, name) -> trimmed object, plus one secondary index."""

    def __init__(
        self,
        kind: str,
        trim: Callable[[Obj], Obj] | None = None,
        index: Callable[[Obj], Hashable | None] | None = None,
    ) -> None:
        self.kind = kind
        self._trim = trim or trim_custom
        self._index_fn = index
        self._lock = threading.Lock()
        self._objs: dict[tuple[str, str], Obj] = {}
        self._index: dict[Hashable, dict[tuple[str, str], Obj]] = {}
        self.synced = threading.Event()  # set once the first LIST has been loaded

    @staticmethod
    def key(obj: Obj) -> tuple[str, str]:
        meta = obj["metadata"]
        return (meta.get("namespace") or "", meta["name"])

    def put(self, obj: Obj) -> tuple[Obj | None, Obj] | None:
        """Stores `obj` (trimmed); returns (old, new), or None when the Store already holds
        a newer version."""
        new = self._trim(obj)
        k = self.key(new)
        with self._lock:
            old = self._objs.get(k)
            if old is not None:
                ro, rn = _rv(old), _rv(new)
                if ro is not None and rn is not None and rn < ro:
                    return None
            self._unindex(k, old)
            self._objs[k] = new
            if self._index_fn is not None:
                ix = self._index_fn(new)
                if ix is not None:
                    self._index.setdefault(ix, {})[k] = new
        return old, new

    def delete(self, namespace: str, name: str) -> Obj | None:
        k = (namespace, name)
        with self._lock:
            old = self._objs.pop(k, None)
            self._unindex(k, old)
        return old

    def _unindex(self, k: tuple[str, str], old: Obj | None) -> None:
        if old is None or self._index_fn is None:
            return
        ix = self._index_fn(old)
        bucket = self._index.get(ix) if ix is not None else None
        if bucket is not None:
            bucket.pop(k, None)
            if not bucket:
                del self._index[ix]

    def get(self, namespace: str, name: str) -> Obj | None:
        with self._lock:
            return self._objs.get((namespace, name))

    def indexed(self, value: Hashable) -> list[Obj]:
        with self._lock:
            return list(self._index.get(value, {}).values())

    def keys(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._objs)

    def replace(self, objs: list[Obj]) -> list[tuple[Obj | None, Obj | None]]:
        """After a (re)list: the Store holds exactly `objs`; returns what changed."""
        changes: list[tuple[Obj | None, Obj | None]] = []
        seen = set()
        for obj in objs:
            seen.add(self.key(obj))
            res = self.put(obj)
            if res is not None and res[0] != res[1]:
                changes.append(res)
        for k in set(self.keys()) - seen:
            old = self.delete(*k)
            if old is not None:
                changes.append((old, None))
        self.synced.set()
        return changes

    def __len__(self) -> int:
        with self._lock:
            return len(self._objs)


# --- trimming: only what the reconcilers read ---------------------------------------------
def _meta(meta: Obj, annotations: bool = True) -> Obj:
    out: Obj = {
        k: meta[k]
        for k in (
            "name",
            "namespace",
            "uid",
            "resourceVersion",
            "generation",
            "labels",
            "ownerReferences",
            "deletionTimestamp",
            "creationTimestamp",
        )
        if k in meta
    }
    if annotations and meta.get("annotations"):
        ann = {k: v for k, v in meta["annotations"].items() if k != LAST_APPLIED}
        if ann:
            out["annotations"] = ann
    return out


def trim_custom(obj: Obj) -> Obj:
    """FineTuneJob / FineTuneSweep: everything but managedFields and kubectl's copy."""
    out = {k: v for k, v in obj.items() if k != "metadata"}
    out["metadata"] = _meta(obj.get("metadata") or {})
    return out


def trim_job(obj: Obj) -> Obj:
    spec = obj.get("spec") or {}
    return {
        "metadata": _meta(obj.get("metadata") or {}, annotations=False),
        "spec": {
            "suspend": spec.get("suspend"),
            "ttlSecondsAfterFinished": spec.get("ttlSecondsAfterFinished"),
        },
        "status": {
            k: v
            for k, v in (obj.get("status") or {}).items()
            if k in ("active", "ready", "succeeded", "failed", "conditions")
        },
    }


def trim_pod(obj: Obj) -> Obj:
    meta = obj.get("metadata") or {}
    st = obj.get("status") or {}
    index = (meta.get("annotations") or {}).get(COMPLETION_INDEX)
    out_meta = _meta(meta, annotations=False)
    if index is not None:
        out_meta["annotations"] = {COMPLETION_INDEX: index}
    out_status: Obj = {
        "phase": st.get("phase"),
        # scheduling, and eviction/preemption (recorded before the evicted pod is gone)
        "conditions": [
            c
            for c in st.get("conditions") or []
            if c.get("type") in ("PodScheduled", "DisruptionTarget")
        ],
        "containerStatuses": _trim_containers(st.get("containerStatuses")),
    }
    if st.get("initContainerStatuses"):
        out_status["initContainerStatuses"] = _trim_containers(st["initContainerStatuses"])
    return {"metadata": out_meta, "status": out_status}


def _trim_containers(statuses: list[Obj] | None) -> list[Obj]:
    """How each container ended (exit code, termination message) or why it cannot start
    (the waiting reason: ErrImagePull, CreateContainerConfigError, ...)."""
    out = []
    for cs in statuses or []:
        state = cs.get("state") or {}
        kept: Obj = {}
        if state.get("terminated"):
            kept["terminated"] = state["terminated"]
        elif state.get("waiting"):
            waiting = state["waiting"]
            kept["waiting"] = {"reason": waiting.get("reason"), "message": waiting.get("message")}
        out.append({"name": cs.get("name"), "state": kept})
    return out


def relevant(obj: Obj | None) -> Any:
    """What a change must touch to be worth a reconcile (resourceVersion alone is not)."""
    if obj is None:
        return None
    meta = {k: v for k, v in obj["metadata"].items() if k != "resourceVersion"}
    return {**obj, "metadata": meta}


# --- list + watch ---------------------------------------------------------------------------
Handler = Callable[[Obj | None, Obj | None], None]


class Informer:
    """List, then watch from the list's resourceVersion, with a server-side label selector;
    relists after `410 Gone` or a broken stream. `on_change(old, new)` runs for every change
    that `relevant` sees (new is None for a deletion)."""

    def __init__(
        self,
        name: str,
        list_fn: Callable[..., Any],
        store: Store,
        on_change: Handler,
        selector: str = MANAGED_SELECTOR,
        page_size: int = 500,
        watch_timeout: int = 300,
    ) -> None:
        self.name = name
        self.list_fn = list_fn
        self.store = store
        self.on_change = on_change
        self.selector = selector
        self.page_size = page_size
        self.watch_timeout = watch_timeout
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"informer-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _emit(self, old: Obj | None, new: Obj | None) -> None:
        if relevant(old) == relevant(new):
            return
        try:
            self.on_change(old, new)
        except Exception:
            log.exception("%s informer handler failed", self.name)

    def _list(self) -> str:
        items: list[Obj] = []
        cont: str | None = None
        while True:
            kwargs: dict[str, Any] = {"label_selector": self.selector, "limit": self.page_size}
            if cont:
                kwargs["_continue"] = cont
            resp = self.list_fn(_preload_content=False, _request_timeout=(10, 60), **kwargs)
            doc = json.loads(resp.data)
            items.extend(doc.get("items") or [])
            cont = (doc.get("metadata") or {}).get("continue")
            if not cont:
                rv = str((doc.get("metadata") or {}).get("resourceVersion") or "")
                break
        for old, new in self.store.replace(items):
            self._emit(old, new)
        return rv

    def _watch(self, rv: str) -> Iterator[Obj]:
        resp = self.list_fn(
            label_selector=self.selector,
            watch=True,
            resource_version=rv,
            allow_watch_bookmarks=True,
            timeout_seconds=self.watch_timeout,
            _preload_content=False,
            _request_timeout=(10, self.watch_timeout + 30),
        )
        try:
            for line in iter_resp_lines(resp):
                if self._stop.is_set():
                    return
                yield json.loads(line)
        finally:
            resp.release_conn()

    def _run(self) -> None:
        backoff = 0.5
        rv = ""
        while not self._stop.is_set():
            try:
                if not rv:
                    rv = self._list()
                for ev in self._watch(rv):
                    typ, obj = ev.get("type"), ev.get("object") or {}
                    if typ == "ERROR":
                        if obj.get("code") == 410:  # too old: relist
                            rv = ""
                        break
                    new_rv = (obj.get("metadata") or {}).get("resourceVersion")
                    if new_rv:
                        rv = new_rv
                    if typ == "BOOKMARK":
                        continue
                    if typ == "DELETED":
                        meta = obj["metadata"]
                        old = self.store.delete(meta.get("namespace") or "", meta["name"])
                        if old is not None:
                            self._emit(old, None)
                    else:
                        res = self.store.put(obj)
                        if res is not None:
                            self._emit(*res)
                backoff = 0.5
            except ApiException as exc:
                if exc.status == 410:
                    rv = ""
                    continue
                log.warning(
                    "%s watch failed (%s); retrying in %.1fs", self.name, exc.status, backoff
                )
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
            except Exception as exc:  # broken stream, timeouts: resume from rv
                log.debug("%s watch interrupted: %r", self.name, exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)


def wait_synced(stores: list[Store], timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    return all(s.synced.wait(max(0.0, deadline - time.monotonic())) for s in stores)
