"""The shared cache on Redis, the interface both cache backends offer, and the factory that picks one.

SQLite (:class:`~llmutils._cache.SQLiteCache`) serves one machine. When several machines share
one cache (a batch spread over workers, a web app with several servers), point them all at one
Redis with ``CACHE_URL = redis://[:password@]host:6379/0``. Same keys (:func:`make_key`), same JSON
values, same modes and counters; TTL is native Redis expiry. On the server (``redis-cli``)::

    llmutils:v1:<make_key() sha256 hex>   a string: {"value": <response>, "created": <unix time>,
                                           "expires": <unix time or null>}, with PX set when it expires
    llmutils:lock:v1:<key>                 single-flight lock: a random token, PX-bounded
    channel llmutils:done:v1:<key>         published when the lock's holder is done

    $ redis-cli --scan --pattern 'llmutils:v1:*' | head
    $ redis-cli get "llmutils:v1:<key>" | jq .value.model

Faults (Redis down at start or mid-run, timeouts, a wrong password) log one WARNING naming the URL
with its password masked, count an error, and calls go on without the cache; the connection is
tried again after ``retry_interval`` seconds, and one INFO says when Redis is back.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sqlite3
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, runtime_checkable
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from ._cache import (
    _WRITE_MODES,
    CACHE_MODES,
    KEY_VERSION,
    SCHEMA_VERSION,
    TABLE,
    CacheStats,
    SQLiteCache,
    _CacheBase,
    _check_ttl,
)
from ._exceptions import ConfigError

__all__ = [
    "CacheBackend",
    "RedisCache",
    "CopyResult",
    "open_cache",
    "copy_cache",
    "is_cache_url",
    "mask_url",
    "REDIS_SCHEMES",
]

logger = logging.getLogger("llmutils")

REDIS_SCHEMES = ("redis", "rediss", "unix")
DEFAULT_SOCKET_TIMEOUT = 1.0  # seconds: a dead or hung Redis costs a call at most about this much
DEFAULT_RETRY_INTERVAL = 5.0  # seconds without trying Redis again after a fault
DEFAULT_LOCK_TTL = 60.0  # seconds a single-flight lock lives at most (a crashed holder blocks no longer)

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_MISSING = object()

# Single-flight, one round trip: the entry if it is there, else the lock if it is free.
_CLAIM = """
local v = redis.call('GET', KEYS[1])
if v then return {1, v} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2} end
return {0}
"""
# Drop the lock only if it is still ours, and wake the waiters either way.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
redis.call('PUBLISH', ARGV[2], '1')
return 1
"""


@runtime_checkable
class CacheBackend(Protocol):
    """What the client needs of a cache: :class:`SQLiteCache` and :class:`RedisCache` both have it.

    ``path`` names the cache in messages (a file path, or a URL with its password masked);
    ``disabled`` is True while a fault keeps the cache out of use.
    """

    mode: str
    ttl: float | None
    path: Any

    @property
    def disabled(self) -> bool: ...

    def get(self, key: str) -> Any | None: ...

    def set(self, key: str, value: Any, *, ttl: float | None = None) -> None: ...

    def stats(self) -> CacheStats: ...

    def reset_stats(self) -> None: ...

    def __len__(self) -> int: ...

    def info(self) -> dict[str, Any]: ...

    def clear(self) -> None: ...

    def close(self) -> None: ...


# -- locations --------------------------------------------------------------------------------


