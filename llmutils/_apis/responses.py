"""The Responses API (``POST /v1/responses``): request building and answer reading, no I/O.

``send_message`` speaks Chat Completions to its callers whatever the endpoint. On the Responses API
its chat-shaped request body is turned into a Responses body by :func:`request_from_chat`, and the
answer is read back into the chat-shaped assistant message by :func:`to_chat_message`, so code
written for chat keeps working. The mapping, chat field -> Responses field:

==============================================  ===============================================
chat                                            Responses
==============================================  ===============================================
``messages``                                    ``input`` (roles kept); a first ``system``
                                                message -> ``instructions``
assistant ``tool_calls``                        ``function_call`` items
``tool`` messages                               ``function_call_output`` items
content parts ``text`` / ``image_url`` /        ``input_text`` (``output_text`` for the
``file``                                        assistant) / ``input_image`` / ``input_file``
``max_tokens``, ``max_completion_tokens``       ``max_output_tokens``
``reasoning_effort``                            ``reasoning.effort``
``response_format`` (``json_object``,           ``text.format`` (the ``json_schema`` object is
``json_schema``, ``text``)                      flattened into it)
``verbosity``                                   ``text.verbosity``
``tools`` (``{"type": "function",               flat function tools ``{"type": "function",
"function": {...}}``)                           "name", ..., "strict"}``; ``strict`` is false
                                                unless given, as on chat
``tool_choice`` ``{"type": "function",          ``{"type": "function", "name": ...}``
"function": {"name": ...}}``
``logprobs``                                    ``include: ["message.output_text.logprobs"]``
``stop``                                        not sent: the answer is cut at the first stop
                                                sequence when it is read
``seed``, ``frequency_penalty``,                not sent (Responses has no such fields)
``presence_penalty``
``n`` > 1                                       :class:`InvalidRequestError` before sending
anything else                                   passed through as is
==============================================  ===============================================

Reading: ``output_text`` parts become ``content``, ``refusal`` parts ``refusal``, ``function_call``
items ``tool_calls`` (chat shape), reasoning summaries ``reasoning``. A ``failed`` response and
an ``incomplete`` one stopped by the content filter raise from the one error tree
(:func:`check_response`); other incomplete answers are returned with the text they have and
:func:`finish_reason` says why (``"length"`` for ``max_output_tokens``).

:func:`to_chat_message` takes a whole Responses object, so a streaming assembler can hand it the
``response`` of the final ``response.completed`` event.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from .._exceptions import (
    ContentFilterError,
    InvalidRequestError,
    LLMUtilsError,
    NonTerminalError,
    RateLimitError,
)

__all__ = [
    "KIND",
    "PATH",
    "check_response",
    "finish_reason",
    "input_as_messages",
    "is_responses_model",
    "normalize_usage",
    "output_from_message",
    "output_text",
    "request_from_chat",
    "to_chat_message",
]

logger = logging.getLogger("llmutils")

PATH = "/responses"
KIND = "responses"

# Chat fields the Responses API does not have; they are left out of the body (see the table).
_DROPPED = ("seed", "frequency_penalty", "presence_penalty")
# What ``include`` asks for to get the logprobs chat's ``logprobs=True`` returns.
_LOGPROBS_INCLUDE = "message.output_text.logprobs"
# failed.error.code values that are a refusal by a safety system rather than a bad request.
_POLICY_CODES = ("bio_policy", "image_content_policy_violation", "misalignment_policy_violation")
# failed.error.code values worth another attempt.
_TRANSIENT_CODES = ("server_error", "vector_store_timeout")


def is_responses_model(model: str, patterns: Sequence[str]) -> bool:
    """Whether ``model`` starts with one of ``patterns`` (``*`` matches any run of characters).

    >>> is_responses_model("o3-pro-2025-06-10", ["o1-pro", "o3-pro"])
    True
    """
    return _matches(model.lower(), tuple(patterns))


@functools.lru_cache(maxsize=256)
def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    """Memoised: a call asks this of the same model and patterns again and again."""
    return any(fnmatch.fnmatchcase(name, pattern.strip().lower() + "*") for pattern in patterns if pattern.strip())


def _copy(value: Any) -> Any:
    """A deep copy of a JSON value (dicts and lists), much cheaper than a JSON round trip."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


# -- requests --------------------------------------------------------------------------------------


