"""Run many requests on a pool of threads: results in input order, one failure never stops the rest.

>>> results = batch([[{"role": "user", "content": "Hi"}], {"text": "A long story."}],
...                 user_template="summarize", workers=8, progress=True)
>>> [r.content if r.ok else r.error for r in results]

What is kept per item and what stops the run:

* an :class:`LLMUtilsError` (an HTTP failure after its retries, a template that does not render,
  an item of the wrong shape) is kept in that item's :attr:`BatchResult.error`; the other items
  go on;
* any other exception is a bug (in a handler, in a callback): the run stops, items not yet
  started are dropped, and the exception propagates with its traceback;
* ``KeyboardInterrupt`` (Ctrl-C) in the calling thread stops the run at once: no new item
  starts and the exception is re-raised without waiting for the requests in flight. Workers are
  daemon threads, so a process that exits on Ctrl-C does not wait for them either; a request in
  flight finishes (or times out) in the background and its result is dropped.

Workers run in a copy of the caller's :mod:`contextvars` context, so
:func:`~llmutils.override_defaults` around :func:`batch` applies to every item.
"""

from __future__ import annotations

import contextvars
import logging
import queue
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ._exceptions import ConfigError, InvalidRequestError, LLMUtilsError

__all__ = ["BatchResult", "batch", "map_calls"]

logger = logging.getLogger("llmutils")

T = TypeVar("T")

DEFAULT_WORKERS = 8
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


class _Progress:
    """A tqdm bar on stderr with done/cached/failed/tokens, or nothing when disabled."""

    def __init__(self, total: int, enabled: bool, desc: str) -> None:
        self.cached = self.failed = self.tokens = 0
        self._bar: Any = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="item", file=sys.stderr, dynamic_ncols=True)
            self._bar.set_postfix_str(self._postfix(), refresh=False)

    def _postfix(self) -> str:
        return f"cached={self.cached} failed={self.failed} tokens={self.tokens}"

    def update(self, result: BatchResult) -> None:
        """Count one finished item."""
        self.cached += result.cached
        self.failed += not result.ok
        if not result.cached:
            self.tokens += result.tokens
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix(), refresh=False)
            self._bar.update(1)

    def close(self) -> None:
        """Draw the bar one last time and release the terminal line."""
        if self._bar is not None:
            self._bar.close()


def _default_client() -> Any:
    from ._registry import client

    return client()


def _call_one(fn: Callable[[T], Any], index: int, item: T, client: Any) -> BatchResult:
    """Run ``fn(item)``; keep an LLMUtilsError, and read cached/usage from the client's last call."""
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


def map_calls(
    fn: Callable[[T], Any],
    items: Iterable[T],
    *,
    workers: int = DEFAULT_WORKERS,
    client: Any = None,
    progress: bool = False,
    desc: str = "llmutils",
    on_result: Callable[[BatchResult], None] | None = None,
) -> list[BatchResult]:
    """Apply ``fn`` to every item on ``workers`` threads; return one :class:`BatchResult` per item, in order.

    >>> summarize = LLMCall("system_default", "summarize")
    >>> map_calls(lambda v: summarize.call(**v), [{"text": a} for a in articles], workers=16)

    ``client`` (default: the configured client) is where ``cached`` and ``usage`` are read from
    (its ``last_call`` on the worker's thread). ``progress`` shows a tqdm bar on stderr.
    ``on_result`` is called in the calling thread as each item finishes (in finishing order).
    Errors and Ctrl-C: see the module docstring.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be an int >= 1, got {workers!r}")
    todo = list(items)
    if client is None:
        client = _default_client()
    results: list[BatchResult | None] = [None] * len(todo)
    bar = _Progress(len(todo), progress, desc)
    pending: queue.SimpleQueue[int] = queue.SimpleQueue()
    for index in range(len(todo)):
        pending.put(index)
    finished: queue.SimpleQueue[tuple[int, BatchResult | None, BaseException | None]] = queue.SimpleQueue()
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            try:
                index = pending.get_nowait()
            except queue.Empty:
                return
            try:
                finished.put((index, _call_one(fn, index, todo[index], client), None))
            except BaseException as exc:  # a bug, or KeyboardInterrupt raised in a worker: stop all
                stop.set()
                finished.put((index, None, exc))
                return

    threads = [
        threading.Thread(target=contextvars.copy_context().run, args=(work,), name=f"llmutils-batch-{i}", daemon=True)
        for i in range(min(workers, len(todo)))
    ]
    try:
        for thread in threads:
            thread.start()
        for _ in range(len(todo)):
            while True:
                try:
                    index, result, exc = finished.get(timeout=_POLL_SECONDS)
                    break
                except queue.Empty:
                    continue
            if exc is not None:
                raise exc
            assert result is not None
            results[index] = result
            bar.update(result)
            if on_result is not None:
                on_result(result)
    except BaseException:
        stop.set()
        done = sum(r is not None for r in results)
        logger.info("batch stopped after %d of %d items; items not started were dropped", done, len(todo))
        raise
    finally:
        bar.close()
    return [r for r in results if r is not None]


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
    via: str = "live",
    fallback: str | None = None,
    **params: Any,
) -> list[BatchResult]:
    """Send one chat request per item on ``workers`` threads; results come back in input order.

    Each item is a list of messages, a dict with a ``"messages"`` list (its other keys are
    ignored, e.g. an id of yours), or a dict of template variables rendered with
    ``system_template`` / ``user_template`` (see :func:`~llmutils._templates.compose_messages`).
    ``**params`` (``model``, ``temperature``, ...) go to every ``client.send_message`` call;
    ``output`` is what it returns (the assistant message dict). With the cache on, a re-run of a
    finished batch is served from the cache without a network call (``cached`` is True).
    ``progress=True`` shows a tqdm bar (done, cached, failed, tokens) on stderr.

    ``via="batch-api"`` sends the items through the OpenAI / Azure Batch API instead, at half price,
    answered within 24 h: same items, same results, same per-item errors. It needs the cache on (the
    batches are recorded there, so calling again after Ctrl-C or a crash resumes them instead of
    paying twice); ``fallback="live"`` sends what the batches did not answer as live calls.
    """
    if via not in VIAS:
        raise ConfigError(f"via must be one of {', '.join(VIAS)}, got {via!r}")
    if fallback is not None and via == "live":
        raise ConfigError("fallback= applies to via='batch-api' only")
    if client is None:
        client = _default_client()

    def send(item: Any) -> Any:
        return client.send_message(_messages_for(item, system_template, user_template, template_dirs), **params)

    if via == "batch-api":
        return _via_batch_api(list(items), send, client, system_template, user_template, template_dirs, progress, fallback, params)

    return map_calls(send, items, workers=workers, client=client, progress=progress, desc="batch")


def _via_batch_api(
    items: list[Any],
    send: Callable[[Any], Any],
    client: Any,
    system_template: str | None,
    user_template: str | None,
    template_dirs: Any,
    progress: bool,
    fallback: str | None,
    params: dict[str, Any],
) -> list[BatchResult]:
    """:func:`batch` through the Batch API: the items' messages here, the jobs in :mod:`llmutils._batchapi`."""
    from ._batchapi import run_items

    messages: list[Any] = []
    for item in items:
        try:
            messages.append(_messages_for(item, system_template, user_template, template_dirs))
        except LLMUtilsError as exc:
            messages.append(exc)
    results: list[BatchResult] = run_items(
        items, messages, client=client, fallback=fallback, live=send, progress=progress, **params
    )
    return results
