"""Client-side rate limiting: requests and tokens per minute, and a cap on calls in flight.

A :class:`RateLimiter` holds two token buckets, one for requests per minute (``rpm``) and
one for tokens per minute (``tpm``); either may be off (``None`` or ``0``). Threads that
cannot go yet queue in arrival order (FIFO); only the thread at the head of the queue
waits for the buckets to refill, the others sleep on their own condition variable until
they reach the head, so nothing busy-waits and no waiter can be overtaken.

Burst sizes (the bucket capacities) are deliberately small, because providers enforce
their per-minute limits over windows of one to ten seconds:

* ``rpm``: capacity ``rpm_burst`` requests, default ``1``, so requests are spaced evenly
  ``60 / rpm`` seconds apart (600 rpm -> one every 0.1 s) and no window of any length
  holds more than its share plus one.
* ``tpm``: capacity ``tpm_burst`` tokens, default one second's budget (``tpm / 60``).
  A request larger than the capacity does not deadlock: it goes when the bucket is full
  and leaves the bucket in debt, which later requests wait out, so the long-run rate
  still holds.

Tokens are counted before sending (the caller passes prompt + max output tokens) and
reconciled afterwards with :meth:`Reservation.reconcile`, which refunds unused tokens or
debits extra ones.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType

from ._deadline import Deadline
from ._exceptions import ConfigError, InvalidRequestError, LLMUtilsError, RateLimitError

__all__ = [
    "RateLimiter",
    "Reservation",
    "ConcurrencyLimiter",
]

logger = logging.getLogger("llmutils")

# Floating-point slack: a bucket this close to the level it needs counts as there.
_EPSILON = 1e-9


class _Bucket:
    """A token bucket that may go into debt (negative level); used under the limiter's lock."""

    __slots__ = ("rate", "capacity", "level", "stamp")

    def __init__(self, per_minute: float, capacity: float, now: float) -> None:
        self.rate = per_minute / 60.0
        self.capacity = capacity
        self.level = capacity
        self.stamp = now

    def refill(self, now: float) -> None:
        """Add what has dripped in since the last refill, up to the capacity."""
        if now > self.stamp:
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
            self.stamp = now

    def wait(self, cost: float) -> float:
        """Seconds until ``cost`` may be taken (an oversize cost only needs a full bucket)."""
        deficit = min(cost, self.capacity) - self.level
        if deficit <= _EPSILON * max(1.0, self.capacity):
            return 0.0
        return deficit / self.rate

    def take(self, cost: float) -> None:
        """Debit ``cost``; the level may go below zero."""
        self.level -= cost

    def give(self, amount: float) -> None:
        """Credit ``amount`` (a refund), up to the capacity."""
        self.level = min(self.capacity, self.level + amount)


class _Waiter:
    """One thread queued in :meth:`RateLimiter.acquire`."""

    __slots__ = ("cond",)

    def __init__(self, lock: threading.Lock) -> None:
        self.cond = threading.Condition(lock)


class Reservation:
    """What :meth:`RateLimiter.acquire` granted; ``reconcile`` corrects the token count later.

    Example::

        r = limiter.acquire(prompt_tokens + max_tokens)
        response = send(...)
        r.reconcile(response.usage.total_tokens)
    """

    __slots__ = ("_limiter", "tokens")

    def __init__(self, limiter: RateLimiter | None, tokens: int) -> None:
        self._limiter = limiter
        self.tokens = tokens

    def reconcile(self, actual_tokens: int) -> None:
        """Adjust the token bucket by ``actual_tokens - tokens`` (refund or extra debit)."""
        if actual_tokens < 0:
            raise InvalidRequestError(f"actual_tokens must be >= 0, got {actual_tokens}")
        if self._limiter is not None:
            self._limiter._adjust_tokens(actual_tokens - self.tokens)
        self.tokens = actual_tokens

    def __repr__(self) -> str:
        return f"Reservation(tokens={self.tokens})"


