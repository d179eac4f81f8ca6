"""``POST /ask``: ``{"prompt": str, "model"?: str}`` -> ``{"answer", "cached", "model"}``.

Errors are short JSON bodies without keys or upstream details: 400 for a bad request, 503 when
the model is unavailable or misconfigured, 504 when ``LLM_TOTAL_TIMEOUT`` would be exceeded.

``POST /ask/stream`` takes the same body and answers with Server-Sent Events as the model writes:
``data: {"text": ...}`` per piece, then ``event: done`` (``{"cached", "model"}``), or ``event: error``
(the same short body) if the model's stream breaks after text was sent. Errors before any text are
the JSON answers above.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponseBase, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

import llmutils

from . import llm

logger = logging.getLogger(__name__)


def _bad_request(message: str) -> JsonResponse:
    return JsonResponse({"error": message, "code": "bad_request"}, status=400)


def _parse(request: HttpRequest) -> tuple[str, dict[str, Any], JsonResponse | None]:
    """``(prompt, per-request overrides, None)`` from the JSON body, or ``("", {}, the 400 response)``."""
    try:
        data = json.loads(request.body)
    except ValueError:
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("prompt"), str) or not data["prompt"].strip():
        return "", {}, _bad_request('Send a JSON object with a non-empty "prompt" string.')
    prompt = data["prompt"]
    if len(prompt) > settings.LLM_MAX_PROMPT_CHARS:
        return "", {}, _bad_request(f"The prompt is longer than {settings.LLM_MAX_PROMPT_CHARS} characters.")
    overrides = {}
    if data.get("model") is not None:
        if data["model"] not in settings.LLM_ALLOWED_MODELS:
            return "", {}, _bad_request(f'"model" must be one of {", ".join(settings.LLM_ALLOWED_MODELS)}.')
        overrides["model"] = data["model"]
    return prompt, overrides, None


@csrf_exempt  # a JSON API without cookie sessions; put real authentication in front of it
@require_POST
def ask(request: HttpRequest) -> JsonResponse:
    """Ask the model ``prompt`` (optionally with an allowed ``model``) and return its answer."""
    prompt, overrides, bad_request = _parse(request)
    if bad_request is not None:
        return bad_request
    client = llm.client
    try:
        # override_defaults is per thread / context: one request's model never leaks into another's.
        with llmutils.override_defaults(**overrides):
            answer = client.send_message(
                [{"role": "user", "content": prompt}], total_timeout=settings.LLM_TOTAL_TIMEOUT
            )
    except llmutils.LLMUtilsError as exc:
        status, body = llm.error_response(exc)
        logger.warning("model call failed (%s -> HTTP %d): %s", type(exc).__name__, status, exc)
        return JsonResponse(body, status=status)
    info = client.last_call  # this thread's call: cached or not
    return JsonResponse({"answer": answer["content"], "cached": info.cached, "model": info.model})


def _sse(data: Any, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n"


@csrf_exempt
@require_POST
def ask_stream(request: HttpRequest) -> HttpResponseBase:
    """Stream the model's answer as Server-Sent Events while it is generated."""
    prompt, overrides, bad_request = _parse(request)
    if bad_request is not None:
        return bad_request
    client = llm.client
    try:
        with llmutils.override_defaults(**overrides):
            # Opens the stream and waits for the first text: retries and errors happen here.
            stream = client.stream_message([{"role": "user", "content": prompt}], total_timeout=settings.LLM_TOTAL_TIMEOUT)
    except llmutils.LLMUtilsError as exc:
        status, body = llm.error_response(exc)
        logger.warning("model call failed (%s -> HTTP %d): %s", type(exc).__name__, status, exc)
        return JsonResponse(body, status=status)

    def events() -> Iterator[str]:
        with stream:  # closes the model's connection if the client goes away
            try:
                for text in stream:
                    yield _sse({"text": text})
            except llmutils.LLMUtilsError as exc:
                _, body = llm.error_response(exc)
                logger.warning("stream failed after %d characters (%s): %s", len(stream.text), type(exc).__name__, exc)
                yield _sse(body, "error")
                return
        info = client.last_call
        yield _sse({"cached": stream.cached, "model": info.model if info else None}, "done")

    response = StreamingHttpResponse(events(), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # no proxy buffering (nginx)
    return response
