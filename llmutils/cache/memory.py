"""An in-memory tier in front of a cache store: recently used decoded answers, in this process.

A hit in :class:`MemoryCache` skips the store's read and the JSON decode: it looks the key up in a
thread-safe LRU (``CACHE_MEMORY_ITEMS`` entries at most) and returns a fresh copy of the decoded
answer (callers may mutate what they get). Everything else goes to the store it wraps, through
:class:`~llmutils.cache.CacheBackend`, so the tier works in front of SQLite and Redis alike.

What it keeps, and for how long:

- an answer this process wrote (``set``, ``put``, ``single_flight``), until it falls out of the LRU
  or its TTL passes (the same TTL as the store's entry);
- an answer read from the store, when the store has no TTL (with a TTL, the entry's age is not
  known here, so it is served from the store each time and the TTL stays exact).

Another process's writes: the tier does not see them. It may serve an answer another process has
since replaced (``refresh`` mode) or cleared, until the answer falls out of the LRU or its TTL
passes. ``clear()`` on this object clears both the tier and the store.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from .._deadline import Deadline
from .base import WRITE_MODES, CacheStats

if TYPE_CHECKING:
    from . import CacheBackend

__all__ = ["MemoryCache", "copy_json"]

_live: weakref.WeakSet[MemoryCache] = weakref.WeakSet()


def copy_json(value: Any) -> Any:
    """A deep copy of a JSON value (dicts, lists, scalars), several times faster than ``copy.deepcopy``."""
    kind = type(value)
    if kind is dict:
        return {k: copy_json(v) if type(v) in _CONTAINERS else v for k, v in value.items()}
    if kind is list:
        return [copy_json(v) if type(v) in _CONTAINERS else v for v in value]
    return value


_CONTAINERS = frozenset({dict, list})


def _reset_locks_in_child() -> None:
    """After ``os.fork``: a lock another thread held is held for ever in the child; start afresh."""
    for cache in list(_live):
        cache._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_locks_in_child)


class MemoryCache:
    """A :class:`~llmutils.cache.CacheBackend` keeping up to ``max_items`` decoded answers in memory
    in front of ``store``.

    >>> cache = MemoryCache(open_cache("llmutils_cache.sqlite"), max_items=10_000)

    :param store: the cache that holds every entry (a :class:`SQLiteCache` or :class:`RedisCache`).
    :param max_items: answers kept in memory, least recently used dropped first (> 0).
    :param clock: monotonic seconds, for TTLs (tests pass a fake one).
    """

    def __init__(self, store: CacheBackend, max_items: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        if isinstance(max_items, bool) or not isinstance(max_items, int) or max_items <= 0:
            raise ValueError(f"max_items must be an int > 0, got {max_items!r}")
        self.store = store
        self.max_items = max_items
        self._clock = clock
        self._items: OrderedDict[str, tuple[Any, float | None]] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = 0
        _live.add(self)

    def __repr__(self) -> str:
        return f"MemoryCache({self.store!r}, max_items={self.max_items})"

    # -- what the store says ------------------------------------------------------------------

    @property
    def mode(self) -> str:
        return self.store.mode

    @mode.setter
    def mode(self, value: str) -> None:
        self.store.mode = value

    @property
    def ttl(self) -> float | None:
        return self.store.ttl

    @property
    def path(self) -> Any:
        return self.store.path

    @property
    def disabled(self) -> bool:
        return self.store.disabled

    # -- the tier -----------------------------------------------------------------------------

    def get(self, key: str) -> Any | None:
        """A fresh copy of the answer under ``key``: from memory if it is there, else from the store."""
        if self.store.mode not in ("off", "refresh"):
            with self._lock:
                item = self._items.get(key)
                if item is not None:
                    expires = item[1]
                    if expires is None or self._clock() < expires:
                        self._items.move_to_end(key)
                        self._hits += 1
                        return copy_json(item[0])
                    del self._items[key]
        value = self.store.get(key)
        if value is not None and self.store.ttl is None:
            self._remember(key, copy_json(value), None)
        return value

    def _remember(self, key: str, value: Any, ttl: float | None) -> None:
        expires = None if ttl is None else self._clock() + ttl
        with self._lock:
            self._items[key] = (value, expires)
            self._items.move_to_end(key)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)

    def _forget(self, key: str) -> None:
        with self._lock:
            self._items.pop(key, None)

    def set(self, key: str, value: Any, *, ttl: float | None = None, deadline: Deadline | None = None) -> None:
        """Store ``value`` under ``key`` (a no-op in off/readonly/replay), here and in the store."""
        if self.store.mode not in WRITE_MODES:
            return
        self.put(key, value, ttl, deadline=deadline)

    def put(self, key: str, value: Any, ttl: float | None = None, *, deadline: Deadline | None = None) -> bool:
        """Write one entry to the store whatever the mode; kept in memory when the store took it."""
        taken = self.store.put(key, value, ttl, deadline=deadline)
        if taken:
            self._remember(key, copy_json(value), self.store.ttl if ttl is None else ttl)
        else:
            self._forget(key)
        return taken

    def single_flight(self, key: str, send: Callable[[], Any], *, deadline: Deadline | None = None) -> tuple[Any, bool]:
        """The store's single-flight; the answer is kept in memory when this process stored it."""
        value, cached = self.store.single_flight(key, send, deadline=deadline)
        if not cached and self.store.mode in WRITE_MODES and not self.store.disabled:
            self._remember(key, copy_json(value), self.store.ttl)
        elif cached and self.store.ttl is None:
            self._remember(key, copy_json(value), None)
        return value, cached

    def iter_entries(self) -> Iterator[tuple[str, str | bytes]]:
        """The store's entries (the tier holds nothing the store does not)."""
        return self.store.iter_entries()

    def put_entries(self, entries: list[tuple[str, Any, float | None]]) -> int:
        """Write a batch to the store; those keys are dropped from memory (the store has the news)."""
        with self._lock:
            for key, _, _ in entries:
                self._items.pop(key, None)
        return self.store.put_entries(entries)

    def stats(self) -> CacheStats:
        """The store's counters, with the hits served from memory added to its hits."""
        stats = self.store.stats()
        with self._lock:
            hits = self._hits
        return CacheStats(stats.hits + hits, stats.misses, stats.writes, stats.errors)

    def reset_stats(self) -> None:
        """Set every counter back to zero (the store's and the tier's)."""
        self.store.reset_stats()
        with self._lock:
            self._hits = 0

    def __len__(self) -> int:
        return len(self.store)

    def info(self) -> dict[str, Any]:
        """The store's description, plus the tier's size and capacity."""
        with self._lock:
            held = len(self._items)
        return {**self.store.info(), "memory_items": held, "memory_max_items": self.max_items}

    def clear(self) -> None:
        """Forget every entry, in memory and in the store."""
        with self._lock:
            self._items.clear()
        self.store.clear()

    def close(self) -> None:
        """Drop the tier and close the store."""
        with self._lock:
            self._items.clear()
        self.store.close()

    def __enter__(self) -> MemoryCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