def is_cache_url(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` is a URL (``scheme://...``) rather than a file path."""
    return isinstance(location, str) and bool(_URL.match(location))


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (in the user part and in a ``password=`` query)."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, host = netloc.rsplit("@", 1)
            user, sep, _ = userinfo.partition(":")
            netloc = f"{user}:***@{host}" if sep else f"{userinfo}@{host}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            if any(k.lower() == "password" for k, _ in pairs):
                query = urlencode([(k, "***" if k.lower() == "password" else v) for k, v in pairs], safe="*")
        # Not urlunsplit(): it turns unix:///path into unix:/path.
        return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "") + (f"#{parts.fragment}" if parts.fragment else "")
    except ValueError:
        return url.split("://", 1)[0] + "://***"


def _secrets(url: str) -> list[str]:
    """The password(s) in ``url``, raw and unquoted, to scrub from error texts."""
    found: list[str] = []
    try:
        parts = urlsplit(url)
        if parts.password:
            found.append(parts.password)
        found.extend(v for k, v in parse_qsl(parts.query) if k.lower() == "password" and v)
    except ValueError:
        pass
    return [s for s in {*found, *(unquote(s) for s in found)} if s]


def open_cache(location: str | os.PathLike[str], *, mode: str = "readwrite", ttl: float | None = None) -> CacheBackend:
    """The cache at ``location``: ``redis://``, ``rediss://`` or ``unix://`` is a :class:`RedisCache`;
    ``sqlite:///relative.sqlite``, ``sqlite:////absolute.sqlite`` or a plain path is a :class:`SQLiteCache`.

    >>> open_cache("redis://:secret@cache.internal:6379/0", ttl=86400)
    RedisCache('redis://:***@cache.internal:6379/0', mode='readwrite')
    """
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


# -- the Redis store ------------------------------------------------------------------------------

_LIVE: weakref.WeakSet[RedisCache] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """Fresh locks in a forked child (a thread that held one is not there); redis-py redials by itself."""
    for cache in list(_LIVE):
        cache._stats_lock = threading.Lock()
        cache._state_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class RedisCache(_CacheBase):
    """A response cache on a Redis server, shared by every process and machine that points at it.

    Usage::

        with RedisCache("redis://:secret@cache.internal:6379/0", ttl=86400) as cache:
            key = make_key({"model": "gpt-4.1-mini", "messages": messages})
            response = cache.get(key)
            if response is None:
                response = call_the_api()
                cache.set(key, response)

    ``mode`` and ``ttl`` are as for :class:`SQLiteCache` (ttl becomes the key's native expiry).
    ``socket_timeout`` bounds each Redis command and connect; after a fault Redis is left alone for
    ``retry_interval`` seconds (``clock`` measures them; tests inject one). ``lock_ttl`` caps the
    single-flight lock. Needs redis-py: ``pip install 'llmutils-openai[redis]'``. Nothing connects before
    the first call; ``close()`` (or ``with``) releases the connections and later calls reconnect.
    """

    def __init__(
        self,
        url: str,
        *,
        mode: str = "readwrite",
        ttl: float | None = None,
        socket_timeout: float = DEFAULT_SOCKET_TIMEOUT,
        retry_interval: float = DEFAULT_RETRY_INTERVAL,
        lock_ttl: float = DEFAULT_LOCK_TTL,
        prefix: str = f"llmutils:v{SCHEMA_VERSION}:",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if mode not in CACHE_MODES:
            raise ConfigError(f"cache mode {mode!r} is not one of {', '.join(CACHE_MODES)}")
        for name, value in (("socket_timeout", socket_timeout), ("retry_interval", retry_interval), ("lock_ttl", lock_ttl)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ConfigError(f"{name} {value!r} must be a number of seconds >= 0")
        self.path = mask_url(url)
        """The URL with its password masked: what messages and info() show."""
        self.mode = mode
        self.ttl = _check_ttl(ttl)
        self.retry_interval = float(retry_interval)
        self.lock_ttl = float(lock_ttl)
        self.prefix = prefix
        self._lock_prefix = prefix.replace(":v", ":lock:v", 1) if ":v" in prefix else prefix + "lock:"
        self._channel_prefix = prefix.replace(":v", ":done:v", 1) if ":v" in prefix else prefix + "done:"
        self._secrets = _secrets(url)
        self._clock = clock
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError:
            raise ConfigError(
                f"the cache at {self.path} is on Redis, which needs redis-py: pip install 'llmutils-openai[redis]'"
            ) from None
        self._errors_type: type[Exception] = redis.RedisError
        try:
            self._redis = redis.Redis.from_url(
                url,
                socket_timeout=socket_timeout or None,
                socket_connect_timeout=socket_timeout or None,
                # One quick retry re-dials a pooled connection that a Redis restart left stale;
                # timeouts are not retried, so a hung server costs one socket_timeout.
                retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
                client_name="llmutils",
            )
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"cache URL {self.path!r} is not a valid Redis URL ({self._scrub(str(exc))})") from None
        self._claim = self._redis.register_script(_CLAIM)
        self._release = self._redis.register_script(_RELEASE)
        self._stats_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._down = False
        self._retry_at = 0.0
        self._warned_values = False
        self._hits = self._misses = self._writes = self._errors = 0
        _LIVE.add(self)

    def __repr__(self) -> str:
        return f"RedisCache({self.path!r}, mode={self.mode!r})"

    def __enter__(self) -> RedisCache:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    @property
    def url(self) -> str:
        """The URL with its password masked (same as ``path``)."""
        return self.path

    @property
    def disabled(self) -> bool:
        """True while a fault keeps Redis out of use (until ``retry_interval`` has passed and it answers)."""
        return self._down

    # -- lookups and writes -------------------------------------------------------------------

    def get(self, key: str) -> Any | None:
        """Return the stored value (a fresh copy), or None on a miss, an expired entry or a fault."""
        if type(key) is not str and not isinstance(key, str):
            raise TypeError(f"cache key must be str, not {type(key).__name__}")
        mode = self.mode
        if mode == "off":
            return None
        if mode == "refresh" or not self._usable():
            self._count(misses=1)
            return None
        try:
            raw = self._redis.get(self.prefix + key)
        except self._errors_type as exc:
            self._fault("reading", exc)
            self._count(misses=1)
            return None
        self._ok()
        value = self._decode(key, raw)
        if value is _MISSING:
            self._count(misses=1)
            return None
        self._count(hits=1)
        return value

    def _put(self, key: str, value: Any, ttl: float | None) -> bool:
        """Write one entry; True if Redis took it (faults are logged and counted, never raised)."""
        text, ttl = self._entry(key, value, ttl, time.time())
        if not self._usable():
            return False
        try:
            self._redis.set(self.prefix + key, text.encode("utf-8", "surrogatepass"), px=_ms(ttl))
        except self._errors_type as exc:
            self._fault("writing", exc)
            return False
        self._ok()
        self._count(writes=1)
        return True

    def single_flight(self, key: str, send: Callable[[], Any], *, lock_ttl: float | None = None) -> tuple[Any, bool]:
        """Return ``(value, True)`` if another process or machine stored ``key`` meanwhile, else
        ``(send(), False)`` after storing it: N workers asking the same thing make one call.

        A short lock (``SET NX PX``, at most ``lock_ttl`` or :attr:`lock_ttl` seconds) marks the one
        sending; the others wait for its notification (pub/sub), and send themselves if it fails or
        dies (its lock expires) without storing anything. Only in readwrite mode; otherwise, or when
        Redis is down, it just sends and stores.
        """
        ttl = self.lock_ttl if lock_ttl is None else min(self.lock_ttl, max(0.1, lock_ttl))
        if self.mode != "readwrite" or ttl <= 0 or not self._usable():
            return self._send_and_store(key, send), False
        token = uuid.uuid4().hex
        entry, lock = self.prefix + key, self._lock_prefix + key
        try:
            claimed = self._claim(keys=[entry, lock], args=[token, _ms(ttl)])
        except self._errors_type as exc:
            self._fault("taking the single-flight lock", exc)
            return self._send_and_store(key, send), False
        self._ok()
        if claimed[0] == 1:  # stored between our lookup and now
            value = self._decode(key, claimed[1])
            if value is not _MISSING:
                return value, True
        elif claimed[0] == 2:  # ours: send, store, release, wake the waiters
            try:
                return self._send_and_store(key, send), False
            finally:
                try:
                    self._release(keys=[lock], args=[token, self._channel_prefix + key])
                except self._errors_type as exc:
                    self._fault("releasing the single-flight lock", exc)
        else:
            value = self._wait(key, ttl)
            if value is not _MISSING:
                return value, True
        return self._send_and_store(key, send), False

    def _send_and_store(self, key: str, send: Callable[[], Any]) -> Any:
        value = send()
        self.set(key, value)
        return value

    def _wait(self, key: str, ttl: float) -> Any:
        """The value once the lock's holder stores it, or _MISSING when it is gone without one or ``ttl`` passed."""
        entry, lock = self.prefix + key, self._lock_prefix + key
        deadline = time.monotonic() + ttl
        pubsub = self._redis.pubsub()
        try:
            pubsub.subscribe(self._channel_prefix + key)
            # Subscribed before looking, so a notification sent after the look is not lost.
            while (message := pubsub.get_message(timeout=min(1.0, ttl))) is not None and message["type"] != "subscribe":
                pass
            while True:
                with self._redis.pipeline(transaction=False) as pipe:
                    raw, left_ms = pipe.get(entry).pttl(lock).execute()
                if raw is not None:
                    return self._decode(key, raw)
                left = deadline - time.monotonic()
                if left_ms == -2 or left <= 0:  # the holder released without storing, or died
                    return _MISSING
                pubsub.get_message(timeout=max(0.001, min(left, 1.0, left_ms / 1000 if left_ms > 0 else 1.0)))
        except self._errors_type as exc:
            self._fault("waiting for another process's answer", exc)
            return _MISSING
        finally:
            pubsub.close()

    def _decode(self, key: str, raw: Any) -> Any:
        if raw is None:
            return _MISSING
        try:
            return json.loads(raw)["value"]
        except (TypeError, ValueError, KeyError) as exc:
            self._count(errors=1)
            level = logging.DEBUG if self._warned_values else logging.WARNING
            self._warned_values = True
            logger.log(level, "llmutils cache %s: entry %s is not a valid cache value (%s); treated as a miss", self.path, key, exc)
            return _MISSING

    # -- maintenance --------------------------------------------------------------------------

    def keys(self) -> Iterator[str]:
        """The cache keys stored (without the prefix); nothing when off or unreachable."""
        if self.mode == "off" or not self._usable():
            return
        try:
            for raw in self._redis.scan_iter(match=_glob_escape(self.prefix) + "*", count=1000):
                yield raw.decode("utf-8", "surrogateescape")[len(self.prefix) :]
        except self._errors_type as exc:
            self._fault("listing keys", exc)
            return
        self._ok()

    def __len__(self) -> int:
        """Number of stored entries (0 when off or unreachable)."""
        return sum(1 for _ in self.keys())

    def info(self) -> dict[str, Any]:
        """URL (password masked), entries, mode, ttl, key and schema versions, prefix, server version, disabled."""
        entries = len(self)
        server = None
        if self.mode != "off" and self._usable():
            try:
                server = self._redis.info("server").get("redis_version")
            except self._errors_type as exc:
                self._fault("reading server info", exc)
        return {
            "path": self.path,
            "backend": "redis",
            "entries": entries,
            "mode": self.mode,
            "ttl": self.ttl,
            "key_version": KEY_VERSION,
            "schema_version": SCHEMA_VERSION,
            "key_prefix": self.prefix,
            "redis_version": server,
            "disabled": self.disabled,
        }

    def clear(self) -> None:
        """Delete every entry under this cache's prefix (other keys on the server are left alone)."""
        if self.mode not in _WRITE_MODES:
            raise ConfigError(f"clear() writes to the cache, but {self.path} is open in mode {self.mode!r}; use 'readwrite'")
        batch: list[str] = []
        for key in self.keys():
            batch.append(self.prefix + key)
            if len(batch) >= 500:
                self._unlink(batch)
                batch = []
        if batch:
            self._unlink(batch)

    def _unlink(self, keys: list[str]) -> None:
        try:
            self._redis.unlink(*keys)
        except self._errors_type as exc:
            self._fault("clearing", exc)

    def close(self) -> None:
        """Close the connections; safe to call twice; later calls reconnect."""
        self._redis.close()

    # -- internals: faults --------------------------------------------------------------------

    def _usable(self) -> bool:
        """False while in the back-off after a fault: Redis is not even tried."""
        return not self._down or self._clock() >= self._retry_at

    def _ok(self) -> None:
        if self._down:
            with self._state_lock:
                was, self._down = self._down, False
            if was:
                logger.info("llmutils cache %s answers again; using it", self.path)

    def _fault(self, doing: str, exc: BaseException) -> None:
        """Count the error, keep Redis out of use for retry_interval, and log one WARNING per outage."""
        with self._stats_lock:
            self._errors += 1
        with self._state_lock:
            first = not self._down
            self._down = True
            self._retry_at = self._clock() + self.retry_interval
        reason = self._scrub(f"{type(exc).__name__}: {exc}")
        if first:
            logger.warning(
                "llmutils cache %s: %s failed (%s); calls go on without the cache, which is tried again every %gs",
                self.path,
                doing,
                reason,
                self.retry_interval,
            )
        else:
            logger.debug("llmutils cache %s (still unusable): %s failed (%s)", self.path, doing, reason)

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


def _ms(ttl: float | None) -> int | None:
    return None if ttl is None else max(1, math.ceil(ttl * 1000))


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


# -- copying between backends -----------------------------------------------------------------------


@dataclass(frozen=True)
class CopyResult:
    """What :func:`copy_cache` did: entries copied, skipped as expired, skipped as unreadable."""

    copied: int = 0
    expired: int = 0
    invalid: int = 0


def _entries(cache: Any) -> Iterator[tuple[str, Any]]:
    """(key, stored JSON text or bytes) of every entry of a SQLite or Redis cache."""
    if isinstance(cache, RedisCache):
        keys = list(cache.keys())
        if cache.disabled:
            raise ConfigError(f"cannot read {cache.path} (see the warning above)")
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            try:
                values = cache._redis.mget([cache.prefix + k for k in chunk])
            except cache._errors_type as exc:
                cache._fault("reading", exc)
                raise ConfigError(f"reading {cache.path} failed (see the warning above)") from None
            yield from ((k, v) for k, v in zip(chunk, values) if v is not None)
        return
    if not isinstance(cache, SQLiteCache):
        raise TypeError(f"cannot copy from {type(cache).__name__}: only SQLiteCache and RedisCache")
    len(cache)  # opens and checks the file: a file that is not a cache turns the cache off
    if cache.disabled:
        raise ConfigError(f"cannot read {cache.path} as a cache (see the warning above)")
    conn = sqlite3.connect(f"file:{quote(str(cache.path))}?mode=ro", uri=True, timeout=cache.busy_timeout)
    try:
        yield from conn.execute(f'SELECT key, value FROM "{TABLE}"')
    finally:
        conn.close()


def copy_cache(source: CacheBackend, dest: CacheBackend, *, batch_size: int = 500) -> CopyResult:
    """Copy every live entry of ``source`` into ``dest`` (SQLite -> Redis, or either way); return counts.

    Entries keep their JSON and their remaining lifetime (expired ones are skipped); an entry
    already in ``dest`` is overwritten. ``dest`` must be open for writing.
    ``llmutils cache copy llmutils_cache.sqlite redis://host:6379/0`` does the same from the shell.
    """
    if dest.mode not in _WRITE_MODES:
        raise ConfigError(f"copy writes to {dest.path}, which is open in mode {dest.mode!r}; use 'readwrite'")
    copied = expired = invalid = 0
    now = time.time()
    pending: list[tuple[str, bytes, int | None]] = []

    def flush() -> None:
        nonlocal copied
        if not pending:
            return
        assert isinstance(dest, RedisCache)
        if dest._usable():
            try:
                with dest._redis.pipeline(transaction=False) as pipe:
                    for key, text, px in pending:
                        pipe.set(dest.prefix + key, text, px=px)
                    pipe.execute()
            except dest._errors_type as exc:
                dest._fault("writing", exc)
            else:
                dest._ok()
                dest._count(writes=len(pending))
                copied += len(pending)
        pending.clear()

    for key, raw in _entries(source):
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
        if isinstance(dest, RedisCache):
            text = raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass")
            pending.append((key, text, _ms(left)))
            if len(pending) >= batch_size:
                flush()
        elif isinstance(dest, SQLiteCache):
            copied += dest._put(key, value, left)
        else:
            raise TypeError(f"cannot copy into {type(dest).__name__}: only SQLiteCache and RedisCache")
        if dest.disabled:
            break
    if isinstance(dest, RedisCache):
        flush()
    return CopyResult(copied, expired, invalid)
