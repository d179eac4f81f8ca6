"""Streaming pieces: decode Server-Sent Events and assemble chat chunks or Responses events.

Everything here is pure (no network, no clock): bytes go in, text deltas and a final answer come
out, so each piece is tested without a server. The send path in :mod:`llmutils._clients` feeds it
the bytes of an HTTP response as they arrive.

The wire formats (checked against openai-python's ``_streaming.py`` and the API reference):

* **SSE** (``text/event-stream``): lines ``field: value`` ending in LF, CR or CRLF; a blank line
  ends an event; lines starting with ``:`` are comments (keep-alives); ``data`` lines of one event
  join with ``\\n``. Lines and events may be split anywhere across network chunks, even inside a
  UTF-8 character.
* **Chat** (``stream: true``): one ``chat.completion.chunk`` per event, each choice carrying a
  ``delta`` (``role``, ``content``, ``refusal``, ``tool_calls`` fragments keyed by ``index``) and at
  last a ``finish_reason``; with ``stream_options: {"include_usage": true}`` a final chunk with
  ``choices: []`` and ``usage``; then ``data: [DONE]``. An error mid-stream arrives as
  ``data: {"error": {...}}``.
* **Responses** (``stream: true``): typed events (``response.created``, ``response.output_item.added``,
  ``response.output_text.delta``, ``response.function_call_arguments.delta``,
  ``response.output_item.done``, ...) ending with ``response.completed`` (or ``response.incomplete``)
  carrying the whole Response object, ``response.failed`` carrying its ``error``, or an ``error``
  event. There is no ``[DONE]`` (some compatible servers send one anyway; it is accepted).
"""

from __future__ import annotations

import json
import re
import time
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from .._exceptions import (
    ContentFilterError,
    InvalidRequestError,
    LLMUtilsError,
    NonTerminalError,
    QuotaExceededError,
    RateLimitError,
)
from .._http import with_answer

__all__ = [
    "ChatStreamAssembler",
    "MessageStream",
    "ResponsesStreamAssembler",
    "SSEDecoder",
    "ServerSentEvent",
    "StreamReader",
    "completion_events",
    "response_events",
    "responses_message",
    "split_text",
    "stream_error",
]

DONE = "[DONE]"
_LINE_END = re.compile(rb"\r\n|\r|\n")
# Size of the pieces a cached answer is replayed in (characters); a word is never split
# unless it is longer than this.
REPLAY_PIECE_CHARS = 16


@dataclass(frozen=True)
class ServerSentEvent:
    """One decoded event: its ``event`` name (None when unnamed) and its ``data`` text."""

    event: str | None
    data: str
    id: str | None = None

    @property
    def is_done(self) -> bool:
        """Whether this is the ``data: [DONE]`` sentinel that ends a chat stream."""
        return self.data.strip() == DONE

    def json(self) -> Any:
        """The data decoded as JSON; a payload that is not JSON raises :class:`NonTerminalError`."""
        try:
            return json.loads(self.data)
        except ValueError:
            raise NonTerminalError(f"a streamed event is not JSON: {self.data[:80]!r}") from None