class RateLimiter:
    """Requests-per-minute and tokens-per-minute limiter shared by every thread that holds it.

    Example::

        limiter = RateLimiter(rpm=600, tpm=90_000)
        r = limiter.acquire(prompt_tokens + max_tokens)   # blocks, FIFO, until allowed
        ...send the request...
        r.reconcile(usage["total_tokens"])

    :param rpm: requests per minute; ``None`` or ``0`` means unlimited.
    :param tpm: tokens per minute; ``None`` or ``0`` means unlimited.
    :param rpm_burst: requests that may go back to back (bucket capacity); ``1`` spaces
        requests evenly.
    :param tpm_burst: tokens that may go back to back; default one second's budget
        (``tpm / 60``). A larger request still goes, when the bucket is full.
    :param clock: monotonic clock in seconds (inject a fake one in tests).
    :param sleep: if given, the head of the queue calls it (lock released) instead of waiting
        on a condition variable; tests pass a fake that advances a fake clock.
    """

    def __init__(
        self,
        *,
        rpm: float | None = None,
        tpm: float | None = None,
        rpm_burst: int = 1,
        tpm_burst: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        for name, value in (("rpm", rpm), ("tpm", tpm)):
            if value is not None and value < 0:
                raise ConfigError(f"{name} must be a positive number, or None/0 for unlimited; got {value!r}")
        if rpm_burst < 1:
            raise ConfigError(f"rpm_burst must be at least 1 request, got {rpm_burst!r}")
        if tpm_burst is not None and tpm_burst < 0:
            raise ConfigError(f"tpm_burst must be >= 0 tokens, got {tpm_burst!r}")
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._queue: deque[_Waiter] = deque()
        self._paused_until = float("-inf")
        now = clock()
        self._rpm = rpm or None
        self._tpm = tpm or None
        self._req = _Bucket(rpm, float(rpm_burst), now) if rpm else None
        tpm_capacity = float(tpm_burst) if tpm_burst is not None else (tpm or 0) / 60.0
        self._tok = _Bucket(tpm, tpm_capacity, now) if tpm else None

    @property
    def enabled(self) -> bool:
        """True when an ``rpm`` or ``tpm`` limit is set."""
        return self._req is not None or self._tok is not None

    @property
    def rpm(self) -> float | None:
        """The requests-per-minute limit, or ``None``."""
        return self._rpm

    @property
    def tpm(self) -> float | None:
        """The tokens-per-minute limit, or ``None``."""
        return self._tpm

    @property
    def waiting(self) -> int:
        """Number of threads queued in :meth:`acquire` right now."""
        with self._lock:
            return len(self._queue)

    def __repr__(self) -> str:
        return f"RateLimiter(rpm={self._rpm!r}, tpm={self._tpm!r})"

    def pause(self, seconds: float) -> None:
        """Hold every acquisition for ``seconds`` from now (e.g. a 429's ``Retry-After``)."""
        with self._lock:
            until = self._clock() + max(0.0, seconds)
            if until > self._paused_until:
                self._paused_until = until
                logger.debug("rate limiter paused for %.3f s", seconds)

    def acquire(self, tokens: int = 0, *, timeout: float | None = None, deadline: Deadline | None = None) -> Reservation:
        """Block until one request of ``tokens`` tokens may be sent; FIFO among waiters.

        ``tokens`` is the estimate (prompt + max output); it is ignored when ``tpm`` is off.
        With ``timeout`` (seconds) raise :class:`RateLimitError` when the wait would run
        past it; the head of the queue raises at once when it can compute that it would.
        With a ``deadline`` (the call's ``total_timeout``) that comes first, raise its
        :class:`~llmutils.TotalTimeoutError` instead.
        """
        if tokens < 0:
            raise InvalidRequestError(f"tokens must be >= 0, got {tokens}")
        if not self.enabled and self._paused_until <= self._clock():
            return Reservation(None, 0)
        reserved = tokens if self._tok is not None else 0
        by_deadline = False
        if deadline is not None and deadline.bounded:
            left = deadline.remaining()
            if timeout is None or left < timeout:
                timeout, by_deadline = left, True
        with self._lock:
            end = None if timeout is None else self._clock() + timeout
            waiter = _Waiter(self._lock)
            self._queue.append(waiter)
            try:
                while True:
                    now = self._clock()
                    if self._queue[0] is not waiter:
                        if end is not None:
                            if now >= end:
                                ahead = self._queue.index(waiter)
                                raise self._timeout_error(timeout, None, ahead, deadline if by_deadline else None)
                            waiter.cond.wait(end - now)
                        else:
                            waiter.cond.wait()
                        continue
                    wait = self._wait_time(reserved, now)
                    if wait <= 0.0:
                        if self._req is not None:
                            self._req.take(1)
                        if self._tok is not None:
                            self._tok.take(reserved)
                        return Reservation(self, reserved)
                    if end is not None and now + wait > end:
                        raise self._timeout_error(timeout, wait, 0, deadline if by_deadline else None)
                    if self._sleep is None:
                        waiter.cond.wait(wait)
                    else:
                        self._lock.release()
                        try:
                            self._sleep(wait)
                        finally:
                            self._lock.acquire()
            finally:
                was_head = self._queue[0] is waiter
                if was_head:
                    self._queue.popleft()
                else:
                    self._queue.remove(waiter)
                if was_head and self._queue:
                    self._queue[0].cond.notify()

    def _wait_time(self, tokens: int, now: float) -> float:
        """Seconds the head must still wait; refills the buckets to ``now`` (lock held)."""
        wait = self._paused_until - now
        if self._req is not None:
            self._req.refill(now)
            wait = max(wait, self._req.wait(1))
        if self._tok is not None:
            self._tok.refill(now)
            wait = max(wait, self._tok.wait(tokens))
        return wait

    def _timeout_error(self, timeout: float | None, wait: float | None, ahead: int, deadline: Deadline | None = None) -> LLMUtilsError:
        """The error for an acquisition that ran out of time (lock held)."""
        need = f"it needs {wait:.3f} s more" if wait is not None else f"{ahead} request(s) still queued ahead"
        if deadline is not None:
            return deadline.error(f"waiting for the client-side rate limit (rpm={self._rpm}, tpm={self._tpm}; {need})")
        return RateLimitError(
            f"client-side rate limit (rpm={self._rpm}, tpm={self._tpm}): no slot within the "
            f"{timeout} s timeout ({need}); raise the timeout, lower the concurrency, or raise "
            "the rpm/tpm settings if the provider allows more",
            retry_after=wait,
        )

    def _adjust_tokens(self, delta: int) -> None:
        """Debit ``delta`` more tokens (refund when negative) and wake the head if it can gain."""
        if self._tok is None or delta == 0:
            return
        with self._lock:
            self._tok.refill(self._clock())
            if delta > 0:
                self._tok.take(delta)
            else:
                self._tok.give(-delta)
                if self._queue:
                    self._queue[0].cond.notify()


class ConcurrencyLimiter:
    """A cap on calls in flight (``MAX_CONCURRENT_MODEL_CALLS``); a context manager per call.

    Example::

        slots = ConcurrencyLimiter(8)
        with slots:
            response = send(...)

    ``max_in_flight`` of ``None`` or ``0`` means unlimited: entering only counts.
    """

    def __init__(self, max_in_flight: int | None) -> None:
        if max_in_flight is not None and max_in_flight < 0:
            raise ConfigError(
                f"max_in_flight must be a positive integer, or None/0 for unlimited; got {max_in_flight!r}"
            )
        self._max = max_in_flight or None
        self._sem = threading.Semaphore(self._max) if self._max else None
        self._count_lock = threading.Lock()
        self._in_flight = 0

    @property
    def max_in_flight(self) -> int | None:
        """The cap, or ``None`` when unlimited."""
        return self._max

    @property
    def in_flight(self) -> int:
        """Calls inside the limiter right now."""
        return self._in_flight

    def acquire(self, *, timeout: float | None = None) -> bool:
        """Take a slot, waiting up to ``timeout`` seconds; return False if none came free."""
        if self._sem is not None and not self._sem.acquire(timeout=timeout):
            return False
        with self._count_lock:
            self._in_flight += 1
        return True

    def release(self) -> None:
        """Give back a slot taken with :meth:`acquire`."""
        with self._count_lock:
            self._in_flight -= 1
        if self._sem is not None:
            self._sem.release()

    def __enter__(self) -> ConcurrencyLimiter:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"ConcurrencyLimiter(max_in_flight={self._max!r}, in_flight={self._in_flight})"
