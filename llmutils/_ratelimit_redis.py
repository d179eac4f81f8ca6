"""A rate limiter shared by every process and machine that uses the same Redis and limit name.

:class:`RedisRateLimiter` has the interface of the local :class:`~llmutils._ratelimit.RateLimiter`
(``acquire`` -> :class:`~llmutils._ratelimit.Reservation`, ``reconcile``, ``pause``, ``enabled``,
``rpm``, ``tpm``), but its requests-per-minute and tokens-per-minute budgets live in one Redis hash,
so four processes with ``rpm=600`` send 600 requests a minute between them, not 2,400.

How it schedules (earliest-slot scheduling, GCRA): the hash holds, per budget, the *theoretical
arrival time* of the next request (``r`` for requests, ``t`` for tokens) and the end of a shared
pause (``p``). One Lua script, run atomically by Redis, reads them, computes the earliest time this
request may go (its *slot*), and, if that is within the caller's time bound, moves both budgets past
the slot in the same step; the caller then sleeps until its slot. Checking and taking are one step,
so there is no check-then-debit race; slots are handed out in the order Redis receives the requests,
so waiting is first-come first-served across processes and no process starves; nobody polls.

* ``rpm``: ``rpm_burst`` requests may go back to back (default ``1``: evenly spaced ``60 / rpm`` s
  apart, over all processes).
* ``tpm``: the estimate (prompt + max output) is taken with the request; ``Reservation.reconcile``
  debits extra tokens (or refunds unused ones) once the answer's usage is known. A request larger
  than the burst goes when the budget is full and leaves a debt that later requests wait out.
* ``pause(seconds)`` (a 429's ``Retry-After``) moves the shared pause; every process's next slot
  comes after it, and a caller already asleep on an earlier slot takes a new one when it wakes.

All times are Redis server time (``TIME`` inside the script); callers only sleep the relative wait
the script returns, so machines' clocks need not agree.

On the server (``redis-cli``)::

    llmutils:ratelimit:{<name>}   a hash: r, t (next free time per budget, ms), p (pause end, ms);
                                  PEXPIREd a minute after its last slot, so idle limits vanish

Faults: when Redis cannot be reached, answers an error, or is slower than ``redis_timeout``, the
limiter logs one WARNING (URL password masked) and goes on with a local limiter of the same limits
(each process then enforces the limits on its own), tries Redis again after ``retry_interval``
seconds, and logs one INFO when it is back. Between tries a dead Redis costs a call nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from ._deadline import Deadline
from ._exceptions import ConfigError, InvalidRequestError, LLMUtilsError, RateLimitError
from ._ratelimit import RateLimiter, Reservation
from .cache import mask_url

__all__ = [
    "DEFAULT_RATE_LIMIT_REDIS_TIMEOUT",
    "DEFAULT_RATE_LIMIT_RETRY_INTERVAL",
    "RedisRateLimiter",
    "rate_limit_name",
]

logger = logging.getLogger("llmutils")

DEFAULT_RATE_LIMIT_REDIS_TIMEOUT = 0.5  # seconds: a Redis slower than this counts as down
DEFAULT_RATE_LIMIT_RETRY_INTERVAL = 5.0  # seconds on the local limiter before Redis is tried again

_KEY_PREFIX = "llmutils:ratelimit:"

# Common head: Redis time in ms, the hash's fields, and the key's expiry helper.
_HEAD = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local h = redis.call('HMGET', KEYS[1], 'r', 't', 'p')
local tat_r = tonumber(h[1]) or now
local tat_t = tonumber(h[2]) or now
local paused = tonumber(h[3]) or 0
local function store(r, tk, p)
  redis.call('HSET', KEYS[1], 'r', string.format('%.3f', r), 't', string.format('%.3f', tk),
             'p', string.format('%.3f', p))
  redis.call('PEXPIRE', KEYS[1], math.ceil(math.max(r, tk, p) - now) + 60000)
end
"""

