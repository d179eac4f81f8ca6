"""Embeddings (``POST /embeddings``): the request body and the vectors the caller gets back."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .._exceptions import MalformedResponseError, NonTerminalError

__all__ = ["PATH", "KIND", "build_embeddings_request", "check_embeddings_response", "read_embeddings_response"]

PATH = "/embeddings"
KIND = "embedding"


def build_embeddings_request(
    settings: Mapping[str, Any],
    texts: Sequence[str],
    *,
    model: str | None = None,
    more: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON body of an embeddings request: ``EMBEDDING_MODEL`` unless ``model``, floats unless asked.

    A None in ``more`` is not sent (``dimensions=None`` means "the model's own").
    """
    extra = {name: value for name, value in (more or {}).items() if value is not None}
    params: dict[str, Any] = {"model": model or settings["EMBEDDING_MODEL"], "input": list(texts), **extra}
    params.setdefault("encoding_format", "float")
    return params


def check_embeddings_response(body: Mapping[str, Any], expected: int) -> None:
    """An embeddings response must hold one list of numbers per input.

    No ``data`` list is retried (a proxy's error page); a wrong count raises
    :class:`~llmutils.MalformedResponseError` at once.
    """
    data = body.get("data")
    if not isinstance(data, list):
        raise NonTerminalError("the embeddings response has no data list")
    if len(data) != expected:
        # The same request gets the same wrong count again (LiteLLM's mock, a server that embeds
        # only the first input): terminal, not a transient failure worth the whole backoff.
        raise MalformedResponseError(
            f"{expected} inputs got {len(data)} embedding(s) back: the server's answer is malformed "
            "(not retried: it would answer the same)"
        )
    for item in data:
        if not isinstance(item, Mapping) or not isinstance(item.get("embedding"), list):
            raise NonTerminalError("an item of the embeddings response has no embedding list")


def read_embeddings_response(response: Mapping[str, Any], expected: int) -> list[list[float]]:
    """The vectors, in input order."""
    check_embeddings_response(response, expected)
    return [item["embedding"] for item in sorted(response["data"], key=lambda item: item.get("index", 0))]
