"""What an HTTP answer says: whether to retry it, how long the server asked us to wait, and the
error fields callers branch on.

Pure functions of a status code, the response headers and the decoded body, so every rule is
tested without a server. The rules are openai-python's (``_base_client.py``: ``_should_retry``,
``_parse_retry_after_header``, ``_calculate_retry_timeout``), plus what gateways do to them:

1. A server wait longer than :data:`SDK_MAX_RETRY_AFTER` (120 s) is not retried at all.
2. ``x-should-retry: true`` / ``false`` is obeyed before the status code.
3. Otherwise 408, 409, 429 and every 5xx are retried, anything else is not.
4. The server's wait is ``retry-after-ms``, else ``Retry-After`` in seconds (a float is allowed)
   or as an HTTP-date. When neither header is there, LiteLLM's ``llm_provider-retry-after-ms`` /
   ``llm_provider-retry-after`` (the provider's headers, forwarded under a prefix) are read the
   same way. A 429 with none of them falls back to OpenAI's ``x-ratelimit-reset-requests`` /
   ``-tokens`` durations (``6m0s``, ``12ms``, ``1.5s``). LiteLLM forwards ``x-should-retry`` and
   the ``x-ratelimit-*`` headers under the same prefix; a plain header always wins.
5. A wait is used only when it is finite and in ``(0, 120]``; 0, a negative or past date, NaN and
   infinity mean "back off as usual". A number too large for a float (``1e400``) is a wait past
   the ceiling, not infinity.
6. An exhausted quota is recognised by its code, its type **or** its message, because LiteLLM
   rewrites OpenAI's ``insufficient_quota`` to ``"type": "throttling_error", "code": "429"`` and
   keeps only the message.
"""

from __future__ import annotations

import email.utils
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, TypeGuard, TypeVar

if TYPE_CHECKING:
    from ._exceptions import LLMUtilsError

E = TypeVar("E", bound="LLMUtilsError")

__all__ = [
    "RETRYABLE_STATUS",
    "SDK_INITIAL_RETRY_DELAY",
    "SDK_MAX_RETRY_AFTER",
    "SDK_MAX_RETRY_DELAY",
    "HttpErrorInfo",
    "RetryDecision",
    "answer_context",
    "error_fields",
    "is_quota_exhausted",
    "is_validation_error",
    "lower_headers",
    "parse_duration",
    "parse_retry_after",
    "rate_limit_reset",
    "request_id_from",
    "retry_decision",
    "server_retry_after",
    "should_retry",
    "usable_wait",
    "with_answer",
]

SDK_MAX_RETRY_AFTER = 120.0
"""The longest server wait openai-python honours (``MAX_RETRY_AFTER_DELAY``); longer is not retried."""
SDK_INITIAL_RETRY_DELAY = 0.5
"""openai-python's first backoff wait (``INITIAL_RETRY_DELAY``)."""
SDK_MAX_RETRY_DELAY = 8.0
"""openai-python's cap on one backoff wait (``MAX_RETRY_DELAY``)."""
RETRYABLE_STATUS = frozenset({408, 409, 429})
"""Status codes below 500 that are retried (request timeout, lock conflict, rate limit)."""

# Headers that carry a request id, in the order they are trusted: OpenAI and most servers,
# then LiteLLM's call id, then Azure API Management's.
_REQUEST_ID_HEADERS = ("x-request-id", "x-litellm-call-id", "apim-request-id")
# (milliseconds header, seconds header) pairs, plain first, then LiteLLM's forwarded copies.
_WAIT_HEADERS = (
    ("retry-after-ms", "retry-after"),
    ("llm_provider-retry-after-ms", "llm_provider-retry-after"),
)
_FORWARDED = "llm_provider-"
_INFINITY_LITERALS = frozenset({"inf", "+inf", "infinity", "+infinity"})
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|us|µs|ns|h|m|s)")
_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_PYDANTIC_ERROR = re.compile(r"'loc':\s*[\(\[]")
_QUOTA_WORDS = ("insufficient_quota",)
_QUOTA_MESSAGES = (
    "exceeded your current quota",
    "insufficient_quota",
    "check your plan and billing",
)