# ARGV: ms per request (0: no rpm), burst in requests, tokens, ms per token (0: no tpm),
# burst in tokens, the longest wait the caller accepts in ms (-1: no bound).
# Returns {granted (1/0), wait in microseconds, the pause end seen (string, ms)}.
_ACQUIRE = (
    _HEAD
    + """
local ri, rb = tonumber(ARGV[1]), tonumber(ARGV[2])
local cost, ti, tb = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local bound = tonumber(ARGV[6])
local slot = math.max(now, paused)
if ri > 0 then slot = math.max(slot, math.max(tat_r, now) - (rb - 1) * ri) end
if ti > 0 then slot = math.max(slot, math.max(tat_t, now) + (math.min(cost, tb) - tb) * ti) end
local wait = slot - now
if bound >= 0 and wait > bound then
  return {0, math.ceil(wait * 1000), string.format('%.3f', paused)}
end
if ri > 0 then tat_r = math.max(tat_r, slot) + ri end
if ti > 0 then tat_t = math.max(tat_t, slot) + cost * ti end
store(tat_r, tat_t, paused)
return {1, math.ceil(wait * 1000), string.format('%.3f', paused)}
"""
)

# ARGV: the pause end the caller saw when it took its slot (ms). Returns the wait in microseconds
# until a pause set since then ends, or 0 when there is none.
_CHECK_PAUSE = (
    _HEAD
    + """
if paused > tonumber(ARGV[1]) and paused > now then return math.ceil((paused - now) * 1000) end
return 0
"""
)

# ARGV: pause length in ms. A pause only ever moves later.
_PAUSE = (
    _HEAD
    + """
store(tat_r, tat_t, math.max(paused, now + tonumber(ARGV[1])))
return 1
"""
)

# ARGV: ms to add to the token budget (negative: a refund, never past a full budget).
_ADJUST = (
    _HEAD
    + """
local delta = tonumber(ARGV[1])
if delta > 0 then tat_t = math.max(tat_t, now) + delta else tat_t = math.max(now, tat_t + delta) end
store(tat_r, tat_t, paused)
return 1
"""
)


def rate_limit_name(endpoint: str) -> str:
    """The default limit name for an endpoint URL: scheme, host, port and path, nothing secret.

    Clients that talk to the same endpoint share one budget by default; set
    ``RATE_LIMIT_NAME`` to split it (two API keys) or to join endpoints (one account behind
    several URLs). User info, query and fragment are dropped, so no password or key ends up
    in the Redis key.

    Example::

        >>> rate_limit_name("https://user:pw@api.openai.com/v1/?api-version=1")
        'https://api.openai.com/v1'
    """
    parts = urlsplit(endpoint.strip())
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    path = parts.path.rstrip("/")
    return f"{parts.scheme}://{host}{path}" if parts.scheme else (endpoint.strip().rstrip("/") or "default")


class _SharedReservation(Reservation):
    """A :class:`~llmutils._ratelimit.Reservation` granted by Redis: ``reconcile`` corrects the shared budget."""

    __slots__ = ("_shared",)

    def __init__(self, limiter: RedisRateLimiter, tokens: int) -> None:
        super().__init__(None, tokens)
        self._shared = limiter

    def reconcile(self, actual_tokens: int) -> None:
        """Debit ``actual_tokens - tokens`` more from the shared budget (a refund when negative)."""
        if actual_tokens < 0:
            raise InvalidRequestError(f"actual_tokens must be >= 0, got {actual_tokens}")
        self._shared._adjust_tokens(actual_tokens - self.tokens)
        self.tokens = actual_tokens


