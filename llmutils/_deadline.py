"""The per-call deadline: one value made when a call starts, asked by every wait inside it.

``total_timeout`` bounds a whole call. Rather than passing loose numbers around (``timeout``,
``time_left``, ``limit``), a call makes one :class:`Deadline` and hands it to every step that may
wait: connecting and reading the whole body, the rate limiter, the concurrency slot, waiting for an
identical request in flight, a Redis single-flight lock, the SQLite busy timeout of a cache write
and the backoff sleeps. Each asks it how long it may still wait (:meth:`Deadline.timeout_for`).
``timeout`` stays the limit of one HTTP attempt.

A wait that cannot be interrupted by a timeout (a blocking socket read between two bytes of a
trickling body) is cut short by :meth:`Deadline.at_expiry`, which runs a callback from one shared
watchdog thread when the deadline passes.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import overload

from ._exceptions import TotalTimeoutError

__all__ = ["Deadline"]

logger = logging.getLogger("llmutils")


class Deadline:
    """When the current call must be over; unbounded when ``total`` is None.

    >>> deadline = Deadline(5.0)              # made once, when the call starts
    >>> deadline.timeout_for(60.0)            # one attempt may use at most what is left
    5.0
    >>> deadline.check("waiting for a call slot")   # raises TotalTimeoutError once spent

    ``clock`` is a monotonic clock in seconds (injectable for tests).
    """

    __slots__ = ("_clock", "_end", "total")

    def __init__(self, total: float | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        if total is not None and (isinstance(total, bool) or not isinstance(total, (int, float)) or math.isnan(total)):
            raise TypeError(f"total must be a number of seconds or None, got {total!r}")
        self.total = None if total is None else float(total)
        self._clock = clock
        self._end = math.inf if total is None else clock() + float(total)

    def __repr__(self) -> str:
        if self.total is None:
            return "Deadline(None)"
        return f"Deadline({self.total:g}, remaining={self.remaining():.3f})"

    @property
    def bounded(self) -> bool:
        """True when the call has a ``total_timeout``."""
        return self.total is not None

    @property
    def expired(self) -> bool:
        """True once nothing is left (never for an unbounded deadline)."""
        return self._end != math.inf and self._clock() >= self._end

    def remaining(self) -> float:
        """Seconds left, never below 0; ``math.inf`` when unbounded."""
        if self._end == math.inf:
            return math.inf
        return max(0.0, self._end - self._clock())

    @overload
    def timeout_for(self, limit: float) -> float: ...
    @overload
    def timeout_for(self, limit: float | None = None) -> float | None: ...

    def timeout_for(self, limit: float | None = None) -> float | None:
        """How long one wait may last: the smaller of ``limit`` and what is left.

        None means "wait as long as needed" (unbounded deadline and no ``limit``); never ``inf``.
        """
        left = self.remaining()
        if left == math.inf:
            return limit
        return left if limit is None else min(limit, left)

    def error(self, doing: str, *, attempts: int | None = 0) -> TotalTimeoutError:
        """The :class:`TotalTimeoutError` for running out while ``doing`` something."""
        return TotalTimeoutError(f"total_timeout={self.total:g}s ran out {doing}", attempts=attempts)

    def check(self, doing: str, *, attempts: int | None = 0) -> None:
        """Raise :meth:`error` when the deadline has passed."""
        if self.expired:
            raise self.error(doing, attempts=attempts)

    @contextlib.contextmanager
    def at_expiry(self, callback: Callable[[], object]) -> Iterator[None]:
        """Run ``callback`` from the watchdog thread if the deadline passes inside the block.

        Used to cut a blocking read short (shut its socket down) exactly at the deadline. Nothing
        is registered for an unbounded deadline. The callback must be quick and must not raise.
        """
        if self._end == math.inf:
            yield
            return
        handle = _watchdog().add(self._end, self._clock, callback)
        try:
            yield
        finally:
            _watchdog().cancel(handle)


class _Watchdog:
    """One daemon thread that runs callbacks at their deadlines (a heap, one condition)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, Callable[[], float], Callable[[], object]]] = []
        self._cancelled: set[int] = set()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._running: int | None = None  # the handle whose callback runs now

    def add(self, end: float, clock: Callable[[], float], callback: Callable[[], object]) -> int:
        with self._cond:
            handle = next(self._ids)
            heapq.heappush(self._heap, (end, handle, clock, callback))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="llmutils-deadline-watchdog", daemon=True)
                self._thread.start()
            elif self._heap[0][1] == handle:
                self._cond.notify()
            return handle

    def cancel(self, handle: int) -> None:
        """Forget ``handle``; if its callback is running, return only once it is done (so the caller
        may then reuse what the callback acts on, e.g. give the connection back to the pool)."""
        with self._cond:
            while self._running == handle:
                self._cond.wait()
            if any(item[1] == handle for item in self._heap):
                self._cancelled.add(handle)
                if len(self._cancelled) > 64 and len(self._cancelled) * 2 > len(self._heap):
                    self._heap = [item for item in self._heap if item[1] not in self._cancelled]
                    heapq.heapify(self._heap)
                    self._cancelled.clear()

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    while self._heap and self._heap[0][1] in self._cancelled:
                        self._cancelled.discard(heapq.heappop(self._heap)[1])
                    if not self._heap:
                        self._cond.wait(60.0)
                        continue
                    end, handle, clock, callback = self._heap[0]
                    wait = end - clock()
                    if wait <= 0:
                        heapq.heappop(self._heap)
                        self._running = handle
                        break
                    self._cond.wait(wait)
            try:
                callback()
            except Exception:  # pragma: no cover - a callback must not kill the watchdog
                logger.debug("a deadline callback failed", exc_info=True)
            finally:
                with self._cond:
                    self._running = None
                    self._cond.notify_all()


_the_watchdog: _Watchdog | None = None
_watchdog_pid = 0
_watchdog_lock = threading.Lock()


def _watchdog() -> _Watchdog:
    """The process's watchdog (a fresh one in a forked child, whose thread did not survive)."""
    global _the_watchdog, _watchdog_pid
    dog = _the_watchdog
    if dog is not None and _watchdog_pid == os.getpid():
        return dog
    with _watchdog_lock:
        if _the_watchdog is None or _watchdog_pid != os.getpid():
            _the_watchdog = _Watchdog()
            _watchdog_pid = os.getpid()
        return _the_watchdog


def _reset_in_child() -> None:
    global _the_watchdog, _watchdog_lock
    _the_watchdog = None
    _watchdog_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_in_child)
