"""The controller's work queue and watch caches, without a cluster."""

from __future__ import annotations

import threading
import time

import pytest

from orchestrator.controller.cache import Store, trim_job, trim_pod
from orchestrator.controller.jobs import created_attempt, status_patch
from orchestrator.controller.settings import ControllerSettings
from orchestrator.controller.workqueue import WorkQueue

pytestmark = pytest.mark.unit


def test_a_key_added_many_times_is_worked_on_once() -> None:
    q = WorkQueue()
    for _ in range(5):
        q.add("a")
    q.add("b")
    assert len(q) == 2
    assert q.get(timeout=0.1) == "a" and q.get(timeout=0.1) == "b"
    assert q.get(timeout=0.05) is None


def test_a_key_is_never_handed_to_two_workers_and_no_add_is_lost() -> None:
    q = WorkQueue()
    q.add("a")
    assert q.get(timeout=0.1) == "a"
    q.add("a")  # an event while a worker holds the key
    assert q.get(timeout=0.05) is None  # not handed to a second worker
    q.done("a")
    assert q.get(timeout=0.1) == "a"  # ... but worked on again afterwards
    q.done("a")
    assert q.get(timeout=0.05) is None


def test_add_after_and_backoff() -> None:
    q = WorkQueue(base_delay=0.01)
    q.add_after("x", 0.05)
    q.add_after("x", 10)  # a later due time does not postpone the earlier one
    t0 = time.monotonic()
    assert q.get(timeout=1) == "x"
    assert 0.04 <= time.monotonic() - t0 < 0.5
    q.done("x")
    delays = [q.add_rate_limited("y") for _ in range(4)]
    assert delays == [0.01, 0.02, 0.04, 0.08]
    q.forget("y")
    assert q.add_rate_limited("y") == 0.01


def test_workers_see_each_key_exclusively() -> None:
    q = WorkQueue()
    active: set[str] = set()
    clash: list[str] = []
    lock = threading.Lock()

    def work() -> None:
        while (key := q.get(timeout=0.2)) is not None:
            with lock:
                if key in active:
                    clash.append(str(key))
                active.add(str(key))
            time.sleep(0.001)
            with lock:
                active.discard(str(key))
            q.done(key)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for i in range(2000):
        q.add(f"k{i % 7}")
    for t in threads:
        t.join()
    assert clash == []


def _job(rv: str, active: int = 0) -> dict:
    return {
        "kind": "Job",
        "metadata": {"name": "j-a1", "namespace": "ns", "resourceVersion": rv,
                     "labels": {"kubetune.io/job": "j"}, "managedFields": [{"big": 1}]},
        "spec": {"suspend": False, "template": {"spec": {"containers": [{}] * 3}}},
        "status": {"active": active, "uncountedTerminatedPods": {}},
    }


def test_store_trims_indexes_and_ignores_older_versions() -> None:
    s = Store("Job", trim_job, index=lambda o: o["metadata"]["labels"]["kubetune.io/job"])
    s.put(_job("10", active=1))
    got = s.get("ns", "j-a1")
    assert got is not None and "template" not in got["spec"] and "managedFields" not in str(got)
    assert s.put(_job("9", active=0)) is None  # an older event after a write-through
    assert s.get("ns", "j-a1")["status"]["active"] == 1  # type: ignore[index]
    assert [o["metadata"]["name"] for o in s.indexed("j")] == ["j-a1"]
    s.delete("ns", "j-a1")
    assert s.indexed("j") == [] and len(s) == 0


