"""The retry policy: tenacity's stop, wait and retry pieces, composed in one place.

An error is retried when it is ``retryable``: every :class:`~llmutils.NonTerminalError` by default,
and for an HTTP answer whatever openai-python's rules say (:mod:`llmutils._http`: ``x-should-retry``
first, no retry when the server asks for more than 120 s). The wait is the server's (``Retry-After``
and its variants, already judged usable: finite and in ``(0, 120]``), obeyed in full; else our own
backoff, growing from ``waiting_time`` by ``backoff_factor`` per attempt, plus jitter, capped at
``max_wait``. ``total_timeout`` bounds the whole call through one
:class:`~llmutils._deadline.Deadline`: each attempt gets it, and a wait that would end past it stops
at once. Calls made inside a :class:`RetryScope` (a batch) report every failed attempt to it and
stop retrying at once when it is stopped: the one seam between a batch's fail-fast rule and the
retries of the items it has in flight.
"""

from __future__ import annotations

import contextvars
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import tenacity
from tenacity import (
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_when_event_set,
    wait_exponential,
)
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from ._config import DEFAULT_MAX_WAIT, UNSET
from ._deadline import Deadline
from ._exceptions import (
    LLMUtilsError,
    NotAttemptedError,
    RetriesExhaustedError,
    TotalTimeoutError,
)
from ._otel import current_call_span

__all__ = ["POLICY_DEFAULTS", "RetryPolicy", "RetryScope", "retry_scope", "stop_at_deadline", "wait_retry_after"]

logger = logging.getLogger("llmutils")

T = TypeVar("T")


class wait_retry_after(wait_base):
    """Wait what the server asked for (the error's ``retry_after``) in full if it did, else ``fallback``
    capped at ``cap``.

    The server's wait is not capped here: an error carries a ``retry_after`` only when openai-python
    would obey it (finite, in ``(0, 120]``); a longer one makes the error not retryable at all.
    """

    def __init__(self, fallback: wait_base, cap: float) -> None:
        self.fallback = fallback
        self.cap = cap

    def __call__(self, retry_state: RetryCallState) -> float:
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None and outcome.failed else None
        asked = getattr(exc, "retry_after", None)
        if asked is not None and asked > 0:
            return float(asked)
        return max(0.0, min(self.fallback(retry_state), self.cap))


def _is_retryable(exc: BaseException) -> bool:
    """An llmutils error that says it is retryable (see :attr:`~llmutils.LLMUtilsError.retryable`)."""
    return isinstance(exc, LLMUtilsError) and exc.retryable


class _wait_jitter(wait_base):
    """Add up to ``fraction`` of the base wait at random, so clients that failed together spread out."""

    def __init__(self, base: wait_base, fraction: float) -> None:
        self.base = base
        self.fraction = fraction

    def __call__(self, retry_state: RetryCallState) -> float:
        wait = self.base(retry_state)
        return wait + random.uniform(0, wait * self.fraction) if self.fraction else wait  # noqa: S311 - jitter, not a secret


class stop_at_deadline(stop_base):
    """Stop when the next backoff wait would not end before ``deadline`` (never when unbounded)."""

    def __init__(self, deadline: Deadline) -> None:
        self.deadline = deadline

    def __call__(self, retry_state: RetryCallState) -> bool:
        if not self.deadline.bounded:
            return False
        return (retry_state.upcoming_sleep or 0.0) >= self.deadline.remaining()


def _log_retry(retry_state: RetryCallState) -> None:
    exc = retry_state.outcome.exception() if retry_state.outcome is not None else None
    span = current_call_span()  # the call's OpenTelemetry span, if tracing is on: a retry event
    if span is not None:
        span.retry(retry_state.attempt_number, exc, retry_state.upcoming_sleep)
    logger.warning(
        "attempt %d failed (%s); retrying in %.2f s",
        retry_state.attempt_number,
        exc,
        retry_state.upcoming_sleep,
    )


def _carry_last(error: LLMUtilsError, last: BaseException | None) -> LLMUtilsError:
    """Copy what the server said last (status, request id, error fields, headers) onto ``error``."""
    if isinstance(last, LLMUtilsError):  # for callers to branch on
        error.status_code = last.status_code
        error.request_id = last.request_id
        error.code, error.type, error.param = last.code, last.type, last.param
        error.headers = last.headers
    return error