def _part(part: Any, role: str) -> Any:
    """One chat content part in the Responses shape (parts already in that shape pass through)."""
    if not isinstance(part, Mapping):
        return part
    kind = part.get("type")
    if kind == "text":
        return {"type": "output_text" if role == "assistant" else "input_text", "text": part.get("text", "")}
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, Mapping) else image
        detail = image.get("detail") if isinstance(image, Mapping) else None
        return {"type": "input_image", "image_url": url, "detail": detail or "auto"}
    if kind == "file" and isinstance(part.get("file"), Mapping):
        return {"type": "input_file", **part["file"]}
    return dict(part)


def _content(content: Any, role: str) -> Any:
    """A chat message content (a string or a list of parts) in the Responses shape."""
    if isinstance(content, list):
        return [_part(part, role) for part in content]
    return "" if content is None else content


def _text_of(content: Any) -> str | None:
    """The text of a content made only of text (a string or text parts), else None."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(
        isinstance(p, Mapping) and p.get("type") in ("text", "input_text") and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(p["text"] for p in content)
    return None


def _input_items(messages: Sequence[Mapping[str, Any]]) -> list[Any]:
    """Chat messages as Responses input items; items already in that shape pass through."""
    items: list[Any] = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role is None and "type" in message:  # a Responses item (function_call_output, reasoning, ...)
            items.append(dict(message))
            continue
        if role == "tool":
            items.append({
                "type": "function_call_output",
                "call_id": message.get("tool_call_id"),
                "output": _content(message.get("content"), "user"),
            })
            continue
        if role == "function":
            raise InvalidRequestError(
                f"messages[{i}] has role 'function' (the legacy function-calling form), which the Responses "
                "API cannot express: use tools= and 'tool' messages with a tool_call_id, or API=chat."
            )
        if role == "assistant":
            content = message.get("content")
            if content is None and isinstance(message.get("refusal"), str):
                content = message["refusal"]
            if content not in (None, "", []):
                items.append({"role": "assistant", "content": _content(content, "assistant")})
            for call in message.get("tool_calls") or []:
                items.append(_call_item(call, i))
            continue
        item = {"role": role, "content": _content(message.get("content"), str(role))}
        if "name" in message:
            logger.debug("the Responses API has no message 'name'; messages[%d] is sent without it", i)
        items.append(item)
    return items


def _call_item(call: Any, index: int) -> dict[str, Any]:
    """An assistant's chat tool call as a Responses ``function_call`` (or ``custom_tool_call``) item."""
    if not isinstance(call, Mapping):
        raise InvalidRequestError(f"messages[{index}].tool_calls holds a {type(call).__name__}, expected a dict")
    if call.get("type") == "custom" and isinstance(call.get("custom"), Mapping):
        custom = call["custom"]
        return {"type": "custom_tool_call", "call_id": call.get("id"), "name": custom.get("name"), "input": custom.get("input", "")}
    function: Mapping[str, Any] = call["function"] if isinstance(call.get("function"), Mapping) else {}
    return {
        "type": "function_call",
        "call_id": call.get("id"),
        "name": function.get("name"),
        "arguments": function.get("arguments") or "{}",
    }


def _tool(tool: Any) -> Any:
    """A chat tool definition as a flat Responses tool; other tools pass through."""
    if not isinstance(tool, Mapping):
        return tool
    if tool.get("type") == "function" and isinstance(tool.get("function"), Mapping):
        function = tool["function"]
        flat: dict[str, Any] = {"type": "function", "name": function.get("name")}
        if function.get("description") is not None:
            flat["description"] = function["description"]
        # Responses makes an omitted ``strict`` strict (and every field required); chat does not.
        flat["parameters"] = function.get("parameters") or {"type": "object", "properties": {}}
        flat["strict"] = bool(function.get("strict", False))
        return flat
    if tool.get("type") == "custom" and isinstance(tool.get("custom"), Mapping):
        return {"type": "custom", **tool["custom"]}
    return dict(tool)


def _tool_ref(tool: Any) -> Any:
    """A tool reference (in ``tool_choice``) in the Responses shape: ``{"type", "name"}``."""
    if isinstance(tool, Mapping):
        for kind in ("function", "custom"):
            if tool.get("type") == kind and isinstance(tool.get(kind), Mapping):
                return {"type": kind, "name": tool[kind].get("name")}
        return dict(tool)
    return tool


def _tool_choice(choice: Any) -> Any:
    """A chat ``tool_choice`` in the Responses shape (strings are the same in both)."""
    if isinstance(choice, Mapping) and choice.get("type") == "allowed_tools" and isinstance(choice.get("allowed_tools"), Mapping):
        allowed = choice["allowed_tools"]
        return {"type": "allowed_tools", "mode": allowed.get("mode", "auto"), "tools": [_tool_ref(t) for t in allowed.get("tools") or []]}
    return _tool_ref(choice)


