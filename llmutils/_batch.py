"""Run many requests on a pool of threads: results in input order, one failure never stops the rest.

>>> results = batch([[{"role": "user", "content": "Hi"}], {"text": "A long story."}],
...                 user_template="summarize", workers=8, progress=True)
>>> [r.content if r.ok else r.error for r in results]

What is kept per item and what stops the run:

* an :class:`LLMUtilsError` (an HTTP failure after its retries, a template that does not render
  on this item's variables, an item of the wrong shape) is kept in that item's
  :attr:`BatchResult.error`; the other items go on;
* fail fast: when the results show that every request would fail the same way, no new item is
  sent: after the first :class:`AuthenticationError`, or after ``max_connection_failures``
  connection failures in a row (no HTTP response at all: refused, DNS, TLS, timeouts) with no
  success in between, each failed attempt counted as it happens (the items' retries report to
  the batch through a :class:`~llmutils._retry.RetryScope`). Items in flight then stop retrying
  at once (a backoff sleep ends; an attempt under way finishes) and fail with the reason; the
  others get a :class:`NotAttemptedError` whose ``reason`` (also logged once, as one WARNING
  line) says why;
* any other exception is a bug (in a handler, in a callback): the run stops, items not yet
  started are dropped, and the exception propagates with its traceback;
* ``KeyboardInterrupt`` (Ctrl-C) in the calling thread stops the run at once: no new item
  starts, results already back still go to ``on_result``, and the exception is re-raised
  without waiting for the requests in flight. Workers are
  daemon threads, so a process that exits on Ctrl-C does not wait for them either; a request in
  flight finishes (or times out) in the background, is not retried, and its result is dropped.

On other processes or machines: with ``executor=`` (a ``ProcessPoolExecutor``, a Dask cluster's
executor) the items go out in chunks; each chunk runs on threads where the executor puts it and
comes back as a list of results, which are collected as above (see :func:`_map_on_executor`).

The pieces are small and separate so that other runners can reuse them: :func:`run_item` (the
work of one item), :class:`ReorderBuffer` (finishing order to input order), :class:`FailFast`
(the stop rule) and :func:`is_connection_failure`.

Workers run in a copy of the caller's :mod:`contextvars` context, so
:func:`~llmutils.override_defaults` around :func:`batch` applies to every item.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import pickle
import queue
import socket
import sys
import threading
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, TypeGuard, TypeVar

from ._exceptions import (
    AuthenticationError,
    ConfigError,
    InvalidRequestError,
    LLMUtilsError,
    NotAttemptedError,
)
from ._retry import RetryScope, retry_scope

__all__ = [
    "DEFAULT_MAX_CONNECTION_FAILURES",
    "DEFAULT_WORKERS",
    "BatchResult",
    "FailFast",
    "ReorderBuffer",
    "batch",
    "is_connection_failure",
    "map_calls",
    "run_item",
]

logger = logging.getLogger("llmutils")

T = TypeVar("T")

DEFAULT_WORKERS = 8
DEFAULT_MAX_CONNECTION_FAILURES = 5
VIAS = ("live", "batch-api")
_POLL_SECONDS = 0.2  # how often the calling thread wakes while waiting (Ctrl-C on every platform)


@dataclass
class BatchResult:
    """One item's outcome: ``output`` when it worked, ``error`` when it did not, never both."""

    index: int
    input: Any
    output: Any = None
    error: LLMUtilsError | None = None
    cached: bool = False
    usage: Mapping[str, Any] | None = None

    @property
    def ok(self) -> bool:
        """True when the item produced an output."""
        return self.error is None

    @property
    def attempted(self) -> bool:
        """False when the batch stopped early (fail fast) before this item was sent."""
        return not isinstance(self.error, NotAttemptedError)

    @property
    def content(self) -> str | None:
        """The text of the answer when ``output`` is an assistant message dict, else None."""
        if isinstance(self.output, Mapping):
            content = self.output.get("content")
            return content if isinstance(content, str) else None
        return None

    @property
    def tokens(self) -> int:
        """Prompt plus completion tokens the API reported for this item (0 if unknown)."""
        if not isinstance(self.usage, Mapping):
            return 0
        return sum(v for k in ("prompt_tokens", "completion_tokens") if isinstance(v := self.usage.get(k), int))


