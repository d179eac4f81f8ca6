"""The project's one llmutils client (shared by every request thread) and its error mapping.

Views use ``llm.client`` at call time, so tests (or a ``ready()`` hook) can replace it.
"""

from __future__ import annotations

import logging
import os

import llmutils

__all__ = ["client", "error_response", "make_client"]

logger = logging.getLogger(__name__)


def make_client() -> llmutils.OpenAIClient:
    """A client from llmutils' configuration with the cache on; offline mock when nothing is configured.

    ``API_TYPE`` ``openai`` (the default) with neither ``OPENAI_API_KEY`` nor a base URL has
    nothing to call, so the ``MockClient`` answers instead.
    """
    settings = llmutils.OpenAIClient().settings()  # config.ini and the environment, read once
    api_type = settings["API_TYPE"]
    if api_type == "openai" and not settings["BASE_URL"] and not os.environ.get("OPENAI_API_KEY"):
        api_type = "mock"
        logger.info("no OPENAI_API_KEY or base URL configured: answering with the offline mock client")
    classes = {"openai": llmutils.OpenAIClient, "azure": llmutils.AzureClient, "mock": llmutils.MockClient}
    if api_type not in classes:
        raise llmutils.ConfigError(f"API_TYPE {api_type!r}: this example knows openai, azure and mock")
    return classes[api_type](cache_api_calls=True)


client: llmutils.OpenAIClient = make_client()

_UNAVAILABLE = "The model is unavailable; try again later."
_MISCONFIGURED = "The model service is not configured correctly."

# (exception class, status, code, public message); the first match wins, so subclasses first.
_ERRORS: list[tuple[type[llmutils.LLMUtilsError], int, str, str]] = [
    (llmutils.TotalTimeoutError, 504, "model_timeout", "The model did not answer in time."),
    (llmutils.RetriesExhaustedError, 503, "model_unavailable", _UNAVAILABLE),
    (llmutils.NonTerminalError, 503, "model_unavailable", _UNAVAILABLE),
    (llmutils.AuthenticationError, 503, "model_misconfigured", _MISCONFIGURED),
    (llmutils.QuotaExceededError, 503, "model_unavailable", _UNAVAILABLE),
    (llmutils.CacheMissError, 503, "model_unavailable", _UNAVAILABLE),
    (llmutils.ConfigError, 503, "model_misconfigured", _MISCONFIGURED),
    (llmutils.ContentFilterError, 400, "content_filter", "The prompt was refused by the content filter."),
    (llmutils.InvalidRequestError, 400, "invalid_request", "The model rejected this request."),
]


def error_response(exc: llmutils.LLMUtilsError) -> tuple[int, dict[str, str]]:
    """The HTTP status and public JSON body for an llmutils error (details go to the log only)."""
    for kind, status, code, message in _ERRORS:
        if isinstance(exc, kind):
            return status, {"error": message, "code": code}
    return 502, {"error": "The model call failed.", "code": "model_error"}
