"""Every exception llmutils raises, under one base class.

The tree::

    LLMUtilsError
    ├── ConfigError (ValueError)            a bad config key, value or file
    ├── InvalidRequestError (ValueError)    a request that can never succeed; never retried
    │   ├── AuthenticationError             HTTP 401/403, or no key configured
    │   ├── ContentFilterError              the provider's content filter refused the request
    │   ├── QuotaExceededError              HTTP 429 with code ``insufficient_quota``
    │   └── CacheMissError                  replay mode and the answer is not in the cache
    ├── NonTerminalError                    a failure that a retry may fix (429, 408, 409, 5xx,
    │   │                                   timeouts, connection errors, a 200 that is not JSON)
    │   ├── RateLimitError                  HTTP 429
    │   └── StreamInterruptedError          a stream broke or stalled after content arrived;
    │                                       ``partial_text`` holds what came; never retried
    ├── MalformedResponseError              an answer wrong the same way on every attempt
    │                                       (1 embedding for 3 inputs); never retried
    ├── RetriesExhaustedError               every attempt failed; ``attempts`` and the last
    │   │                                   error (``__cause__``) tell why
    │   └── TotalTimeoutError               the ``total_timeout`` bound ran out first
    ├── BatchAPIError                       the Batch API gave a request no answer (its batch failed,
    │                                       expired or was cancelled); ``batch_id`` names the batch
    ├── TemplateError                       a prompt template is missing, broken or under-filled
    ├── NotAttemptedError                   a batch stopped early (fail fast) before sending this item
    └── OutputParseError (ValueError)       a model answer could not be coerced to ``output_type``

Every error made from an HTTP answer carries what the server said: ``status_code``, ``code``,
``type``, ``param`` (from the error body, as strings, as the openai SDK reads them), ``request_id``
(``x-request-id``, else LiteLLM's ``x-litellm-call-id``, else Azure's ``apim-request-id``) and the
response ``headers`` (lower-case names). ``retryable`` says whether the retry policy tries again:
by default a :class:`NonTerminalError` is retried and nothing else is, but for an HTTP answer the
server decides as the openai SDK lets it (``x-should-retry``; a wait over 120 s is not retried).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "AuthenticationError",
    "BatchAPIError",
    "CacheMissError",
    "ConfigError",
    "ContentFilterError",
    "InvalidRequestError",
    "LLMUtilsError",
    "MalformedResponseError",
    "NonTerminalError",
    "NotAttemptedError",
    "OutputParseError",
    "QuotaExceededError",
    "RateLimitError",
    "RetriesExhaustedError",
    "StreamInterruptedError",
    "TemplateError",
    "TotalTimeoutError",
]


class LLMUtilsError(Exception):
    """Base class of every error llmutils raises.

    ``status_code``, ``code``, ``type``, ``param``, ``request_id`` and ``headers`` are set when an
    HTTP response caused the error (None and ``{}`` otherwise); ``attempts`` is the number of HTTP
    attempts made when the error was raised; ``retryable`` whether the retry policy retries it.
    """

    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        request_id: str | None = None,
        attempts: int | None = None,
        code: str | None = None,
        type: str | None = None,  # noqa: A002 - the name the API and the openai SDK use
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
        retryable: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.request_id = request_id
        self.attempts = attempts
        self.code = code
        self.type = type
        self.param = param
        self.headers: Mapping[str, str] = dict(headers or {})
        if retryable is not None:
            self.retryable = retryable

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle without calling ``__init__`` again (some take keyword-only arguments), so an
        error can come back from a process pool or a Dask worker with its attributes."""
        return (_restore, (type(self), self.args), self.__dict__)


def _restore(cls: type[LLMUtilsError], args: tuple[Any, ...]) -> LLMUtilsError:
    """Unpickle an :class:`LLMUtilsError`: the instance without ``__init__``; its ``__dict__`` follows."""
    error = cls.__new__(cls, *args)
    error.args = args
    return error


class ConfigError(LLMUtilsError, ValueError):
    """A configuration key, value or file is wrong."""


class InvalidRequestError(LLMUtilsError, ValueError):
    """The request can never succeed as sent (bad input, HTTP 400/404/422); it is not retried."""


class AuthenticationError(InvalidRequestError):
    """The endpoint rejected the credentials (HTTP 401/403), or none were configured."""


class ContentFilterError(InvalidRequestError):
    """The provider's content filter refused the prompt or the answer."""


class QuotaExceededError(InvalidRequestError):
    """HTTP 429 with ``insufficient_quota``: the account is out of credit, so waiting cannot help."""


class CacheMissError(InvalidRequestError):
    """The cache is in replay mode and holds no answer for this request; nothing was sent."""


class NonTerminalError(LLMUtilsError):
    """A failure that may pass if the request is tried again (429, 408, 409, 5xx, timeouts).

    ``retry_after`` is the wait the server asked for, in seconds, when it did.
    """

    retryable = True

    def __init__(self, message: str, *, retry_after: float | None = None, **context: Any) -> None:
        super().__init__(message, **context)
        self.retry_after = retry_after


class RateLimitError(NonTerminalError):
    """HTTP 429: the provider asks the client to slow down."""


class StreamInterruptedError(NonTerminalError):
    """A stream broke, stalled or failed after content was yielded; ``partial_text`` is what came."""

    def __init__(self, message: str, *, partial_text: str = "", **context: Any) -> None:
        super().__init__(message, **context)
        self.partial_text = partial_text


class MalformedResponseError(LLMUtilsError):
    """The server answered, wrongly the same way every time (e.g. 1 embedding for 3 inputs); not retried."""


class RetriesExhaustedError(LLMUtilsError):
    """Every attempt failed with a retryable error; the last one is chained as ``__cause__``."""


class TotalTimeoutError(RetriesExhaustedError):
    """The ``total_timeout`` of one call ran out before an attempt succeeded."""


class TemplateError(LLMUtilsError):
    """A prompt template could not be found, parsed or rendered."""


class NotAttemptedError(LLMUtilsError):
    """A batch stopped early (every request would have failed) before sending this item; ``reason`` says why."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class OutputParseError(LLMUtilsError, ValueError):
    """A model's answer could not be coerced to the requested ``output_type``; ``raw`` holds it."""

    def __init__(self, message: str, *, raw: str | None = None) -> None:
        super().__init__(message)
        self.raw = raw


class BatchAPIError(LLMUtilsError):
    """A request sent through the Batch API got no answer: its batch failed, expired or was cancelled."""

    def __init__(self, message: str, *, batch_id: str | None = None, **context: Any) -> None:
        super().__init__(message, **context)
        self.batch_id = batch_id
