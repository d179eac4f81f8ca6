"""Chat completions (``POST /chat/completions``): the request body and what the caller gets back.

Pure functions: :func:`build_chat_request` turns the settings and a call's arguments into the body
sent; :func:`check_chat_response` tells whether a decoded answer is usable (run inside each retried
attempt, so a malformed 200 is retried and never cached); :func:`read_chat_response` turns it into
the message dict(s) :meth:`~llmutils.OpenAIClient.send_message` returns.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from .._exceptions import ContentFilterError, NonTerminalError

__all__ = [
    "PATH",
    "KIND",
    "SAMPLING_PARAMS",
    "is_reasoning_model",
    "build_chat_request",
    "check_chat_response",
    "read_chat_response",
]

logger = logging.getLogger("llmutils")

PATH = "/chat/completions"
KIND = "chat"

# Parameters reasoning models (o1, o3, o4, gpt-5) reject.
SAMPLING_PARAMS = ("temperature", "top_p", "frequency_penalty", "presence_penalty", "max_tokens")
_REASONING_MODEL = re.compile(r"^(o\d|gpt-5)(?!.*-chat)", re.IGNORECASE)

Message = dict[str, Any]


def is_reasoning_model(model: str, configured: str | None = None) -> bool:
    """Whether ``model`` takes reasoning parameters (o1/o3/o4/gpt-5 families, or the configured one)."""
    return model == configured or bool(_REASONING_MODEL.match(model))


def build_chat_request(
    settings: Mapping[str, Any],
    messages: list[Message],
    *,
    model: str | None = None,
    temperature: float | None = None,
    max_tokens: int | None = None,
    top_p: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    stop: str | list[str] | None = None,
    n: int = 1,
    more: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON body of a chat completion request.

    Unset arguments (None) come from ``settings``; ``more`` is passed as is and wins. For a
    reasoning model (``MODEL_ALIASES`` maps an Azure deployment to its model) the sampling
    parameters are left out and ``max_completion_tokens``/``reasoning_effort`` are sent instead.
    """
    extra = dict(more or {})
    model = model or settings["MODEL"]
    params: dict[str, Any] = {"model": model, "messages": messages}
    if is_reasoning_model(settings["MODEL_ALIASES"].get(model, model), settings["REASONING_MODEL"]):
        budget = extra.pop("max_completion_tokens", None) or max_tokens or settings["MAX_COMPLETION_TOKENS"]
        if budget is not None:
            params["max_completion_tokens"] = budget
        effort = extra.pop("reasoning_effort", None) or settings["REASONING_EFFORT"]
        if effort is not None:
            params["reasoning_effort"] = effort
        given = (temperature, top_p, frequency_penalty, presence_penalty)
        ignored = [name for name, value in zip(SAMPLING_PARAMS, given) if value is not None]
        if ignored:
            logger.debug("llmutils: %s is a reasoning model; not sending %s", model, ", ".join(ignored))
    else:
        for name, value, key in (
            ("temperature", temperature, "TEMPERATURE"),
            ("top_p", top_p, "TOP_P"),
            ("frequency_penalty", frequency_penalty, "FREQ_PENALTY"),
            ("presence_penalty", presence_penalty, "PRESENCE_PENALTY"),
        ):
            value = settings[key] if value is None else value
            if value is not None:
                params[name] = value
        if "max_completion_tokens" not in extra:
            budget = settings["MAX_TOKENS"] if max_tokens is None else max_tokens
            if budget is not None:
                params["max_tokens"] = budget
    if stop is not None:
        params["stop"] = stop
    if n != 1:
        params["n"] = n
    params.update(extra)
    return params


def check_chat_response(body: Mapping[str, Any]) -> None:
    """A chat completion must have choices with a message each; a filtered answer is terminal."""
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        raise NonTerminalError("the response has no choices")
    for choice in choices:
        if not isinstance(choice, Mapping) or not isinstance(choice.get("message"), Mapping):
            raise NonTerminalError("a choice in the response has no message")
        if choice.get("finish_reason") == "content_filter" and not choice["message"].get("content"):
            raise ContentFilterError("The answer was withheld by the content filter (finish_reason=content_filter)")


def read_chat_response(response: Mapping[str, Any], n: int) -> Message | list[Message]:
    """The assistant message dict(s) of a chat completion (new dicts: the response is never shared)."""
    check_chat_response(response)  # also for entries stored by older versions
    messages = []
    for choice in sorted(response["choices"], key=lambda c: c.get("index", 0)):
        message = choice["message"]
        cleaned = {k: v for k, v in message.items() if v is not None}
        cleaned.setdefault("role", "assistant")
        cleaned.setdefault("content", None)
        messages.append(cleaned)
    if n == 1:
        return messages[0]
    return messages
