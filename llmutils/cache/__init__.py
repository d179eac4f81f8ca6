"""The response cache: one protocol, two backends, and the factory that picks one.

* :class:`SQLiteCache` (:mod:`.sqlite`): one SQLite file of JSON values, shared by the threads,
  processes and forks of one machine.
* :class:`RedisCache` (:mod:`.redis`): one Redis server shared by several machines
  (``CACHE_URL = redis://[:password@]host:6379/0``).

Both store the same keys (:func:`make_key`, :mod:`.keys`) and the same JSON values, honour the
same modes and count the same :class:`CacheStats`. The client reaches a cache only through
:class:`CacheBackend`, single-flight included. Each backend builds on :mod:`.base` and on nothing
private of the other; :func:`import_pickle_cache` (:mod:`.legacy`) reads the old pickle cache.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from .._deadline import Deadline
from .._exceptions import ConfigError
from .base import CACHE_MODES, WRITE_MODES, CacheStats, is_cache_url, mask_url
from .keys import KEY_VERSION, make_key
from .legacy import import_pickle_cache
from .memory import MemoryCache
from .redis import REDIS_SCHEMES, RedisCache
from .sqlite import SQLiteCache

__all__ = [
    "CACHE_MODES",
    "KEY_VERSION",
    "CacheBackend",
    "MemoryCache",
    "CacheStats",
    "CopyResult",
    "RedisCache",
    "SQLiteCache",
    "copy_cache",
    "import_pickle_cache",
    "is_cache_url",
    "make_key",
    "mask_url",
    "open_cache",
]


@runtime_checkable
class CacheBackend(Protocol):
    """What the client needs of a cache: :class:`SQLiteCache` and :class:`RedisCache` both have it.

    ``path`` names the cache in messages (a file path, or a URL with its password masked);
    ``disabled`` is True while a fault keeps the cache out of use. ``single_flight`` sends
    ``send()`` once for N identical requests where the store is shared between processes, and
    stores the answer; a ``deadline`` bounds every wait (a lock, a busy store).
    """

    mode: str
    ttl: float | None
    path: Any

    @property
    def disabled(self) -> bool:
        """True while a fault keeps the cache out of use (calls then go on without it)."""
        ...

    def get(self, key: str) -> Any | None:
        """A fresh copy of the value stored under ``key``, or None (a miss, an expired entry, a fault)."""
        ...

    def set(self, key: str, value: Any, *, ttl: float | None = None, deadline: Deadline | None = None) -> None:
        """Store ``value`` (plain JSON) under ``key`` where the mode writes; faults are logged, never raised."""
        ...

    def put(self, key: str, value: Any, ttl: float | None = None, *, deadline: Deadline | None = None) -> bool:
        """Write one entry whatever the mode; True if the store took it."""
        ...

    def single_flight(self, key: str, send: Callable[[], Any], *, deadline: Deadline | None = None) -> tuple[Any, bool]:
        """``(value, cached)``: ``send()`` once for identical requests that share the store, and store it."""
        ...

    def iter_entries(self) -> Iterator[tuple[str, str | bytes]]:
        """Every stored ``(key, JSON text)``, for :func:`~llmutils.copy_cache`."""
        ...

    def put_entries(self, entries: list[tuple[str, Any, float | None]]) -> int:
        """Write ``(key, value, ttl)`` entries; return how many the store took."""
        ...

    def stats(self) -> CacheStats:
        """A snapshot of the hits, misses, writes and errors counted by this object."""
        ...

    def reset_stats(self) -> None:
        """Set every counter back to zero."""
        ...

    def __len__(self) -> int: ...

    def info(self) -> dict[str, Any]:
        """Where the cache is, how many entries and versions it holds, and whether it is disabled."""
        ...

    def clear(self) -> None:
        """Delete every llmutils entry (the store itself stays)."""
        ...

    def close(self) -> None:
        """Release connections; safe to call twice; a later call reopens."""
        ...

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc_info: object) -> None: ...


def open_cache(
    location: str | os.PathLike[str], *, mode: str = "readwrite", ttl: float | None = None, memory_items: int = 0
) -> CacheBackend:
    """The cache at ``location``: ``redis://``, ``rediss://`` or ``unix://`` is a :class:`RedisCache`;
    ``sqlite:///relative.sqlite``, ``sqlite:////absolute.sqlite`` or a plain path is a :class:`SQLiteCache`.
    With ``memory_items`` > 0 it is wrapped in a :class:`MemoryCache` keeping that many decoded
    answers in memory (``CACHE_MEMORY_ITEMS``).

    >>> open_cache("redis://:secret@cache.internal:6379/0", ttl=86400)
    RedisCache('redis://:***@cache.internal:6379/0', mode='readwrite')

    :param location: a path or a URL (``CACHE_URL`` / ``CACHE_FILE_NAME`` take the same values).
    :param mode: ``readwrite``, ``readonly``, ``replay``, ``refresh`` or ``off``.
    :param ttl: seconds an entry stays valid (None: for ever).
    :returns: the backend; nothing is opened or connected before its first use.
    :raises ConfigError: an unknown URL scheme, a malformed URL, a bad mode or ttl.
    """
    store = _open_store(location, mode=mode, ttl=ttl)
    return MemoryCache(store, memory_items) if memory_items else store


def _open_store(location: str | os.PathLike[str], *, mode: str, ttl: float | None) -> CacheBackend:
    if not is_cache_url(location):
        return SQLiteCache(os.fspath(location), mode=mode, ttl=ttl)
    text = os.fspath(location)
    scheme = text.split("://", 1)[0].lower()
    if scheme in REDIS_SCHEMES:
        return RedisCache(text, mode=mode, ttl=ttl)
    if scheme == "sqlite":
        path = text[len("sqlite:///") :] if text.lower().startswith("sqlite:///") else ""
        if not path:
            raise ConfigError(f"cache URL {text!r} names no file: use sqlite:///relative.sqlite or sqlite:////abs/path.sqlite")
        return SQLiteCache(path, mode=mode, ttl=ttl)
    raise ConfigError(
        f"cache URL {mask_url(text)!r} has an unknown scheme {scheme!r}: use redis://host:6379/0, rediss://, "
        "unix:///path/redis.sock, sqlite:///file.sqlite or a plain file path"
    )


@dataclass(frozen=True)
class CopyResult:
    """What :func:`copy_cache` did: entries copied, skipped as expired, skipped as unreadable."""

    copied: int = 0
    expired: int = 0
    invalid: int = 0


def copy_cache(source: CacheBackend, dest: CacheBackend, *, batch_size: int = 500) -> CopyResult:
    """Copy every live entry of ``source`` into ``dest`` (SQLite -> Redis, or either way); return counts.

    Entries keep their JSON and their remaining lifetime (expired ones are skipped); an entry
    already in ``dest`` is overwritten. ``dest`` must be open for writing.
    ``llmutils cache copy llmutils_cache.sqlite redis://host:6379/0`` does the same from the shell.

    :param source: the cache to read (any mode).
    :param dest: the cache to write (mode ``readwrite`` or ``refresh``).
    :param batch_size: entries written per round trip.
    :returns: the counts of entries copied, skipped as expired and skipped as invalid.
    :raises ConfigError: ``dest`` is not open for writing.
    """
    if dest.mode not in WRITE_MODES:
        raise ConfigError(f"copy writes to {dest.path}, which is open in mode {dest.mode!r}; use 'readwrite'")
    copied = expired = invalid = 0
    now = time.time()
    pending: list[tuple[str, Any, float | None]] = []
    for key, raw in source.iter_entries():
        try:
            entry = json.loads(raw)
            value = entry["value"]
            expires = entry.get("expires")
            left = None if expires is None else float(expires) - now
        except (TypeError, ValueError, KeyError, AttributeError):
            invalid += 1
            continue
        if left is not None and left <= 0:
            expired += 1
            continue
        pending.append((key, value, left))
        if len(pending) >= batch_size:
            copied += dest.put_entries(pending)
            pending = []
            if dest.disabled:
                break
    if pending and not dest.disabled:
        copied += dest.put_entries(pending)
    return CopyResult(copied, expired, invalid)