# -- the work of one item --------------------------------------------------------------------------


def run_item(fn: Callable[[T], Any], index: int, item: T, client: Any) -> BatchResult:
    """Run ``fn(item)`` and return its :class:`BatchResult`.

    An :class:`LLMUtilsError` becomes the result's ``error``; any other exception propagates
    (a bug). ``cached`` and ``usage`` are read from ``client.last_call`` (the calling thread's
    last call) when ``fn`` made one.
    """
    before = getattr(client, "last_call", None)
    try:
        output = fn(item)
    except LLMUtilsError as exc:
        logger.debug("batch item %d failed: %s", index, exc)
        return BatchResult(index, item, error=exc)
    info = getattr(client, "last_call", None)
    if info is None or info is before:
        return BatchResult(index, item, output=output)
    return BatchResult(index, item, output=output, cached=bool(info.cached), usage=info.usage)


# -- finishing order to input order ----------------------------------------------------------------


class ReorderBuffer:
    """Turn results arriving in finishing order into input order, holding those ahead of a gap.

    >>> buffer = ReorderBuffer()
    >>> buffer.push(BatchResult(1, "b"))      # item 0 is not finished: held
    []
    >>> [r.index for r in buffer.push(BatchResult(0, "a"))]
    [0, 1]

    Not thread-safe: push from one thread (the one collecting results).
    """

    def __init__(self, first: int = 0) -> None:
        self._next = first
        self._held: dict[int, BatchResult] = {}

    @property
    def next_index(self) -> int:
        """The index the buffer waits for before it can hand anything else out."""
        return self._next

    def __len__(self) -> int:
        """The number of results held, waiting for an earlier one."""
        return len(self._held)

    def push(self, result: BatchResult) -> list[BatchResult]:
        """Add one finished result; return the results now ready, in input order (maybe none)."""
        if result.index < self._next or result.index in self._held:
            raise ValueError(f"result {result.index} was already pushed")
        self._held[result.index] = result
        ready = []
        while self._next in self._held:
            ready.append(self._held.pop(self._next))
            self._next += 1
        return ready

    def drain(self) -> list[BatchResult]:
        """Return every result still held, in input order, skipping the gaps (the run was cut short)."""
        ready = [self._held[i] for i in sorted(self._held)]
        self._held.clear()
        if ready:
            self._next = ready[-1].index + 1
        return ready


# -- the fail-fast rule -------------------------------------------------------------------------------


