"""OpenTelemetry spans for calls, following the GenAI semantic conventions (opt-in: extra ``otel``).

With ``opentelemetry-api`` installed (``pip install 'llmutils-openai[otel]'``) and a tracer
provider configured by the application, each call makes one span:

- name ``"{gen_ai.operation.name} {gen_ai.request.model}"`` (``chat gpt-4.1-mini``), kind CLIENT,
  covering the whole call with its retries and waits;
- ``gen_ai.operation.name`` (``chat``, ``embeddings``), ``gen_ai.provider.name`` (``openai``,
  ``azure.ai.openai``), ``gen_ai.request.model`` and the request's ``temperature``, ``top_p``,
  ``max_tokens``, ``seed`` when sent; ``server.address`` / ``server.port``;
- from the answer: ``gen_ai.response.model``, ``gen_ai.response.id``,
  ``gen_ai.response.finish_reasons``, ``gen_ai.usage.input_tokens`` / ``output_tokens``;
- ``llmutils.cache.hit`` (served from the llmutils cache) and ``llmutils.attempts`` (HTTP attempts
  made; 0 for a cache hit);
- each retry is a span event ``llmutils.retry`` with ``llmutils.attempt``, ``error.type`` and
  ``llmutils.wait_seconds``;
- on failure: ``error.type`` (the exception's class, ``llmutils.RateLimitError``), the exception
  recorded as an event and the span status ERROR.

A stream (``client.stream_message``) makes the same span, started by the call and ended with the
stream: at its last delta, when the loop is left or the stream closed (``llmutils.stream.completed``
false, no error), or when it fails (``error.type``: ``llmutils.StreamInterruptedError`` after
content, the call's error before it). It is current only while llmutils opens the stream (so retry
events and HTTP client spans land in it), never while the caller's code runs between deltas
(:func:`start_stream_span`, :class:`StreamSpan`). A replay from the cache is a span with
``llmutils.cache.hit`` true, ended with the replay's last piece.

Prompts and answers are recorded (``gen_ai.input.messages`` / ``gen_ai.output.messages``, JSON in
the conventions' parts format) only when ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true``:
they may hold personal data.

Without opentelemetry-api this module is a no-op that costs one check per call, and importing
llmutils never imports opentelemetry (it loads on the first call).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar
from urllib.parse import urlsplit

__all__ = [
    "CAPTURE_CONTENT_ENV",
    "CallSpan",
    "StreamSpan",
    "call_span",
    "current_call_span",
    "start_stream_span",
]

T = TypeVar("T")
R = TypeVar("R")

#: The environment variable that turns on recording of prompts and answers (``true``).
CAPTURE_CONTENT_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"

_REQUEST_ATTRIBUTES = {
    "temperature": "gen_ai.request.temperature",
    "top_p": "gen_ai.request.top_p",
    "max_tokens": "gen_ai.request.max_tokens",
    "max_completion_tokens": "gen_ai.request.max_tokens",
    "max_output_tokens": "gen_ai.request.max_tokens",
    "seed": "gen_ai.request.seed",
    "frequency_penalty": "gen_ai.request.frequency_penalty",
    "presence_penalty": "gen_ai.request.presence_penalty",
}

# llmutils' kinds of call and api types -> the conventions' operation and provider names.
OPERATIONS = {"chat": "chat", "embedding": "embeddings", "embeddings": "embeddings", "responses": "chat"}
PROVIDERS = {"openai": "openai", "azure": "azure.ai.openai"}

_current: ContextVar[CallSpan | None] = ContextVar("llmutils_call_span", default=None)
_trace: Any = None  # the opentelemetry.trace module once looked for; False when it is not installed
_tracer: tuple[Any, Any] = (None, None)  # (tracer provider, llmutils' tracer from it)


def _trace_module() -> Any:
    """``opentelemetry.trace``, imported on the first call; False without opentelemetry-api."""
    global _trace
    if _trace is None:
        try:
            from opentelemetry import trace
        except ImportError:
            _trace = False
        else:
            _trace = trace
    return _trace


def _error_type(exc: BaseException) -> str:
    """A low-cardinality name for an error: its class, under ``llmutils.`` for ours."""
    cls = type(exc)
    module = cls.__module__
    if module.startswith("llmutils"):
        module = "llmutils"
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def _parts(message: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A chat message's (or a Responses message item's) content in the conventions' parts format."""
    parts: list[dict[str, Any]] = []
    content = message.get("content")
    if isinstance(content, str):
        parts.append({"type": "text", "content": content})
    elif isinstance(content, list):  # chat parts {"type": "text"}, Responses {"type": "output_text"}, ...
        for part in content:
            if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                parts.append({"type": "text", "content": part["text"]})
    for call in message.get("tool_calls") or ():
        if not isinstance(call, Mapping):
            continue
        function = call.get("function") or {}
        parts.append({"type": "tool_call", "id": call.get("id"), "name": function.get("name"),
                      "arguments": function.get("arguments")})
    if message.get("role") == "tool":
        parts = [{"type": "tool_call_response", "id": message.get("tool_call_id"), "result": content}]
    return parts


