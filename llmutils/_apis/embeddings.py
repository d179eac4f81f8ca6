"""Embeddings (``POST /embeddings``): the request body and the vectors the caller gets back."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .._exceptions import MalformedResponseError, NonTerminalError

__all__ = ["KIND", "PATH", "build_embeddings_request", "check_embeddings_response", "read_embeddings_response"]

PATH = "/embeddings"
KIND = "embedding"
_NUMBERS = frozenset({int, float})


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

    No ``data`` list, or an item without an embedding, is retried (a proxy's error page). A wrong
    count, or a vector holding anything but numbers (``[1, "a"]``, a base64 string) raises
    :class:`~llmutils.MalformedResponseError` at once: the same request gets the same answer again,
    so it is neither retried nor cached.
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
    for position, item in enumerate(data):
        vector = item.get("embedding") if isinstance(item, Mapping) else None
        if isinstance(vector, str):  # what encoding_format="base64" gets, every time
            raise MalformedResponseError(
                f"embedding {position} of the response is a string (base64?), not a list of numbers: only "
                "encoding_format='float' answers are read (not retried: it would answer the same)"
            )
        if not isinstance(vector, list):
            raise NonTerminalError("an item of the embeddings response has no embedding list")
        if not _NUMBERS.issuperset(map(type, vector)):  # JSON numbers decode to int or float; bool is neither
            index, bad = next((i, v) for i, v in enumerate(vector) if type(v) not in _NUMBERS)
            raise MalformedResponseError(
                f"embedding {position} holds {bad!r:.40} ({type(bad).__name__}) at index {index}, not a number: "
                "the server's answer is malformed (not retried: it would answer the same)"
            )


def read_embeddings_response(response: Mapping[str, Any], expected: int) -> list[list[float]]:
    """The vectors, in input order."""
    check_embeddings_response(response, expected)
    return [item["embedding"] for item in sorted(response["data"], key=lambda item: item.get("index", 0))]