def _chain(error: BaseException) -> Iterator[BaseException]:
    """The error, then its causes (``__cause__``, else ``__context__``), each once."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def is_connection_failure(error: BaseException) -> bool:
    """True when no HTTP response came back: connection refused or reset, DNS, TLS, a timeout.

    Reads the error's chain of causes: an HTTP status anywhere in it means the server answered
    (not a connection failure); the SDK's ``APIConnectionError`` (timeouts included) or an OS
    connection error means it did not.
    """
    openai = sys.modules.get("openai")
    connection_errors: tuple[type[BaseException], ...] = (ConnectionError, socket.gaierror, TimeoutError)
    sdk_error = getattr(openai, "APIConnectionError", None)
    if isinstance(sdk_error, type):
        connection_errors += (sdk_error,)
    for exc in _chain(error):
        if isinstance(exc, LLMUtilsError) and exc.status_code is not None:
            return False
        if isinstance(exc, connection_errors):
            return True
    return False


class FailFast:
    """Decide when a batch should stop sending because every request would fail the same way.

    Stop after the first :class:`AuthenticationError`, or after ``max_connection_failures``
    connection failures (:func:`is_connection_failure`) in a row: an item the server answered
    (a success, or an HTTP error) resets the count; a cache hit or an item that failed before
    sending leaves it as it is. ``None`` or ``0`` never stops on connection failures.

    A runner that sees the attempts (``map_calls``, through a :class:`~llmutils._retry.RetryScope`)
    reports each failed attempt with :meth:`observe_attempt`, so a dead endpoint is recognised
    after ``max_connection_failures`` attempts, not after as many items each retried in full; the
    item's final error is then not counted a second time by :meth:`observe`. Not thread-safe:
    call it under one lock.

    >>> rule = FailFast(max_connection_failures=5)
    >>> rule.observe(result)   # True once, when the batch should stop; ``rule.reason`` says why
    """

    def __init__(self, max_connection_failures: int | None = DEFAULT_MAX_CONNECTION_FAILURES) -> None:
        if max_connection_failures is not None and (
            isinstance(max_connection_failures, bool)
            or not isinstance(max_connection_failures, int)
            or max_connection_failures < 0
        ):
            raise ConfigError(f"max_connection_failures must be an int >= 0 or None, got {max_connection_failures!r}")
        self.max_connection_failures = max_connection_failures or None
        self.reason: str | None = None
        self._in_a_row = 0
        self._counted: weakref.WeakSet[BaseException] = weakref.WeakSet()  # attempts observe_attempt counted

    def observe(self, result: BatchResult) -> bool:
        """Count one finished item; return True the first time the batch should stop."""
        if self.reason is not None:
            return False
        error = result.error
        if error is None:
            if not result.cached:
                self._in_a_row = 0
            return False
        if isinstance(error, AuthenticationError):
            self.reason = f"item {result.index} failed with AuthenticationError, so every request would: {error}"
            return True
        if is_connection_failure(error):
            if any(cause in self._counted for cause in _chain(error)):
                return False  # its attempts were counted as they failed
            self._in_a_row += 1
            return self._tripped(f"item {result.index}: {error}")
        if error.status_code is not None:
            self._in_a_row = 0
        return False

    def observe_attempt(self, error: BaseException) -> bool:
        """Count one failed attempt of an item still running; return True the first time the batch should stop.

        A connection failure adds one to the count; an HTTP answer (an error status) resets it.
        """
        if self.reason is not None:
            return False
        if is_connection_failure(error):
            with contextlib.suppress(TypeError):  # an error that cannot be weakly referenced is counted again later
                self._counted.add(error)
            self._in_a_row += 1
            return self._tripped(str(error))
        if isinstance(error, LLMUtilsError) and error.status_code is not None:
            self._in_a_row = 0
        return False

    def _tripped(self, last: str) -> bool:
        """Whether the count reached the limit (then ``reason`` says so)."""
        limit = self.max_connection_failures
        if limit is None or self._in_a_row < limit:
            return False
        self.reason = f"{self._in_a_row} connection failures in a row with no success in between (last: {last})"
        return True


def _not_attempted(index: int, item: Any, reason: str) -> BatchResult:
    return BatchResult(index, item, error=NotAttemptedError(f"not attempted: the batch stopped early: {reason}", reason=reason))


# -- the progress bar ----------------------------------------------------------------------------------


class _BarHandler(logging.Handler):
    """Stand-in for a console log handler while a bar is drawn: the same text, through ``tqdm.write``."""

    def __init__(self, original: logging.StreamHandler[Any], write: Callable[..., None]) -> None:
        super().__init__(original.level)
        self.original = original
        self.filters = list(original.filters)
        self._write = write

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._write(self.original.format(record), file=self.original.stream)
        except Exception:  # as logging.StreamHandler does: report, never raise into the caller
            self.handleError(record)


def _is_console(handler: logging.Handler) -> TypeGuard[logging.StreamHandler[Any]]:
    return isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) in (sys.stderr, sys.stdout)


@contextmanager
def _logs_through_bar(write: Callable[..., None]) -> Iterator[None]:
    """Print console log lines (llmutils' and the root logger's) above the bar, not glued to it.

    Like tqdm's ``logging_redirect_tqdm``, but only handlers that write to the console are
    replaced, and nothing is added to a logger that has none (Python's last-resort handler is
    redirected instead).
    """
    saved: list[tuple[logging.Logger, list[logging.Handler]]] = []
    for each in (logger, logging.getLogger()):
        if any(_is_console(h) for h in each.handlers):
            saved.append((each, each.handlers))
            each.handlers = [_BarHandler(h, write) if _is_console(h) else h for h in each.handlers]
    last_resort = logging.lastResort
    if isinstance(last_resort, logging.StreamHandler):
        logging.lastResort = _BarHandler(last_resort, write)
    try:
        yield
    finally:
        for each, handlers in saved:
            each.handlers = handlers
        logging.lastResort = last_resort


class _Progress:
    """A tqdm bar on stderr with done/cached/failed/tokens, or nothing when disabled."""

    def __init__(self, total: int, enabled: bool, desc: str) -> None:
        self.cached = self.failed = self.tokens = self.skipped = 0
        self._bar: Any = None
        self._redirect: Any = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="item", file=sys.stderr, dynamic_ncols=True)
            self._bar.set_postfix_str(self._postfix(), refresh=False)
            self._redirect = _logs_through_bar(tqdm.write)
            self._redirect.__enter__()

    def _postfix(self) -> str:
        skipped = f" not_attempted={self.skipped}" if self.skipped else ""
        return f"cached={self.cached} failed={self.failed} tokens={self.tokens}{skipped}"

    def update(self, result: BatchResult) -> None:
        """Count one finished item."""
        self.cached += result.cached
        self.failed += not result.ok
        self.skipped += not result.attempted
        if not result.cached:
            self.tokens += result.tokens
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix(), refresh=False)
            self._bar.update(1)

    def close(self) -> None:
        """Draw the bar one last time, release the terminal line and put the log handlers back."""
        if self._bar is not None:
            self._bar.close()
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)


# -- the runner --------------------------------------------------------------------------------------


def _default_client() -> Any:
    from ._registry import client

    return client()


def map_calls(
    fn: Callable[[T], Any],
    items: Iterable[T],
    *,
    workers: int = DEFAULT_WORKERS,
    client: Any = None,
    progress: bool = False,
    desc: str = "llmutils",
    on_result: Callable[[BatchResult], None] | None = None,
    max_connection_failures: int | None = DEFAULT_MAX_CONNECTION_FAILURES,
    executor: Executor | None = None,
    chunk_size: int | None = None,
) -> list[BatchResult]:
    """Apply ``fn`` to every item on ``workers`` threads; return one :class:`BatchResult` per item, in order.

    >>> summarize = LLMCall("system_default", "summarize")
    >>> map_calls(lambda v: summarize.call(**v), [{"text": a} for a in articles], workers=16)

    ``client`` (default: the configured client) is where ``cached`` and ``usage`` are read from
    (its ``last_call`` on the worker's thread). ``progress`` shows a tqdm bar on stderr (log lines
    are printed above it). ``on_result`` is called in the calling thread as each item finishes
    (in finishing order; wrap it with a :class:`ReorderBuffer` for input order), and for every
    item not attempted when the run stops early. ``max_connection_failures``: see
    :class:`FailFast`. Errors and Ctrl-C: see the module docstring.

    ``executor`` (any :class:`concurrent.futures.Executor`: a ``ProcessPoolExecutor``, a Dask
    ``distributed.Client(...).get_executor()``, ...) runs the items there instead, in chunks of
    ``chunk_size`` (default ``2 * workers``), each chunk on ``workers`` threads where it runs, with
    the calling process's settings; results still come back in input order with per-item errors,
    the bar and ``on_result`` advance as chunks come back, and fail fast or Ctrl-C cancel the chunks
    not started. ``fn``, ``client`` and the items must then pickle (Dask also takes lambdas); a
    ``fn`` a ``ProcessPoolExecutor`` cannot take raises :class:`ConfigError` before any request.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be an int >= 1, got {workers!r}")
    if executor is not None and not isinstance(executor, Executor):
        raise ConfigError(
            f"executor must be a concurrent.futures.Executor (a ProcessPoolExecutor, or Dask's "
            f"distributed.Client(...).get_executor()), got {type(executor).__name__}"
        )
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ConfigError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    rule = FailFast(max_connection_failures)
    todo = list(items)
    if client is None:
        client = _default_client()
    if executor is not None:
        return _map_on_executor(
            fn,
            todo,
            executor=executor,
            chunk_size=chunk_size or 2 * workers,
            workers=workers,
            client=client,
            progress=progress,
            desc=desc,
            on_result=on_result,
            max_connection_failures=max_connection_failures,
        )
    results: list[BatchResult | None] = [None] * len(todo)
    finished: queue.SimpleQueue[tuple[int, BatchResult | None, BaseException | None]] = queue.SimpleQueue()
    lock = threading.Lock()
    taken = 0  # items handed to a worker; frozen once ``stop`` is set (both change under ``lock``, as ``rule``)

    def attempt_failed(error: LLMUtilsError) -> None:
        """Told by the retry policy of every failed attempt of the items in flight (see RetryScope)."""
        with lock:
            if rule.observe_attempt(error):
                scope.stop(rule.reason)  # nothing more is sent; the items in flight stop retrying

    scope = RetryScope(on_failure=attempt_failed)
    stop = scope.stopped

    def work() -> None:
        nonlocal taken
        with retry_scope(scope):
            while True:
                with lock:
                    if stop.is_set() or taken >= len(todo):
                        return
                    index = taken
                    taken += 1
                try:
                    result = run_item(fn, index, todo[index], client)
                    with lock:  # judged here, before this worker takes another item: nothing more is sent
                        if rule.observe(result):
                            scope.stop(rule.reason)
                    finished.put((index, result, None))
                except BaseException as exc:  # a bug, or KeyboardInterrupt raised in a worker: stop all
                    stop.set()
                    finished.put((index, None, exc))
                    return

    def collect(result: BatchResult) -> None:
        results[result.index] = result
        bar.update(result)
        if on_result is not None:
            on_result(result)

    threads = [
        threading.Thread(target=contextvars.copy_context().run, args=(work,), name=f"llmutils-batch-{i}", daemon=True)
        for i in range(min(workers, len(todo)))
    ]
    bar = _Progress(len(todo), progress, desc)
    received = 0
    try:
        for thread in threads:
            thread.start()
        while received < len(todo):
            if stop.is_set():
                with lock:
                    if received >= taken:  # everything in flight has come back
                        break
            try:
                index, result, exc = finished.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                continue
            received += 1
            if exc is not None:
                raise exc
            assert result is not None  # noqa: S101 - a worker sends a result or an exception (for mypy)
            collect(result)
        if rule.reason is not None:
            skipped = [i for i, r in enumerate(results) if r is None]
            logger.warning("batch stopped early: %s; %d of %d items not attempted", rule.reason, len(skipped), len(todo))
            for index in skipped:
                collect(_not_attempted(index, todo[index], rule.reason))
    except KeyboardInterrupt:
        stop.set()
        while True:  # results that came back before Ctrl-C still reach on_result: nothing answered is lost
            try:
                index, result, exc = finished.get_nowait()
            except queue.Empty:
                break
            if result is not None:
                collect(result)
        done = sum(r is not None for r in results)
        logger.info("batch interrupted after %d of %d items; items not started were dropped", done, len(todo))
        raise
    except BaseException:
        stop.set()
        done = sum(r is not None for r in results)
        logger.info("batch stopped after %d of %d items; items not started were dropped", done, len(todo))
        raise
    finally:
        bar.close()
    return [r for r in results if r is not None]