def _text_format(response_format: Any) -> Any:
    """A chat ``response_format`` as a Responses ``text.format``."""
    if not isinstance(response_format, Mapping):
        raise InvalidRequestError(
            f"response_format must be a dict such as {{'type': 'json_object'}}, got {type(response_format).__name__}"
        )
    if response_format.get("type") == "json_schema" and isinstance(response_format.get("json_schema"), Mapping):
        return {"type": "json_schema", **response_format["json_schema"]}
    return dict(response_format)


def request_from_chat(params: Mapping[str, Any]) -> dict[str, Any]:
    """The Responses request body for a chat request body (``model``, ``messages``, ...).

    Pure: the same chat body always gives the same Responses body. See the module's table for
    the mapping. Fields the Responses API lacks (``seed``, the penalties, ``stop``) are left out;
    the caller applies ``stop`` when it reads the answer (:func:`to_chat_message`).

    :raises InvalidRequestError: ``n`` > 1 (Responses returns one answer), a legacy ``function``
        message, or both ``response_format`` and ``text.format`` given.
    """
    body = dict(params)
    n = body.pop("n", 1)
    if n not in (None, 1):
        raise InvalidRequestError(
            f"n={n!r}: the Responses API returns one answer per request and has no 'n'; "
            "make n separate calls (with the cache off), or use api='chat'."
        )
    body.pop("stop", None)  # applied when the answer is read
    for name in _DROPPED:
        if body.pop(name, None) is not None:
            logger.debug("the Responses API has no %r; it is not sent", name)
    messages = body.pop("messages", None)
    if messages is not None:
        messages = list(messages)
        first = messages[0] if messages else None
        if (
            "instructions" not in body
            and isinstance(first, Mapping)
            and first.get("role") == "system"
            and _text_of(first.get("content")) is not None
        ):
            body["instructions"] = _text_of(first.get("content"))
            messages = messages[1:]
        body["input"] = _input_items(messages)
    budget = body.pop("max_completion_tokens", None)
    max_tokens = body.pop("max_tokens", None)
    budget = budget if budget is not None else max_tokens
    if budget is not None and "max_output_tokens" not in body:
        body["max_output_tokens"] = budget
    effort = body.pop("reasoning_effort", None)
    if effort is not None:
        reasoning = dict(body.get("reasoning") or {})
        reasoning.setdefault("effort", effort)  # an explicit reasoning={"effort": ...} wins
        body["reasoning"] = reasoning
    response_format = body.pop("response_format", None)
    verbosity = body.pop("verbosity", None)
    if response_format is not None or verbosity is not None:
        text = dict(body.get("text") or {})
        if response_format is not None:
            if "format" in text:
                raise InvalidRequestError("both response_format and text={'format': ...} were given; pass one of them")
            text["format"] = _text_format(response_format)
        if verbosity is not None:
            text.setdefault("verbosity", verbosity)
        body["text"] = text
    if "tools" in body and isinstance(body["tools"], list):
        body["tools"] = [_tool(tool) for tool in body["tools"]]
    if "tool_choice" in body:
        body["tool_choice"] = _tool_choice(body["tool_choice"])
    if body.pop("logprobs", None):
        include = list(body.get("include") or [])
        if _LOGPROBS_INCLUDE not in include:
            include.append(_LOGPROBS_INCLUDE)
        body["include"] = include
    return body


