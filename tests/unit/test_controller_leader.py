"""Leader election (orchestrator.controller.leader): LeaseLock against an in-memory Lease API
with the API server's optimistic concurrency, on fake clocks. The two-process test with a
real API server and SIGSTOP is tests/cluster/test_leader_election.py."""

from __future__ import annotations

import copy
import datetime as dt
from typing import Any, NoReturn

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from orchestrator.controller.kube import Kube
from orchestrator.controller.leader import LeadershipLost, LeaseLock, check_durations
from orchestrator.controller.settings import ControllerSettings

pytestmark = pytest.mark.unit

T0 = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)


class Clock:
    """A monotonic clock and a wall clock that only move when told (the wall one may be
    skewed against another replica's)."""

    def __init__(self, skew: float = 0.0) -> None:
        self.t = 1000.0
        self.skew = skew

    def __call__(self) -> float:
        return self.t

    def wall(self) -> dt.datetime:
        return T0 + dt.timedelta(seconds=self.t - 1000.0 + self.skew)

    def advance(self, seconds: float) -> None:
        self.t += seconds


class FakeLeases:
    """The coordination.k8s.io/v1 Lease calls LeaseLock makes, with resourceVersion checks
    (a stale replace gets 409, as from the API server); records every call's timeout."""

    def __init__(self) -> None:
        self.lease: Any = None
        self.rv = 0
        self.calls: list[tuple[str, Any]] = []
        self.fail: Exception | None = None
        self.during: Any = None  # called inside each request (e.g. to advance a clock)

    def _enter(self, verb: str, kw: dict[str, Any]) -> None:
        self.calls.append((verb, kw.get("_request_timeout")))
        if self.during is not None:
            self.during()
        if self.fail is not None:
            raise self.fail

    def _store(self, body: Any) -> Any:
        stored = copy.deepcopy(body)
        self.rv += 1
        stored.metadata.resource_version = str(self.rv)
        self.lease = stored
        return copy.deepcopy(stored)

    def read_namespaced_lease(self, name: str, namespace: str, **kw: Any) -> Any:
        self._enter("read", kw)
        if self.lease is None:
            raise ApiException(status=404)
        return copy.deepcopy(self.lease)

    def create_namespaced_lease(self, namespace: str, body: Any, **kw: Any) -> Any:
        self._enter("create", kw)
        if self.lease is not None:
            raise ApiException(status=409)
        return self._store(body)

    def replace_namespaced_lease(self, name: str, namespace: str, body: Any, **kw: Any) -> Any:
        self._enter("replace", kw)
        if self.lease is None:
            raise ApiException(status=404)
        if body.metadata.resource_version != self.lease.metadata.resource_version:
            raise ApiException(status=409)
        return self._store(body)

    @property
    def holder(self) -> str:
        return str(self.lease.spec.holder_identity or "")

    def writes(self) -> int:
        return sum(1 for verb, _ in self.calls if verb != "read")


def _lost(reason: str) -> NoReturn:
    raise LeadershipLost(reason)


def lock(api: FakeLeases, identity: str, clock: Clock, **kw: Any) -> LeaseLock:
    return LeaseLock(api, "kubetune-controller", "kubetune-system", identity, clock=clock,
                     wall=clock.wall, on_lost=_lost, **kw)


class StopAfter:
    """Stands in for LeaseLock._stop: each wait advances the fake clock instead of sleeping."""

    def __init__(self, clock: Clock, rounds: int = 1000) -> None:
        self.clock, self.rounds, self.waits = clock, rounds, []  # type: ignore[var-annotated]

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        self.clock.advance(timeout or 0.0)
        self.rounds -= 1
        return self.rounds < 0

    def set(self) -> None:
        self.rounds = -1


def test_first_replica_creates_the_lease_and_leads() -> None:
    api, clock = FakeLeases(), Clock()
    a = lock(api, "a", clock)
    assert a.try_acquire_or_renew() and a.leading()
    assert api.holder == "a" and api.lease.spec.lease_duration_seconds == 15
    a.check()  # the fence lets a leader write