# -- the runner on an executor (processes, machines) ---------------------------------------------

_CHUNK_STATE_KEPT = 4  # (fn, client) pairs a worker process keeps, one per recent batch
_chunk_state: OrderedDict[str, tuple[Any, Any]] = OrderedDict()
_chunk_state_lock = threading.Lock()


def _shipped_settings() -> dict[str, Any]:
    """The calling process's settings that differ from the defaults (config file, environment,
    forced values, ``override_defaults``), applied around every chunk where it runs."""
    from ._config import DEFAULTS, resolve

    return {name: value for name, value in resolve().items() if value != DEFAULTS[name]}


def _run_chunk(
    token: str,
    work: tuple[Callable[[Any], Any], Any],
    pairs: list[tuple[int, Any]],
    workers: int,
    max_connection_failures: int | None,
    settings: Mapping[str, Any],
) -> list[BatchResult]:
    """Run one chunk where the executor put it: ``(index, item)`` pairs on ``workers`` threads.

    ``work`` is ``(fn, client)``, pickled together so ``fn``'s client is ``client``. A worker keeps
    the pair of the first chunk of a batch (``token``) it runs and uses it for the batch's later
    chunks, so they share its connections and requests in flight instead of opening their own.
    """
    from ._config import override_defaults

    with _chunk_state_lock:
        kept = _chunk_state.get(token)
        if kept is None:
            kept = _chunk_state[token] = work
            while len(_chunk_state) > _CHUNK_STATE_KEPT:
                _chunk_state.popitem(last=False)
        else:
            _chunk_state.move_to_end(token)
    fn, client = kept
    with override_defaults(**settings):
        results = map_calls(
            fn,
            [item for _, item in pairs],
            workers=workers,
            client=client,
            max_connection_failures=max_connection_failures,
        )
    return [replace(r, index=pairs[r.index][0]) for r in results]


