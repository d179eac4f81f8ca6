"""The Batch API's files: build the JSONL request lines, split them into files, read result lines back.

Pure functions, testable without a server. An input line is::

    {"custom_id": "<the request's cache key>", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

and each line of the output and error files is::

    {"id": "batch_req_...", "custom_id": "...", "response": {"status_code": 200, "request_id": "...",
     "body": {...}} or null, "error": {"code": "...", "message": "..."} or null}

One batch takes at most :data:`MAX_REQUESTS` lines and :data:`MAX_FILE_BYTES` bytes, all for one
model (OpenAI and Azure both refuse a file that mixes models), so :func:`build_input_files` groups
the requests by model and splits each group at those limits (parameters, so tests can use small
ones). Azure's api-version paths spell the URL without ``/v1`` (``/chat/completions``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .._exceptions import InvalidRequestError

__all__ = [
    "BATCH_URLS",
    "MAX_FILE_BYTES",
    "MAX_REQUESTS",
    "InputFile",
    "LineResult",
    "batch_url",
    "build_input_files",
    "read_results",
    "request_line",
]

logger = logging.getLogger("llmutils")

#: Requests one batch input file may hold (OpenAI and Azure).
MAX_REQUESTS = 50_000
#: Bytes one batch input file may hold: 200 MB, counted in decimal megabytes to stay on the safe side.
MAX_FILE_BYTES = 200_000_000
#: The request URL of each API a batch can run, as OpenAI spells it.
BATCH_URLS: Mapping[str, str] = {
    "chat": "/v1/chat/completions",
    "responses": "/v1/responses",
    "embeddings": "/v1/embeddings",
}

_LINE_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def batch_url(api: str, *, azure: bool = False) -> str:
    """The ``url`` of the lines (and the ``endpoint`` of the batch) for ``api`` (chat, responses, embeddings).

    Azure's api-version paths take ``/chat/completions``; OpenAI (and Azure's ``/openai/v1``) take
    ``/v1/chat/completions``.
    """
    try:
        url = BATCH_URLS[api]
    except KeyError:
        raise InvalidRequestError(f"the Batch API runs {', '.join(BATCH_URLS)} requests, not {api!r}") from None
    return url.removeprefix("/v1") if azure else url


def request_line(custom_id: str, url: str, body: Mapping[str, Any]) -> bytes:
    """One JSONL input line (newline included) for a request."""
    try:
        text = _LINE_JSON({"custom_id": custom_id, "method": "POST", "url": url, "body": body})
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"the request {custom_id} cannot be written as JSON: {exc}") from None
    return text.encode("utf-8") + b"\n"


@dataclass(frozen=True)
class InputFile:
    """One batch input file: its bytes, the custom ids (cache keys) it holds in order, and its model."""

    content: bytes
    keys: tuple[str, ...]
    model: str


def build_input_files(
    requests: Iterable[tuple[str, Mapping[str, Any]]],
    url: str,
    *,
    max_requests: int = MAX_REQUESTS,
    max_bytes: int = MAX_FILE_BYTES,
) -> list[InputFile]:
    """Group ``(custom_id, body)`` pairs by model and split each group into files within the limits.

    Order is kept within a model. Raises :class:`InvalidRequestError` for a custom id given twice
    (a batch refuses duplicates) or a single request larger than ``max_bytes``.
    """
    if max_requests < 1 or max_bytes < 1:
        raise InvalidRequestError(f"batch file limits must be >= 1, got max_requests={max_requests}, max_bytes={max_bytes}")
    groups: dict[str, list[tuple[str, bytes]]] = {}
    seen: set[str] = set()
    for custom_id, body in requests:
        if custom_id in seen:
            raise InvalidRequestError(f"custom_id {custom_id!r} is given twice; each line of a batch needs its own")
        seen.add(custom_id)
        line = request_line(custom_id, url, body)
        if len(line) > max_bytes:
            raise InvalidRequestError(
                f"the request {custom_id} is {len(line)} bytes, more than a batch file may hold ({max_bytes}); send it live"
            )
        groups.setdefault(str(body.get("model")), []).append((custom_id, line))
    files: list[InputFile] = []
    for model, lines in groups.items():
        chunk: list[tuple[str, bytes]] = []
        size = 0
        for custom_id, line in lines:
            if chunk and (len(chunk) >= max_requests or size + len(line) > max_bytes):
                files.append(InputFile(b"".join(x[1] for x in chunk), tuple(x[0] for x in chunk), model))
                chunk, size = [], 0
            chunk.append((custom_id, line))
            size += len(line)
        if chunk:
            files.append(InputFile(b"".join(x[1] for x in chunk), tuple(x[0] for x in chunk), model))
    return files


@dataclass(frozen=True)
class LineResult:
    """One line of a batch output or error file.

    ``status_code``, ``body`` and ``request_id`` come from ``response`` (None when the request got
    no HTTP answer); ``error_code`` and ``error_message`` from ``error`` (set for requests the batch
    never ran: ``batch_expired``, ``batch_cancelled``), or from the body of an HTTP error.
    """

    custom_id: str
    status_code: int | None = None
    body: Any = None
    request_id: str | None = None
    error_code: str | None = None
    error_message: str | None = None

    @property
    def ok(self) -> bool:
        """True when the request was answered with HTTP 200 and a JSON object."""
        return self.status_code == 200 and isinstance(self.body, dict)


def _line_result(record: Mapping[str, Any]) -> LineResult | None:
    custom_id = record.get("custom_id")
    if not isinstance(custom_id, str):
        return None
    response = record.get("response")
    error = record.get("error")
    status_code = body = request_id = code = message = None
    if isinstance(response, Mapping):
        status_code = response.get("status_code") if isinstance(response.get("status_code"), int) else None
        body = response.get("body")
        request_id = response.get("request_id") if isinstance(response.get("request_id"), str) else None
        if isinstance(body, Mapping) and isinstance(body.get("error"), Mapping):
            code = body["error"].get("code")
            message = body["error"].get("message")
    if isinstance(error, Mapping):
        code = error.get("code", code)
        message = error.get("message", message)
    return LineResult(
        custom_id=custom_id,
        status_code=status_code,
        body=body,
        request_id=request_id,
        error_code=str(code) if code is not None else None,
        error_message=str(message) if message is not None else None,
    )


def read_results(*contents: bytes | str | None) -> dict[str, LineResult]:
    """Read output and error files (JSONL) into ``{custom_id: LineResult}``.

    A line that is not JSON or has no ``custom_id`` is skipped (logged at DEBUG); its request then
    counts as not answered. When a custom id appears twice, a successful line wins.
    """
    results: dict[str, LineResult] = {}
    for content in contents:
        if not content:
            continue
        text = content.decode("utf-8", "replace") if isinstance(content, bytes) else content
        for number, raw in enumerate(text.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError:
                logger.debug("batch result line %d is not JSON; skipped", number)
                continue
            result = _line_result(record) if isinstance(record, Mapping) else None
            if result is None:
                logger.debug("batch result line %d has no custom_id; skipped", number)
                continue
            known = results.get(result.custom_id)
            if known is None or (result.ok and not known.ok):
                results[result.custom_id] = result
    return results