def test_a_standby_ignores_the_remote_timestamp_and_waits_on_its_own_clock() -> None:
    # A's wall clock is an hour behind B's: B comparing renewTime with its wall clock would
    # take over at once (what LeaseLock did before). B waits for the record to stay unchanged.
    api, ca, cb = FakeLeases(), Clock(skew=-3600), Clock()
    a, b = lock(api, "a", ca), lock(api, "b", cb)
    assert a.try_acquire_or_renew()
    for _ in range(20):  # 40 s of A renewing every 2 s: B never takes over
        assert not b.try_acquire_or_renew()
        ca.advance(2)
        cb.advance(2)
        assert a.try_acquire_or_renew()
    assert api.holder == "a" and a.leading()
    # A stops renewing. To a standby whose wall clock is two hours behind, A's renewTime lies
    # an hour in the future (never "expired" by the old rule); it takes over exactly when it
    # has seen no change for 15 s on its own clock.
    cc = Clock(skew=-7200)
    c = lock(api, "c", cc)
    assert not c.try_acquire_or_renew()  # first look: the timer starts now
    cc.advance(14.9)
    assert not c.try_acquire_or_renew()
    cc.advance(0.2)
    assert c.try_acquire_or_renew() and api.holder == "c"
    assert api.lease.spec.lease_transitions == 1


def test_every_observed_change_restarts_the_standbys_wait() -> None:
    api, clock = FakeLeases(), Clock()
    a, b = lock(api, "a", clock), lock(api, "b", clock)
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()
    clock.advance(10)
    assert a.try_acquire_or_renew()  # renewed: a new resourceVersion and renewTime
    clock.advance(10)  # 20 s since B's first look, 10 s since the change it then sees
    assert not b.try_acquire_or_renew()
    clock.advance(14)
    assert not b.try_acquire_or_renew()
    clock.advance(1.5)
    assert b.try_acquire_or_renew() and api.holder == "b"


def test_the_standby_cannot_take_over_before_the_leader_stopped_writing() -> None:
    # The leader's validity counts from *before* its renewal was sent, the standby's wait from
    # *after* it saw the result, and lease (15 s) > renew deadline (10 s): whatever the
    # request latencies, the leader's fence closes before the standby may start.
    api, clock = FakeLeases(), Clock()
    a, b = lock(api, "a", clock), lock(api, "b", clock)
    api.during = lambda: clock.advance(1.5)  # slow requests
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()
    a_valid_until = a._renewed_at + a.renew_deadline  # type: ignore[operator]
    while not b.try_acquire_or_renew():
        clock.advance(0.5)
    takeover = clock()
    assert takeover - a_valid_until >= 4.9
    with pytest.raises(LeadershipLost):
        a.check()


def test_the_leader_exits_as_soon_as_it_sees_another_holder() -> None:
    api, clock = FakeLeases(), Clock()
    a = lock(api, "a", clock)
    assert a.try_acquire_or_renew()
    # someone (a standby with a bad clock, or an operator) wrote the Lease
    taken = copy.deepcopy(api.lease)
    taken.spec.holder_identity = "intruder"
    api._store(taken)
    version = api.rv
    with pytest.raises(LeadershipLost, match="held by 'intruder'"):
        a.try_acquire_or_renew()  # its renewal gets 409, the read shows the new holder
    assert api.rv == version and api.holder == "intruder" and not a.leading()
    with pytest.raises(LeadershipLost):
        a.check()


def test_a_leader_whose_lease_was_deleted_does_not_recreate_it() -> None:
    api, clock = FakeLeases(), Clock()
    a = lock(api, "a", clock)
    assert a.try_acquire_or_renew()
    api.lease = None
    with pytest.raises(LeadershipLost, match="deleted"):
        a.try_acquire_or_renew()
    assert api.lease is None


def test_renew_loop_exits_at_the_renew_deadline_when_renewals_fail() -> None:
    api, clock = FakeLeases(), Clock()
    a = lock(api, "a", clock)
    assert a.try_acquire_or_renew()
    renewed = clock()
    api.fail = ApiException(status=500)  # the API server answers errors from now on
    a._stop = StopAfter(clock)  # type: ignore[assignment]
    with pytest.raises(LeadershipLost, match="renew deadline of 10s"):
        a._renew_loop()
    # at the deadline, not a retry period later, and before a standby could take over (15 s)
    assert clock() - renewed == pytest.approx(10.0)
    # tries every retry period, each request bounded by the time left before the deadline
    renewals = [t for _, t in api.calls[2:]]  # after the first read and create
    assert renewals == [5.0, 5.0, pytest.approx(4.0), pytest.approx(2.0)]