def _map_on_executor(
    fn: Callable[[T], Any],
    todo: list[T],
    *,
    executor: Executor,
    chunk_size: int,
    workers: int,
    client: Any,
    progress: bool,
    desc: str,
    on_result: Callable[[BatchResult], None] | None,
    max_connection_failures: int | None,
) -> list[BatchResult]:
    """:func:`map_calls` on ``executor``: the items go out in chunks; results come back in input order.

    * Each chunk is one task: :func:`_run_chunk` runs its items on ``workers`` threads where the
      executor puts it, with the calling process's settings (:func:`_shipped_settings`); the
      client travels as its configuration (see ``OpenAIClient.__getstate__``).
    * An item's :class:`LLMUtilsError` stays in its :class:`BatchResult`; the progress bar and
      ``on_result`` advance as each chunk comes back; the results are put in input order.
    * Fail fast (:class:`FailFast`) is judged on the results as chunks come back (and within each
      chunk): chunks not started are cancelled, chunks running finish, the rest of the items get
      a :class:`NotAttemptedError`.
    * Any other exception (a bug in ``fn``, a worker that died, ``fn`` or an item that cannot be
      pickled) cancels the chunks not started and propagates; so does Ctrl-C, after the results
      already back went to ``on_result``. Chunks already running cannot be stopped from here: a
      ``ProcessPoolExecutor`` you own should be shut down with ``cancel_futures=True``.
    """
    if isinstance(executor, ProcessPoolExecutor):
        try:
            pickle.dumps((fn, client))
        except Exception as exc:
            raise ConfigError(
                f"map_calls(executor=ProcessPoolExecutor(...)) sends fn and client to other processes, but "
                f"{fn!r} (or its client) cannot be pickled: {exc}. Use a module-level function, a bound method "
                "or functools.partial instead of a lambda or a nested function."
            ) from exc
    rule = FailFast(max_connection_failures)
    results: list[BatchResult | None] = [None] * len(todo)
    token = uuid.uuid4().hex
    settings = _shipped_settings()
    bar = _Progress(len(todo), progress, desc)
    pending: dict[Future[list[BatchResult]], range] = {}

    def collect(result: BatchResult) -> None:
        results[result.index] = result
        bar.update(result)
        if on_result is not None:
            on_result(result)

    def cancel_rest() -> None:
        for future in pending:
            future.cancel()

    def take(future: Future[list[BatchResult]]) -> None:
        """Collect a finished chunk's results (raises what the chunk raised)."""
        pending.pop(future)
        if future.cancelled():
            return
        for result in future.result():
            collect(result)
            if rule.observe(result):
                logger.debug("batch stops sending: %s", rule.reason)
                cancel_rest()

    try:
        for start in range(0, len(todo), chunk_size):
            indices = range(start, min(start + chunk_size, len(todo)))
            future = executor.submit(
                _run_chunk,
                token,
                (fn, client),
                [(i, todo[i]) for i in indices],
                workers,
                max_connection_failures,
                settings,
            )
            pending[future] = indices
        while pending:
            done, _ = wait(list(pending), timeout=_POLL_SECONDS, return_when=FIRST_COMPLETED)
            for future in done:
                take(future)
        skipped = [i for i, r in enumerate(results) if r is None]
        if skipped:
            reason = rule.reason or "its chunk was cancelled"
            logger.warning("batch stopped early: %s; %d of %d items not attempted", reason, len(skipped), len(todo))
            for index in skipped:
                collect(_not_attempted(index, todo[index], reason))
    except KeyboardInterrupt:
        cancel_rest()
        for future in [f for f in pending if f.done() and not f.cancelled() and f.exception() is None]:
            for result in future.result():  # what came back before Ctrl-C still reaches on_result
                collect(result)
        done_count = sum(r is not None for r in results)
        logger.info("batch interrupted after %d of %d items; chunks not started were cancelled", done_count, len(todo))
        raise
    except BaseException:
        cancel_rest()
        done_count = sum(r is not None for r in results)
        logger.info("batch stopped after %d of %d items; chunks not started were cancelled", done_count, len(todo))
        raise
    finally:
        bar.close()
        with _chunk_state_lock:  # chunks that ran in this process (a thread pool) kept the pair here
            _chunk_state.pop(token, None)
    return [r for r in results if r is not None]