def test_pod_trim_keeps_what_failure_attribution_reads() -> None:
    pod = {
        "metadata": {"name": "p", "namespace": "ns", "resourceVersion": "1",
                     "annotations": {"batch.kubernetes.io/job-completion-index": "1", "x": "y"}},
        "spec": {"containers": [{"name": "trainer"}]},
        "status": {"phase": "Failed", "conditions": [{"type": "Ready"}, {"type": "PodScheduled"}],
                   "containerStatuses": [{"name": "trainer", "image": "i", "state": {
                       "terminated": {"exitCode": 65, "message": "{}"}}}]},
    }
    t = trim_pod(pod)
    assert t["metadata"]["annotations"] == {"batch.kubernetes.io/job-completion-index": "1"}
    assert t["status"]["conditions"] == [{"type": "PodScheduled"}]
    assert t["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 65
    assert "spec" not in t


def test_status_patch_carries_only_changes() -> None:
    before = {"phase": "Pending", "attempts": 1, "message": "a", "progress": {"step": 1}}
    after = {"phase": "Running", "attempts": 1, "message": "a"}
    assert status_patch(before, after) == {"phase": "Running", "progress": None}
    assert status_patch(after, after) == {}


def test_created_attempt_reads_the_created_condition() -> None:
    conds = [{"type": "Created", "status": "True", "message": "attempt 3: Job j-a3 created"}]
    assert created_attempt({"conditions": conds}) == 3
    assert created_attempt({}) == 0


def test_every_setting_has_an_environment_variable_in_help() -> None:
    text = ControllerSettings.describe()
    for name in ("KUBETUNE_WORKERS", "KUBETUNE_LEASE_NAMESPACE", "KUBETUNE_RESYNC_SECONDS"):
        assert name in text
    s = ControllerSettings.from_env({"KUBETUNE_WORKERS": "4", "KUBETUNE_API_QPS": "50"})
    assert s.workers == 4 and s.api_qps == 50.0 and s.lease_namespace == ""


class _Resp:
    def __init__(self, doc: object = None, lines: list[dict] | None = None) -> None:
        import json as _json

        self.data = _json.dumps(doc).encode() if doc is not None else b""
        self._lines = [(_json.dumps(x) + "\n").encode() for x in lines or []]

    def stream(self, amt: object = None, decode_content: bool = False) -> list[bytes]:
        return self._lines

    def release_conn(self) -> None:
        pass


def test_informer_lists_watches_relists_after_410_and_always_sends_the_selector() -> None:
    from orchestrator.controller.cache import Informer

    def job(name: str, rv: str, active: int = 0) -> dict:
        return {"metadata": {"name": name, "namespace": "ns", "resourceVersion": rv,
                             "labels": {"kubetune.io/job": name[:-3]}},
                "spec": {}, "status": {"active": active}}

    calls: list[dict] = []
    script = [
        _Resp({"metadata": {"resourceVersion": "10"}, "items": [job("a-a1", "5")]}),
        _Resp(lines=[
            {"type": "ADDED", "object": job("b-a1", "11")},
            {"type": "MODIFIED", "object": job("a-a1", "12")},  # rv only: not relevant
            {"type": "MODIFIED", "object": job("a-a1", "13", active=1)},
            {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "14"}}},
            {"type": "ERROR", "object": {"code": 410}},
        ]),
        _Resp({"metadata": {"resourceVersion": "20"}, "items": [job("b-a1", "11")]}),
    ]
    store = Store("Job", trim_job)
    changes: list[tuple[str | None, str | None]] = []
    inf: Informer

    def list_fn(**kw: object) -> _Resp:
        calls.append(kw)
        if not script:
            inf.stop()
            return _Resp(lines=[])
        return script.pop(0)

    def on_change(old: dict | None, new: dict | None) -> None:
        changes.append(((old or {}).get("metadata", {}).get("name"),
                        (new or {}).get("metadata", {}).get("name")))

    inf = Informer("jobs", list_fn, store, on_change)
    inf._run()
    assert all(c["label_selector"] == "app.kubernetes.io/managed-by=kubetune" for c in calls)
    assert calls[1]["watch"] is True and calls[1]["resource_version"] == "10"
    assert changes == [(None, "a-a1"), (None, "b-a1"), ("a-a1", "a-a1"), ("a-a1", None)]
    assert store.keys() == [("ns", "b-a1")] and store.synced.is_set()


def test_pod_trim_keeps_why_a_pod_cannot_start_and_its_disruption() -> None:
    pod = {
        "metadata": {"name": "p", "namespace": "ns", "resourceVersion": "1"},
        "status": {"phase": "Pending", "conditions": [
            {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}],
            "initContainerStatuses": [{"name": "init", "imageID": "x", "state": {
                "waiting": {"reason": "ImagePullBackOff", "message": "Back-off"}}}],
            "containerStatuses": [{"name": "trainer", "image": "i", "state": {
                "waiting": {"reason": "CreateContainerConfigError", "message": "no key"}}}]},
    }
    t = trim_pod(pod)
    assert t["status"]["conditions"][0]["reason"] == "EvictionByEvictionAPI"
    assert t["status"]["containerStatuses"] == [{"name": "trainer", "state": {
        "waiting": {"reason": "CreateContainerConfigError", "message": "no key"}}}]
    assert t["status"]["initContainerStatuses"][0]["state"]["waiting"]["reason"] == (
        "ImagePullBackOff")


@pytest.mark.parametrize("given,used", [
    ("http://kubetune-report.ns.svc:8081", "http://kubetune-report.ns.svc:8081/report"),
    ("http://kubetune-report.ns.svc:8081/", "http://kubetune-report.ns.svc:8081/report"),
    ("https://r.example:8443/report", "https://r.example:8443/report"),
])
def test_the_report_url_trainers_get_reaches_the_endpoint(given: str, used: str) -> None:
    """A bare Service address used to make every trial's report a 404: no pruning at all."""
    from orchestrator.controller.settings import ControllerSettings

    assert ControllerSettings(report_url=given).report_url == used
    with pytest.raises(ValueError, match="KUBETUNE_REPORT_URL must be an http"):
        ControllerSettings(report_url="kubetune-report:8081")