def test_renew_loop_keeps_renewing_while_it_can() -> None:
    api, clock = FakeLeases(), Clock()
    a = lock(api, "a", clock)
    assert a.try_acquire_or_renew()
    a._stop = StopAfter(clock, rounds=50)  # type: ignore[assignment]
    calls = len(api.calls)
    a._renew_loop()  # returns when stopped
    # one request per renewal (a conditional replace of its own record), as client-go
    assert [verb for verb, _ in api.calls[calls:]] == ["replace"] * 50
    assert a.leading() and clock() - 1000.0 == pytest.approx(102.0)  # 51 waits of 2 s
    assert api.lease.spec.lease_transitions == 0
    assert api.lease.spec.acquire_time == T0  # kept across renewals


def test_a_paused_leader_resumes_and_writes_nothing() -> None:
    # SIGSTOP for 30 s: a standby took over meanwhile. On resume, neither the renew thread
    # nor a worker's write gets through: the fence needs no API call to know.
    api, clock = FakeLeases(), Clock()
    a, b = lock(api, "a", clock), lock(api, "b", clock)
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()
    clock.advance(16)
    assert b.try_acquire_or_renew()
    calls = len(api.calls)
    clock.advance(14)  # A resumes
    with pytest.raises(LeadershipLost, match="past the renew deadline"):
        a.check()
    a._stop = StopAfter(clock)  # type: ignore[assignment]
    with pytest.raises(LeadershipLost):
        a._renew_loop()
    assert len(api.calls) == calls and api.holder == "b"


def test_a_renewal_counts_from_when_it_was_sent() -> None:
    # The standby's wait restarts no earlier than the server stored the renewal, which is
    # after it was sent: counting the leader's validity from the send is the safe side.
    api, clock = FakeLeases(), Clock()
    a = lock(api, "a", clock)
    assert a.try_acquire_or_renew()
    clock.advance(9)
    sent = clock()
    api.during = lambda: clock.advance(4)  # a slow renewal
    assert a.try_acquire_or_renew()
    assert clock() - sent == 4.0 and a.leading()
    clock.advance(5.9)
    a.check()
    clock.advance(0.1)  # 10 s after the renewal was sent
    with pytest.raises(LeadershipLost):
        a.check()


def test_every_lease_request_has_a_timeout_clipped_to_the_deadline() -> None:
    api, clock = FakeLeases(), Clock()
    a = lock(api, "a", clock)
    assert a.try_acquire_or_renew()
    clock.advance(8)
    assert a.try_acquire_or_renew()
    clock.advance(9)
    b = lock(api, "b", clock)
    b.try_acquire_or_renew()
    assert all(t is not None for _, t in api.calls), api.calls
    assert api.calls[0][1] == 5.0  # renew deadline / 2 for a candidate
    assert api.calls[2][1] == pytest.approx(2.0)  # a leader's: only what is left


def test_release_hands_over_at_once_and_closes_the_fence() -> None:
    api, clock = FakeLeases(), Clock()
    a, b = lock(api, "a", clock), lock(api, "b", clock)
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()
    a.release()
    assert api.holder == ""
    with pytest.raises(LeadershipLost, match="released"):
        a.check()
    assert b.try_acquire_or_renew() and api.holder == "b"  # no lease duration to wait
    assert api.lease.spec.lease_transitions == 1


def test_release_after_the_deadline_leaves_the_lease_alone() -> None:
    api, clock = FakeLeases(), Clock()
    a = lock(api, "a", clock)
    assert a.try_acquire_or_renew()
    clock.advance(11)
    a.release()
    assert api.holder == "a"


def test_acquire_waits_then_leads_and_renews(monkeypatch: pytest.MonkeyPatch) -> None:
    api, clock = FakeLeases(), Clock()
    holder = lock(api, "a", clock)
    assert holder.try_acquire_or_renew()
    b = lock(api, "b", clock)
    b._stop = StopAfter(clock)  # type: ignore[assignment]
    started: list[Any] = []
    monkeypatch.setattr("threading.Thread.start", lambda self: started.append(self.name))
    b.acquire()  # A never renews: B leads after 15 s and a bit of jitter
    assert api.holder == "b" and started == ["lease-renew"]
    assert 15 <= clock() - 1000.0 <= 15 + 2 * 1.2 + 0.01


