""""Off for N seconds, then try again": the one breaker behind every degradable resource.

A resource that failed (a cache file, a Redis server, a tiktoken download) is left alone for a
while so calls do not pay for the failure again and again; after the pause one caller tries it
again. A permanent failure keeps it off for good. The SQLite and Redis caches and the tiktoken
loader each hold one :class:`Cooldown`.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

__all__ = ["Cooldown"]


class Cooldown:
    """A thread-safe "off until" switch.

    >>> breaker = Cooldown(30.0)
    >>> breaker.trip()          # a transient fault: off for 30 s
    True
    >>> breaker.blocked()       # True until 30 s have passed, then False (try again)
    True

    ``trip()`` returns True for the first fault of an outage (the one worth a WARNING) and False
    while it is already off; ``trip(permanent=True)`` keeps it off for good. ``reset()`` ends the
    outage (the resource works again) and returns True when there was one (worth an INFO).
    ``clock`` is injectable so tests need not wait.
    """

    __slots__ = ("interval", "_clock", "_lock", "_until", "_tripped", "_permanent")

    def __init__(self, interval: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = float(interval)
        self._clock = clock
        self._lock = threading.Lock()
        self._until = -math.inf
        self._tripped = False
        self._permanent = False

    @property
    def tripped(self) -> bool:
        """True from a fault until :meth:`reset` (even while a retry is allowed)."""
        return self._tripped

    @property
    def permanent(self) -> bool:
        """True when the last fault keeps the resource off for good."""
        return self._permanent

    def blocked(self) -> bool:
        """True while the resource must be left alone: a permanent fault, or within the pause."""
        if not self._tripped:
            return False
        return self._permanent or self._clock() < self._until

    def remaining(self) -> float:
        """Seconds until the resource may be tried again (inf when permanent, 0 when not blocked)."""
        if not self._tripped:
            return 0.0
        if self._permanent:
            return math.inf
        return max(0.0, self._until - self._clock())

    def trip(self, *, permanent: bool = False, interval: float | None = None) -> bool:
        """Turn it off for ``interval`` (default :attr:`interval`) seconds, or for good.

        Returns True when this fault starts an outage (or makes it permanent), False while it was
        already off.
        """
        with self._lock:
            first = not self._tripped or (permanent and not self._permanent)
            self._tripped = True
            if permanent:
                self._permanent = True
            self._until = self._clock() + (self.interval if interval is None else interval)
            return first

    def reset(self) -> bool:
        """End the outage; True when there was one."""
        if not self._tripped:
            return False
        with self._lock:
            was = self._tripped
            self._tripped = False
            self._permanent = False
            self._until = -math.inf
            return was

    def after_fork(self) -> None:
        """Give a forked child a fresh lock (the thread that held the parent's is not there)."""
        self._lock = threading.Lock()
