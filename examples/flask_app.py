"""A Flask app whose view asks a model through llmutils: one shared client, cache on, bounded time.

Run it (works offline on a fresh machine: with no ``OPENAI_API_KEY`` and no base URL configured
the app uses llmutils' ``mock`` client, which answers ``"echo: <prompt>"``)::

    pip install flask
    flask --app examples/flask_app run         # threaded by default
    curl -s localhost:5000/ask -H 'Content-Type: application/json' -d '{"prompt": "Hello"}'
    # {"answer": "echo: Hello", "cached": false, "model": "gpt-4.1-mini"}

Against the real API set ``OPENAI_API_KEY`` (or ``OPENAI_BASE_URL`` for any OpenAI-compatible
server, or ``LLMUTILS_API_TYPE=azure`` with the Azure variables). The usual llmutils settings
apply (``LLMUTILS_MODEL``, ``LLMUTILS_CACHE_FILE_NAME``, ``LLMUTILS_MAX_ATTEMPTS``, ...); the app's
own settings come from ``FLASK_``-prefixed variables, e.g. ``FLASK_LLM_TOTAL_TIMEOUT=10``.

``POST /ask`` takes ``{"prompt": "...", "model": "..."}`` (``model`` optional, one of
``LLM_ALLOWED_MODELS``) and answers ``{"answer", "cached", "model"}``. Errors are short JSON
bodies (``{"error": ..., "code": ...}``) that never contain keys or upstream details:

* 400 a bad request (no prompt, a model that is not allowed, a prompt the model rejects);
* 503 the model is unavailable (retries exhausted, 5xx, rate limited, or a configuration
  problem such as a missing or wrong key);
* 504 the call would run past ``LLM_TOTAL_TIMEOUT`` seconds (retries included).

``POST /ask/stream`` takes the same body and streams the answer as Server-Sent Events while the
model writes it (``curl -N`` shows it arrive)::

    data: {"text": "echo: "}
    data: {"text": "Hello"}
    event: done
    data: {"cached": false, "model": "gpt-4.1-mini"}

Errors before the first text are the same JSON answers as ``/ask`` (retries happen then); an
error after text has been sent ends the stream cleanly with ``event: error`` and the same short
``{"error", "code"}`` body, never a broken connection.

Flask serves each request on its own thread; the one module-level client is thread-safe and
shares its connection pool and SQLite cache among them.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from collections.abc import Iterator

from flask import Flask, Response, current_app, jsonify, request, stream_with_context

import llmutils

__all__ = ["create_app", "make_client", "error_response", "sse", "llm"]

logger = logging.getLogger(__name__)

DEFAULT_CONFIG: dict[str, Any] = {
    "LLM_TOTAL_TIMEOUT": 20.0,  # seconds for one model call, retries and backoff included
    "LLM_ALLOWED_MODELS": ["gpt-4.1-mini", "gpt-4.1-nano", "gpt-4o-mini"],  # what "model" may name
    "LLM_MAX_PROMPT_CHARS": 8000,
}


def make_client() -> llmutils.OpenAIClient:
    """The app's client, from llmutils' configuration (config.ini, environment), with the cache on.

    With ``API_TYPE`` left at ``openai`` but neither ``OPENAI_API_KEY`` nor a base URL configured,
    there is nothing to call, so the offline ``MockClient`` is used instead.
    """
    settings = llmutils.OpenAIClient().settings()  # reads config.ini and the environment once
    api_type = settings["API_TYPE"]
    if api_type == "openai" and not settings["BASE_URL"] and not os.environ.get("OPENAI_API_KEY"):
        api_type = "mock"
        logger.info("no OPENAI_API_KEY or base URL configured: answering with the offline mock client")
    classes = {"openai": llmutils.OpenAIClient, "azure": llmutils.AzureClient, "mock": llmutils.MockClient}
    if api_type not in classes:
        raise llmutils.ConfigError(f"API_TYPE {api_type!r}: this example knows openai, azure and mock")
    return classes[api_type](cache_api_calls=True)


# One client for the whole process: every request thread shares its connections and cache.
llm = make_client()


# (status, code, public message) by exception class; the first match wins, so subclasses first.
_ERRORS: list[tuple[type[llmutils.LLMUtilsError], int, str, str]] = [
    (llmutils.TotalTimeoutError, 504, "model_timeout", "The model did not answer in time."),
    (llmutils.RetriesExhaustedError, 503, "model_unavailable", "The model is unavailable; try again later."),
    (llmutils.NonTerminalError, 503, "model_unavailable", "The model is unavailable; try again later."),
    (llmutils.AuthenticationError, 503, "model_misconfigured", "The model service is not configured correctly."),
    (llmutils.QuotaExceededError, 503, "model_unavailable", "The model is unavailable; try again later."),
    (llmutils.CacheMissError, 503, "model_unavailable", "The model is unavailable; try again later."),
    (llmutils.ConfigError, 503, "model_misconfigured", "The model service is not configured correctly."),
    (llmutils.ContentFilterError, 400, "content_filter", "The prompt was refused by the content filter."),
    (llmutils.InvalidRequestError, 400, "invalid_request", "The model rejected this request."),
]


def error_response(exc: llmutils.LLMUtilsError) -> tuple[int, dict[str, str]]:
    """The HTTP status and public JSON body for an llmutils error (details go to the log only)."""
    for kind, status, code, message in _ERRORS:
        if isinstance(exc, kind):
            return status, {"error": message, "code": code}
    return 502, {"error": "The model call failed.", "code": "model_error"}


def _bad_request(message: str) -> Any:
    return jsonify(error=message, code="bad_request"), 400


def _parse_request() -> tuple[str, dict[str, Any], Any]:
    """``(prompt, per-request overrides, None)`` from the JSON body, or ``("", {}, the 400 response)``."""
    data = request.get_json(silent=True)
    if not isinstance(data, dict) or not isinstance(data.get("prompt"), str) or not data["prompt"].strip():
        return "", {}, _bad_request('Send a JSON object with a non-empty "prompt" string.')
    prompt = data["prompt"]
    if len(prompt) > current_app.config["LLM_MAX_PROMPT_CHARS"]:
        return "", {}, _bad_request(f"The prompt is longer than {current_app.config['LLM_MAX_PROMPT_CHARS']} characters.")
    overrides = {}
    if data.get("model") is not None:
        if data["model"] not in current_app.config["LLM_ALLOWED_MODELS"]:
            return "", {}, _bad_request(f'"model" must be one of {", ".join(current_app.config["LLM_ALLOWED_MODELS"])}.')
        overrides["model"] = data["model"]
    return prompt, overrides, None


def ask() -> Any:
    """``POST /ask``: ``{"prompt": str, "model"?: str}`` -> ``{"answer", "cached", "model"}``."""
    prompt, overrides, bad_request = _parse_request()
    if bad_request is not None:
        return bad_request
    client = current_app.extensions["llmutils"]
    try:
        # Per-request settings: override_defaults applies to this request's thread only, so
        # concurrent requests with different models do not see each other's choice.
        with llmutils.override_defaults(**overrides):
            answer = client.send_message(
                [{"role": "user", "content": prompt}],
                total_timeout=float(current_app.config["LLM_TOTAL_TIMEOUT"]),
            )
    except llmutils.LLMUtilsError as exc:
        status, body = error_response(exc)
        current_app.logger.warning("model call failed (%s -> HTTP %d): %s", type(exc).__name__, status, exc)
        return jsonify(body), status
    info = client.last_call  # per thread: this request's call, whatever the other threads do
    return jsonify(answer=answer["content"], cached=info.cached, model=info.model)


def sse(data: Any, event: str | None = None) -> str:
    """One Server-Sent Event whose data is ``data`` as JSON."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n"