class _Send:
    """One batch item -> ``client.send_message``; a picklable callable, so a batch can run on any executor."""

    def __init__(
        self,
        client: Any,
        system_template: str | None,
        user_template: str | None,
        template_dirs: Any,
        params: Mapping[str, Any],
    ) -> None:
        self.client = client
        self.system_template = system_template
        self.user_template = user_template
        self.template_dirs = template_dirs
        self.params = dict(params)

    def __call__(self, item: Any) -> Any:
        messages = _messages_for(item, self.system_template, self.user_template, self.template_dirs)
        return self.client.send_message(messages, **self.params)


def _messages_for(
    item: Any,
    system_template: str | None,
    user_template: str | None,
    template_dirs: Any,
) -> list[dict[str, Any]]:
    """The messages of one batch item: given as is, or rendered from its template variables."""
    if isinstance(item, list):
        return item
    if not isinstance(item, Mapping):
        raise InvalidRequestError(
            f"a batch item must be a list of messages, a dict with 'messages', or a dict of template "
            f"variables; got {type(item).__name__}"
        )
    if "messages" in item:
        messages = item["messages"]
        if not isinstance(messages, list):
            raise InvalidRequestError(f"'messages' must be a list of message dicts, got {type(messages).__name__}")
        return messages
    if system_template is None and user_template is None:
        raise InvalidRequestError(
            "this item is a dict of template variables but no template was given: pass "
            "user_template= (and/or system_template=), or give the item a 'messages' list"
        )
    from ._templates import compose_messages

    # As one mapping, not **item: a variable may be called anything (template_dirs, name, ...).
    return compose_messages(system_template, user_template, item, template_dirs=template_dirs)


