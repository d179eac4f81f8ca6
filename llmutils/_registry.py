"""The client registry: which client :func:`client` returns, and the process-wide switches.

``openai``, ``azure`` and ``mock`` are registered at import (creating a client reads nothing and
opens nothing). Register your own for any OpenAI-compatible endpoint::

    register_client("ollama", OpenAIClient(base_url="http://localhost:11434/v1", model="llama3.2"))
    force_api_type("ollama")
"""

from __future__ import annotations

import os
import threading
from typing import Any, Protocol, runtime_checkable

from ._clients import AzureClient, MockClient, OpenAIClient
from ._config import force_default_value, resolved
from ._exceptions import ConfigError

__all__ = ["register_client", "client", "registered_api_types", "force_api_type", "force_api_cache"]


@runtime_checkable
class _Client(Protocol):
    def send_message(self, messages: list[dict[str, Any]], *args: Any, **kwargs: Any) -> Any: ...


_lock = threading.Lock()
_clients: dict[str, Any] = {}


def register_client(api_type: str, client: Any) -> None:
    """Make ``client`` the one :func:`client` returns when ``API_TYPE`` is ``api_type``.

    :param api_type: the name (``openai``, ``azure``, ``mock`` are registered at import; a new
        name adds one, a known name replaces it).
    :param client: any object with a ``send_message`` method, usually an :class:`OpenAIClient`.
    :raises ConfigError: ``api_type`` is not a non-empty string, or ``client`` has no ``send_message``.
    """
    if not isinstance(api_type, str) or not api_type:
        raise ConfigError(f"api_type must be a non-empty string, got {api_type!r}")
    if not isinstance(client, _Client):
        raise ConfigError(f"{client!r} has no send_message method, so it cannot be registered as {api_type!r}")
    with _lock:
        _clients[api_type] = client


def registered_api_types() -> list[str]:
    """The API types that have a registered client.

    :returns: their names, sorted.
    """
    with _lock:
        return sorted(_clients)


def client() -> Any:
    """The client registered for the configured ``API_TYPE`` (``openai`` unless configured).

    :returns: the registered client, read when called (so ``force_api_type`` and
        ``override_defaults(api_type=...)`` apply).
    :raises ConfigError: no client is registered under that name (the message lists those that are).
    """
    api_type = resolved()["API_TYPE"]
    found = _clients.get(api_type)
    if found is None:
        raise ConfigError(
            f"No client registered for API_TYPE {api_type!r}; registered: {', '.join(registered_api_types())}. "
            "Use register_client() first."
        )
    return found


def force_api_type(api_type: str) -> None:
    """Make :func:`client` return the client registered for ``api_type``, for the whole process.

    :param api_type: a registered name (see :func:`registered_api_types`).
    :raises ConfigError: ``api_type`` is not registered (the message lists those that are).
    """
    if api_type not in _clients:
        raise ConfigError(
            f"Unknown api type {api_type!r}; registered: {', '.join(registered_api_types())}. "
            "Use register_client() first."
        )
    force_default_value("API_TYPE", api_type)


def force_api_cache(cache_api_calls: bool, cache_file_name: str | os.PathLike[str] | None = None) -> None:
    """Turn the cache on or off (and choose its file) for every client that follows the config.

    :param cache_api_calls: on or off, for the whole process (``CACHE_API_CALLS``).
    :param cache_file_name: the SQLite file (``CACHE_FILE_NAME``), or a cache URL such as
        ``redis://host:6379/0``; None keeps the configured one. A store named here is the store:
        it wins over a ``CACHE_URL`` from the environment, a config file or an earlier force.
    """
    force_default_value("CACHE_API_CALLS", bool(cache_api_calls))
    if cache_file_name is not None:
        force_default_value("CACHE_URL", None)
        force_default_value("CACHE_FILE_NAME", os.fspath(cache_file_name))


def _register_defaults() -> None:
    """Register fresh ``openai``, ``azure`` and ``mock`` clients (also used to reset between tests)."""
    with _lock:
        for old in _clients.values():
            close = getattr(old, "close", None)
            if close is not None:
                close()
        _clients.clear()
        _clients.update(openai=OpenAIClient(), azure=AzureClient(), mock=MockClient())


_register_defaults()