def ask_stream() -> Any:
    """``POST /ask/stream``: the answer as Server-Sent Events, sent as the model writes it."""
    prompt, overrides, bad_request = _parse_request()
    if bad_request is not None:
        return bad_request
    client = current_app.extensions["llmutils"]
    try:
        with llmutils.override_defaults(**overrides):
            # Opens the stream and waits for its first text: retries and errors happen here,
            # while a proper status code can still be sent.
            stream = client.stream_message(
                [{"role": "user", "content": prompt}],
                total_timeout=float(current_app.config["LLM_TOTAL_TIMEOUT"]),
            )
    except llmutils.LLMUtilsError as exc:
        status, body = error_response(exc)
        current_app.logger.warning("model call failed (%s -> HTTP %d): %s", type(exc).__name__, status, exc)
        return jsonify(body), status

    def events() -> Iterator[str]:
        with stream:  # closes the model's connection if the browser goes away
            try:
                for text in stream:
                    yield sse({"text": text})
            except llmutils.LLMUtilsError as exc:
                _, body = error_response(exc)
                current_app.logger.warning("stream failed after %d characters (%s): %s", len(stream.text), type(exc).__name__, exc)
                yield sse(body, "error")
                return
        info = client.last_call
        yield sse({"cached": stream.cached, "model": info.model if info else None}, "done")

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering
    return Response(stream_with_context(events()), mimetype="text/event-stream", headers=headers)


def create_app(client: llmutils.OpenAIClient | None = None, **config: Any) -> Flask:
    """Build the app; ``client`` defaults to the module-level one, ``config`` overrides settings.

    Settings come from :data:`DEFAULT_CONFIG`, then ``FLASK_*`` environment variables
    (``FLASK_LLM_TOTAL_TIMEOUT=10``), then ``config``.
    """
    app = Flask(__name__)
    app.config.from_mapping(DEFAULT_CONFIG)
    app.config.from_prefixed_env()
    app.config.update(config)
    app.extensions["llmutils"] = client if client is not None else llm
    app.add_url_rule("/ask", view_func=ask, methods=["POST"])
    app.add_url_rule("/ask/stream", view_func=ask_stream, methods=["POST"])
    return app
