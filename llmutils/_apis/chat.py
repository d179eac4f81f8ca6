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
from typing import Any, Literal, overload

from .._config import UNSET
from .._exceptions import ContentFilterError, NonTerminalError

__all__ = [
    "KIND",
    "PATH",
    "SAMPLING_PARAMS",
    "build_chat_request",
    "check_chat_response",
    "fewer_choices",
    "is_reasoning_model",
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
    temperature: Any = UNSET,
    max_tokens: Any = UNSET,
    top_p: Any = UNSET,
    frequency_penalty: Any = UNSET,
    presence_penalty: Any = UNSET,
    stop: str | list[str] | None = None,
    n: int = 1,
    more: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON body of a chat completion request: only what is set is sent.

    A sampling argument left :data:`~llmutils._config.UNSET` takes its setting (``TEMPERATURE``,
    ``TOP_P``, ``FREQ_PENALTY``, ``PRESENCE_PENALTY``, ``MAX_TOKENS``, all unset by default); an
    argument or setting that is None is not sent, so ``temperature=None`` turns a configured
    temperature off. A plain call's body is exactly ``{"model", "messages"}``. ``more`` is passed as
    is and wins, except that a None there is not sent either (``tools=None`` sends no ``"tools":
    null``; ``reasoning_effort=None`` / ``max_completion_tokens=None`` turn the setting off).

    For a reasoning model (its name, ``REASONING_MODEL``, or what ``MODEL_ALIASES`` says a gateway
    alias or Azure deployment is) the output budget is sent as ``max_completion_tokens``
    (``MAX_COMPLETION_TOKENS``, or the call's ``max_tokens``) with ``reasoning_effort``; the
    sampling parameters are left out, except with effort ``"none"``, which accepts them (gpt-5.1
    and later).
    """
    given = dict(more or {})
    extra = {name: value for name, value in given.items() if value is not None}
    model = model or settings["MODEL"]
    params: dict[str, Any] = {"model": model, "messages": messages}
    sampling = {
        name: settings[key] if value is UNSET else value
        for name, value, key in (
            ("temperature", temperature, "TEMPERATURE"),
            ("top_p", top_p, "TOP_P"),
            ("frequency_penalty", frequency_penalty, "FREQ_PENALTY"),
            ("presence_penalty", presence_penalty, "PRESENCE_PENALTY"),
        )
    }
    wanted = {name: value for name, value in sampling.items() if value is not None}
    if is_reasoning_model(settings["MODEL_ALIASES"].get(model, model), settings["REASONING_MODEL"]):
        if "max_completion_tokens" in given:
            budget = extra.pop("max_completion_tokens", None)
        else:
            budget = settings["MAX_COMPLETION_TOKENS"] if max_tokens is UNSET else max_tokens
        if budget is not None:
            params["max_completion_tokens"] = budget
        effort = extra.pop("reasoning_effort", None) if "reasoning_effort" in given else settings["REASONING_EFFORT"]
        if effort is not None:
            params["reasoning_effort"] = effort
        if effort == "none":
            params.update(wanted)
        elif wanted:
            logger.debug(
                "%s is a reasoning model (effort %s); not sending %s", model, effort, ", ".join(wanted)
            )
    else:
        params.update(wanted)
        if "max_completion_tokens" not in extra:
            budget = settings["MAX_TOKENS"] if max_tokens is UNSET else max_tokens
            if budget is not None:
                params["max_tokens"] = budget
    if stop is not None:
        params["stop"] = stop
    if n != 1:
        params["n"] = n
    params.update(extra)
    return params


def fewer_choices(response: Mapping[str, Any], n: int) -> int | None:
    """How many choices came when fewer than ``n`` did (servers such as llama.cpp ignore ``n``), else None."""
    choices = response.get("choices")
    count = len(choices) if isinstance(choices, list) else 0
    return count if count < n else None


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


@overload
def read_chat_response(response: Mapping[str, Any], n: Literal[1]) -> Message: ...
@overload
def read_chat_response(response: Mapping[str, Any], n: int) -> Message | list[Message]: ...


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