def _input_messages(params: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The prompt of a request: chat ``messages``, or Responses ``instructions`` and ``input``."""
    messages = params.get("messages")
    if isinstance(messages, list):
        return [m for m in messages if isinstance(m, Mapping)]
    shaped: list[Mapping[str, Any]] = []
    if isinstance(params.get("instructions"), str):
        shaped.append({"role": "system", "content": params["instructions"]})
    given = params.get("input")
    if isinstance(given, str):
        shaped.append({"role": "user", "content": given})
    elif isinstance(given, list):
        shaped += [m for m in given if isinstance(m, Mapping) and "role" in m]
    return shaped


def _messages_json(messages: Sequence[Mapping[str, Any]], *, output: bool) -> str:
    """Messages as the conventions' JSON: role and parts (and, for answers, the finish reason)."""
    shaped: list[dict[str, Any]] = []
    for m in messages:
        item: dict[str, Any] = {"role": m.get("role", "assistant" if output else None), "parts": _parts(m)}
        if output:
            item["finish_reason"] = m.get("finish_reason")
        shaped.append(item)
    return json.dumps(shaped, ensure_ascii=False, default=str)


class CallSpan:
    """What one call tells its span; a no-op when nothing records it.

    The send path fills it in: :meth:`retry` for each retry, :meth:`finish` with the answer.
    """

    __slots__ = ("_attempts", "_capture", "_retries", "_span")

    def __init__(self, span: Any = None, *, capture: bool = False) -> None:
        self._span = span
        self._capture = capture
        self._attempts: int | None = None
        self._retries = 0

    @property
    def recording(self) -> bool:
        """Whether a span records what this call says (False without opentelemetry or a provider)."""
        return self._span is not None

    def retry(self, attempt: int, error: BaseException | None = None, wait: float | None = None) -> None:
        """Record that ``attempt`` failed with ``error`` and the call waits ``wait`` seconds before the next."""
        if self._span is None:
            return
        self._retries += 1
        attributes: dict[str, Any] = {"llmutils.attempt": attempt}
        if error is not None:
            attributes["error.type"] = _error_type(error)
        if wait is not None:
            attributes["llmutils.wait_seconds"] = float(wait)
        self._span.add_event("llmutils.retry", attributes)

    def finish(
        self,
        response: Mapping[str, Any] | None,
        *,
        cached: bool = False,
        attempts: int | None = None,
        output_messages: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """Record the answer: the response JSON (model, id, usage, choices), cache hit and attempts.

        :param response: the API's JSON response (a dict), or None when there is none to read.
        :param cached: the answer came from the llmutils cache.
        :param attempts: HTTP attempts made (default: retries recorded + 1, or 0 for a cache hit).
        :param output_messages: the answer's messages, when they are not ``response["choices"]``.
        """
        span = self._span
        if span is None:
            return
        if attempts is None:
            attempts = 0 if cached else self._retries + 1
        self._attempts = attempts
        span.set_attribute("llmutils.cache.hit", bool(cached))
        span.set_attribute("llmutils.attempts", int(attempts))
        if not isinstance(response, Mapping):
            return
        if isinstance(response.get("model"), str):
            span.set_attribute("gen_ai.response.model", response["model"])
        if isinstance(response.get("id"), str):
            span.set_attribute("gen_ai.response.id", response["id"])
        usage = response.get("usage")
        if isinstance(usage, Mapping):
            for names, attribute in (
                (("prompt_tokens", "input_tokens"), "gen_ai.usage.input_tokens"),
                (("completion_tokens", "output_tokens"), "gen_ai.usage.output_tokens"),
            ):
                value = next((usage[n] for n in names if isinstance(usage.get(n), int)), None)
                if value is not None:
                    span.set_attribute(attribute, value)
        output = response.get("output")  # the Responses API: message items, and a status
        if isinstance(output, list) and self._capture and output_messages is None:
            reason = "stop" if response.get("status") == "completed" else response.get("status")
            output_messages = [
                {**item, "finish_reason": reason}
                for item in output
                if isinstance(item, Mapping) and item.get("type") == "message"
            ]
        choices = response.get("choices")
        if isinstance(choices, list):
            reasons = [c.get("finish_reason") for c in choices if isinstance(c, Mapping)]
            if reasons and all(isinstance(r, str) for r in reasons):
                span.set_attribute("gen_ai.response.finish_reasons", reasons)
            if self._capture and output_messages is None:
                output_messages = [
                    {**c["message"], "finish_reason": c.get("finish_reason")}
                    for c in choices
                    if isinstance(c, Mapping) and isinstance(c.get("message"), Mapping)
                ]
        if self._capture and output_messages:
            span.set_attribute("gen_ai.output.messages", _messages_json(output_messages, output=True))


_NO_SPAN = CallSpan()  # what a call fills in when nothing records: every method returns at once


def _get_tracer(trace: Any) -> Any:
    """llmutils' tracer, made once per tracer provider (the SDK builds a new one on each ``get_tracer``)."""
    global _tracer
    provider = trace.get_tracer_provider()
    cached_provider, tracer = _tracer
    if cached_provider is not provider:
        tracer = provider.get_tracer("llmutils")
        _tracer = (provider, tracer)
    return tracer


def tracer_is_recording(trace: Any) -> bool:
    """Whether spans may record: false while the application has set no SDK tracer provider."""
    return type(trace.get_tracer_provider()).__name__ not in ("ProxyTracerProvider", "NoOpTracerProvider")


def _address(server_url: str | Callable[[], str]) -> tuple[str | None, int | None]:
    """Host and port of an endpoint URL (default port by scheme); (None, None) when there is none."""
    try:
        url = urlsplit(server_url() if callable(server_url) else server_url)
        port = url.port or {"https": 443, "http": 80}.get(url.scheme)
    except ValueError:  # an endpoint that cannot be named (an Azure client without one: ConfigError)
        return None, None
    return url.hostname, port


def current_call_span() -> CallSpan | None:
    """The span helper of the call running in this thread / context, if any (for the retry layer)."""
    return _current.get()


def _span_start(
    trace: Any,
    operation: str,
    model: str,
    provider: str,
    server_address: str | None,
    server_port: int | None,
    server_url: str | Callable[[], str] | None,
    params: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The keyword arguments of ``tracer.start_span`` for a call: name, kind CLIENT and the
    attributes known before the request (operation, provider, model, server, request parameters)."""
    operation = OPERATIONS.get(operation, operation)
    provider = PROVIDERS.get(provider, provider)
    if server_address is None and server_url is not None:
        server_address, server_port = _address(server_url)
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": operation,
        "gen_ai.provider.name": provider,
        "gen_ai.request.model": model,
    }
    if server_address:
        attributes["server.address"] = server_address
        if server_port:
            attributes["server.port"] = int(server_port)
    for name, attribute in _REQUEST_ATTRIBUTES.items():
        value = (params or {}).get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            attributes[attribute] = value
    return {"name": f"{operation} {model}", "kind": trace.SpanKind.CLIENT, "attributes": attributes,
            "record_exception": False, "set_status_on_exception": False}


def _capture(span: Any, params: Mapping[str, Any] | None, messages: Sequence[Mapping[str, Any]] | None) -> bool:
    """Whether content is captured (CAPTURE_CONTENT_ENV); when it is, the prompt is recorded on ``span``."""
    capture = os.environ.get(CAPTURE_CONTENT_ENV, "").strip().lower() == "true"
    if capture:
        prompt = messages if messages is not None else _input_messages(params or {})
        if prompt:
            span.set_attribute("gen_ai.input.messages", _messages_json(prompt, output=False))
    return capture


def _record_error(trace: Any, span: Any, helper: CallSpan, exc: BaseException) -> None:
    """A failed call on its span: ``error.type``, the attempts, the exception event, status ERROR."""
    span.set_attribute("error.type", _error_type(exc))
    if helper._attempts is None:
        attempts = getattr(exc, "attempts", None)
        if not isinstance(attempts, int):
            attempts = helper._retries + 1
        span.set_attribute("llmutils.attempts", attempts)
    span.record_exception(exc)
    span.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)[:200]))


@contextmanager
def call_span(
    operation: str,
    model: str,
    *,
    provider: str = "openai",
    server_address: str | None = None,
    server_port: int | None = None,
    server_url: str | Callable[[], str] | None = None,
    params: Mapping[str, Any] | None = None,
    messages: Sequence[Mapping[str, Any]] | None = None,
) -> Iterator[CallSpan]:
    """One span for one call, current while the call runs; yields a :class:`CallSpan` to fill in.

    :param operation: ``chat``, ``embeddings`` (``gen_ai.operation.name``); llmutils' kinds of call
        (``embedding``) are mapped.
    :param model: the model (or Azure deployment) requested.
    :param provider: ``gen_ai.provider.name``: ``openai``, ``azure.ai.openai``, or another; llmutils'
        api types (``azure``) are mapped.
    :param server_address: host the request goes to; ``server_port`` its port.
    :param server_url: the endpoint URL (or a function returning it, called only when a span
        records), from which the address and port are taken when not given.
    :param params: the request's parameters (temperature, top_p, max tokens, seed are recorded;
        the prompt, from ``messages`` or Responses ``instructions`` / ``input``, only when content
        capture is on).
    :param messages: the prompt, when it is not in ``params``.
    :raises: whatever the body raises, after recording ``error.type`` and the ERROR status.
    """
    trace = _trace_module()
    if not trace or not tracer_is_recording(trace):  # nothing would record: no span at all
        yield _NO_SPAN
        return
    start = _span_start(trace, operation, model, provider, server_address, server_port, server_url, params)
    with _get_tracer(trace).start_as_current_span(**start) as span:
        recording = span.is_recording()
        helper = CallSpan(span if recording else None, capture=recording and _capture(span, params, messages))
        token = _current.set(helper)
        try:
            yield helper
        except BaseException as exc:
            if recording:
                _record_error(trace, span, helper, exc)
            raise
        finally:
            _current.reset(token)


class StreamSpan(CallSpan):
    """The span of a streamed call (:func:`start_stream_span`), never current between deltas.

    A stream is read in the caller's loop, between the caller's own code: a span made current for
    the thread would become the parent of whatever the caller does between deltas. So this span is
    current only while llmutils' own code opens the stream (:meth:`opening`: the request and its
    retries up to the first content), and it is ended explicitly: :meth:`finish` records the whole
    answer, :meth:`end` ends the span (with the error that ended the stream, if any). It records
    ``llmutils.stream.completed``: false for a stream closed, abandoned or failed before its end.
    """

    __slots__ = ("_completed", "_ended", "_lock")

    def __init__(self, span: Any = None, *, capture: bool = False) -> None:
        super().__init__(span, capture=capture)
        self._completed = False
        self._ended = span is None
        self._lock = threading.Lock()

    def finish(
        self,
        response: Mapping[str, Any] | None,
        *,
        cached: bool = False,
        attempts: int | None = None,
        output_messages: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """Record the whole answer (as :meth:`CallSpan.finish`): the stream reached its end."""
        if self._span is None:
            return
        super().finish(response, cached=cached, attempts=attempts, output_messages=output_messages)
        self._completed = True

    @contextmanager
    def opening(self) -> Iterator[StreamSpan]:
        """Current while llmutils opens the stream: retry events, and HTTP spans nest under it.

        :raises: whatever the body raises, after ending the span with that error.
        """
        if self._span is None:
            yield self
            return
        trace = _trace_module()
        token = _current.set(self)
        try:
            with trace.use_span(self._span, end_on_exit=False, record_exception=False, set_status_on_exception=False):
                yield self
        except BaseException as exc:
            self.end(exc)
            raise
        finally:
            _current.reset(token)

    def end(self, error: BaseException | None = None) -> None:
        """End the span, once (later calls do nothing); ``error`` is what ended the stream, if any.

        A stream left before its end (``break``, ``close()``, garbage-collected: ``GeneratorExit``
        or no error) ends without an error: the caller chose to stop.
        """
        with self._lock:
            if self._ended:
                return
            self._ended = True
        span = self._span
        if isinstance(error, GeneratorExit):
            error = None
        if error is not None:
            _record_error(_trace_module(), span, self, error)
        elif self._attempts is None:
            span.set_attribute("llmutils.attempts", self._retries + 1)
        span.set_attribute("llmutils.stream.completed", self._completed and error is None)
        span.end()

    def traced(self, deltas: Generator[T, None, R]) -> Generator[T, None, R]:
        """``deltas``, ending the span when they end: returned, raised, or closed (as is when nothing records)."""
        return deltas if self._span is None else self._traced(deltas)

    def _traced(self, deltas: Generator[T, None, R]) -> Generator[T, None, R]:
        try:
            result = yield from deltas
        except BaseException as exc:
            self.end(exc)
            raise
        self.end()
        return result


_NO_STREAM_SPAN = StreamSpan()  # records nothing, and its end() does nothing


def start_stream_span(
    operation: str,
    model: str,
    *,
    provider: str = "openai",
    server_url: str | Callable[[], str] | None = None,
    params: Mapping[str, Any] | None = None,
    messages: Sequence[Mapping[str, Any]] | None = None,
) -> StreamSpan:
    """Start the span of a streamed call, NOT made current; whoever reads the stream ends it.

    Takes :func:`call_span`'s parameters. Without opentelemetry or an SDK tracer provider no span
    is created: the :class:`StreamSpan` returned records nothing.
    """
    trace = _trace_module()
    if not trace or not tracer_is_recording(trace):  # nothing would record: no span at all
        return _NO_STREAM_SPAN
    start = _span_start(trace, operation, model, provider, None, None, server_url, params)
    span = _get_tracer(trace).start_span(**start)
    if not span.is_recording():  # sampled out
        span.end()
        return _NO_STREAM_SPAN
    return StreamSpan(span, capture=_capture(span, params, messages))