class RetryScope:
    """Calls that stop retrying together: the items a batch has in flight when it stops sending.

    Every :meth:`RetryPolicy.call` run inside ``with retry_scope(scope):`` (in that context, or in a
    thread started with a copy of it) calls ``on_failure(error)`` after each failed attempt, before
    deciding whether to retry. Once :meth:`stop` is called, no call in the scope makes another
    attempt: a backoff sleep in progress ends at once (the policy's default ``time.sleep`` becomes a
    wait on :attr:`stopped`; an injected ``sleep`` is called as it is), and the call raises
    :class:`RetriesExhaustedError` naming the reason (the last error chained, its fields carried),
    or :class:`NotAttemptedError` if it had sent nothing yet. An attempt already under way is not
    cut short.

    >>> scope = RetryScope(on_failure=rule_observes_the_attempt)
    >>> with retry_scope(scope):
    ...     client.send_message(messages)   # scope.stop("why") from another thread ends its retries
    """

    def __init__(self, on_failure: Callable[[LLMUtilsError], None] | None = None, *, label: str = "batch") -> None:
        self.on_failure = on_failure
        self.label = label
        self.stopped = threading.Event()
        """Set once the scope is stopped."""
        self.reason: str | None = None

    def stop(self, reason: str | None = None) -> None:
        """Stop every call in the scope from retrying (the first reason given is kept)."""
        if self.reason is None:
            self.reason = reason
        self.stopped.set()

    def sleep_with(self, sleep: Callable[[float], None]) -> Callable[[float], None]:
        """``sleep``, made to end at once when the scope stops (for the default ``time.sleep``)."""
        if sleep is not time.sleep:
            return sleep

        def wait(seconds: float) -> None:
            self.stopped.wait(seconds)

        return wait

    def error(self, attempts: int, last: BaseException | None) -> LLMUtilsError:
        """The error of a call that the stop cut short after ``attempts`` attempts (``last`` failed last)."""
        reason = self.reason or f"the {self.label} was stopped"
        if attempts == 0 or last is None:
            return NotAttemptedError(f"not attempted: the {self.label} stopped early: {reason}", reason=reason)
        error = RetriesExhaustedError(
            f"Gave up after {attempts} attempt(s), not retried because the {self.label} stopped early: {reason}. "
            f"Last error: {last}",
            attempts=attempts,
        )
        return _carry_last(error, last)


_scope: contextvars.ContextVar[RetryScope | None] = contextvars.ContextVar("llmutils_retry_scope", default=None)


@contextmanager
def retry_scope(scope: RetryScope) -> Iterator[RetryScope]:
    """Run the calls of this block (and of threads started with a copy of its context) in ``scope``."""
    token = _scope.set(scope)
    try:
        yield scope
    finally:
        _scope.reset(token)


# What an unset field means when nothing else (the configuration) gives it a value.
POLICY_DEFAULTS: dict[str, Any] = {
    "max_attempts": 5,
    "waiting_time": 1.0,
    "backoff_factor": 2.0,
    "max_wait": DEFAULT_MAX_WAIT,
    "total_timeout": None,
    "jitter": 0.25,
    "sleep": time.sleep,
}