def batch(
    items: Iterable[Sequence[Mapping[str, Any]] | Mapping[str, Any]],
    *,
    client: Any = None,
    workers: int = DEFAULT_WORKERS,
    system_template: str | None = None,
    user_template: str | None = None,
    template_dirs: Any = None,
    progress: bool = False,
    on_result: Callable[[BatchResult], None] | None = None,
    max_connection_failures: int | None = DEFAULT_MAX_CONNECTION_FAILURES,
    executor: Executor | None = None,
    chunk_size: int | None = None,
    via: str = "live",
    fallback: str | None = None,
    **params: Any,
) -> list[BatchResult]:
    """Send one chat request per item on ``workers`` threads; results come back in input order.

    Each item is a list of messages, a dict with a ``"messages"`` list (its other keys are
    ignored, e.g. an id of yours), or a dict of template variables rendered with
    ``system_template`` / ``user_template`` (see :func:`~llmutils._templates.compose_messages`).
    The templates are loaded first: a name that does not exist raises :class:`TemplateError`
    before any request. ``**params`` (``model``, ``temperature``, ...) go to every
    ``client.send_message`` call; ``output`` is what it returns (the assistant message dict).
    With the cache on, a re-run of a finished batch is served from the cache without a network
    call (``cached`` is True). ``progress=True`` shows a tqdm bar (done, cached, failed, tokens)
    on stderr. ``on_result`` and ``max_connection_failures`` (fail fast): see :func:`map_calls`.
    ``executor`` and ``chunk_size`` run the items on other processes or machines (a
    ``ProcessPoolExecutor``, a Dask cluster), ``workers`` threads each: see :func:`map_calls`;
    the client travels there as its configuration.

    ``via="batch-api"`` sends the items through the OpenAI / Azure Batch API instead, at half price,
    answered within 24 h: same items, same results, same per-item errors. It needs the cache on (the
    batches are recorded there, so calling again after Ctrl-C or a crash resumes them instead of
    paying twice); ``fallback="live"`` sends what the batches did not answer as live calls.
    ``on_result`` is then called in input order once the batches are done.
    """
    from ._templates import find_template

    if via not in VIAS:
        raise ConfigError(f"via must be one of {', '.join(VIAS)}, got {via!r}")
    if fallback is not None and via == "live":
        raise ConfigError("fallback= applies to via='batch-api' only")
    for name in (system_template, user_template):
        if name is not None:
            find_template(name, template_dirs)
    if client is None:
        client = _default_client()

    send = _Send(client, system_template, user_template, template_dirs, params)
    if via == "batch-api":
        if executor is not None:
            raise ConfigError("executor= applies to via='live' only: the Batch API runs the requests itself")
        return _via_batch_api(
            list(items),
            send,
            client,
            (system_template, user_template, template_dirs),
            workers=workers,
            progress=progress,
            fallback=fallback,
            on_result=on_result,
            max_connection_failures=max_connection_failures,
            params=params,
        )

    return map_calls(
        send,
        items,
        workers=workers,
        client=client,
        progress=progress,
        desc="batch",
        on_result=on_result,
        max_connection_failures=max_connection_failures,
        executor=executor,
        chunk_size=chunk_size,
    )


def _via_batch_api(
    items: list[Any],
    send: Callable[[Any], Any],
    client: Any,
    templates: tuple[str | None, str | None, Any],
    *,
    workers: int,
    progress: bool,
    fallback: str | None,
    on_result: Callable[[BatchResult], None] | None,
    max_connection_failures: int | None,
    params: dict[str, Any],
) -> list[BatchResult]:
    """:func:`batch` through the Batch API: the items' messages here, the jobs in :mod:`llmutils._batchapi`."""
    from ._batchapi import run_items

    messages: list[Any] = []
    for item in items:
        try:
            messages.append(_messages_for(item, *templates))
        except LLMUtilsError as exc:
            messages.append(exc)
    results: list[BatchResult] = run_items(
        items,
        messages,
        client=client,
        fallback=fallback,
        live=send,
        workers=workers,
        progress=progress,
        on_result=on_result,
        max_connection_failures=max_connection_failures,
        **params,
    )
    return results
