"""Single active replica: a coordination.k8s.io Lease, judged the way client-go's
leaderelection judges it (controller-runtime's defaults: lease 15 s, renew deadline 10 s,
retry period 2 s).

Why each rule is there:

- **Expiry on the candidate's own monotonic clock.** A standby never compares the Lease's
  `renewTime` with its wall clock: two machines' clocks differ, and a skew of a few seconds
  would let a standby take over from a leader that is renewing fine. It remembers *when it
  last saw the record change* (holder, renewTime, resourceVersion, ...) and takes over only
  after `leaseDurationSeconds` passed on its own clock without a change.
- **A renew deadline shorter than the lease.** The leader counts as leader only until
  `renew_deadline` after the start of its last successful renewal (monotonic clock). A
  standby's timer starts no earlier than the renewal it saw, so the leader has stopped
  `lease_duration - renew_deadline` (5 s) before anyone else may start: margin for clock
  rates and requests in flight. A leader that misses the deadline exits at once.
- **The leader exits as soon as it sees another holder** in the Lease.
- **Fencing.** `check()` runs before every mutating API call (`Kube._call`) and before every
  reconcile: a process resumed after SIGSTOP, a long GC pause or a frozen VM exits on its
  first write instead of writing, even before its renew thread notices. It reads one
  monotonic clock, no API call.
- **A timeout on every Lease request**, clipped to the time left before the deadline, so a
  hanging connection cannot keep a leader past it.

Losing leadership ends the process (`EXIT_LOST_LEADERSHIP`) instead of stopping handlers
mid-flight: every handler is idempotent, so a restart is safe, and the restarted replica
comes back as a standby.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import math
import os
import random
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from orchestrator.controller import metrics

log = logging.getLogger("kubetune.leader")

# The exit status of a replica that stopped leading (lost the Lease, missed the renew
# deadline, or was paused past it); Kubernetes restarts it as a standby.
EXIT_LOST_LEADERSHIP = 3
# Setup errors a standby must not wait out: a missing namespace, no permission.
_SETUP_ERRORS = (401, 403, 404)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class LeadershipLost(Exception):
    """Raised by the `on_lost` of tests; in a real controller losing leadership exits."""


@dataclass(frozen=True)
class Record:
    """What a Lease says, and everything whose change proves the holder is alive."""

    holder: str
    renew_time: Any
    acquire_time: Any
    lease_seconds: int | None
    transitions: int
    resource_version: str | None

    @classmethod
    def of(cls, lease: Any) -> Record:
        spec = lease.spec or client.V1LeaseSpec()
        return cls(
            holder=spec.holder_identity or "",
            renew_time=spec.renew_time,
            acquire_time=spec.acquire_time,
            lease_seconds=spec.lease_duration_seconds,
            transitions=spec.lease_transitions or 0,
            resource_version=lease.metadata.resource_version if lease.metadata else None,
        )


def exit_process(reason: str) -> NoReturn:
    """Ends the process at once: no handler, no thread gets to write anything more."""
    log.critical(
        "lost leadership: %s; exiting (status %d, noticed by %s) so the replica that leads "
        "now is the only one writing",
        reason,
        EXIT_LOST_LEADERSHIP,
        threading.current_thread().name,  # lease-renew, worker-N, events, ...
    )
    for handler in logging.getLogger().handlers + log.handlers:
        with contextlib.suppress(Exception):  # exiting anyway
            handler.flush()
    with contextlib.suppress(Exception):
        sys.stderr.write(f"kubetune controller: lost leadership: {reason}\n")
        sys.stderr.flush()
    os._exit(EXIT_LOST_LEADERSHIP)


class LeaseLock:
    def __init__(
        self,
        api: Any,
        name: str,
        namespace: str,
        identity: str,
        *,
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
        request_timeout: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], dt.datetime] = _now,
        on_lost: Callable[[str], NoReturn] = exit_process,
    ) -> None:
        check_durations(lease_duration, renew_deadline, retry_period)
        self.api, self.name, self.namespace, self.identity = api, name, namespace, identity
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.request_timeout = request_timeout or max(1.0, renew_deadline / 2)
        self._clock, self._wall, self._on_lost = clock, wall, on_lost
        self._observed: Record | None = None
        self._observed_at = 0.0  # monotonic: when `_observed` was first seen
        self._renewed_at: float | None = None  # monotonic: start of the last good renewal
        self._lost: str | None = None
        self._lost_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- state --------------------------------------------------------------------------
    def leading(self) -> bool:
        """Holds the Lease and renewed it within the renew deadline (no API call)."""
        renewed = self._renewed_at
        return (
            self._lost is None
            and renewed is not None
            and self._clock() - renewed < self.renew_deadline
        )

    def check(self) -> None:
        """The fence: exits (through `on_lost`) unless this replica still leads. Cheap
        enough for every write: one monotonic clock read."""
        if self.leading():
            return
        if self._lost is not None:
            self._lose(self._lost)
        renewed = self._renewed_at
        if renewed is None:
            self._lose("not leading")
        self._lose(
            f"the Lease was last renewed {self._clock() - renewed:.1f}s ago, past the renew "
            f"deadline of {self.renew_deadline:g}s (the process was paused or cannot reach "
            "the API server)"
        )

    def _lose(self, reason: str) -> NoReturn:
        with self._lost_lock:
            if self._lost is None:
                self._lost = reason
        self._on_lost(self._lost)

    # --- one round: read, judge, write ----------------------------------------------------
    def _timeout(self, start: float) -> float:
        """Per request; a leader's ends no later than its renew deadline."""
        if self._renewed_at is None:
            return self.request_timeout
        left = self._renewed_at + self.renew_deadline - start
        return max(0.2, min(self.request_timeout, left))

    def _body(self, transitions: int, acquire_time: Any = None) -> Any:
        now = self._wall()
        return client.V1Lease(
            metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
            spec=client.V1LeaseSpec(
                holder_identity=self.identity,
                lease_duration_seconds=max(1, math.ceil(self.lease_duration)),
                acquire_time=acquire_time or now,
                renew_time=now,
                lease_transitions=transitions,
            ),
        )

    def try_acquire_or_renew(self) -> bool:
        """One attempt; True when this replica holds the Lease afterwards. A leader that
        finds another holder (or its Lease deleted) loses leadership here."""
        start = self._clock()  # a renewal counts from before its requests were sent
        was_leading = self._renewed_at is not None
        if was_leading and self._renew_fast(start):
            return True
        try:
            metrics.API_REQUESTS.labels("lease").inc()
            lease = self.api.read_namespaced_lease(
                self.name, self.namespace, _request_timeout=self._timeout(start)
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
            if was_leading:
                self._lose("the Lease was deleted; another replica may have created it")
            return self._write(start, (409,), self.api.create_namespaced_lease,
                               self.namespace, self._body(0))
        record = Record.of(lease)
        seen = self._clock()  # a candidate's wait counts from after it saw the record
        if record != self._observed:
            self._observed, self._observed_at = record, seen
        if record.holder and record.holder != self.identity:
            if was_leading:
                self._lose(f"the Lease is held by {record.holder!r} now")
            duration = record.lease_seconds or self.lease_duration
            if seen - self._observed_at < duration:
                return False  # held, and seen renewed within the lease duration
            log.info(
                "the Lease held by %s was not renewed for %.1fs (lease duration %ss); "
                "taking over",
                record.holder,
                seen - self._observed_at,
                duration,
            )
        ours = record.holder == self.identity
        body = self._body(
            record.transitions + (0 if ours else 1), record.acquire_time if ours else None
        )
        body.metadata.resource_version = record.resource_version
        # optimistic concurrency: a racing candidate (or a newer holder) gets 409
        return self._write(start, (409,), self.api.replace_namespaced_lease,
                           self.name, self.namespace, body)

    def _renew_fast(self, start: float) -> bool:
        """A leader's renewal in one request, as client-go's: replace the record it wrote
        last, conditional on its resourceVersion. Any other write since (a new holder) makes
        it fail with 409, and the full round then reads who holds the Lease."""
        observed = self._observed
        if observed is None or observed.holder != self.identity:
            return False
        body = self._body(observed.transitions, observed.acquire_time)
        body.metadata.resource_version = observed.resource_version
        return self._write(start, (404, 409), self.api.replace_namespaced_lease,
                           self.name, self.namespace, body)

    def _write(self, start: float, lost_to: tuple[int, ...], call: Any, *args: Any) -> bool:
        """One conditional Lease write with the round's timeout; False when the API server
        answers one of `lost_to` (someone else wrote first, or the Lease is gone)."""
        metrics.API_REQUESTS.labels("lease").inc()
        try:
            written = call(*args, _request_timeout=self._timeout(start))
        except ApiException as exc:
            if exc.status in lost_to:
                return False
            raise
        self._renewed(start, written)
        return True

    def _renewed(self, start: float, lease: Any) -> None:
        if self._lost is not None:  # never un-lose: the process is on its way out
            return
        self._renewed_at = start
        self._observed, self._observed_at = Record.of(lease), self._clock()

    # --- the loops --------------------------------------------------------------------------
    def acquire(self) -> None:
        """Blocks until this replica holds the Lease, then renews it in a thread. Errors of
        the first attempt are raised (the API server unreachable, no permission, no
        namespace); later transient ones are logged and retried."""
        log.info(
            "waiting for leadership",
            extra={"lease": f"{self.namespace}/{self.name}", "identity": self.identity},
        )
        first = True
        while True:
            try:
                if self.try_acquire_or_renew():
                    break
            except Exception as exc:
                if first or (isinstance(exc, ApiException) and exc.status in _SETUP_ERRORS):
                    raise
                log.warning("reading the Lease failed (%s); retrying", _short(exc))
            first = False
            # jittered, as client-go's JitterUntil(retryPeriod, 1.2): standbys spread out
            if self._stop.wait(self.retry_period * (1 + 0.2 * random.random())):
                raise LeadershipLost("released while waiting for leadership")
        log.info("acquired leadership", extra={"identity": self.identity})
        self._thread = threading.Thread(target=self._renew_loop, name="lease-renew", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while True:
            renewed = self._renewed_at or self._clock()
            left = renewed + self.renew_deadline - self._clock()
            if self._stop.wait(max(0.0, min(self.retry_period, left))):
                return
            self.check()  # past the deadline (e.g. resumed after a pause): exit, no renewal
            try:
                if self.try_acquire_or_renew():
                    continue
                log.warning("could not renew the Lease (conflict); retrying")
            except Exception as exc:
                log.warning("renewing the Lease failed (%s); retrying", _short(exc))
            # the next round starts at once if the deadline is closer than the retry period

    def release(self) -> None:
        """Stops renewing and, while still leading, gives the Lease up (holder cleared) so a
        standby takes over at once instead of after the lease duration. From here on this
        replica writes nothing: `check()` fails."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.request_timeout + 1)
        start = self._clock()
        leading = self.leading()
        with self._lost_lock:
            self._lost = self._lost or "released the Lease at shutdown"
        if not leading:
            return
        try:
            lease = self.api.read_namespaced_lease(
                self.name, self.namespace, _request_timeout=self.request_timeout
            )
            if (lease.spec.holder_identity or "") != self.identity:
                return
            now = self._wall()
            lease.spec = client.V1LeaseSpec(
                holder_identity="",
                lease_duration_seconds=1,
                acquire_time=now,
                renew_time=now,
                lease_transitions=lease.spec.lease_transitions or 0,
            )
            # only while still within the deadline: a standby may take over after it
            if self._clock() - (self._renewed_at or start) < self.renew_deadline:
                self.api.replace_namespaced_lease(
                    self.name, self.namespace, lease, _request_timeout=self.request_timeout
                )
                log.info("released the Lease", extra={"identity": self.identity})
        except Exception as exc:  # the standby takes over after the lease duration instead
            log.warning("could not release the Lease: %s", _short(exc))


def _short(exc: Exception) -> str:
    if isinstance(exc, ApiException):
        return f"HTTP {exc.status} {exc.reason or ''}".strip()
    return repr(exc)


def check_durations(lease_duration: float, renew_deadline: float, retry_period: float) -> None:
    """client-go's rules: lease > renew deadline > 1.2 x retry period > 0."""
    if retry_period <= 0:
        raise ValueError(f"the retry period must be positive, not {retry_period:g}s")
    if renew_deadline <= 1.2 * retry_period:
        raise ValueError(
            f"the renew deadline ({renew_deadline:g}s) must be longer than 1.2 times the retry "
            f"period ({retry_period:g}s)"
        )
    if lease_duration <= renew_deadline:
        raise ValueError(
            f"the lease duration ({lease_duration:g}s) must be longer than the renew deadline "
            f"({renew_deadline:g}s): a standby could take over while the leader still writes"
        )