@dataclass(frozen=True)
class RetryPolicy:
    """How a call is retried; inject one into a client to change some of the pieces.

    >>> waits = []
    >>> policy = RetryPolicy(max_attempts=3, waiting_time=0.5, sleep=waits.append)

    Every field is optional: a field left unset (:data:`UNSET`) comes from the configuration
    (``MAX_ATTEMPTS``, ``WAITING_TIME``, ``EXPONENTIAL_BACKOFF_FACTOR``, ``MAX_WAIT``,
    ``TOTAL_TIMEOUT``), field by field, so ``RetryPolicy(jitter=0)`` keeps the configured number
    of attempts. Used on its own, unset fields take :data:`POLICY_DEFAULTS`. ``total_timeout=None``
    given explicitly means "no bound", whatever the configuration says.

    :param max_attempts: attempts per call, the first included (``MAX_ATTEMPTS``).
    :param waiting_time: the first backoff wait in seconds (``WAITING_TIME``).
    :param backoff_factor: what each wait is multiplied by (``EXPONENTIAL_BACKOFF_FACTOR``).
    :param max_wait: the cap on one wait of our own backoff (``MAX_WAIT``); a server's
        ``Retry-After`` is obeyed in full up to 120 s, as openai-python does.
    :param total_timeout: seconds for the whole call, retries and waits included (None: unbounded).
    :param jitter: up to this fraction is added at random to each computed wait.
    :param sleep: how a wait is done (tests pass ``list.append`` to record the waits instead).
    """

    max_attempts: int = UNSET
    waiting_time: float = UNSET
    backoff_factor: float = UNSET
    max_wait: float = UNSET
    total_timeout: float | None = UNSET
    jitter: float = UNSET
    sleep: Callable[[float], None] = field(default=UNSET, compare=False)

    def __post_init__(self) -> None:
        from ._exceptions import ConfigError

        for name in ("waiting_time", "backoff_factor", "max_wait", "jitter"):
            value = getattr(self, name)
            if value is not UNSET and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf")):
                raise ConfigError(f"RetryPolicy({name}={value!r}): expected a number of seconds >= 0")
        attempts = self.max_attempts
        if attempts is not UNSET and (isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1):
            raise ConfigError(f"RetryPolicy(max_attempts={attempts!r}): expected an int >= 1 (the first attempt included)")
        total = self.total_timeout
        if total is not UNSET and total is not None and (isinstance(total, bool) or not isinstance(total, (int, float)) or not total > 0):
            raise ConfigError(f"RetryPolicy(total_timeout={total!r}): expected seconds > 0, or None for no bound")
        if self.sleep is not UNSET and not callable(self.sleep):
            raise ConfigError(f"RetryPolicy(sleep={self.sleep!r}): expected a callable taking seconds")

    def is_set(self, name: str) -> bool:
        """Whether the field ``name`` was given (not :data:`UNSET`)."""
        return getattr(self, name) is not UNSET

    def given(self) -> dict[str, Any]:
        """The fields that were given, by name."""
        return {name: getattr(self, name) for name in POLICY_DEFAULTS if getattr(self, name) is not UNSET}

    def over(self, base: RetryPolicy) -> RetryPolicy:
        """This policy's given fields over ``base`` (the one built from the configuration)."""
        return replace(base, **self.given())

    def with_values(self, **values: Any) -> RetryPolicy:
        """A copy with the given fields changed (``None`` values are ignored)."""
        return replace(self, **{k: v for k, v in values.items() if v is not None})

    def resolved(self) -> RetryPolicy:
        """A copy where every unset field takes :data:`POLICY_DEFAULTS`."""
        missing = {name: value for name, value in POLICY_DEFAULTS.items() if getattr(self, name) is UNSET}
        return replace(self, **missing) if missing else self

    def deadline(self) -> Deadline:
        """A new deadline for one call from now (unbounded without ``total_timeout``)."""
        return Deadline(self.resolved().total_timeout)

    def retrying(self, deadline: Deadline | None = None, scope: RetryScope | None = None) -> tenacity.Retrying:
        """The tenacity ``Retrying`` object for one call bounded by ``deadline`` (and stopped with ``scope``)."""
        policy = self.resolved()
        stop: stop_base = stop_after_attempt(max(1, policy.max_attempts))
        if deadline is None:
            deadline = self.deadline()
        if deadline.bounded:
            stop = stop | stop_at_deadline(deadline)
        sleep = policy.sleep
        if scope is not None:
            stop = stop | stop_when_event_set(scope.stopped)
            sleep = scope.sleep_with(sleep)
        backoff = wait_exponential(multiplier=policy.waiting_time, exp_base=policy.backoff_factor, max=policy.max_wait)
        return tenacity.Retrying(
            stop=stop,
            wait=wait_retry_after(_wait_jitter(backoff, policy.jitter), cap=policy.max_wait),
            retry=retry_if_exception(_is_retryable),
            before_sleep=_log_retry,
            sleep=sleep,
            reraise=False,
        )

    def call(self, attempt: Callable[[Deadline], T], deadline: Deadline | None = None) -> T:
        """Run ``attempt(deadline)`` until it succeeds or the policy gives up.

        ``deadline`` (made from ``total_timeout`` when not given) is the call's one time bound:
        each attempt bounds its own waits by it, and no backoff wait runs past it. Terminal errors
        (a :class:`TotalTimeoutError` raised inside an attempt included) pass through untouched;
        when the retries run out, :class:`RetriesExhaustedError` (or :class:`TotalTimeoutError`)
        chains the last error and carries ``attempts``. Inside a :class:`RetryScope`, each failed
        attempt is reported to it, and once it is stopped the call raises its error at once.
        """
        policy = self.resolved()
        if deadline is None:
            deadline = policy.deadline()
        scope = _scope.get()
        attempts = 0
        failed: LLMUtilsError | None = None

        def one_attempt() -> T:
            nonlocal attempts, failed
            if scope is not None and scope.stopped.is_set():
                raise scope.error(attempts, failed) from failed
            deadline.check(f"before attempt {attempts + 1} could start", attempts=attempts)
            attempts += 1
            try:
                return attempt(deadline)
            except LLMUtilsError as exc:
                exc.attempts = attempts
                failed = exc
                if scope is not None and scope.on_failure is not None:
                    scope.on_failure(exc)
                raise

        try:
            return policy.retrying(deadline, scope)(one_attempt)
        except tenacity.RetryError as exc:
            last = exc.last_attempt.exception()
            if scope is not None and scope.stopped.is_set():
                raise scope.error(attempts, last) from last
            timed_out = deadline.bounded and attempts < policy.max_attempts
            if timed_out:
                error: RetriesExhaustedError = TotalTimeoutError(
                    f"Gave up after {attempts} attempt(s): total_timeout={deadline.total:g}s would be "
                    f"exceeded. Last error: {last}",
                    attempts=attempts,
                )
            else:
                error = RetriesExhaustedError(
                    f"Gave up after {attempts} attempt(s). Last error: {last}", attempts=attempts
                )
            raise _carry_last(error, last) from last
