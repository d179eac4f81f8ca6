"""A local HTTP server that speaks the OpenAI wire format, for tests and benchmarks.

It answers chat completions, embeddings and responses (plain OpenAI and Azure OpenAI paths) with
deterministic results, records every request, and can be scripted to fail in the ways the
real services fail (429 with ``Retry-After``, 5xx, content filter, slow or non-JSON answers).
Stdlib only: a threaded ``http.server`` on a background thread.

Usage::

    import openai
    from llmutils.testing import Fault, OpenAITestServer

    with OpenAITestServer() as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="test", max_retries=0)
        answer = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
        assert answer.choices[0].message.content == "echo: hi"

        srv.script(Fault.rate_limit(retry_after=1))  # the next request gets a 429
        client.close()

Azure clients use ``openai.AzureOpenAI(azure_endpoint=srv.azure_endpoint, api_version=...)``.
From a shell: ``python -m llmutils.testing --port 8000 [--latency 0.05]``.
"""

from __future__ import annotations

import argparse
import base64
import email.utils
import hashlib
import http
import json
import logging
import re
import select
import socket
import socketserver
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

__all__ = ["BatchOutcome", "FakeBatchAPI", "Fault", "OpenAITestServer", "RecordedRequest", "main"]

logger = logging.getLogger("llmutils")

_V1_ROUTES = {"/v1/chat/completions": "chat", "/v1/embeddings": "embeddings"}
# The Responses API (Azure serves it only on its v1 path: see _AZURE_V1_ROUTES).
_V1_ROUTES.update({"/v1/responses": "responses"})
# Every field POST /v1/responses takes; the real API answers 400 unknown_parameter to any other.
_RESPONSES_FIELDS = frozenset({
    "access_programs", "background", "background_options", "context_management", "conversation", "image",
    "include", "input", "instructions", "max_output_tokens", "max_tool_calls", "metadata", "model",
    "moderation", "parallel_tool_calls", "previous_response_id", "prompt", "prompt_cache_key",
    "prompt_cache_options", "prompt_cache_retention", "reasoning", "safety_identifier", "service_tier",
    "store", "stream", "stream_options", "temperature", "text", "tool_choice", "tools", "top_logprobs",
    "top_p", "truncation", "user",
})
_MIN_OUTPUT_TOKENS = 16
_REMEMBERED = 100_000  # stored response ids and seen inputs the server keeps, each
# Azure OpenAI's v1 API: OpenAI's paths under {endpoint}/openai/v1/, the deployment in "model", no api-version.
_AZURE_V1_ROUTES = {"/openai/v1/chat/completions": "chat", "/openai/v1/embeddings": "embeddings"}
_AZURE_V1_ROUTES["/openai/v1/responses"] = "responses"
_AZURE_ROUTE = re.compile(r"^/openai/deployments/([^/]+)/(chat/completions|embeddings)$")
_JSON_FORMATS = ("json_object", "json_schema")
_DEFAULT_EMBEDDING_DIMENSIONS = 8
_STOP_JOIN_TIMEOUT = 2.0


@dataclass(frozen=True)
class RecordedRequest:
    """One request the server received, kept so tests can assert on what the client sent."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any
    deployment: str | None = None
    request_id: str = ""


def _error_body(
    message: str, type_: str | None, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """Build an error body shaped like OpenAI's, so the SDK fills ``message`` and ``code``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


@dataclass(frozen=True)
class Fault:
    """A scripted misbehaviour for one request; build it with the classmethods.

    ``status_code`` None means "answer normally" (after ``delay`` seconds, if any). ``body`` is a
    dict (sent as JSON), or str/bytes sent as-is with ``content_type``.
    """

    status_code: int | None = None
    body: Any = None
    headers: Mapping[str, str | None] = field(default_factory=dict)
    content_type: str = "application/json"
    delay: float = 0.0
    bytes_per_s: float = 0.0  # > 0: the body trickles in at this rate (see trickle())
    truncate: int | None = None
    drop_after: int | None = None
    stall_after: int | None = None
    stall_seconds: float = 0.0
    error_after: int | None = None

    def with_headers(self, headers: Mapping[str, str | None]) -> Fault:
        """A copy that also sends ``headers`` (a value None leaves that header out, even ``x-request-id``).

        ``Fault.server_error(503).with_headers({"x-should-retry": "false"})`` is a 503 that says not
        to retry it, as OpenAI's edge does.
        """
        return replace(self, headers={**self.headers, **headers})

    def trickling(self, bytes_per_s: float) -> Fault:
        """A copy whose body (an error body too) is sent ``bytes_per_s`` bytes per second after the head.

        ``Fault.server_error(500).trickling(1)`` is a 500 whose error body takes minutes, as a
        stalled gateway sends it: the client reads an error body before it can raise.
        """
        if not bytes_per_s > 0:
            raise ValueError(f"bytes_per_s must be > 0, got {bytes_per_s!r}")
        return replace(self, bytes_per_s=float(bytes_per_s))

    @classmethod
    def status(cls, code: int, body: Any = None, headers: Mapping[str, str] | None = None) -> Fault:
        """Answer with any status; ``body`` None gives an OpenAI error body named after the status."""
        if body is None:
            phrase = _reason(code)
            body = _error_body(f"{code} {phrase}", "invalid_request_error" if code < 500 else "server_error")
        return cls(status_code=code, body=body, headers=dict(headers or {}))

    @classmethod
    def rate_limit(
        cls,
        retry_after: float | None = None,
        retry_after_ms: int | None = None,
        code: str | None = "rate_limit_exceeded",
        *,
        should_retry: bool | None = None,
        reset_requests: str | None = None,
        reset_tokens: str | None = None,
    ) -> Fault:
        """Answer 429, with ``Retry-After`` / ``retry-after-ms`` headers when given.

        ``should_retry`` adds ``x-should-retry``; ``reset_requests`` / ``reset_tokens`` add OpenAI's
        ``x-ratelimit-reset-*`` durations (``"6m0s"``, ``"12ms"``) with the matching
        ``x-ratelimit-remaining-*: 0``.
        """
        headers: dict[str, str] = {}
        if retry_after is not None:
            headers["Retry-After"] = _format_number(retry_after)
        if retry_after_ms is not None:
            headers["retry-after-ms"] = str(int(retry_after_ms))
        if should_retry is not None:
            headers["x-should-retry"] = str(should_retry).lower()
        for limit, reset in (("requests", reset_requests), ("tokens", reset_tokens)):
            if reset is not None:
                headers[f"x-ratelimit-reset-{limit}"] = reset
                headers[f"x-ratelimit-remaining-{limit}"] = "0"
        body = _error_body("Rate limit reached for requests. Please try again later.", "requests", code)
        return cls(status_code=429, body=body, headers=headers)

    @classmethod
    def retry_after_date(cls, seconds: float, status: int = 429) -> Fault:
        """Answer ``status`` with ``Retry-After`` as an HTTP-date ``seconds`` from when the fault is built
        (negative: a date in the past)."""
        date = email.utils.formatdate(time.time() + seconds, usegmt=True)
        fault = cls.status(status) if status != 429 else cls.rate_limit()
        return fault.with_headers({"Retry-After": date})

    @classmethod
    def litellm_rate_limit(
        cls,
        retry_after: float | None = None,
        retry_after_ms: int | None = None,
        message: str = "Rate limit reached for requests. Please try again later.",
    ) -> Fault:
        """Answer as a LiteLLM proxy does when its provider answered 429.

        LiteLLM forwards the provider's headers under an ``llm_provider-`` prefix (so
        ``Retry-After`` arrives as ``llm_provider-retry-after``), names the call with
        ``x-litellm-call-id`` instead of ``x-request-id``, and rewrites the error body to
        ``"type": "throttling_error", "code": "429"``, keeping only the provider's message.
        """
        headers: dict[str, str | None] = {"x-request-id": None, "x-litellm-call-id": _litellm_call_id()}
        if retry_after is not None:
            headers["llm_provider-retry-after"] = _format_number(retry_after)
        if retry_after_ms is not None:
            headers["llm_provider-retry-after-ms"] = str(int(retry_after_ms))
        text = (
            f"litellm.RateLimitError: RateLimitError: OpenAIException - {message}\n\n"
            "LiteLLM: model group 'upstream' failed with the error above. No fallback was attempted."
        )
        body = _error_body(text, "throttling_error", "429")
        return cls(status_code=429, body=body, headers=headers)

    @classmethod
    def litellm_quota(cls) -> Fault:
        """Answer as LiteLLM does for a provider's ``insufficient_quota``: only the message tells."""
        return cls.litellm_rate_limit(
            message="You exceeded your current quota, please check your plan and billing details."
        )

    @classmethod
    def fewer_choices(cls, count: int = 1) -> Fault:
        """Answer normally with only the first ``count`` choices, as a server that ignores ``n`` does (llama.cpp)."""
        return cls(truncate=int(count))

    @classmethod
    def fewer_embeddings(cls, count: int = 1) -> Fault:
        """Answer an embeddings request with only the first ``count`` vectors (LiteLLM's mock answers one)."""
        return cls(truncate=int(count))

    @classmethod
    def validation_error(cls, status: int = 500, field: str = "messages") -> Fault:
        """Answer a request validation error: FastAPI's 422 ``{"detail": [...]}`` shape, or with a 5xx
        ``status`` the shape llama-cpp-python's server gives it (its error route turns every exception,
        validation errors included, into a 500 ``internal_server_error`` whose message is the
        pydantic error list)."""
        error: dict[str, Any] = {"type": "missing", "loc": ("body", field), "msg": "Field required", "input": None}
        if status < 500:
            return cls(status_code=status, body={"detail": [{**error, "loc": list(error["loc"])}]})
        return cls(status_code=status, body=_error_body(repr([error]), "internal_server_error"))

    @classmethod
    def insufficient_quota(cls) -> Fault:
        """Answer 429 with code ``insufficient_quota`` (billing, not worth retrying)."""
        body = _error_body(
            "You exceeded your current quota, please check your plan and billing details.",
            "insufficient_quota",
            "insufficient_quota",
        )
        return cls(status_code=429, body=body)

    @classmethod
    def response_failed(cls, code: str = "server_error", message: str = "The model failed to generate a response.") -> Fault:
        """Answer 200 with a Responses object whose ``status`` is ``failed`` and ``error`` says why."""
        body = _response_body(f"resp_failed_{code}", "unknown", [], status="failed")
        body["error"] = {"code": code, "message": message}
        return cls(status_code=200, body=body)

    @classmethod
    def response_incomplete(cls, reason: str = "content_filter", text: str = "") -> Fault:
        """Answer 200 with a Responses object ``incomplete`` for ``reason``, holding ``text`` if any."""
        output = [_output_message("msg_incomplete", text, status="incomplete")] if text else []
        body = _response_body(f"resp_incomplete_{reason}", "unknown", output, status="incomplete")
        body["incomplete_details"] = {"reason": reason}
        return cls(status_code=200, body=body)

    @classmethod
    def server_error(cls, code: int = 500, *, should_retry: bool | None = None) -> Fault:
        """Answer a 5xx with OpenAI's generic server-error body (and ``x-should-retry`` when given)."""
        body = _error_body(
            "The server had an error while processing your request. Sorry about that!", "server_error"
        )
        fault = cls(status_code=code, body=body)
        return fault if should_retry is None else fault.with_headers({"x-should-retry": str(should_retry).lower()})

    @classmethod
    def bad_request(
        cls, message: str = "Invalid request (scripted fault).", code: str | None = None
    ) -> Fault:
        """Answer 400 ``invalid_request_error`` with the given message and code."""
        return cls(status_code=400, body=_error_body(message, "invalid_request_error", code))

    @classmethod
    def unauthorized(cls) -> Fault:
        """Answer 401 ``invalid_api_key``, as for a wrong key."""
        return cls(status_code=401, body=_invalid_key_body())

    @classmethod
    def content_filter(cls) -> Fault:
        """Answer 400 with code ``content_filter``, as Azure does for a filtered prompt."""
        body = _error_body(
            "The response was filtered due to the prompt triggering content management policy.",
            "invalid_request_error",
            "content_filter",
            "prompt",
        )
        body["error"]["innererror"] = {"code": "ResponsibleAIPolicyViolation"}
        return cls(status_code=400, body=body)

    @classmethod
    def slow(cls, seconds: float) -> Fault:
        """Wait ``seconds`` then answer normally; used to run past a client's timeout."""
        return cls(delay=float(seconds))

    @classmethod
    def trickle(cls, bytes_per_s: float) -> Fault:
        """Send the headers at once, then the normal body ``bytes_per_s`` bytes per second.

        As a stalled proxy or an overloaded server does: every read gets a byte before a read
        timeout could fire, so only a bound on the whole call ends it. A streamed answer
        (``stream: true``) trickles the same way, one byte per HTTP chunk.
        """
        if not bytes_per_s > 0:
            raise ValueError(f"bytes_per_s must be > 0, got {bytes_per_s!r}")
        return cls(bytes_per_s=float(bytes_per_s))

    @classmethod
    def not_json(cls) -> Fault:
        """Answer 200 labelled ``application/json`` whose body is not JSON."""
        return cls(status_code=200, body=b"this is not JSON {", content_type="application/json")

    @classmethod
    def html(cls) -> Fault:
        """Answer 200 with an HTML page, as a captive portal or proxy error page would."""
        page = b"<!DOCTYPE html><html><body><h1>Gateway says hello</h1></body></html>"
        return cls(status_code=200, body=page, content_type="text/html; charset=utf-8")

    @classmethod
    def drop_stream(cls, after: int) -> Fault:
        """Stream ``after`` events of the answer, then close the connection without ending it.

        Applies to a streamed answer (``stream: true``); a request that does not stream is answered
        normally. The client sees an incomplete chunked body, as when a proxy or the provider drops.
        """
        return cls(drop_after=int(after))

    @classmethod
    def stream_error(
        cls, after: int, message: str = "The server had an error while processing your request.", code: str = "server_error"
    ) -> Fault:
        """Stream ``after`` events, then an error event (``data: {"error": ...}`` on chat, ``event: error``
        on Responses) and end the stream, as the API does when generation fails midway."""
        return cls(error_after=int(after), body=_error_body(message, "server_error", code))

    @classmethod
    def stall_stream(cls, after: int, seconds: float = 60.0) -> Fault:
        """Stream ``after`` events, then send nothing for ``seconds`` (or until the client leaves), then the rest.

        With ``after`` at least the number of events, every event is sent and the end of the body
        is held back, as a proxy that keeps the connection open after the last event does.
        """
        return cls(stall_after=int(after), stall_seconds=float(seconds))