def input_as_messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The ``instructions`` and ``input`` of a Responses body as chat messages, to count their tokens.

    ``function_call`` items become assistant ``tool_calls``, ``function_call_output`` items
    ``tool`` messages, ``input_*`` parts text/image parts; other items (reasoning, references)
    are left out: their tokens are not known here.
    """
    messages: list[dict[str, Any]] = []
    if isinstance(body.get("instructions"), str):
        messages.append({"role": "system", "content": body["instructions"]})
    raw = body.get("input")
    items = [{"role": "user", "content": raw}] if isinstance(raw, str) else list(raw or [])
    for item in items:
        if not isinstance(item, Mapping):
            continue
        kind = item.get("type", "message")
        if kind == "message" and isinstance(item.get("role"), str):
            messages.append({"role": item["role"], "content": item.get("content") or ""})
        elif kind == "function_call":
            function = {"name": item.get("name"), "arguments": item.get("arguments")}
            call = {"id": item.get("call_id"), "type": "function", "function": function}
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": item.get("output") or ""})
    return messages


# -- answers ---------------------------------------------------------------------------------------


def _error_from_failed(response: Mapping[str, Any]) -> LLMUtilsError:
    """The error-tree exception for a Responses answer whose status is ``failed``."""
    error: Mapping[str, Any] = response["error"] if isinstance(response.get("error"), Mapping) else {}
    code = str(error.get("code") or "")
    detail = f"the response {response.get('id', '')} failed ({code or 'no code'}): {error.get('message') or 'no message'}"
    said = code or None  # what callers branch on, as for an HTTP error (exc.code)
    if code == "rate_limit_exceeded":
        return RateLimitError(detail, code=said)
    if code in _TRANSIENT_CODES:
        return NonTerminalError(detail, code=said)
    if code in _POLICY_CODES:
        return ContentFilterError(f"Refused by a safety policy: {detail}", code=said)
    return InvalidRequestError(detail, code=said)


def check_response(response: Mapping[str, Any], *, message: bool = True) -> None:
    """Raise the error-tree exception a Responses answer stands for, or return if it is usable.

    Meant to run inside the retried attempt, so a failure worth retrying (a malformed answer,
    ``failed`` with ``server_error``) is retried and never cached. ``message`` is True when the
    caller needs an assistant message (``send_message``): then a response still running
    (``background=True``) or cancelled is an error too; :meth:`create_response` returns those.

    :raises NonTerminalError: no ``output`` list, or ``failed`` with a transient code.
    :raises RateLimitError: ``failed`` with ``rate_limit_exceeded``.
    :raises ContentFilterError: ``incomplete`` because of ``content_filter``, or ``failed`` by a
        safety policy.
    :raises InvalidRequestError: any other ``failed``; with ``message``, not finished.
    """
    status = response.get("status")
    if status == "failed":
        raise _error_from_failed(response)
    if not isinstance(response.get("output"), list):
        raise NonTerminalError("the Responses answer has no output list")
    details = response.get("incomplete_details")
    if status == "incomplete" and isinstance(details, Mapping) and details.get("reason") == "content_filter":
        raise ContentFilterError(
            f"The answer was withheld by the content filter (response {response.get('id', '')} is incomplete: content_filter)"
        )
    if message and status in ("queued", "in_progress", "cancelled"):
        raise InvalidRequestError(
            f"the response {response.get('id', '')} is {status}: send_message needs a finished answer; "
            "use create_response() (and poll) for background=True responses"
        )


def output_text(response: Mapping[str, Any]) -> str:
    """All ``output_text`` parts of the answer's messages, joined (as the SDK's ``output_text``)."""
    texts: list[str] = []
    for item in response.get("output") or []:
        if isinstance(item, Mapping) and item.get("type") == "message":
            for part in item.get("content") or []:
                if isinstance(part, Mapping) and part.get("type") == "output_text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
    return "".join(texts)


def _cut_at_stop(text: str, stop: str | Sequence[str] | None) -> tuple[str, bool]:
    """``text`` up to the first stop sequence (excluded, as chat does), and whether one was found."""
    if not stop:
        return text, False
    sequences = [stop] if isinstance(stop, str) else [s for s in stop if s]
    cuts = [text.find(s) for s in sequences if s and s in text]
    if not cuts:
        return text, False
    return text[: min(cuts)], True


def to_chat_message(response: Mapping[str, Any], *, stop: str | Sequence[str] | None = None) -> dict[str, Any]:
    """The chat-shaped assistant message of a Responses answer (a new dict).

    ``{"role": "assistant", "content": <all output text>}``, plus ``tool_calls`` in the chat shape
    (``{"id": call_id, "type": "function", "function": {"name", "arguments"}}``) when the model
    called functions, ``refusal`` when it refused, and ``reasoning`` (the summary text) when it
    returned a reasoning summary. ``content`` is None when the answer is only tool calls or a
    refusal, as on chat. ``stop`` cuts the text at the first stop sequence (Responses has no
    ``stop``; chat leaves the sequence out too).
    """
    texts: list[str] = []
    refusals: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    summaries: list[str] = []
    for item in response.get("output") or []:
        if not isinstance(item, Mapping):
            continue
        kind = item.get("type")
        if kind == "message":
            for part in item.get("content") or []:
                if not isinstance(part, Mapping):
                    continue
                if part.get("type") == "output_text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif part.get("type") == "refusal" and isinstance(part.get("refusal"), str):
                    refusals.append(part["refusal"])
        elif kind == "function_call":
            tool_calls.append({
                "id": item.get("call_id"),
                "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments") or "{}"},
            })
        elif kind == "custom_tool_call":
            custom = {"name": item.get("name"), "input": item.get("input", "")}
            tool_calls.append({"id": item.get("call_id"), "type": "custom", "custom": custom})
        elif kind == "reasoning":
            for summary in item.get("summary") or []:
                if isinstance(summary, Mapping) and isinstance(summary.get("text"), str) and summary["text"]:
                    summaries.append(summary["text"])
    content: str | None
    if texts:
        content, _ = _cut_at_stop("".join(texts), stop)
    else:
        content = None if (tool_calls or refusals) else ""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if refusals:
        message["refusal"] = "".join(refusals)
    if tool_calls:
        message["tool_calls"] = tool_calls
    if summaries:
        message["reasoning"] = "\n\n".join(summaries)
    return message


def finish_reason(response: Mapping[str, Any], *, stop: str | Sequence[str] | None = None) -> str | None:
    """Why the answer ended, in chat's words: ``stop``, ``length``, ``tool_calls``, ``content_filter``.

    ``incomplete`` with ``max_output_tokens`` is ``"length"``; another incomplete reason is given
    as is; a response that is not finished gives its status (``"in_progress"``, ...).
    """
    status = response.get("status")
    if status == "incomplete":
        details = response.get("incomplete_details")
        reason = details.get("reason") if isinstance(details, Mapping) else None
        if reason == "max_output_tokens":
            text = output_text(response)
            return "stop" if stop and _cut_at_stop(text, stop)[1] else "length"
        return str(reason or "incomplete")
    if status not in (None, "completed"):
        return str(status)
    output = response.get("output") or []
    if any(isinstance(item, Mapping) and item.get("type") in ("function_call", "custom_tool_call") for item in output):
        return "tool_calls"
    return "stop"


def _detail(usage: Mapping[str, Any], containers: tuple[str, ...], name: str) -> int:
    """``usage[container][name]`` for the first container present, or a flat ``usage[name]``; 0 if none."""
    for container in containers:
        details = usage.get(container)
        if details is None:
            continue
        if isinstance(details, Mapping) and isinstance(details.get(name), (int, float)):
            return int(details[name])
    value = usage.get(name)
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


def normalize_usage(usage: Any) -> dict[str, Any] | None:
    """The usage of either API with the same flat fields added (a new dict; None stays None).

    ``prompt_tokens`` / ``completion_tokens`` / ``total_tokens`` (from Responses'
    ``input_tokens`` / ``output_tokens`` when those are what the API sent), ``cached_tokens``
    (``input_tokens_details`` or chat's ``prompt_tokens_details``) and ``reasoning_tokens``
    (``output_tokens_details`` or chat's ``completion_tokens_details``), 0 when not reported. The
    API's own fields are kept as they came.
    """
    if not isinstance(usage, Mapping):
        return None
    flat: dict[str, Any] = _copy(dict(usage))  # a deep copy: the caller's (cached) dict is never shared
    for chat_name, responses_name in (("prompt_tokens", "input_tokens"), ("completion_tokens", "output_tokens")):
        if chat_name not in flat and isinstance(usage.get(responses_name), int):
            flat[chat_name] = usage[responses_name]
    if "total_tokens" not in flat and isinstance(flat.get("prompt_tokens"), int) and isinstance(flat.get("completion_tokens"), int):
        flat["total_tokens"] = flat["prompt_tokens"] + flat["completion_tokens"]
    flat["cached_tokens"] = _detail(usage, ("input_tokens_details", "prompt_tokens_details"), "cached_tokens")
    flat["reasoning_tokens"] = _detail(usage, ("output_tokens_details", "completion_tokens_details"), "reasoning_tokens")
    return flat


def output_from_message(message: Mapping[str, Any], *, item_id: str = "msg") -> list[dict[str, Any]]:
    """The Responses ``output`` items that say what a chat-shaped assistant ``message`` says.

    The inverse of :func:`to_chat_message`, for offline answers (``MockClient``) and tests:
    ``reasoning`` -> a reasoning item with that summary, ``content`` / ``refusal`` -> a message
    item, ``tool_calls`` -> ``function_call`` items.
    """
    output: list[dict[str, Any]] = []
    if isinstance(message.get("reasoning"), str):
        output.append({"id": f"rs_{item_id}", "type": "reasoning", "summary": [{"type": "summary_text", "text": message["reasoning"]}]})
    parts: list[dict[str, Any]] = []
    if isinstance(message.get("content"), str) and (message["content"] or not message.get("tool_calls")):
        parts.append({"type": "output_text", "text": message["content"], "annotations": []})
    if isinstance(message.get("refusal"), str):
        parts.append({"type": "refusal", "refusal": message["refusal"]})
    if parts:
        output.append({"id": item_id, "type": "message", "role": "assistant", "status": "completed", "content": parts})
    for index, call in enumerate(message.get("tool_calls") or []):
        output.append({**_call_item(call, 0), "id": f"fc_{item_id}_{index}", "status": "completed"})
    return output