class RedisRateLimiter:
    """Requests-per-minute and tokens-per-minute limits shared through Redis by every process.

    Example::

        limiter = RedisRateLimiter("redis://localhost:6379/0", name="openai-prod", rpm=600)
        r = limiter.acquire(prompt_tokens + max_tokens)   # waits for this call's slot
        ...send the request...
        r.reconcile(usage["total_tokens"])

    Every process that builds a limiter with the same Redis URL and ``name`` draws on one budget;
    give them the same ``rpm``/``tpm`` (each process schedules with its own numbers).

    Parameters:
        url: a Redis URL (``redis://[:password@]host:port/db``, ``rediss://``, ``unix://``).
        name: the shared budget's name; see :func:`rate_limit_name` for the default a client uses.
        rpm: requests per minute; ``None`` or ``0`` means unlimited.
        tpm: tokens per minute; ``None`` or ``0`` means unlimited.
        rpm_burst: requests that may go back to back (``1`` spaces requests evenly).
        tpm_burst: tokens that may go back to back; default one second's budget (``tpm / 60``).
        redis_timeout: seconds a Redis command may take before Redis counts as down.
        retry_interval: seconds on the local limiter after a fault before Redis is tried again.
        clock: monotonic clock in seconds, for the retry interval.
        sleep: how to wait for a slot (tests pass a recorder).

    Raises:
        ConfigError: a bad limit, an empty name, or a URL that is not a Redis URL (before any
            connection is made); also when the ``redis`` package is not installed.
    """

    def __init__(
        self,
        url: str,
        *,
        name: str,
        rpm: float | None = None,
        tpm: float | None = None,
        rpm_burst: int = 1,
        tpm_burst: int | None = None,
        redis_timeout: float = DEFAULT_RATE_LIMIT_REDIS_TIMEOUT,
        retry_interval: float = DEFAULT_RATE_LIMIT_RETRY_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not isinstance(url, str) or urlsplit(url).scheme not in ("redis", "rediss", "unix"):
            raise ConfigError(
                f"RATE_LIMIT_URL must be a Redis URL (redis://host:6379/0, rediss://..., unix://...); "
                f"got {mask_url(url) if isinstance(url, str) else url!r}"
            )
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"RATE_LIMIT_NAME must be a non-empty string, got {name!r}")
        for label, value in (("redis_timeout", redis_timeout), ("retry_interval", retry_interval)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"{label} must be a positive number of seconds, got {value!r}")
        # The local limiter checks rpm, tpm and the bursts, and is the fallback.
        self._local = RateLimiter(rpm=rpm, tpm=tpm, rpm_burst=rpm_burst, tpm_burst=tpm_burst, clock=clock)
        try:
            import redis
        except ImportError as exc:  # pragma: no cover - the redis extra is part of the test install
            raise ConfigError("RATE_LIMIT_URL needs the redis package: pip install 'llmutils-openai[redis]'") from exc
        self._redis_errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._url = url
        self._name = name
        self._key = f"{_KEY_PREFIX}{{{name}}}"
        self._rpm = rpm or None
        self._tpm = tpm or None
        self._per_request_ms = 60_000.0 / rpm if rpm else 0.0
        self._per_token_ms = 60_000.0 / tpm if tpm else 0.0
        self._rpm_burst = rpm_burst
        self._tpm_burst = float(tpm_burst) if tpm_burst is not None else (tpm or 0) / 60.0
        self._retry_interval = float(retry_interval)
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._waiting = 0
        self._down_until = float("-inf")
        self._outage = False
        try:
            self._client: Any = redis.Redis.from_url(
                url, socket_timeout=redis_timeout, socket_connect_timeout=redis_timeout
            )
        except ValueError as exc:
            raise ConfigError(f"RATE_LIMIT_URL {mask_url(url)!r} cannot be used: {exc}") from None
        self._scripts = {
            script: self._client.register_script(text)
            for script, text in (
                ("acquire", _ACQUIRE),
                ("check", _CHECK_PAUSE),
                ("pause", _PAUSE),
                ("adjust", _ADJUST),
            )
        }

    # -- the RateLimiter interface ---------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """Always True: even without ``rpm``/``tpm``, a 429's shared pause holds every process."""
        return True

    @property
    def rpm(self) -> float | None:
        """The requests-per-minute limit, or ``None``."""
        return self._rpm

    @property
    def tpm(self) -> float | None:
        """The tokens-per-minute limit, or ``None``."""
        return self._tpm

    @property
    def name(self) -> str:
        """The shared budget's name."""
        return self._name

    @property
    def shared(self) -> bool:
        """True while Redis is in use; False while the local fallback limiter is."""
        return not self._outage

    @property
    def waiting(self) -> int:
        """Threads of this process waiting in :meth:`acquire` right now."""
        return self._waiting + self._local.waiting

    def __repr__(self) -> str:
        return f"RedisRateLimiter({mask_url(self._url)!r}, name={self._name!r}, rpm={self._rpm!r}, tpm={self._tpm!r})"

    def acquire(
        self, tokens: int = 0, *, timeout: float | None = None, deadline: Deadline | None = None
    ) -> Reservation:
        """Wait for this request's slot in the shared budget; first come, first served.

        ``tokens`` is the estimate (prompt + max output); it is ignored when ``tpm`` is off.
        With ``timeout`` (seconds), raise :class:`RateLimitError` at once, without taking a
        slot, when the slot would come later than that; with a ``deadline`` (the call's
        ``total_timeout``) that comes first, raise its :class:`~llmutils.TotalTimeoutError`.
        """
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise InvalidRequestError(f"tokens must be an integer >= 0, got {tokens!r}")
        by_deadline = False
        if deadline is not None and deadline.bounded:
            remaining = deadline.remaining()
            if timeout is None or remaining < timeout:
                timeout, by_deadline = remaining, True
        start = self._clock()
        reserved = tokens if self._tpm is not None else 0
        while True:
            left = None if timeout is None else timeout - (self._clock() - start)
            if not self._redis_usable():
                return self._local.acquire(
                    reserved,
                    timeout=None if left is None or by_deadline else max(0.0, left),
                    deadline=deadline if by_deadline else None,
                )
            bound_ms = -1.0 if left is None else max(0.0, left) * 1000.0
            try:
                granted, wait_us, paused_seen = self._scripts["acquire"](
                    keys=[self._key],
                    args=[
                        repr(self._per_request_ms),
                        self._rpm_burst,
                        reserved,
                        repr(self._per_token_ms),
                        repr(self._tpm_burst),
                        repr(bound_ms),
                    ],
                )
            except self._redis_errors as exc:
                self._went_down(exc)
                continue
            self._came_back()
            wait = int(wait_us) / 1e6
            if not int(granted):
                raise self._timeout_error(timeout, wait, deadline if by_deadline else None)
            if wait <= 0.0:
                return _SharedReservation(self, reserved)
            self._wait(wait)
            # A 429 elsewhere may have paused everyone while this caller slept on its slot.
            try:
                again_us = int(self._scripts["check"](keys=[self._key], args=[paused_seen]))
            except self._redis_errors as exc:
                self._went_down(exc)
                return _SharedReservation(self, reserved)
            if again_us <= 0:
                return _SharedReservation(self, reserved)
            logger.debug("shared rate limit %r paused while waiting: taking a new slot", self._name)

    def pause(self, seconds: float) -> None:
        """Hold every process's acquisitions for ``seconds`` from now (a 429's ``Retry-After``)."""
        self._local.pause(seconds)
        if self._redis_usable():
            try:
                self._scripts["pause"](keys=[self._key], args=[repr(max(0.0, seconds) * 1000.0)])
            except self._redis_errors as exc:
                self._went_down(exc)
                return
            self._came_back()
            logger.debug("shared rate limit %r paused for %.3f s", self._name, seconds)

    def close(self) -> None:
        """Close the Redis connections (the limiter reconnects if used again)."""
        self._client.close()

    # -- internals -------------------------------------------------------------------------------

    def _wait(self, seconds: float) -> None:
        with self._lock:
            self._waiting += 1
        try:
            self._sleep(seconds)
        finally:
            with self._lock:
                self._waiting -= 1

    def _adjust_tokens(self, delta: int) -> None:
        """Debit ``delta`` more tokens from the shared budget (refund when negative)."""
        if self._tpm is None or delta == 0 or not self._redis_usable():
            return
        try:
            self._scripts["adjust"](keys=[self._key], args=[repr(delta * self._per_token_ms)])
        except self._redis_errors as exc:
            self._went_down(exc)
            return
        self._came_back()

    def _redis_usable(self) -> bool:
        """False while in the back-off after a fault (no Redis round trip is tried then)."""
        return not self._outage or self._clock() >= self._down_until

    def _went_down(self, exc: BaseException) -> None:
        """Switch to the local limiter until the retry interval has passed; warn once per outage."""
        with self._lock:
            self._down_until = self._clock() + self._retry_interval
            first = not self._outage
            self._outage = True
        if first:
            logger.warning(
                "shared rate limit %r on %s is unavailable (%s: %s); each process now limits itself "
                "locally (rpm=%s, tpm=%s); Redis is tried again every %g s",
                self._name,
                mask_url(self._url),
                type(exc).__name__,
                exc,
                self._rpm,
                self._tpm,
                self._retry_interval,
            )
        else:
            logger.debug("shared rate limit %r: Redis still unavailable (%s)", self._name, exc)

    def _came_back(self) -> None:
        if self._outage:
            with self._lock:
                was_down, self._outage = self._outage, False
            if was_down:
                logger.info("shared rate limit %r on %s is back in use", self._name, mask_url(self._url))

    def _timeout_error(self, timeout: float | None, wait: float, deadline: Deadline | None) -> LLMUtilsError:
        """The error for a slot that would come too late: the deadline's, or a RateLimitError."""
        if deadline is not None:
            return deadline.error(
                f"waiting for the shared rate limit {self._name!r} (rpm={self._rpm}, tpm={self._tpm}; "
                f"the next slot is {wait:.3f} s away)"
            )
        return RateLimitError(
            f"shared rate limit {self._name!r} (rpm={self._rpm}, tpm={self._tpm}): no slot within the "
            f"{timeout} s timeout (the next one is {wait:.3f} s away); raise the timeout, lower the "
            "concurrency, or raise the rpm/tpm settings if the provider allows more",
            retry_after=wait,
        )