@dataclass
class _Response:
    """A response ready to encode; ``body`` is a dict (JSON) or raw bytes."""

    status: int
    body: Any
    headers: Mapping[str, str | None] = field(default_factory=dict)
    content_type: str = "application/json"
    trickle: float = 0.0  # bytes per second of the body; 0 sends it at once
    events: list[bytes] | None = None  # a streamed answer: SSE events, one HTTP chunk each
    fault: Fault | None = None  # the stream fault to play while sending ``events``


class _RequestError(Exception):
    """Raised inside request handling to answer with an OpenAI error body."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.response = _Response(status, _error_body(message, "invalid_request_error", code, param))


def _litellm_call_id() -> str:
    """A LiteLLM-style call id (a UUID4 string)."""
    return str(uuid.uuid4())


def _reason(code: int) -> str:
    """Return the standard reason phrase of an HTTP status code."""
    try:
        return http.HTTPStatus(code).phrase
    except ValueError:
        return "Unknown"


def _format_number(value: float) -> str:
    """Format seconds for a header: ``2`` rather than ``2.0``."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _invalid_key_body() -> dict[str, Any]:
    """Return the body OpenAI sends for a wrong API key."""
    return _error_body("Incorrect API key provided.", "invalid_request_error", "invalid_api_key")


def _content_text(content: Any) -> str:
    """Return the text of a message content: a string or a list of ``{"type": "text"}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        return " ".join(t for t in texts if isinstance(t, str))
    return ""


def _count_words(text: str) -> int:
    """Estimate tokens deterministically as whitespace-separated words."""
    return len(text.split())


def _remember(seen: dict[Any, None], key: Any) -> None:
    """Add ``key`` to an insertion-ordered set, dropping the oldest beyond ``_REMEMBERED``."""
    seen[key] = None
    if len(seen) > _REMEMBERED:
        del seen[next(iter(seen))]


def _input_parts(content: Any) -> Any:
    """A Responses content list with ``input_text`` / ``output_text`` parts read as ``text`` parts."""
    if isinstance(content, list):
        return [
            {"type": "text", "text": p.get("text", "")} if isinstance(p, dict) and p.get("type") in ("input_text", "output_text") else p
            for p in content
        ]
    return content


def _output_message(item_id: str, text: str, *, status: str = "completed") -> dict[str, Any]:
    """An assistant ``message`` output item holding one ``output_text`` part."""
    return {
        "id": item_id,
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }


def _response_body(response_id: str, model: str, output: list[dict[str, Any]], *, status: str) -> dict[str, Any]:
    """A Responses object with the fields the SDK requires; the caller fills in the rest."""
    return {
        "id": response_id,
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "max_output_tokens": None,
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": True,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": None,
        "user": None,
        "metadata": {},
    }


def _embedding(text: str, dimensions: int) -> list[float]:
    """Return a deterministic vector in [-1, 1) from sha256 of ``text``; exact in float32."""
    seed = hashlib.sha256(text.encode("utf-8")).digest()
    stream = b""
    block = 0
    while len(stream) < 2 * dimensions:
        stream += hashlib.sha256(seed + block.to_bytes(4, "big")).digest()
        block += 1
    values = struct.unpack(f">{dimensions}H", stream[: 2 * dimensions])
    return [v / 32768.0 - 1.0 for v in values]


class _Handler(BaseHTTPRequestHandler):
    """Parses one HTTP/1.1 request at a time and writes each response in a single write."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # StreamRequestHandler sets TCP_NODELAY in setup()
    server_version = "llmutils-testserver"
    sys_version = ""
    server: _HTTPServer

    def setup(self) -> None:
        """Register the connection so stop() can close idle keep-alive sockets."""
        super().setup()
        self.server.owner._track(self.connection, threading.current_thread(), add=True)

    def finish(self) -> None:
        """Unregister the connection."""
        try:
            super().finish()
        finally:
            self.server.owner._track(self.connection, threading.current_thread(), add=False)

    def handle(self) -> None:
        """Serve requests until the client goes away; disconnects are not errors here."""
        try:
            super().handle()
        except (OSError, ValueError) as exc:  # BrokenPipe, ConnectionReset, socket closed by stop()
            logger.debug("test server: connection ended: %r", exc)
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """Silence the default per-request stderr logging."""

    def _read_body(self) -> bytes:
        """Read the request body (Content-Length or chunked) so keep-alive stays in sync."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0:
            raise ValueError("negative Content-Length")
        return self.rfile.read(length) if length else b""

    def _dispatch(self) -> None:
        """Record the request, compute the answer and send it."""
        owner = self.server.owner
        request_id = owner._next_request_id()
        try:
            raw = self._read_body()
        except ValueError:
            self.close_connection = True
            error_body = _error_body("Malformed request body.", "invalid_request_error")
            self._send(_Response(400, error_body), request_id)
            return
        url = urlsplit(self.path)
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        body: Any = None
        body_is_json = True
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body_is_json = False
                if "multipart/form-data" in headers.get("content-type", ""):
                    body = _parse_multipart(headers["content-type"], raw)
        match = _AZURE_ROUTE.match(url.path)
        record = RecordedRequest(
            method=self.command,
            path=url.path,
            query=dict(parse_qsl(url.query, keep_blank_values=True)),
            headers=headers,
            body=body,
            deployment=match.group(1) if match else None,
            request_id=request_id,
        )
        owner._record(record)
        response = owner._answer(record, body_is_json)
        if response is None:  # the server is stopping: drop the connection without answering
            self.close_connection = True
            return
        self._send(response, request_id)

    def _send(self, response: _Response, request_id: str) -> None:
        """Encode status line, headers and body and write them in one call (no Nagle stall)."""
        if response.events is not None:
            self._send_stream(response, request_id)
            return
        if isinstance(response.body, (bytes, bytearray)):
            payload = bytes(response.body)
        elif isinstance(response.body, str):
            payload = response.body.encode("utf-8")
        else:
            payload = json.dumps(response.body).encode("utf-8")
        headers: dict[str, tuple[str, str]] = {}
        for name, value in (
            ("Server", self.server_version),
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Content-Type", response.content_type),
            ("x-request-id", request_id),
            *response.headers.items(),
        ):
            if value is None:  # a fault can leave a default header out
                headers.pop(name.lower(), None)
                continue
            headers[name.lower()] = (name, str(value))
        headers["content-length"] = ("Content-Length", str(len(payload)))
        if self.close_connection:
            headers["connection"] = ("Connection", "close")
        lines = [f"{self.protocol_version} {response.status} {_reason(response.status)}"]
        lines += [f"{name}: {value}" for name, value in headers.values()]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if response.trickle > 0:
            self.wfile.write(head)
            self.wfile.flush()
            stopping = self.server.owner._stopping
            for i in range(len(payload)):
                if stopping.wait(1.0 / response.trickle):
                    self.close_connection = True
                    return
                self.wfile.write(payload[i : i + 1])
                self.wfile.flush()
            return
        self.wfile.write(head + payload)

    def _send_stream(self, response: _Response, request_id: str) -> None:
        """Send SSE events as HTTP chunks, playing the stream fault; notice a client that leaves early."""
        owner = self.server.owner
        head = (
            f"{self.protocol_version} 200 OK\r\n"
            f"Server: {self.server_version}\r\n"
            f"Date: {email.utils.formatdate(usegmt=True)}\r\n"
            "Content-Type: text/event-stream; charset=utf-8\r\n"
            "Cache-Control: no-cache\r\n"
            f"x-request-id: {request_id}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n"
        )
        fault = response.fault or Fault()
        try:
            self.wfile.write(head.encode("latin-1"))
            if self._write_events(response.events or [], fault, owner.stream_interval, request_id):
                self.wfile.write(b"0\r\n\r\n")
                return
        except OSError:  # the client closed the connection while we wrote
            pass
        self.close_connection = True
        if fault.drop_after is None and not owner._stopping.is_set():
            logger.debug("test server: the client closed the stream of %s early", request_id)
            owner._stream_left(request_id)

    def _write_events(self, events: list[bytes], fault: Fault, interval: float, request_id: str) -> bool:
        """Write the events as chunks; False when the stream ended early (dropped, client gone, stopping)."""
        for index, event in enumerate(events):
            if fault.drop_after == index:
                logger.debug("test server: %s drops the stream after %d events", request_id, index)
                self.connection.shutdown(socket.SHUT_RDWR)
                return False
            if fault.stall_after == index and self._wait_or_left(fault.stall_seconds):
                return False
            if fault.error_after == index:
                event = _stream_error_event(fault.body["error"], responses=b'"sequence_number"' in event)
                self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                return True
            pause = 1.0 / fault.bytes_per_s if fault.bytes_per_s > 0 else interval
            pieces = [event[i : i + 1] for i in range(len(event))] if fault.bytes_per_s > 0 else [event]
            for piece in pieces:
                if self._client_left():
                    return False
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                if pause > 0 and self._wait_or_left(pause):
                    return False
        if fault.stall_after is not None and fault.stall_after >= len(events) and self._wait_or_left(fault.stall_seconds):
            return False  # every event sent, the body's end held back
        return True

    def _client_left(self) -> bool:
        """Whether the client closed its end (readable with nothing to read: end of file)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _wait_or_left(self, seconds: float) -> bool:
        """Wait ``seconds``; True as soon as the client leaves or the server stops."""
        end = time.monotonic() + seconds
        stopping = self.server.owner._stopping
        while not (self._client_left() or stopping.is_set()):
            left = end - time.monotonic()
            if left <= 0:
                return False
            stopping.wait(min(left, 0.02))
        return True

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _dispatch