class SSEDecoder:
    """Turn byte chunks into :class:`ServerSentEvent` objects, whatever the chunk boundaries.

    >>> decoder = SSEDecoder()
    >>> decoder.feed(b'data: {"a"') + decoder.feed(b': 1}\\n\\n: keep-alive\\n\\ndata: [DONE]\\n\\n')
    [ServerSentEvent(event=None, data='{"a": 1}', id=None), ServerSentEvent(event=None, data='[DONE]', id=None)]

    ``feed`` returns the events completed by a chunk; ``finish`` those a stream that ended without
    a last blank line still completes (the SSE rules drop an unterminated event; a line that ended
    is kept, as the SDK does).
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._skip_lf = False
        self._event: str | None = None
        self._data: list[str] = []
        self._id: str | None = None

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        """Decode one chunk of bytes; returns the events it completed, in order."""
        events: list[ServerSentEvent] = []
        start = 0
        if self._skip_lf and chunk[:1] == b"\n":  # the LF of a CRLF split across chunks
            start = 1
        self._skip_lf = False
        for match in _LINE_END.finditer(chunk, start):
            self._buffer += chunk[start : match.start()]
            line = bytes(self._buffer).decode("utf-8", errors="replace")
            self._buffer.clear()
            event = self._line(line)
            if event is not None:
                events.append(event)
            start = match.end()
            self._skip_lf = match.group() == b"\r" and start == len(chunk)
        self._buffer += chunk[start:]
        return events

    def finish(self) -> list[ServerSentEvent]:
        """End of the byte stream: complete a last line and event that had no blank line after them."""
        events: list[ServerSentEvent] = []
        if self._buffer:
            line = bytes(self._buffer).decode("utf-8", errors="replace")
            self._buffer.clear()
            event = self._line(line)
            if event is not None:
                events.append(event)
        event = self._line("")
        if event is not None:
            events.append(event)
        return events

    def iter_events(self, chunks: Iterable[bytes]) -> Iterator[ServerSentEvent]:
        """Decode a whole iterable of chunks lazily (each event as soon as its chunk arrives)."""
        for chunk in chunks:
            yield from self.feed(chunk)
        yield from self.finish()

    def _line(self, line: str) -> ServerSentEvent | None:
        """Apply one line (the WHATWG event-stream rules); a blank line dispatches the event."""
        if not line:
            if self._event is None and not self._data:
                return None
            event = ServerSentEvent(self._event, "\n".join(self._data), self._id)
            self._event = None
            self._data = []
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        return None


def stream_error(payload: Mapping[str, Any], *, where: str = "the stream") -> LLMUtilsError:
    """The llmutils error for an error reported inside a stream (not raised: returned).

    ``payload`` is the ``error`` object (``{"message", "type", "code"}``) of a chat error event, the
    body of a Responses ``error`` event, or the ``error`` of a failed Response. Rate limits,
    server errors and unknown codes may pass on a new try (:class:`NonTerminalError`); quota,
    content filter and invalid-request codes cannot.
    """
    message = payload.get("message") if isinstance(payload.get("message"), str) else None
    code = str(payload.get("code") or "")
    kind = str(payload.get("type") or "")
    detail = f"error in {where}: {message or 'the server reported an error while streaming'}"
    if code:
        detail += f" (code {code})"
    if "insufficient_quota" in (code, kind):
        return QuotaExceededError(detail)
    if code in ("rate_limit_exceeded", "rate_limit_error") or kind in ("rate_limit_error", "requests", "tokens"):
        return RateLimitError(detail)
    if "content_filter" in code or code == "ResponsibleAIPolicyViolation":
        return ContentFilterError(detail)
    if kind == "invalid_request_error" or code in ("invalid_prompt", "invalid_request_error", "context_length_exceeded"):
        return InvalidRequestError(detail)
    return NonTerminalError(detail)


def _error_of(data: Any) -> Mapping[str, Any] | None:
    """The ``error`` object of a chat-stream payload, if it is an error event."""
    if isinstance(data, Mapping):
        error = data.get("error")
        if isinstance(error, Mapping):
            return error
        if isinstance(error, str):
            return {"message": error}
    return None


class ChatStreamAssembler:
    """Assemble ``chat.completion.chunk`` events into the ``chat.completion`` they stand for.

    ``feed(event)`` returns the text delta the event carried ("" when none), raises the llmutils
    error for an error event, and sets ``done`` on ``[DONE]``. ``completion()`` is the whole answer,
    shaped exactly like a non-streamed chat completion (so it can be cached under the same key and
    read by the same code); ``text`` is the content received so far.

    Only choice 0 is streamed as text; other choices are assembled too.
    """

    def __init__(self) -> None:
        self.done = False
        self.usage: dict[str, Any] | None = None
        self._meta: dict[str, Any] = {}
        self._choices: dict[int, dict[str, Any]] = {}
        self._text: list[str] = []

    @property
    def text(self) -> str:
        """The content of choice 0 received so far."""
        return "".join(self._text)

    @property
    def started(self) -> bool:
        """Whether any content (text, refusal or a tool call) has arrived."""
        return any(c["content"] or c["refusal"] or c["tool_calls"] for c in self._choices.values())

    def feed(self, event: ServerSentEvent) -> str:
        """Take one event; returns the text delta of choice 0 it carried."""
        if event.is_done:
            self.done = True
            return ""
        data = event.json()
        error = _error_of(data)
        if error is not None or event.event == "error":
            raise stream_error(error or {"message": event.data[:200]}, where="the chat stream")
        if not isinstance(data, Mapping):
            raise NonTerminalError(f"a streamed chunk is not a JSON object: {event.data[:80]!r}")
        for name in ("id", "created", "model", "system_fingerprint", "service_tier"):
            if data.get(name) is not None:
                self._meta.setdefault(name, data[name])
        if isinstance(data.get("usage"), Mapping):
            self.usage = dict(data["usage"])
        piece = ""
        for choice in data.get("choices") or ():
            if not isinstance(choice, Mapping):
                continue
            index = choice.get("index", 0)
            state = self._choices.setdefault(
                index, {"role": "assistant", "content": [], "refusal": [], "tool_calls": {}, "finish_reason": None}
            )
            delta = choice.get("delta") or {}
            if isinstance(delta.get("role"), str):
                state["role"] = delta["role"]
            content = delta.get("content")
            if isinstance(content, str) and content:
                state["content"].append(content)
                if index == 0:
                    self._text.append(content)
                    piece += content
            refusal = delta.get("refusal")
            if isinstance(refusal, str) and refusal:
                state["refusal"].append(refusal)
            for fragment in delta.get("tool_calls") or ():
                self._tool_call(state["tool_calls"], fragment)
            if choice.get("finish_reason"):
                state["finish_reason"] = choice["finish_reason"]
        return piece

    @staticmethod
    def _tool_call(calls: dict[int, dict[str, Any]], fragment: Mapping[str, Any]) -> None:
        """Merge one ``tool_calls`` delta: id/type are set, name and arguments are concatenated."""
        index = fragment.get("index", len(calls))
        call = calls.setdefault(index, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
        if fragment.get("id"):
            call["id"] = fragment["id"]
        if fragment.get("type"):
            call["type"] = fragment["type"]
        function = fragment.get("function") or {}
        if isinstance(function.get("name"), str):
            call["function"]["name"] += function["name"]
        if isinstance(function.get("arguments"), str):
            call["function"]["arguments"] += function["arguments"]

    def completion(self) -> dict[str, Any]:
        """The assembled answer as a ``chat.completion`` dict (choices in index order, usage if sent)."""
        choices = []
        for index in sorted(self._choices):
            state = self._choices[index]
            message: dict[str, Any] = {
                "role": state["role"],
                "content": "".join(state["content"]) if state["content"] or not state["tool_calls"] else None,
                "refusal": "".join(state["refusal"]) or None,
            }
            if state["tool_calls"]:
                message["tool_calls"] = [state["tool_calls"][i] for i in sorted(state["tool_calls"])]
            choices.append({"index": index, "message": message, "logprobs": None, "finish_reason": state["finish_reason"]})
        return {
            "id": self._meta.get("id", ""),
            "object": "chat.completion",
            "created": self._meta.get("created", int(time.time())),
            "model": self._meta.get("model", ""),
            "choices": choices,
            "usage": self.usage,
            "system_fingerprint": self._meta.get("system_fingerprint"),
        }

    def result(self) -> dict[str, Any]:
        """The whole answer as the API returns it without streaming (here: :meth:`completion`)."""
        return self.completion()


def responses_message(response: Mapping[str, Any]) -> dict[str, Any]:
    """The chat-shaped assistant message of a Responses API ``response`` object (minimal reader).

    Text of every ``output_text`` part of ``message`` items, joined; ``function_call`` items become
    chat ``tool_calls`` (``id`` is the ``call_id`` that a tool result must name).
    """
    texts: list[str] = []
    refusals: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    for item in response.get("output") or ():
        if not isinstance(item, Mapping):
            continue
        if item.get("type") == "message":
            for part in item.get("content") or ():
                if isinstance(part, Mapping) and part.get("type") == "output_text":
                    texts.append(str(part.get("text") or ""))
                elif isinstance(part, Mapping) and part.get("type") == "refusal":
                    refusals.append(str(part.get("refusal") or ""))
        elif item.get("type") == "function_call":
            tool_calls.append(
                {
                    "id": item.get("call_id") or item.get("id"),
                    "type": "function",
                    "function": {"name": item.get("name", ""), "arguments": item.get("arguments", "")},
                }
            )
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not tool_calls else None}
    if refusals:
        message["refusal"] = "".join(refusals)
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


class ResponsesStreamAssembler:
    """Assemble Responses API stream events into the final Response object.

    ``feed(event)`` returns the ``output_text`` delta the event carried ("" when none), raises the
    llmutils error for ``error`` and ``response.failed`` events, and sets ``done`` on
    ``response.completed`` / ``response.incomplete``. ``response()`` is the Response object the last
    event carried (the same object a non-streamed call returns), with its ``output`` rebuilt from
    the deltas when a server left it out.
    """

    _TERMINAL = ("response.completed", "response.incomplete")

    def __init__(self) -> None:
        self.done = False
        self._final: dict[str, Any] | None = None
        self._snapshot: dict[str, Any] = {}
        self._items: dict[int, dict[str, Any]] = {}
        self._text: list[str] = []

    @property
    def text(self) -> str:
        """The output text received so far."""
        return "".join(self._text)

    @property
    def started(self) -> bool:
        """Whether any output (text or a function call) has arrived."""
        return bool(self._text) or any(i.get("type") == "function_call" for i in self._items.values())

    @property
    def usage(self) -> dict[str, Any] | None:
        """The usage the completed response reported (None before it)."""
        usage = (self._final or {}).get("usage")
        return dict(usage) if isinstance(usage, Mapping) else None

    def feed(self, event: ServerSentEvent) -> str:
        """Take one event; returns the output text delta it carried."""
        if event.is_done:
            self.done = self.done or self._final is not None
            return ""
        data = event.json()
        if not isinstance(data, Mapping):
            raise NonTerminalError(f"a streamed event is not a JSON object: {event.data[:80]!r}")
        kind = data.get("type") or event.event
        if kind == "error":
            error = data.get("error")
            raise stream_error(error if isinstance(error, Mapping) else data, where="the Responses stream")
        if kind == "response.failed":
            response = data.get("response") or {}
            error = response.get("error") if isinstance(response, Mapping) else None
            raise stream_error(error if isinstance(error, Mapping) else {"message": "response.failed"}, where="the Responses stream")
        if kind in ("response.created", "response.in_progress", "response.queued"):
            if isinstance(data.get("response"), Mapping):
                self._snapshot = dict(data["response"])
        elif kind in ("response.output_item.added", "response.output_item.done"):
            item = data.get("item")
            if isinstance(item, Mapping):
                self._items[int(data.get("output_index", len(self._items)))] = json.loads(json.dumps(item))
        elif kind == "response.output_text.delta":
            delta = str(data.get("delta") or "")
            self._text.append(delta)
            self._append_text(data, delta)
            return delta
        elif kind == "response.function_call_arguments.delta":
            item = self._items.setdefault(int(data.get("output_index", 0)), {"type": "function_call", "arguments": ""})
            item["arguments"] = str(item.get("arguments") or "") + str(data.get("delta") or "")
        elif kind in self._TERMINAL:
            response = data.get("response")
            self._final = dict(response) if isinstance(response, Mapping) else {}
            self.done = True
        return ""

    def _append_text(self, data: Mapping[str, Any], delta: str) -> None:
        """Add a text delta to the message item it belongs to (for servers that omit the final output)."""
        item = self._items.setdefault(
            int(data.get("output_index", 0)), {"type": "message", "role": "assistant", "content": []}
        )
        parts = item.setdefault("content", [])
        index = int(data.get("content_index", 0))
        while len(parts) <= index:
            parts.append({"type": "output_text", "text": "", "annotations": []})
        parts[index]["text"] = str(parts[index].get("text") or "") + delta

    def response(self) -> dict[str, Any]:
        """The final Response object (``output`` rebuilt from the events if the server left it empty)."""
        final = dict(self._final if self._final is not None else self._snapshot)
        if not final.get("output"):
            final["output"] = [self._items[i] for i in sorted(self._items)]
        final.setdefault("object", "response")
        final.setdefault("status", "completed" if self._final is not None else "in_progress")
        return final

    def result(self) -> dict[str, Any]:
        """The whole answer as the API returns it without streaming (here: :meth:`response`)."""
        return self.response()


def split_text(text: str, size: int = REPLAY_PIECE_CHARS) -> list[str]:
    """Cut ``text`` into pieces of about ``size`` characters at word boundaries (joined, they are ``text``)."""
    pieces: list[str] = []
    current = ""
    for word in _words(text):
        if current and len(current) + len(word) > size:
            pieces.append(current)
            current = ""
        current += word
        while len(current) > size:
            pieces.append(current[:size])
            current = current[size:]
    if current:
        pieces.append(current)
    return pieces


def _words(text: str) -> Iterator[str]:
    """Each word with the whitespace that follows it."""
    start = 0
    length = len(text)
    i = 0
    while i < length:
        while i < length and not text[i].isspace():
            i += 1
        while i < length and text[i].isspace():
            i += 1
        yield text[start:i]
        start = i


def completion_events(completion: Mapping[str, Any]) -> list[bytes]:
    """A whole ``chat.completion`` as the SSE events of its stream (text in pieces), for offline clients."""
    base = {k: completion.get(k) for k in ("id", "created", "model")}
    base["object"] = "chat.completion.chunk"
    events: list[bytes] = []

    def event(choices: list[dict[str, Any]], **extra: Any) -> None:
        events.append(f"data: {json.dumps({**base, 'choices': choices, **extra})}\n\n".encode())

    for choice in completion.get("choices") or ():
        index = choice.get("index", 0)
        message = dict(choice.get("message") or {})
        content = message.pop("content", None)
        event([{"index": index, "delta": {**message, "content": "" if content is not None else None}, "finish_reason": None}])
        for piece in split_text(content) if isinstance(content, str) else ():
            event([{"index": index, "delta": {"content": piece}, "finish_reason": None}])
        event([{"index": index, "delta": {}, "finish_reason": choice.get("finish_reason") or "stop"}])
    if completion.get("usage") is not None:
        event([], usage=completion["usage"])
    events.append(b"data: [DONE]\n\n")
    return events


def response_events(response: Mapping[str, Any]) -> list[bytes]:
    """A whole Responses object as the SSE events of its stream (text deltas in pieces), for offline clients."""
    events: list[bytes] = []

    def event(kind: str, **data: Any) -> None:
        body = {"type": kind, "sequence_number": len(events), **data}
        events.append(f"event: {kind}\ndata: {json.dumps(body)}\n\n".encode())

    event("response.created", response={**response, "status": "in_progress", "output": []})
    for index, item in enumerate(response.get("output") or ()):
        event("response.output_item.added", output_index=index, item=item)
        for part_index, part in enumerate(item.get("content") or () if item.get("type") == "message" else ()):
            if isinstance(part, Mapping) and part.get("type") == "output_text":
                for piece in split_text(str(part.get("text") or "")):
                    event("response.output_text.delta", item_id=item.get("id"), output_index=index,
                          content_index=part_index, delta=piece)
        event("response.output_item.done", output_index=index, item=item)
    event("response.incomplete" if response.get("status") == "incomplete" else "response.completed", response=response)
    return events


class MessageStream:
    """A streamed answer: iterate it for text deltas (``str``), then read ``message`` and ``usage``.

    Returned by ``client.stream_message(...)``. Use it as a context manager so the connection is
    closed however the loop ends (``break``, an exception)::

        with client.stream_message([{"role": "user", "content": "Tell me a story"}]) as stream:
            for text in stream:
                print(text, end="", flush=True)
        print(stream.message)        # the same dict send_message returns, tool calls assembled
        print(stream.usage)          # the usage the API reported (None if it sent none)

    ``message`` and ``usage`` are None until the stream has ended normally; ``text`` is what was
    received so far; ``cached`` tells whether the answer is replayed from the cache. A stream that
    breaks or stalls after text was yielded raises :class:`~llmutils.StreamInterruptedError` from
    the loop (with ``partial_text``); it is not retried.
    """

    def __init__(
        self,
        deltas: Generator[str, None, tuple[dict[str, Any], Mapping[str, Any] | None]],
        *,
        cached: bool = False,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        """``deltas`` yields the text deltas and returns ``(message, usage)`` when the answer is whole.

        ``on_close`` releases what the stream holds (its connection, its call slot); it runs once,
        on :meth:`close` or when the stream is garbage-collected unclosed (even never iterated).
        """
        self._on_close = weakref.finalize(self, on_close) if on_close is not None else None
        self._parts: list[str] = []
        self._closed = False
        self.cached = cached
        self.message: dict[str, Any] | None = None
        self.usage: dict[str, Any] | None = None
        self._deltas = deltas

    @classmethod
    def replay(
        cls,
        message: dict[str, Any],
        usage: Mapping[str, Any] | None,
        *,
        cached: bool = True,
        on_end: Callable[[], None] | None = None,
    ) -> MessageStream:
        """A stream of a whole answer: its text in pieces of about 16 characters cut at word ends.

        ``on_end`` runs when the replay ends: read to its end, closed, or garbage-collected
        unclosed. It must be idempotent (a replay read to its end runs it again on ``close()``).
        """
        content = message.get("content")

        def deltas() -> Generator[str, None, tuple[dict[str, Any], Mapping[str, Any] | None]]:
            try:
                yield from split_text(content) if isinstance(content, str) else ()
            finally:
                if on_end is not None:
                    on_end()
            return message, usage

        return cls(deltas(), cached=cached, on_close=on_end)

    @property
    def text(self) -> str:
        """The text yielded so far (the whole answer's text once the stream has ended)."""
        return "".join(self._parts)

    @property
    def completed(self) -> bool:
        """Whether the stream reached its normal end (``message`` is set)."""
        return self.message is not None

    def __iter__(self) -> Iterator[str]:
        try:
            while True:
                try:
                    piece = next(self._deltas)
                except StopIteration as end:
                    message, usage = end.value
                    self.usage = dict(usage) if isinstance(usage, Mapping) else None
                    self.message = message
                    return
                self._parts.append(piece)
                yield piece
        finally:
            if not self.completed:
                self.close()  # ``break`` (the loop dropped this generator), or an error

    def close(self) -> None:
        """Close the connection (idempotent); an unfinished answer is dropped and never cached."""
        if self._closed:
            return
        self._closed = True
        try:
            close = getattr(self._deltas, "close", None)
            if close is not None:
                close()
        finally:
            if self._on_close is not None:
                self._on_close()  # a finalizer runs its callback at most once

    def __enter__(self) -> MessageStream:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "completed" if self.completed else "closed" if self._closed else "open"
        return f"<MessageStream {state} cached={self.cached} chars={len(self.text)}>"



class StreamReader:
    """Read an SSE byte stream into an assembler, yielding its text deltas as they arrive.

    ``chunks`` is the body of the HTTP response as it is received; ``transport_error`` turns an
    exception raised while reading it (a read timeout, a dropped connection) into the llmutils
    error to raise (None: re-raise it as is). :meth:`until_content` reads until the answer has
    started (text or a tool call) or ended, returning the deltas read; :meth:`rest` yields the
    remaining ones. A body that ends before the answer is complete raises :class:`NonTerminalError`.
    ``drain`` is called after the end event, to read the rest of the body (so that the connection
    can be reused) within a bound of its own. ``answer`` is what the HTTP answer said
    (:func:`llmutils._http.answer_context`: status code, request id, headers): every error the
    reader raises carries it.
    """

    def __init__(
        self,
        chunks: Iterator[bytes],
        assembler: ChatStreamAssembler | ResponsesStreamAssembler,
        *,
        transport_error: Callable[[Exception], LLMUtilsError | None],
        close: Callable[[], None],
        drain: Callable[[], None] | None = None,
        answer: Mapping[str, Any] | None = None,
    ) -> None:
        self.assembler = assembler
        self.answer = answer
        self._drain = drain
        self._chunks = chunks
        self._transport_error = transport_error
        self._close = close
        self._decoder = SSEDecoder()
        self._deltas = self._read()

    def until_content(self) -> list[str]:
        """Read until the answer has started or ended; the text deltas read (possibly none)."""
        pieces: list[str] = []
        if self._started() or self._done():
            return pieces
        for piece in self._deltas:
            if piece:
                pieces.append(piece)
            if self.assembler.started:
                break
        return pieces

    def rest(self) -> Iterator[str]:
        """The remaining text deltas, until the answer is complete."""
        for piece in self._deltas:
            if piece:
                yield piece

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self._close()

    # The assembler's state read through calls: a type checker takes an attribute tested once as fixed,
    # but feeding the assembler changes it.
    def _started(self) -> bool:
        return self.assembler.started

    def _done(self) -> bool:
        return self.assembler.done

    def _read(self) -> Iterator[str]:
        """Every event's delta ("" when it carried no text); raises on errors and incomplete ends,
        each error carrying the HTTP answer's fields."""
        try:
            yield from self._events()
        except LLMUtilsError as exc:
            with_answer(exc, self.answer)
            raise

    def _events(self) -> Iterator[str]:
        """:meth:`_read` without the answer's fields."""
        assembler = self.assembler
        while not self._done():
            try:
                chunk = next(self._chunks, None)
            except Exception as exc:
                error = self._transport_error(exc)
                if error is None:
                    raise
                raise error from exc
            events = self._decoder.feed(chunk) if chunk is not None else self._decoder.finish()
            for event in events:
                yield assembler.feed(event)
                if assembler.done:
                    break
            if chunk is None:
                break
        if not assembler.done and not self._finished_without_sentinel():
            raise NonTerminalError("the stream ended before the answer was complete (no end-of-stream event)")
        if self._drain is not None:
            self._drain()
        yield ""

    def _finished_without_sentinel(self) -> bool:
        """Some chat servers end the body without ``[DONE]``: accept it once every choice has finished."""
        assembler = self.assembler
        if not isinstance(assembler, ChatStreamAssembler):
            return False
        choices = assembler.completion()["choices"]
        return bool(choices) and all(c["finish_reason"] for c in choices)
