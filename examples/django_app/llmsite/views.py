"""``POST /ask``: ``{"prompt": str, "model"?: str}`` -> ``{"answer", "cached", "model"}``.

Errors are short JSON bodies without keys or upstream details: 400 for a bad request, 503 when
the model is unavailable or misconfigured, 504 when ``LLM_TOTAL_TIMEOUT`` would be exceeded.
"""

from __future__ import annotations

import json
import logging

from django.conf import settings
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

import llmutils

from . import llm

logger = logging.getLogger(__name__)


def _bad_request(message: str) -> JsonResponse:
    return JsonResponse({"error": message, "code": "bad_request"}, status=400)


@csrf_exempt  # a JSON API without cookie sessions; put real authentication in front of it
@require_POST
def ask(request: HttpRequest) -> JsonResponse:
    """Ask the model ``prompt`` (optionally with an allowed ``model``) and return its answer."""
    try:
        data = json.loads(request.body)
    except ValueError:
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("prompt"), str) or not data["prompt"].strip():
        return _bad_request('Send a JSON object with a non-empty "prompt" string.')
    prompt = data["prompt"]
    if len(prompt) > settings.LLM_MAX_PROMPT_CHARS:
        return _bad_request(f"The prompt is longer than {settings.LLM_MAX_PROMPT_CHARS} characters.")
    overrides = {}
    if data.get("model") is not None:
        if data["model"] not in settings.LLM_ALLOWED_MODELS:
            return _bad_request(f'"model" must be one of {", ".join(settings.LLM_ALLOWED_MODELS)}.')
        overrides["model"] = data["model"]
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