class _HTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with daemon threads, no reverse DNS, and quiet error handling."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # socketserver's 5 stalls or resets 32 clients that connect at once

    def __init__(self, address: tuple[str, int], owner: OpenAITestServer) -> None:
        self.owner = owner
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        """Bind without HTTPServer's getfqdn() call, which can stall on reverse DNS."""
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log handler errors at debug level instead of printing tracebacks to stderr."""
        logger.debug("test server: error serving %s", client_address, exc_info=True)


class OpenAITestServer:
    """A real HTTP server on 127.0.0.1 that answers like the OpenAI and Azure OpenAI APIs.

    Example::

        with OpenAITestServer(latency=0.01) as srv:
            client = openai.OpenAI(base_url=srv.base_url, api_key="test", max_retries=0)
            srv.script(Fault.server_error(), Fault.slow(5))  # next two requests misbehave
            srv.chat_handler = lambda body: "scripted answer"  # or return a full response dict

    Parameters: ``port`` 0 picks a free port; ``latency`` seconds are waited before every
    answer; with ``api_key`` set, requests whose ``Authorization: Bearer`` or ``api-key``
    header differ get a 401. Chat answers echo the last user message (``"echo: <text>"``).
    ``POST /v1/responses`` (and Azure's ``/openai/v1/responses``) answers the same way in the
    Responses shape; ``responses_handler`` scripts it as ``chat_handler`` does chat.
    ``keep_requests`` bounds :attr:`requests` to the most recent ones (None keeps every request,
    for tests; a long-running benchmark server keeps a few so its memory stays flat), while
    :attr:`request_count` still counts them all.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        latency: float = 0.0,
        api_key: str | None = None,
        keep_requests: int | None = None,
    ) -> None:
        if keep_requests is not None and (isinstance(keep_requests, bool) or not isinstance(keep_requests, int) or keep_requests < 0):
            raise ValueError(f"keep_requests must be None or an int >= 0, got {keep_requests!r}")
        self.host = host
        self.latency = latency
        self.api_key = api_key
        self.chat_handler: Callable[[dict[str, Any]], str | dict[str, Any]] | None = None
        self.responses_handler: Callable[[dict[str, Any]], str | dict[str, Any]] | None = None
        """For ``POST /v1/responses``: return the output text, or a whole Responses object."""
        # Ids of stored responses and digests of inputs seen, oldest first, each bounded (a long
        # benchmark run must not grow without end).
        self._stored_responses: dict[str, None] = {}
        self._seen_inputs: dict[bytes, None] = {}
        self._requested_port = port
        self._lock = threading.Lock()
        self._requests: deque[RecordedRequest] = deque(maxlen=keep_requests)
        self._received = 0
        self._faults: deque[Fault] = deque()
        self._counter = 0
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._connections: dict[socket.socket, threading.Thread] = {}
        self.stream_interval = 0.0
        """Seconds between the events of a streamed answer (0: as fast as the socket takes them)."""
        self._streams_left: list[str] = []
        self._stream_left_cond = threading.Condition(self._lock)
        self.batch_api = FakeBatchAPI(self)
        """The Batch API (``/v1/files``, ``/v1/batches``): scripted outcomes and a fast clock."""

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> OpenAITestServer:
        """Bind the port and serve on a daemon thread; returns self."""
        if self._httpd is not None:
            raise RuntimeError("OpenAITestServer is already running; call stop() first.")
        self._stopping = threading.Event()
        httpd = _HTTPServer((self.host, self._requested_port), self)
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"OpenAITestServer:{httpd.server_port}",
            daemon=True,
        )
        self._thread.start()
        logger.debug("test server: serving at %s", self.base_url)
        return self

    def stop(self) -> None:
        """Stop serving, wake pending waits, close open connections and join the threads."""
        httpd, thread = self._httpd, self._thread
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        with self._lock:
            connections = dict(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        httpd.server_close()
        if thread is not None:
            thread.join(_STOP_JOIN_TIMEOUT)
        deadline = time.monotonic() + _STOP_JOIN_TIMEOUT
        for handler_thread in connections.values():
            handler_thread.join(max(0.0, deadline - time.monotonic()))
        self._httpd = None
        self._thread = None
        logger.debug("test server: stopped")

    def __enter__(self) -> OpenAITestServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.base_url if self._httpd is not None else "stopped"
        return f"<OpenAITestServer {where}>"

    # -- public state ------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port actually bound (useful with ``port=0``)."""
        if self._httpd is None:
            raise RuntimeError("OpenAITestServer is not running; call start() or use `with`.")
        return self._httpd.server_port

    @property
    def azure_endpoint(self) -> str:
        """The value for ``openai.AzureOpenAI(azure_endpoint=...)``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The value for ``openai.OpenAI(base_url=...)``."""
        return f"{self.azure_endpoint}/v1"

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of the requests received so far (the last ``keep_requests`` of them), oldest first."""
        with self._lock:
            return list(self._requests)

    @property
    def request_count(self) -> int:
        """How many requests were received since the last reset() (all of them, kept or not)."""
        with self._lock:
            return self._received

    @property
    def pending_faults(self) -> int:
        """How many scripted faults have not been consumed yet."""
        with self._lock:
            return len(self._faults)

    def script(self, *faults: Fault) -> None:
        """Queue faults, consumed FIFO, one per chat/embeddings request that passes the key/api-version checks."""
        for fault in faults:
            if not isinstance(fault, Fault):
                raise TypeError(
                    f"script() takes Fault objects, got {type(fault).__name__}; "
                    "build them with Fault.status(...), Fault.rate_limit(...), etc."
                )
        with self._lock:
            self._faults.extend(faults)

    def reset(self) -> None:
        """Forget recorded requests and pending faults."""
        with self._lock:
            self._stored_responses.clear()
            self._seen_inputs.clear()
            self._requests.clear()
            self._received = 0
            self._faults.clear()
            self._streams_left.clear()
        self.batch_api.reset()

    @property
    def streams_closed_early(self) -> list[str]:
        """Request ids of streamed answers whose client closed the connection before their end."""
        with self._lock:
            return list(self._streams_left)

    def wait_stream_closed_early(self, count: int = 1, timeout: float = 5.0) -> bool:
        """Wait until ``count`` streams were closed early by their client; False if ``timeout`` passed first."""
        with self._stream_left_cond:
            return self._stream_left_cond.wait_for(lambda: len(self._streams_left) >= count, timeout)

    def _stream_left(self, request_id: str) -> None:
        """Record that the client of ``request_id`` closed its stream early."""
        with self._stream_left_cond:
            self._streams_left.append(request_id)
            self._stream_left_cond.notify_all()

    def _as_stream(self, request: RecordedRequest, response: _Response, fault: Fault | None) -> _Response:
        """Turn a whole answer into SSE events when the request asked for ``stream: true``."""
        body: dict[str, Any] = request.body
        if not body.get("stream"):
            if body.get("stream_options") is not None:
                message = "The 'stream_options' parameter is only allowed when 'stream' is enabled."
                raise _RequestError(400, message, "invalid_value", "stream_options")
            return response
        if response.status != 200 or not isinstance(response.body, dict):
            return response
        if response.body.get("object") == "response":
            events = _response_events(response.body)
        else:
            options = body.get("stream_options")
            include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
            events = _chat_chunks(response.body, include_usage)
        return _Response(200, None, events=events, fault=fault)

    # -- internals used by the handler -------------------------------------------------------

    def _next_request_id(self) -> str:
        """Return a new ``req_<n>`` id (never reused within the server's life)."""
        with self._lock:
            self._counter += 1
            return f"req_{self._counter}"

    def _record(self, request: RecordedRequest) -> None:
        """Append a request to the record (the oldest falls out beyond ``keep_requests``) and count it."""
        with self._lock:
            self._requests.append(request)
            self._received += 1

    def _track(self, conn: socket.socket, thread: threading.Thread, *, add: bool) -> None:
        """Add or remove an open connection and the thread serving it."""
        with self._lock:
            if add:
                self._connections[conn] = thread
            else:
                self._connections.pop(conn, None)

    def _pop_fault(self) -> Fault | None:
        """Take the next scripted fault, if any."""
        with self._lock:
            return self._faults.popleft() if self._faults else None

    def _answer(self, request: RecordedRequest, body_is_json: bool) -> _Response | None:
        """Compute the response to a request; None when the server stopped while waiting."""
        if self.latency > 0 and self._stopping.wait(self.latency):
            return None
        batch_response = self.batch_api.answer(request)
        if batch_response is not None:
            return batch_response
        if request.deployment is not None:
            kind: str | None = "chat" if request.path.endswith("/chat/completions") else "embeddings"
        else:
            kind = _V1_ROUTES.get(request.path) or _AZURE_V1_ROUTES.get(request.path)
        if kind is None or request.method != "POST":
            message = f"Invalid URL ({request.method} {request.path})"
            return _Response(404, _error_body(message, "invalid_request_error"))
        if self.api_key is not None and not self._authorized(request.headers):
            return _Response(401, _invalid_key_body())
        if request.deployment is not None and not request.query.get("api-version"):
            message = "Missing required query parameter 'api-version'; pass api_version= to AzureOpenAI."
            body = _error_body(message, "invalid_request_error", "missing_api_version", "api-version")
            return _Response(400, body)
        fault = self._pop_fault()
        if fault is not None:
            logger.debug("test server: %s gets scripted %r", request.request_id, fault)
            if fault.delay > 0 and self._stopping.wait(fault.delay):
                return None
            if fault.status_code is not None:
                return _Response(fault.status_code, fault.body, fault.headers, fault.content_type, fault.bytes_per_s)
        trickle = fault.bytes_per_s if fault is not None else 0.0
        try:
            if not body_is_json or not isinstance(request.body, dict):
                raise _RequestError(400, "The request body must be a JSON object.", "invalid_json")
            if kind == "responses":
                answer = self._responses(request)
            else:
                answer = self._chat(request) if kind == "chat" else self._embeddings(request)
            items = {"chat": "choices", "embeddings": "data"}.get(kind)
            if fault is not None and fault.truncate is not None and items is not None:
                if isinstance(answer.get(items), list):
                    answer = {**answer, items: answer[items][: fault.truncate]}
            response = _Response(200, answer, fault.headers if fault is not None else {}, trickle=trickle)
            return self._as_stream(request, response, fault) if kind != "embeddings" else response
        except _RequestError as exc:
            return exc.response
        except Exception:
            logger.exception("test server: chat_handler failed for %s", request.request_id)
            body = _error_body("The test server's chat_handler raised; see the log.", "server_error")
            return _Response(500, body)

    def _authorized(self, headers: Mapping[str, str]) -> bool:
        """Return whether the Bearer token or Azure ``api-key`` header matches ``api_key``."""
        bearer = headers.get("authorization", "")
        return bearer == f"Bearer {self.api_key}" or headers.get("api-key") == self.api_key

    def _responses(self, request: RecordedRequest) -> dict[str, Any]:
        """Build a Responses object: the handler's answer, a function call, JSON, or an echo.

        Checks what the real API checks (unknown fields, ``input``, ``max_output_tokens`` >= 16,
        flat function tools, a named ``json_schema``, a known ``previous_response_id``); answers
        ``incomplete`` when the answer needs more than ``max_output_tokens`` words; adds a reasoning
        item (with a summary when asked) when ``reasoning`` is given; reports the input as cached
        when the same input was seen before.
        """
        body: dict[str, Any] = request.body
        for name in body:
            if name not in _RESPONSES_FIELDS:
                raise _RequestError(400, f"Unknown parameter: '{name}'.", "unknown_parameter", name)
        raw_input = body.get("input")
        if raw_input is None and not (body.get("previous_response_id") or body.get("conversation") or body.get("prompt")):
            raise _RequestError(400, "Missing required parameter: 'input'.", "missing_required_parameter", "input")
        budget = body.get("max_output_tokens")
        if budget is not None and (not isinstance(budget, int) or budget < _MIN_OUTPUT_TOKENS):
            message = (
                "Invalid 'max_output_tokens': integer below minimum value. "
                f"Expected a value >= {_MIN_OUTPUT_TOKENS}, but got {budget!r} instead."
            )
            raise _RequestError(400, message, "integer_below_min_value", "max_output_tokens")
        tools = body.get("tools") or []
        for index, tool in enumerate(tools):
            if isinstance(tool, dict) and tool.get("type") == "function" and not tool.get("name"):
                param = f"tools[{index}].name"
                raise _RequestError(400, f"Missing required parameter: '{param}'.", "missing_required_parameter", param)
        text_config = body.get("text")
        if not isinstance(text_config, dict):
            text_config = {}
        text_format = text_config.get("format")
        if not isinstance(text_format, dict):
            text_format = {"type": "text"}
        if text_format.get("type") == "json_schema":
            for name in ("name", "schema"):
                if name not in text_format:
                    param = f"text.format.{name}"
                    raise _RequestError(400, f"Missing required parameter: '{param}'.", "missing_required_parameter", param)
        previous = body.get("previous_response_id")
        with self._lock:
            known = previous in self._stored_responses
        if previous is not None and not known:
            message = f"Previous response with id '{previous}' not found."
            raise _RequestError(400, message, "previous_response_not_found", "previous_response_id")

        number = request.request_id.removeprefix("req_")
        model = body.get("model") or "unknown"
        items = [{"role": "user", "content": raw_input}] if isinstance(raw_input, str) else list(raw_input or [])
        user_texts = [_content_text(_input_parts(i.get("content"))) for i in items if isinstance(i, dict) and i.get("role") == "user"]
        text = user_texts[-1] if user_texts else ""
        last = items[-1] if items and isinstance(items[-1], dict) else {}
        output: list[dict[str, Any]] = []
        reasoning = body.get("reasoning") if isinstance(body.get("reasoning"), dict) else None
        reasoning_tokens = 0
        if reasoning is not None:
            reasoning_tokens = _count_words(text) + 1
            summary = []
            if reasoning.get("summary") in ("auto", "concise", "detailed"):
                summary = [{"type": "summary_text", "text": f"Thinking about: {text}"}]
            output.append({"id": f"rs_{number}", "type": "reasoning", "summary": summary})
        answer: str | None
        if self.responses_handler is not None:
            handled = self.responses_handler(body)
            if isinstance(handled, dict):
                return handled
            answer = str(handled)
        elif last.get("type") == "function_call_output":
            answer = f"result: {_content_text(_input_parts(last.get('output')))}"
        elif tools and text.startswith("call "):
            function = next((t for t in tools if isinstance(t, dict) and t.get("type") == "function"), {})
            output.append({
                "id": f"fc_{number}",
                "type": "function_call",
                "status": "completed",
                "call_id": f"call_{number}",
                "name": function.get("name", "function"),
                "arguments": "{}",
            })
            answer = None
        elif text_format.get("type") in _JSON_FORMATS:
            answer = json.dumps({"echo": text})
        else:
            answer = f"echo: {text}"
        status = "completed"
        if answer is not None:
            words = answer.split(" ")
            if budget is not None and len(words) + reasoning_tokens > budget:
                answer = " ".join(words[: max(0, budget - reasoning_tokens)])
                status = "incomplete"
            if answer or status == "completed":
                output.append(_output_message(f"msg_{number}", answer, status=status))
        input_text = " ".join(_content_text(_input_parts(i.get("content") or i.get("output"))) for i in items if isinstance(i, dict))
        input_tokens = _count_words(f"{body.get('instructions') or ''} {input_text}")
        seen = json.dumps([model, body.get("instructions"), raw_input], sort_keys=True, default=str)
        seen_key = hashlib.sha256(seen.encode("utf-8")).digest()
        answer_tokens = sum(_count_words(_content_text(_input_parts(i.get("content")))) for i in output if i["type"] == "message")
        output_tokens = answer_tokens + reasoning_tokens + sum(1 for i in output if i["type"] == "function_call")
        response_id = f"resp_{number}"
        with self._lock:
            cached = input_tokens if seen_key in self._seen_inputs else 0
            _remember(self._seen_inputs, seen_key)
            if body.get("store", True):
                _remember(self._stored_responses, response_id)
        result = _response_body(response_id, model, output, status=status)
        if status == "incomplete":
            result["incomplete_details"] = {"reason": "max_output_tokens"}
        result.update({
            "instructions": body.get("instructions"),
            "max_output_tokens": budget,
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": previous,
            "reasoning": {"effort": (reasoning or {}).get("effort"), "summary": (reasoning or {}).get("summary")},
            "store": body.get("store", True),
            "temperature": body.get("temperature", 1.0),
            "text": {"format": text_format},
            "tool_choice": body.get("tool_choice", "auto"),
            "tools": tools,
            "top_p": body.get("top_p", 1.0),
            "usage": {
                "input_tokens": input_tokens,
                "input_tokens_details": {"cached_tokens": cached},
                "output_tokens": output_tokens,
                "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
                "total_tokens": input_tokens + output_tokens,
            },
        })
        return result

    def _chat(self, request: RecordedRequest) -> dict[str, Any]:
        """Build a ChatCompletion: the chat_handler's answer, a tool call, JSON, or an echo."""
        body: dict[str, Any] = request.body
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            error = "Missing required parameter: 'messages'."
            raise _RequestError(400, error, "missing_required_parameter", "messages")
        n = body.get("n") or 1
        if not isinstance(n, int) or not 1 <= n <= 128:
            raise _RequestError(400, "'n' must be an integer between 1 and 128.", "invalid_value", "n")
        model = body.get("model") or request.deployment or "unknown"
        user_messages = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        text = _content_text(user_messages[-1].get("content")) if user_messages else ""
        number = request.request_id.removeprefix("req_")

        contents: list[str | None]
        tool_calls: list[dict[str, Any]] | None = None
        if self.chat_handler is not None:
            answer = self.chat_handler(body)
            if isinstance(answer, dict):
                return answer
            contents = [str(answer)] * n
        else:
            suffixes = [""] + [f" [{i}]" for i in range(1, n)]
            tools = body.get("tools")
            response_format = body.get("response_format")
            if tools and text.startswith("call "):
                function = (tools[0] or {}).get("function") or {}
                tool_calls = [
                    {
                        "id": f"call_{number}",
                        "type": "function",
                        "function": {"name": function.get("name", "function"), "arguments": "{}"},
                    }
                ]
                contents = [None] * n
            elif isinstance(response_format, dict) and response_format.get("type") in _JSON_FORMATS:
                contents = [json.dumps({"echo": text + s}) for s in suffixes]
            else:
                contents = [f"echo: {text}{s}" for s in suffixes]

        choices = []
        for index, content in enumerate(contents):
            message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
            if tool_calls is not None:
                message["tool_calls"] = tool_calls
            choices.append(
                {
                    "index": index,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": "tool_calls" if tool_calls is not None else "stop",
                }
            )
        prompt_tokens = sum(
            _count_words(_content_text(m.get("content"))) for m in messages if isinstance(m, dict)
        )
        completion_tokens = sum(_count_words(c) if c is not None else 1 for c in contents)
        return {
            "id": f"chatcmpl-{number}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
            "system_fingerprint": None,
        }

    def _embeddings(self, request: RecordedRequest) -> dict[str, Any]:
        """Build an embeddings response with deterministic sha256-derived vectors."""
        body: dict[str, Any] = request.body
        raw_input = body.get("input")
        texts: list[str]
        if isinstance(raw_input, str):
            texts = [raw_input]
        elif isinstance(raw_input, list) and raw_input and all(isinstance(x, str) for x in raw_input):
            texts = list(raw_input)
        elif isinstance(raw_input, list) and raw_input and all(isinstance(x, int) for x in raw_input):
            texts = [" ".join(map(str, raw_input))]  # one input given as token ids
        elif isinstance(raw_input, list) and raw_input and all(isinstance(x, list) for x in raw_input):
            texts = [" ".join(map(str, x)) for x in raw_input]
        else:
            message = "'input' must be a string or a non-empty list of strings."
            raise _RequestError(400, message, "invalid_value", "input")
        dimensions = body.get("dimensions") or _DEFAULT_EMBEDDING_DIMENSIONS
        if not isinstance(dimensions, int) or dimensions < 1:
            message = "'dimensions' must be a positive integer."
            raise _RequestError(400, message, "invalid_value", "dimensions")
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            message = "'encoding_format' must be 'float' or 'base64'."
            raise _RequestError(400, message, "invalid_value", "encoding_format")
        data = []
        for index, text in enumerate(texts):
            vector = _embedding(text, dimensions)
            embedding: Any = vector
            if encoding == "base64":  # the SDK asks for base64 by default and decodes float32
                embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        tokens = sum(_count_words(t) for t in texts)
        return {
            "object": "list",
            "data": data,
            "model": body.get("model") or request.deployment or "unknown",
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }


_PIECE = re.compile(r"\S+\s*|\s+")


def _pieces(text: str, size: int = 0) -> list[str]:
    """Cut text as a model streams it: word by word (``size`` > 0: fixed-size pieces)."""
    if size > 0:
        return [text[i : i + size] for i in range(0, len(text), size)]
    return _PIECE.findall(text)


def _sse(data: Any, event: str | None = None) -> bytes:
    """Encode one Server-Sent Event (``data`` as JSON unless it is a str)."""
    payload = data if isinstance(data, str) else json.dumps(data)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


def _stream_error_event(error: Mapping[str, Any], *, responses: bool) -> bytes:
    """The error event that ends a failed stream: Responses' typed ``error`` event, or chat's ``{"error"}``."""
    if responses:
        return _sse({"type": "error", "code": error.get("code"), "message": error.get("message"), "param": None}, "error")
    return _sse({"error": dict(error)})


def _chat_chunks(completion: Mapping[str, Any], include_usage: bool) -> list[bytes]:
    """A chat completion as OpenAI streams it: role, content word by word, tool-call fragments, finish,
    the usage chunk (``choices: []``) when ``include_usage``, then ``[DONE]``."""
    base: dict[str, Any] = {
        "id": completion.get("id"),
        "object": "chat.completion.chunk",
        "created": completion.get("created", int(time.time())),
        "model": completion.get("model"),
        "system_fingerprint": completion.get("system_fingerprint"),
    }
    if include_usage:
        base["usage"] = None

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return _sse({**base, "choices": [choice]})

    events: list[bytes] = []
    for choice in completion.get("choices") or ():
        index = choice.get("index", 0)
        message = choice.get("message") or {}
        content = message.get("content")
        events.append(chunk(index, {"role": "assistant", "content": "" if content is not None else None, "refusal": None}))
        for piece in _pieces(content) if isinstance(content, str) else ():
            events.append(chunk(index, {"content": piece}))
        for number, call in enumerate(message.get("tool_calls") or ()):
            function = call.get("function") or {}
            first = {"index": number, "id": call.get("id"), "type": call.get("type", "function"),
                     "function": {"name": function.get("name"), "arguments": ""}}
            events.append(chunk(index, {"tool_calls": [first]}))
            for piece in _pieces(function.get("arguments") or "", 4):
                events.append(chunk(index, {"tool_calls": [{"index": number, "function": {"arguments": piece}}]}))
        events.append(chunk(index, {}, choice.get("finish_reason") or "stop"))
    if include_usage:
        events.append(_sse({**base, "choices": [], "usage": completion.get("usage")}))
    events.append(_sse("[DONE]"))
    return events


def _response_events(response: Mapping[str, Any]) -> list[bytes]:
    """A Responses API object as OpenAI streams it: ``response.created``, each output item with its
    text or argument deltas, then ``response.completed`` (``.incomplete`` / ``.failed`` by status)."""
    events: list[bytes] = []

    def emit(kind: str, **data: Any) -> None:
        events.append(_sse({"type": kind, "sequence_number": len(events), **data}, kind))

    start = {**response, "status": "in_progress", "output": [], "usage": None}
    emit("response.created", response=start)
    emit("response.in_progress", response=start)
    for index, item in enumerate(response.get("output") or ()):
        item_id = item.get("id", f"item_{index}")
        if item.get("type") == "message":
            emit("response.output_item.added", output_index=index, item={**item, "status": "in_progress", "content": []})
            for part_index, part in enumerate(item.get("content") or ()):
                where = {"item_id": item_id, "output_index": index, "content_index": part_index}
                text = part.get("text", "") if part.get("type") == "output_text" else ""
                emit("response.content_part.added", **where, part={**part, "text": ""} if "text" in part else part)
                for piece in _pieces(text):
                    emit("response.output_text.delta", **where, delta=piece, logprobs=[])
                if part.get("type") == "output_text":
                    emit("response.output_text.done", **where, text=text, logprobs=[])
                emit("response.content_part.done", **where, part=part)
        elif item.get("type") == "function_call":
            emit("response.output_item.added", output_index=index, item={**item, "status": "in_progress", "arguments": ""})
            arguments = item.get("arguments") or ""
            for piece in _pieces(arguments, 4):
                emit("response.function_call_arguments.delta", item_id=item_id, output_index=index, delta=piece)
            emit("response.function_call_arguments.done", item_id=item_id, output_index=index, arguments=arguments)
        else:
            emit("response.output_item.added", output_index=index, item=item)
        emit("response.output_item.done", output_index=index, item=item)
    status = response.get("status")
    final = {"failed": "response.failed", "incomplete": "response.incomplete"}.get(str(status), "response.completed")
    emit(final, response=response)
    return events


# -- the Batch API: /v1/files and /v1/batches ----------------------------------------------------------

_FILES_ROUTE = re.compile(r"^(/v1|/openai/v1|/openai)/files(?:/([^/]+)(/content)?)?$")
_BATCHES_ROUTE = re.compile(r"^(/v1|/openai/v1|/openai)/batches(?:/([^/]+)(/cancel)?)?$")
_BATCH_ENDPOINTS = ("/v1/chat/completions", "/v1/responses", "/v1/embeddings")
_BATCH_STATUSES = ("completed", "failed", "expired", "cancelled")
_BATCH_MAX_LINES = 50_000
_UNFINISHED = ("validating", "in_progress", "finalizing", "cancelling")
_LINE_ERRORS = {
    "expired": ("batch_expired", "This request could not be executed before the completion window expired."),
    "cancelled": ("batch_cancelled", "This request was not executed because the batch was cancelled."),
}


def _parse_multipart(content_type: str, raw: bytes) -> dict[str, Any] | None:
    """The fields of a ``multipart/form-data`` body: text fields as str, files as ``{"filename", "content"}``."""
    import email.parser
    import email.policy

    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + raw)
    if not message.is_multipart():
        return None
    fields: dict[str, Any] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        payload = part.get_payload(decode=True)  # bytes (None for a nested multipart)
        if not isinstance(payload, bytes):
            payload = b""
        filename = part.get_filename()
        if filename is not None:
            fields[name] = {"filename": filename, "content": payload}
        else:
            fields[name] = payload.decode("utf-8", "replace")
    return fields


@dataclass(frozen=True)
class BatchOutcome:
    """How the next batch created on the test server ends; queue it with ``srv.batch_api.script()``.

    ``status`` is the final status (``completed``, ``failed``, ``expired`` or ``cancelled``);
    ``polls`` the number of retrieves before it gets there (None: ``srv.batch_api.polls``);
    ``answered`` how many lines are answered first (None: all for completed, none for failed),
    the others get a ``batch_expired`` / ``batch_cancelled`` line in the error file, as OpenAI
    writes them; ``line_fault(line)`` may return a :class:`Fault` to answer one input line with
    an HTTP error instead (it lands in the error file); ``errors`` are the batch-level errors of a
    ``failed`` batch.

    >>> srv.batch_api.script(BatchOutcome("expired", answered=3))
    >>> srv.batch_api.script(BatchOutcome(line_fault=lambda line: Fault.bad_request() if line["custom_id"] == "k7" else None))
    """

    status: str = "completed"
    polls: int | None = None
    answered: int | None = None
    line_fault: Callable[[dict[str, Any]], Fault | None] | None = None
    errors: Sequence[Mapping[str, Any]] = ()

    def __post_init__(self) -> None:
        if self.status not in _BATCH_STATUSES:
            raise ValueError(f"BatchOutcome status must be one of {', '.join(_BATCH_STATUSES)}, got {self.status!r}")


@dataclass
class _FakeBatch:
    """One batch on the test server: its public object and what it will do."""

    obj: dict[str, Any]
    lines: list[dict[str, Any]]
    outcome: BatchOutcome
    azure: bool
    polls: int = 0
    finishing: bool = False
    output_lifetime: int | None = None


class FakeBatchAPI:
    """The test server's OpenAI Batch API (``srv.batch_api``): files, batches and a fast clock.

    A batch is ``validating`` when created, ``in_progress`` while it is polled, and reaches its
    final status after ``polls`` retrieves (default 1: at the first poll; set ``srv.batch_api.polls``). Each input line
    is then answered by the server's own chat (or embeddings, or responses when it has one)
    handler, so ``chat_handler`` applies; the answers go to an output file (status 200) and an
    error file (the rest), in the shape OpenAI writes them. ``script()`` queues a
    :class:`BatchOutcome` per created batch (expired, failed, cancelled, failing lines, partial
    output); ``script_http()`` queues :class:`Fault` answers for the files/batches endpoints
    themselves (a 500 while polling). ``created`` lists the batch ids in creation order.
    Azure paths (``/openai/files``, ``/openai/batches`` with ``api-version``, and ``/openai/v1/...``)
    are served too.
    """

    def __init__(self, owner: OpenAITestServer) -> None:
        self.polls = 1
        self._owner = owner
        self._lock = threading.Lock()
        self._files: dict[str, dict[str, Any]] = {}
        self._contents: dict[str, bytes] = {}
        self._batches: dict[str, _FakeBatch] = {}
        self._outcomes: deque[BatchOutcome] = deque()
        self._faults: deque[Fault] = deque()
        self._counter = 0
        self.created: list[str] = []

    # -- public ---------------------------------------------------------------------------------

    def script(self, *outcomes: BatchOutcome) -> None:
        """Queue outcomes, one per batch created from now on (FIFO); unscripted batches complete."""
        for outcome in outcomes:
            if not isinstance(outcome, BatchOutcome):
                raise TypeError(f"script() takes BatchOutcome objects, got {type(outcome).__name__}")
        with self._lock:
            self._outcomes.extend(outcomes)

    def script_http(self, *faults: Fault) -> None:
        """Queue faults for the next requests to the files and batches endpoints (FIFO)."""
        for fault in faults:
            if not isinstance(fault, Fault):
                raise TypeError(f"script_http() takes Fault objects, got {type(fault).__name__}")
        with self._lock:
            self._faults.extend(faults)

    def batch(self, batch_id: str) -> dict[str, Any]:
        """A copy of a batch object as the API would show it now (without advancing its clock)."""
        with self._lock:
            copied: dict[str, Any] = json.loads(json.dumps(self._batches[batch_id].obj))
            return copied

    def file_content(self, file_id: str) -> bytes:
        """The bytes of an uploaded or generated file."""
        with self._lock:
            return self._contents[file_id]

    def reset(self) -> None:
        """Forget files, batches, scripted outcomes and faults; ``polls`` back to 1."""
        with self._lock:
            self._files.clear()
            self._contents.clear()
            self._batches.clear()
            self._outcomes.clear()
            self._faults.clear()
            self.created.clear()
            self.polls = 1

    # -- serving ----------------------------------------------------------------------------------

    def answer(self, request: RecordedRequest) -> _Response | None:
        """The response to a files/batches request, or None when the path is not one of them."""
        files = _FILES_ROUTE.match(request.path)
        batches = None if files else _BATCHES_ROUTE.match(request.path)
        match = files or batches
        if match is None:
            return None
        owner = self._owner
        if owner.api_key is not None and not owner._authorized(request.headers):
            return _Response(401, _invalid_key_body())
        prefix = match.group(1)
        if prefix == "/openai" and not request.query.get("api-version"):
            message = "Missing required query parameter 'api-version'; pass api_version= to AzureOpenAI."
            return _Response(400, _error_body(message, "invalid_request_error", "missing_api_version", "api-version"))
        with self._lock:
            fault = self._faults.popleft() if self._faults else None
        if fault is not None:
            if fault.delay > 0 and owner._stopping.wait(fault.delay):
                return _Response(503, _error_body("The test server is stopping.", "server_error"))
            if fault.status_code is not None:
                return _Response(fault.status_code, fault.body, fault.headers, fault.content_type)
        try:
            if files:
                return self._files_request(request, match.group(2), bool(match.group(3)))
            return self._batches_request(request, match.group(2), bool(match.group(3)), azure=prefix.startswith("/openai"))
        except _RequestError as exc:
            return exc.response

    def _new_id(self, prefix: str) -> str:
        with self._lock:
            self._counter += 1
            number = self._counter
        return f"{prefix}{number:06d}{hashlib.sha256(f'{prefix}{number}{time.time()}'.encode()).hexdigest()[:18]}"

    def _add_file(self, filename: str, purpose: str, content: bytes, lifetime: int | None = None) -> dict[str, Any]:
        file_id = self._new_id("file-")
        now = int(time.time())
        obj = {
            "id": file_id,
            "object": "file",
            "bytes": len(content),
            "created_at": now,
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "expires_at": None if lifetime is None else now + lifetime,
            "status_details": None,
        }
        with self._lock:
            self._files[file_id] = obj
            self._contents[file_id] = content
        return obj

    def _files_request(self, request: RecordedRequest, file_id: str | None, content: bool) -> _Response:
        if file_id is None:
            if request.method == "GET":
                with self._lock:
                    data = [dict(f) for f in self._files.values()]
                return _Response(200, {"object": "list", "data": data[::-1], "has_more": False})
            if request.method != "POST":
                raise _RequestError(405, f"Method {request.method} is not allowed on /files")
            form = request.body if isinstance(request.body, dict) else None
            upload = form.get("file") if form else None
            if not isinstance(upload, dict):
                raise _RequestError(400, "Missing required parameter: 'file' (multipart/form-data).", "missing_required_parameter", "file")
            purpose = form.get("purpose") if form else None
            if not isinstance(purpose, str) or not purpose:
                raise _RequestError(400, "Missing required parameter: 'purpose'.", "missing_required_parameter", "purpose")
            if purpose == "batch" and not str(upload["filename"]).endswith(".jsonl"):
                raise _RequestError(400, "Invalid file format for Batch API. Must be .jsonl", "invalid_file_format", "file")
            lifetime = None
            if form and ("expires_after[anchor]" in form or "expires_after[seconds]" in form):
                lifetime = _lifetime(form.get("expires_after[anchor]"), form.get("expires_after[seconds]"), "expires_after")
            elif purpose == "batch":
                lifetime = 30 * 86400  # batch files expire after 30 days by default
            return _Response(200, self._add_file(str(upload["filename"]), purpose, upload["content"], lifetime))
        with self._lock:
            obj = self._files.get(file_id)
            stored = self._contents.get(file_id)
        if obj is None or stored is None:
            raise _RequestError(404, f"No such File object: {file_id}", None, "id")
        if content:
            if request.method != "GET":
                raise _RequestError(405, f"Method {request.method} is not allowed on file content")
            return _Response(200, stored, content_type="application/octet-stream")
        if request.method == "DELETE":
            with self._lock:
                self._files.pop(file_id, None)
                self._contents.pop(file_id, None)
            return _Response(200, {"id": file_id, "object": "file", "deleted": True})
        return _Response(200, dict(obj))

    def _batches_request(self, request: RecordedRequest, batch_id: str | None, cancel: bool, *, azure: bool) -> _Response:
        if batch_id is None:
            if request.method == "POST":
                return _Response(200, self._create(request, azure))
            return _Response(200, self._list(request))
        with self._lock:
            batch = self._batches.get(batch_id)
        if batch is None:
            raise _RequestError(404, f"No batch found with id '{batch_id}'.", None, "batch_id")
        if cancel:
            if request.method != "POST":
                raise _RequestError(405, "Use POST to cancel a batch")
            with self._lock:
                status = batch.obj["status"]
                if status not in _UNFINISHED:
                    raise _RequestError(400, f"Cannot cancel a batch with status '{status}'.", "invalid_request")
                batch.obj["status"] = "cancelling"
                batch.obj["cancelling_at"] = int(time.time())
                return _Response(200, json.loads(json.dumps(batch.obj)))
        if request.method != "GET":
            raise _RequestError(405, f"Method {request.method} is not allowed on a batch")
        self._advance(batch)
        with self._lock:
            return _Response(200, json.loads(json.dumps(batch.obj)))

    def _create(self, request: RecordedRequest, azure: bool) -> dict[str, Any]:
        body = request.body if isinstance(request.body, dict) else None
        if body is None:
            raise _RequestError(400, "The request body must be a JSON object.", "invalid_json")
        file_id = _required_str(body, "input_file_id")
        endpoint = _required_str(body, "endpoint")
        window = _required_str(body, "completion_window")
        if _v1(endpoint) not in _BATCH_ENDPOINTS:
            raise _RequestError(400, f"Invalid value for 'endpoint': {endpoint!r}.", "invalid_value", "endpoint")
        if window != "24h":
            message = "Invalid value for 'completion_window': only '24h' is supported."
            raise _RequestError(400, message, "invalid_value", "completion_window")
        output_lifetime = None
        expiry = body.get("output_expires_after")
        if expiry is not None:
            if not isinstance(expiry, dict):
                raise _RequestError(400, "'output_expires_after' must be an object.", "invalid_value", "output_expires_after")
            output_lifetime = _lifetime(expiry.get("anchor"), expiry.get("seconds"), "output_expires_after")
        metadata = body.get("metadata")
        if metadata is not None and (not isinstance(metadata, dict) or len(metadata) > 16):
            raise _RequestError(400, "'metadata' must be an object of at most 16 string pairs.", "invalid_value", "metadata")
        with self._lock:
            file_obj = self._files.get(file_id)
            content = self._contents.get(file_id, b"")
            outcome = self._outcomes.popleft() if self._outcomes else BatchOutcome()
        if file_obj is None:
            raise _RequestError(404, f"No such File object: {file_id}", None, "input_file_id")
        if file_obj["purpose"] != "batch":
            raise _RequestError(400, f"File {file_id} was not uploaded with purpose 'batch'.", "invalid_value", "input_file_id")
        lines, errors = _read_batch_lines(content, endpoint)
        if errors and outcome.status != "failed":
            outcome = BatchOutcome("failed", polls=outcome.polls, errors=errors)
        now = int(time.time())
        batch_id = self._new_id("batch_")
        obj: dict[str, Any] = {
            "id": batch_id,
            "object": "batch",
            "endpoint": endpoint,
            "errors": None,
            "input_file_id": file_id,
            "completion_window": "24h",
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "in_progress_at": None,
            "expires_at": now + 86400,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": metadata,
        }
        with self._lock:
            self._batches[batch_id] = _FakeBatch(obj, lines, outcome, azure, output_lifetime=output_lifetime)
            self.created.append(batch_id)
            copied: dict[str, Any] = json.loads(json.dumps(obj))
            return copied

    def _list(self, request: RecordedRequest) -> dict[str, Any]:
        try:
            limit = int(request.query.get("limit") or 20)
        except ValueError:
            raise _RequestError(400, "'limit' must be an integer.", "invalid_value", "limit") from None
        if not 1 <= limit <= 100:
            raise _RequestError(400, "'limit' must be between 1 and 100.", "invalid_value", "limit")
        after = request.query.get("after")
        with self._lock:
            ids = self.created[::-1]
            if after:
                ids = ids[ids.index(after) + 1 :] if after in ids else []
            page = [json.loads(json.dumps(self._batches[i].obj)) for i in ids[:limit]]
            more = len(ids) > limit
        return {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": more,
        }

    def _advance(self, batch: _FakeBatch) -> None:
        """One poll of the fast clock: a batch moves on, and ends after its outcome's number of polls."""
        with self._lock:
            obj = batch.obj
            if obj["status"] not in _UNFINISHED or batch.finishing:
                return
            batch.polls += 1
            cancelling = obj["status"] == "cancelling"
            needed = batch.outcome.polls if batch.outcome.polls is not None else self.polls
            done = cancelling or batch.polls >= needed
            total = len(batch.lines)
            if not done:
                if batch.outcome.status != "failed":
                    obj["status"] = "in_progress"
                    obj["in_progress_at"] = obj["in_progress_at"] or int(time.time())
                    obj["request_counts"] = {"total": total, "completed": total * batch.polls // max(1, needed), "failed": 0}
                return
            batch.finishing = True  # a concurrent poll leaves the answering to this one
        self._finish(batch, "cancelled" if cancelling else batch.outcome.status)

    def _finish(self, batch: _FakeBatch, status: str) -> None:
        """Answer the lines the outcome says, write the output and error files, set the final status."""
        now = int(time.time())
        obj = batch.obj
        if status == "failed":
            scripted = {"code": "scripted_failure", "message": "The batch failed (scripted).", "param": None, "line": None}
            errors = list(batch.outcome.errors) or [scripted]
            with self._lock:
                obj.update(status="failed", failed_at=now, errors={"object": "list", "data": errors})
            return
        answered = batch.outcome.answered
        if answered is None:
            answered = len(batch.lines) if status == "completed" else 0
        outputs: list[bytes] = []
        failures: list[bytes] = []
        for index, line in enumerate(batch.lines):
            if index < answered:
                status_code, body, request_id = self._answer_line(line, batch.azure, batch.outcome)
                record: dict[str, Any] = {
                    "id": f"batch_req_{request_id.removeprefix('req_')}",
                    "custom_id": line["custom_id"],
                    "response": {"status_code": status_code, "request_id": request_id, "body": body},
                    "error": None,
                }
                (outputs if status_code == 200 else failures).append(json.dumps(record).encode() + b"\n")
            else:
                code, message = _LINE_ERRORS.get(status, _LINE_ERRORS["expired"])
                record = {
                    "id": f"batch_req_{self._new_id('')}",
                    "custom_id": line["custom_id"],
                    "response": None,
                    "error": {"code": code, "message": message},
                }
                failures.append(json.dumps(record).encode() + b"\n")
        lifetime = batch.output_lifetime
        output_id = self._add_file("batch_output.jsonl", "batch_output", b"".join(outputs), lifetime)["id"] if outputs else None
        error_id = self._add_file("batch_errors.jsonl", "batch_output", b"".join(failures), lifetime)["id"] if failures else None
        with self._lock:
            obj.update(
                status=status,
                output_file_id=output_id,
                error_file_id=error_id,
                request_counts={"total": len(batch.lines), "completed": len(outputs), "failed": len(failures)},
            )
            obj["in_progress_at"] = obj["in_progress_at"] or now
            if status == "completed":
                obj.update(finalizing_at=now, completed_at=now)
            else:
                obj[f"{status}_at"] = now

    def _answer_line(self, line: dict[str, Any], azure: bool, outcome: BatchOutcome) -> tuple[int, Any, str]:
        """Answer one input line through the server's own handlers: (status code, body, request id)."""
        owner = self._owner
        request_id = owner._next_request_id()
        body = line["body"]
        fault = outcome.line_fault(line) if outcome.line_fault is not None else None
        if fault is not None and fault.status_code is not None:
            return fault.status_code, fault.body, request_id
        url = _v1(line["url"])
        record = RecordedRequest(
            method="POST",
            path=url,
            query={},
            headers={},
            body=body,
            deployment=body.get("model") if azure else None,
            request_id=request_id,
        )
        handlers: dict[str, Callable[[RecordedRequest], dict[str, Any]] | None] = {
            "/v1/chat/completions": owner._chat,
            "/v1/embeddings": owner._embeddings,
            "/v1/responses": getattr(owner, "_responses", None),
        }
        handler = handlers.get(url)
        if handler is None:
            return 404, _error_body(f"Invalid URL (POST {line['url']})", "invalid_request_error"), request_id
        try:
            return 200, handler(record), request_id
        except _RequestError as exc:
            return exc.response.status, exc.response.body, request_id
        except Exception:
            logger.exception("test server: a handler failed for batch line %s", line.get("custom_id"))
            return 500, _error_body("The test server's handler raised; see the log.", "server_error"), request_id


def _lifetime(anchor: Any, seconds: Any, param: str) -> int:
    """Check an expiry policy (``anchor`` created_at, 3600 to 2592000 seconds) and return its seconds."""
    if anchor != "created_at":
        raise _RequestError(400, f"'{param}.anchor' must be 'created_at'.", "invalid_value", f"{param}.anchor")
    try:
        value = int(seconds)
    except (TypeError, ValueError):
        raise _RequestError(400, f"'{param}.seconds' must be an integer.", "invalid_value", f"{param}.seconds") from None
    if not 3600 <= value <= 2_592_000:
        raise _RequestError(400, f"'{param}.seconds' must be between 3600 and 2592000.", "invalid_value", f"{param}.seconds")
    return value


def _required_str(body: dict[str, Any], name: str) -> str:
    """``body[name]``, a non-empty str, or the API's 400 for a missing parameter."""
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise _RequestError(400, f"Missing required parameter: '{name}'.", "missing_required_parameter", name)
    return value


def _v1(url: str) -> str:
    """``/chat/completions`` (Azure's spelling) as ``/v1/chat/completions``; other URLs unchanged."""
    return url if url.startswith("/v1/") else "/v1" + url if url.startswith("/") else url


def _read_batch_lines(content: bytes, endpoint: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Validate a batch input file as OpenAI does: (the lines, the errors that fail the batch)."""
    lines: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    models: set[str] = set()
    for number, raw in enumerate(content.splitlines(), start=1):
        if not raw.strip():
            continue

        def bad(code: str, message: str, param: str | None = None, line: int = number) -> None:
            errors.append({"code": code, "message": message, "param": param, "line": line})

        try:
            line = json.loads(raw)
        except ValueError:
            bad("invalid_json_line", "This line is not parseable as valid JSON.")
            continue
        if not isinstance(line, dict):
            bad("invalid_json_line", "Each line must be a JSON object.")
            continue
        custom_id = line.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            bad("missing_required_parameter", "Missing required parameter: 'custom_id'.", "custom_id")
        elif custom_id in seen:
            bad("duplicate_custom_id", f"The custom_id for this request is a duplicate of another request: {custom_id}", "custom_id")
        else:
            seen.add(custom_id)
        if line.get("method") != "POST":
            bad("invalid_value", "Only POST is supported for batch requests.", "method")
        if not isinstance(line.get("url"), str) or _v1(line["url"]) != _v1(endpoint):
            bad("mismatched_url", f"The url of this request does not match the batch endpoint {endpoint}.", "url")
        body = line.get("body")
        if not isinstance(body, dict):
            bad("missing_required_parameter", "Missing required parameter: 'body'.", "body")
            continue
        model = body.get("model")
        if not isinstance(model, str) or not model:
            bad("missing_required_parameter", "Missing required parameter: 'body.model'.", "body.model")
        else:
            models.add(model)
        lines.append(line)
    if not lines and not errors:
        errors.append({"code": "empty_file", "message": "The batch input file is empty.", "param": None, "line": None})
    if len(lines) > _BATCH_MAX_LINES:
        message = f"A batch holds at most {_BATCH_MAX_LINES} requests; this file has {len(lines)}."
        errors.append({"code": "too_many_requests", "message": message, "param": None, "line": None})
    if len(models) > 1:
        message = "Every request of a batch must use the same model."
        errors.append({"code": "model_mismatch", "message": message, "param": "body.model", "line": None})
    return lines, errors


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until Ctrl-C: ``python -m llmutils.testing --port 8000 [--latency 0.05]``."""
    parser = argparse.ArgumentParser(
        prog="python -m llmutils.testing",
        description="Run a local fake of the OpenAI / Azure OpenAI HTTP API.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds to wait before each answer")
    parser.add_argument("--api-key", default=None, help="require this API key (401 otherwise)")
    parser.add_argument("--keep-requests", type=int, default=100, help="recent requests kept in memory (default 100)")
    parser.add_argument("--batch-polls", type=int, default=1, metavar="N", help="Batch API: polls before a batch ends (default 1)")
    args = parser.parse_args(argv)
    server = OpenAITestServer(
        host=args.host, port=args.port, latency=args.latency, api_key=args.api_key, keep_requests=args.keep_requests
    )
    server.batch_api.polls = max(1, args.batch_polls)
    try:
        server.start()
    except OSError as exc:
        parser.exit(1, f"cannot listen on {args.host}:{args.port}: {exc}\n")
    print(f"serving at {server.base_url} (Azure: {server.azure_endpoint}); Ctrl-C to stop", flush=True)
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