def _plain_or_forwarded(headers: Mapping[str, str], name: str) -> str | None:
    """Header ``name``, else LiteLLM's forwarded copy ``llm_provider-<name>`` (``headers`` lower-cased)."""
    value = headers.get(name)
    return value if value is not None else headers.get(_FORWARDED + name)


def lower_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """Return ``headers`` as a plain dict with lower-case names (HTTP names are case-insensitive)."""
    if not headers:
        return {}
    return {str(name).lower(): str(value) for name, value in headers.items()}


def _parse_pair(headers: Mapping[str, str], ms_name: str, seconds_name: str) -> float | None:
    """openai-python's ``_parse_retry_after_header`` over one (ms, seconds) header pair."""
    for name, divisor in ((ms_name, 1000.0), (seconds_name, 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            delay = float(value)
        except ValueError:
            continue
        if delay == math.inf and value.strip().lower() not in _INFINITY_LITERALS:
            return SDK_MAX_RETRY_AFTER + 1  # an overflowing number is a huge wait, not a bad literal
        return delay / divisor
    text = headers.get(seconds_name)
    if text is None:
        return None
    try:
        parsed = email.utils.parsedate_tz(text)
        if parsed is None:
            return None
        moment = email.utils.mktime_tz(parsed)
    except (TypeError, ValueError, OverflowError, OSError):
        return None
    return float(moment - time.time())


def parse_retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds the plain ``retry-after-ms`` / ``Retry-After`` headers ask for, exactly as the SDK reads them.

    ``retry-after-ms`` wins, then ``Retry-After`` as a number of seconds (floats allowed), then
    ``Retry-After`` as an HTTP-date (the result may be negative for a past date). None when
    neither header is there or parses. The value is not judged here: see :func:`usable_wait`.
    """
    return _parse_pair(lower_headers(headers), *_WAIT_HEADERS[0])


def server_retry_after(headers: Mapping[str, str] | None) -> float | None:
    """The server's wait in seconds: the plain headers, else LiteLLM's ``llm_provider-`` copies.

    The forwarded copies are read only when neither plain header is present at all, so a gateway
    that sends its own ``Retry-After`` is the one obeyed.
    """
    lowered = lower_headers(headers)
    for ms_name, seconds_name in _WAIT_HEADERS:
        if ms_name in lowered or seconds_name in lowered:
            return _parse_pair(lowered, ms_name, seconds_name)
    return None


def parse_duration(text: str | None) -> float | None:
    """Seconds in a Go-style duration as OpenAI's ``x-ratelimit-reset-*`` headers send it.

    ``"6m0s"`` is 360.0, ``"12ms"`` is 0.012, ``"1.5s"`` is 1.5, ``"1h2m3s"`` is 3723.0; a bare
    number is seconds. None for anything else (empty, negative, unknown unit).
    """
    if text is None:
        return None
    value = text.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    position = 0
    total = 0.0
    for match in _DURATION_PART.finditer(value):
        if match.start() != position:
            return None
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    if position == 0 or position != len(value):
        return None
    return total


def rate_limit_reset(headers: Mapping[str, str] | None) -> float | None:
    """Seconds until the exhausted OpenAI rate limit resets, from ``x-ratelimit-reset-*``.

    The limit whose ``x-ratelimit-remaining-*`` is ``0`` is the one that was hit; when that is not
    said, the sooner of the two resets is taken (the earliest moment a retry can pass). None when
    no reset header parses.
    """
    lowered = lower_headers(headers)
    resets: dict[str, float] = {}
    for limit in ("requests", "tokens"):
        seconds = parse_duration(_plain_or_forwarded(lowered, f"x-ratelimit-reset-{limit}"))
        if seconds is not None:
            resets[limit] = seconds
    if not resets:
        return None
    exhausted = [
        s for limit, s in resets.items() if (_plain_or_forwarded(lowered, f"x-ratelimit-remaining-{limit}") or "").strip() == "0"
    ]
    return max(exhausted) if exhausted else min(resets.values())


def usable_wait(seconds: float | None) -> float | None:
    """``seconds`` if the SDK would wait that long (finite, in ``(0, 120]``), else None ("back off as usual")."""
    if seconds is None or not math.isfinite(seconds) or not 0 < seconds <= SDK_MAX_RETRY_AFTER:
        return None
    return seconds


def _too_long(seconds: float | None) -> TypeGuard[float]:
    return seconds is not None and math.isfinite(seconds) and seconds > SDK_MAX_RETRY_AFTER


def should_retry(status_code: int, headers: Mapping[str, str] | None = None) -> bool:
    """Whether the SDK retries a response with this status and these headers (``_should_retry``).

    A server wait past 120 s forbids it, then ``x-should-retry`` decides, then the status: 408,
    409, 429 and 5xx are retried. The forwarded ``llm_provider-`` waits count as the server's.
    """
    return retry_decision(status_code, headers).retry


class RetryDecision(NamedTuple):
    """What one HTTP error answer says about trying again.

    ``retry``: whether a retry may help. ``wait``: the seconds to wait before it, when the server
    said so usably (None: use the client's own backoff). ``asked``: the raw server wait, even when
    it was not usable (e.g. 300.0 for a ``Retry-After: 300`` that forbids the retry). ``reason``:
    one phrase for logs and error messages.
    """

    retry: bool
    wait: float | None
    asked: float | None
    reason: str


def retry_decision(status_code: int, headers: Mapping[str, str] | None = None) -> RetryDecision:
    """Decide whether and when to retry an HTTP error answer (see the module docstring for the rules)."""
    lowered = lower_headers(headers)
    asked = server_retry_after(lowered)
    if _too_long(asked):
        return RetryDecision(
            False, None, asked, f"the server asked to wait {asked:g} s, over the {SDK_MAX_RETRY_AFTER:g} s ceiling"
        )
    wait = usable_wait(asked)
    if wait is None and asked is None and status_code == 429:
        wait = usable_wait(rate_limit_reset(lowered))
    flag = _plain_or_forwarded(lowered, "x-should-retry")
    if flag == "true":
        return RetryDecision(True, wait, asked, "x-should-retry: true")
    if flag == "false":
        return RetryDecision(False, wait, asked, "x-should-retry: false")
    if status_code in RETRYABLE_STATUS or status_code >= 500:
        return RetryDecision(True, wait, asked, f"HTTP {status_code} is retryable")
    return RetryDecision(False, wait, asked, f"HTTP {status_code} is not retryable")


def request_id_from(headers: Mapping[str, str] | None) -> str | None:
    """The request id a support ticket needs: ``x-request-id``, else ``x-litellm-call-id``, else ``apim-request-id``."""
    lowered = lower_headers(headers)
    for name in _REQUEST_ID_HEADERS:
        value = lowered.get(name)
        if value:
            return value
    return None


def answer_context(status_code: int, headers: Mapping[str, str] | None) -> dict[str, Any]:
    """What every error made from an HTTP answer carries: ``status_code``, ``request_id`` (as
    :func:`request_id_from` finds it) and ``headers`` (lower-case names), as keyword arguments of
    the error classes."""
    lowered = lower_headers(headers)
    return {"status_code": status_code, "request_id": request_id_from(lowered), "headers": lowered}


def with_answer(error: E, context: Mapping[str, Any] | None) -> E:
    """Fill an :func:`answer_context` into ``error`` (raised while the answer was read or checked:
    a 200 with no choices, a failed Responses answer, a wrong embedding count) and return it.

    Fields the error already has are kept; ``context`` None (no HTTP answer: a cache hit, the
    mock) leaves the error as it is.
    """
    if context:
        if error.status_code is None:
            error.status_code = context.get("status_code")
        if error.request_id is None:
            error.request_id = context.get("request_id")
        if not error.headers:
            error.headers = dict(context.get("headers") or {})
    return error


def _text(value: Any) -> str | None:
    """A JSON scalar as the SDK keeps it (``code`` 429 becomes ``"429"``); None for anything else."""
    if value is None or isinstance(value, (dict, list)):
        return None
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


@dataclass(frozen=True)
class HttpErrorInfo:
    """The fields of an HTTP error answer that callers branch on, read as the SDK reads them.

    ``code``, ``type`` and ``param`` come from the ``error`` object of the body (or the body
    itself when it has none), as strings; ``message`` is the error's message (or the body's text);
    ``request_id`` follows :func:`request_id_from`; ``headers`` has lower-case names.
    """

    status_code: int
    message: str
    code: str | None = None
    type: str | None = None
    param: str | None = None
    request_id: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


def error_fields(status_code: int, headers: Mapping[str, str] | None, body: Any) -> HttpErrorInfo:
    """Read an error answer: ``body`` is the decoded JSON (any shape) or the raw text/bytes."""
    lowered = lower_headers(headers)
    data = body.get("error", body) if isinstance(body, Mapping) else body
    code = type_ = param = None
    message: str | None = None
    if isinstance(data, Mapping):
        code, type_, param = _text(data.get("code")), _text(data.get("type")), _text(data.get("param"))
        message = _text(data.get("message"))
        if message is None and isinstance(body, Mapping) and "detail" in body:  # FastAPI validation errors
            message = _text(body["detail"]) or _validation_summary(body["detail"])
    elif isinstance(data, str):
        message = data  # the SDK keeps an error that is a bare string as the message too
    elif isinstance(data, (bytes, bytearray)):
        message = bytes(data).decode("utf-8", "replace")
    if not message:
        message = f"HTTP {status_code} with no error message"
    return HttpErrorInfo(
        status_code=status_code,
        message=message.strip(),
        code=code,
        type=type_,
        param=param,
        request_id=request_id_from(lowered),
        headers=lowered,
    )


def _validation_summary(detail: Any) -> str | None:
    """One line from FastAPI's ``{"detail": [{"loc": [...], "msg": ...}]}``."""
    if not isinstance(detail, list):
        return None
    parts = []
    for item in detail:
        if isinstance(item, Mapping):
            where = ".".join(str(p) for p in item.get("loc") or ())
            parts.append(f"{where}: {item.get('msg')}" if where else str(item.get("msg")))
    return "; ".join(parts) or None


def is_quota_exhausted(info: HttpErrorInfo) -> bool:
    """Whether the error says the account is out of credit (waiting cannot help).

    OpenAI says so with ``code``/``type`` ``insufficient_quota``; LiteLLM rewrites both
    (``"type": "throttling_error", "code": "429"``) and keeps only the message, so the message
    counts too.
    """
    if info.code in _QUOTA_WORDS or info.type in _QUOTA_WORDS:
        return True
    message = info.message.lower()
    return any(words in message for words in _QUOTA_MESSAGES)


def is_validation_error(status_code: int, body: Any) -> bool:
    """Whether an answer is a request validation error, which fails the same way on every attempt.

    Two shapes: FastAPI's own ``{"detail": [{"loc": [...], "msg": ...}]}`` (any status), and
    llama-cpp-python's server, whose error route turns the same validation error into a **500**
    ``{"error": {"type": "internal_server_error", "message": "[{'type': 'missing', 'loc':
    ('body', 'messages'), 'msg': 'Field required', ...}]"}}``. The SDK retries the 500; it is not
    worth it.
    """
    if not isinstance(body, Mapping):
        return False
    detail = body.get("detail")
    if isinstance(detail, list) and detail and all(
        isinstance(item, Mapping) and "loc" in item and "msg" in item for item in detail
    ):
        return True
    if status_code < 500:
        return False
    error = body.get("error", body)  # the whole body, or the error object the SDK already took out
    message = error.get("message") if isinstance(error, Mapping) else None
    return isinstance(message, str) and bool(_PYDANTIC_ERROR.search(message)) and "'msg':" in message
