"""What every cache backend shares: modes, counters, the stored entry's form, URL masking.

Backends (:mod:`llmutils.cache.sqlite`, :mod:`llmutils.cache.redis`) build on :class:`CacheBase`
and the public helpers here, and on nothing private of each other.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from .._deadline import Deadline
from .._exceptions import ConfigError
from .keys import check_json

__all__ = [
    "CACHE_MODES",
    "META_TABLE",
    "READ_MODES",
    "SCHEMA_VERSION",
    "TABLE",
    "VALUE_FORMAT",
    "WRITE_MODES",
    "CacheBase",
    "CacheStats",
    "check_ttl",
    "encode_entry",
    "is_cache_url",
    "mask_url",
    "url_secrets",
]

CACHE_MODES = ("off", "readwrite", "readonly", "replay", "refresh")
READ_MODES = frozenset({"readwrite", "readonly", "replay"})
WRITE_MODES = frozenset({"readwrite", "refresh"})
SCHEMA_VERSION = 1  # layout of the store; a store with a newer one is left alone
TABLE = "responses"
META_TABLE = "llmutils_meta"
VALUE_FORMAT = '{"value": <response>, "created": <unix time>, "expires": <unix time or null>}'

# Built once: json.dumps() with options builds a new encoder on every call.
_VALUE_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
_ASCII_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of one cache's counters: lookups served (hits), not served (misses), writes, faults."""

    hits: int = 0
    misses: int = 0
    writes: int = 0
    errors: int = 0


def check_ttl(ttl: float | None) -> float | None:
    """``ttl`` as float seconds > 0, or None; ConfigError otherwise."""
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl < math.inf:
        raise ConfigError(f"cache ttl {ttl!r} must be a number of seconds > 0, or None for no expiry")
    return float(ttl)


def encode_entry(value: Any, now: float, ttl: float | None) -> str:
    """The JSON text stored for ``value``: ``{"value": ..., "created": now, "expires": ...}``.

    Text is stored as is (UTF-8), except in an entry holding a lone surrogate (``"\\ud83d"``, not
    valid Unicode, so not encodable as UTF-8): that entry is stored with ``\\uXXXX`` escapes,
    which JSON reads back to the very same string.
    """
    entry = {"value": value, "created": now, "expires": None if ttl is None else now + ttl}
    text = _VALUE_JSON(entry)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = _ASCII_JSON(entry)
    return text


class CacheBase:
    """Thread-safe counters, ``set`` and the default single-flight, shared by every backend.

    A subclass sets ``mode``, ``ttl`` and ``path`` and implements :meth:`put` (one write that
    never raises for a store fault) and ``get``.
    """

    mode: str
    ttl: float | None
    path: Any

    _stats_lock: threading.Lock
    _hits: int = 0
    _misses: int = 0
    _writes: int = 0
    _errors: int = 0

    def stats(self) -> CacheStats:
        """Return a snapshot of this object's hits, misses, writes and errors."""
        with self._stats_lock:
            return CacheStats(self._hits, self._misses, self._writes, self._errors)

    def reset_stats(self) -> None:
        """Set every counter back to zero."""
        with self._stats_lock:
            self._hits = self._misses = self._writes = self._errors = 0

    def count(self, hits: int = 0, misses: int = 0, writes: int = 0, errors: int = 0) -> None:
        """Add to the counters (thread-safe)."""
        with self._stats_lock:
            self._hits += hits
            self._misses += misses
            self._writes += writes
            self._errors += errors

    def set(self, key: str, value: Any, *, ttl: float | None = None, deadline: Deadline | None = None) -> None:
        """Store ``value`` (plain JSON, else TypeError) under ``key``; a no-op in off/readonly/replay.

        ``deadline`` bounds any wait for the store (a lock held by another process): a write that
        cannot finish in time is dropped, counted as an error and logged once.
        """
        if self.mode not in WRITE_MODES:
            return
        self.put(key, value, ttl, deadline=deadline)

    def put(self, key: str, value: Any, ttl: float | None = None, *, deadline: Deadline | None = None) -> bool:
        """Write one entry whatever the mode; True if the store took it. Faults are logged, not raised."""
        raise NotImplementedError

    def entry_text(self, key: str, value: Any, ttl: float | None, now: float) -> tuple[str, float | None]:
        """Check key, value and ttl; return the JSON text to store and the ttl that applies."""
        if not isinstance(key, str):
            raise TypeError(f"cache key must be str, not {type(key).__name__}")
        ttl = self.ttl if ttl is None else check_ttl(ttl)
        check_json(value, "value")
        return encode_entry(value, now, ttl), ttl

    def single_flight(self, key: str, send: Callable[[], Any], *, deadline: Deadline | None = None) -> tuple[Any, bool]:
        """Return ``(send(), False)`` after storing the value.

        Backends shared between processes (Redis) override this so that one of N identical
        requests is sent while the others wait for its answer (``(value, True)``). Identical
        requests within one client are already folded by the client itself.
        """
        value = send()
        self.set(key, value, deadline=deadline)
        return value, False

    def iter_entries(self) -> Iterator[tuple[str, str | bytes]]:
        """Every stored ``(key, JSON text)``, for :func:`~llmutils.copy_cache`."""
        raise NotImplementedError

    def put_entries(self, entries: list[tuple[str, Any, float | None]]) -> int:
        """Write ``(key, value, ttl)`` entries (a batch); return how many the store took."""
        return sum(1 for key, value, ttl in entries if self.put(key, value, ttl))

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    if TYPE_CHECKING:  # each store defines it

        def close(self) -> None: ...


def is_cache_url(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` is a URL (``scheme://...``) rather than a file path."""
    return isinstance(location, str) and bool(_URL.match(location))


def _split_userinfo(url: str) -> tuple[str, str | None, str | None, str]:
    """``(scheme, user, password, rest)``: the user part ends at the LAST ``@``, so a password holding
    ``#``, ``/`` or ``?`` unencoded (which a URL parser would cut at) is still taken whole."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "", None, None, url
    at = rest.rfind("@")
    if at < 0:
        return scheme, None, None, rest
    userinfo, rest = rest[:at], rest[at + 1 :]
    user, colon, password = userinfo.partition(":")
    return scheme, user, password if colon else None, rest


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (in the user part and in a ``password=`` query).

    >>> mask_url("redis://:s3cr#t@cache.internal:6379/0")
    'redis://:***@cache.internal:6379/0'
    """
    scheme, user, password, rest = _split_userinfo(url)
    if not scheme:
        return url
    if user is None:
        head = ""
    elif password is None:
        head = f"{user}@"
    else:
        head = f"{user}:***@"
    try:
        parts = urlsplit(f"{scheme}://{rest}")
    except ValueError:
        return f"{scheme}://{head}***"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() == "password" for k, _ in pairs):
            query = urlencode([(k, "***" if k.lower() == "password" else v) for k, v in pairs], safe="*")
    # Not urlunsplit(): it turns unix:///path into unix:/path.
    tail = (f"?{query}" if query else "") + (f"#{parts.fragment}" if parts.fragment else "")
    return f"{scheme}://{head}{parts.netloc}{parts.path}{tail}"


def url_secrets(url: str) -> list[str]:
    """The password(s) in ``url``, raw and unquoted, to scrub from error texts."""
    found: list[str] = []
    scheme, _, password, rest = _split_userinfo(url)
    if password:
        found.append(password)
    try:
        found.extend(v for k, v in parse_qsl(urlsplit(f"{scheme}://{rest}").query) if k.lower() == "password" and v)
    except ValueError:
        pass
    return [s for s in {*found, *(unquote(s) for s in found)} if s]
