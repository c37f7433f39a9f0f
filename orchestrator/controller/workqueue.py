"""The controller's one work queue (the shape of client-go's workqueue).

Everything that wants an object looked at — a watch event of the object or of one of its
children, the periodic resync, a metrics report — only *adds its key*. Worker threads take
keys and reconcile. The queue guarantees:

- de-duplication: a key added any number of times before a worker takes it is worked on once;
- exclusivity: a key is never worked on by two workers at a time; a key added while it is
  being worked on is queued again when that worker calls `done`, so no event is lost;
- "come back later": `add_after(key, delay)` (a reconcile's `Result(requeue_after=...)`) and
  `add_rate_limited(key)` (per-key exponential backoff after an error, reset by `forget`).

Keys are small tuples such as ("FineTuneJob", namespace, name); the queue holds nothing else,
so its size is bounded by the number of objects, and a key leaves every table once done.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Hashable

Key = Hashable


class WorkQueue:
    def __init__(self, base_delay: float = 0.05, max_delay: float = 60.0) -> None:
        self._cond = threading.Condition()
        self._queue: deque[Key] = deque()
        self._dirty: set[Key] = set()  # queued, waiting for a worker
        self._processing: set[Key] = set()  # taken by a worker, not yet done
        self._delayed: list[tuple[float, int, Key]] = []  # (due, seq, key) heap
        self._due: dict[Key, float] = {}  # earliest due time per delayed key
        self._seq = itertools.count()
        self._failures: dict[Key, int] = {}
        self._base, self._max = base_delay, max_delay
        self._shutdown = False

    # --- producers ------------------------------------------------------------------------
    def add(self, key: Key) -> None:
        with self._cond:
            self._add_locked(key)

    def _add_locked(self, key: Key) -> None:
        if self._shutdown or key in self._dirty:
            return
        self._dirty.add(key)
        if key not in self._processing:  # else `done` queues it
            self._queue.append(key)
            self._cond.notify()

    def add_after(self, key: Key, delay: float) -> None:
        if delay <= 0:
            self.add(key)
            return
        due = time.monotonic() + delay
        with self._cond:
            if self._shutdown or self._due.get(key, float("inf")) <= due:
                return  # already coming back sooner
            self._due[key] = due
            heapq.heappush(self._delayed, (due, next(self._seq), key))
            self._cond.notify()

    def add_rate_limited(self, key: Key) -> float:
        """Requeues `key` after an exponentially growing delay; returns the delay."""
        with self._cond:
            n = self._failures.get(key, 0)
            self._failures[key] = n + 1
        delay = min(self._max, self._base * (2**n))
        self.add_after(key, delay)
        return delay

    def forget(self, key: Key) -> None:
        """The key succeeded: its next error starts the backoff from the beginning."""
        with self._cond:
            self._failures.pop(key, None)

    def failures(self, key: Key) -> int:
        with self._cond:
            return self._failures.get(key, 0)

    # --- consumers ------------------------------------------------------------------------
    def get(self, timeout: float | None = None) -> Key | None:
        """The next key to work on (the caller must call `done(key)`); None on shutdown or
        when `timeout` passes."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                now = time.monotonic()
                while self._delayed and self._delayed[0][0] <= now:
                    due, _, key = heapq.heappop(self._delayed)
                    if self._due.get(key) == due:  # else superseded by an earlier due time
                        del self._due[key]
                        self._add_locked(key)
                if self._shutdown:
                    return None
                if self._queue:
                    key = self._queue.popleft()
                    self._dirty.discard(key)
                    self._processing.add(key)
                    return key
                wait = self._delayed[0][0] - now if self._delayed else None
                if deadline is not None:
                    left = deadline - now
                    if left <= 0:
                        return None
                    wait = left if wait is None else min(wait, left)
                self._cond.wait(wait)

    def done(self, key: Key) -> None:
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty:  # added again while it was being worked on
                self._queue.append(key)
                self._cond.notify()

    def shutdown(self) -> None:
        with self._cond:
            self._shutdown = True
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._queue) + len(self._due)