def test_acquire_raises_setup_errors_and_retries_blips(monkeypatch: pytest.MonkeyPatch) -> None:
    api, clock = FakeLeases(), Clock()
    a = lock(api, "a", clock)
    api.fail = ApiException(status=403)
    with pytest.raises(ApiException):
        a.acquire()
    # a standby that already looked once rides out a transient error
    api.fail = None
    lock(api, "x", clock).try_acquire_or_renew()
    b = lock(api, "b", clock)
    assert not b.try_acquire_or_renew()
    flaky = iter([None, ApiException(status=503), None])

    def during() -> None:
        api.fail = next(flaky, None)

    api.during = during
    b._stop = StopAfter(clock)  # type: ignore[assignment]
    monkeypatch.setattr("threading.Thread.start", lambda self: None)
    b.acquire()
    assert api.holder == "b"


def test_a_worker_that_no_longer_leads_reconciles_nothing() -> None:
    from orchestrator.controller.handlers import JOB, Controller
    from tests.unit.test_controller_reconcile import FakeKube

    api, clock = FakeLeases(), Clock()
    a = lock(api, "a", clock)
    assert a.try_acquire_or_renew()
    kube = FakeKube()
    kube.fence = a.check  # type: ignore[attr-defined]
    ctl = Controller(kube, ControllerSettings(), None)  # type: ignore[arg-type]
    processed: list[Any] = []
    ctl.process = processed.append  # type: ignore[method-assign]
    ctl.queue.add((JOB, "ns", "j"))
    clock.advance(12)  # resumed after a pause: the key is taken, the reconcile never runs
    with pytest.raises(LeadershipLost):
        ctl._work()
    assert processed == [] and kube.calls == []


def test_kube_writes_pass_the_fence_reads_do_not() -> None:
    api, clock = FakeLeases(), Clock()
    a = lock(api, "a", clock)
    assert a.try_acquire_or_renew()
    kube = Kube(client.ApiClient(), fence=a.check)
    created: list[Any] = []

    class Batch:
        def create_namespaced_job(self, ns: str, body: Any, **kw: Any) -> Any:
            created.append((body, kw["_request_timeout"]))
            return type("R", (), {"data": b"{}"})()

        def read_namespaced_job(self, name: str, ns: str, **kw: Any) -> Any:
            return type("R", (), {"data": b'{"kind": "Job"}'})()

    kube.batch = Batch()
    body = {"kind": "Job", "metadata": {"name": "j-a1", "namespace": "ns"}}
    kube.create(body)
    assert len(created) == 1 and created[0][1] == 30.0  # Kube's default request timeout
    clock.advance(12)  # paused past the renew deadline
    with pytest.raises(LeadershipLost):
        kube.create(body)
    assert len(created) == 1  # the write never left the process
    assert kube.get("Job", "ns", "j-a1") == {"kind": "Job"}  # reads need no leadership


def test_lease_durations_follow_client_go_rules() -> None:
    check_durations(15, 10, 2)
    with pytest.raises(ValueError, match="longer than the renew deadline"):
        check_durations(10, 10, 2)
    with pytest.raises(ValueError, match="retry"):
        check_durations(15, 2, 2)
    with pytest.raises(ValueError, match="positive"):
        check_durations(15, 10, 0)
    s = ControllerSettings.from_env({"KUBETUNE_LEASE_DURATION_SECONDS": "30",
                                     "KUBETUNE_RENEW_DEADLINE_SECONDS": "20",
                                     "KUBETUNE_RETRY_PERIOD_SECONDS": "4"})
    assert (s.lease_duration_seconds, s.renew_deadline_seconds, s.retry_period_seconds) == (
        30, 20, 4)
    assert ControllerSettings().lease_duration_seconds == 15.0
    with pytest.raises(ValueError, match="KUBETUNE_RENEW_DEADLINE_SECONDS"):
        ControllerSettings.from_env({"KUBETUNE_RENEW_DEADLINE_SECONDS": "20"})
    # without leader election the durations are not used, so not checked
    ControllerSettings.from_env({"KUBETUNE_LEADER_ELECTION": "false",
                                 "KUBETUNE_RENEW_DEADLINE_SECONDS": "20"})


def test_losing_leadership_ends_the_process_with_its_own_status() -> None:
    import subprocess
    import sys

    code = ("from orchestrator.controller.leader import exit_process\n"
            "import logging; logging.basicConfig()\n"
            "exit_process('the Lease is held by \\'b\\' now')\n"
            "print('still running')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 3 and "still running" not in proc.stdout
    assert "lost leadership: the Lease is held by 'b' now" in proc.stderr
    assert "noticed by MainThread" in proc.stderr
