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

Prompts and answers are recorded (``gen_ai.input.messages`` / ``gen_ai.output.messages``, JSON in
the conventions' parts format) only when ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true``:
they may hold personal data.

Without opentelemetry-api this module is a no-op that costs one check per call, and importing
llmutils never imports opentelemetry (it loads on the first call).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "CAPTURE_CONTENT_ENV",
    "CallSpan",
    "call_span",
    "current_call_span",
]

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
    tracer = trace.get_tracer("llmutils")
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
    with tracer.start_as_current_span(
        f"{operation} {model}",
        kind=trace.SpanKind.CLIENT,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        recording = span.is_recording()
        capture = recording and os.environ.get(CAPTURE_CONTENT_ENV, "").strip().lower() == "true"
        if capture:
            prompt = messages if messages is not None else _input_messages(params or {})
            if prompt:
                span.set_attribute("gen_ai.input.messages", _messages_json(prompt, output=False))
        helper = CallSpan(span if recording else None, capture=capture)
        token = _current.set(helper)
        try:
            yield helper
        except BaseException as exc:
            if recording:
                span.set_attribute("error.type", _error_type(exc))
                if helper._attempts is None:
                    attempts = getattr(exc, "attempts", None)
                    if not isinstance(attempts, int):
                        attempts = helper._retries + 1
                    span.set_attribute("llmutils.attempts", attempts)
                span.record_exception(exc)
                span.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)[:200]))
            raise
        finally:
            _current.reset(token)
