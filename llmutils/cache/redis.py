"""The shared cache on Redis: one server for every process and machine that points at it.

SQLite (:class:`~llmutils.cache.SQLiteCache`) serves one machine. When several machines share
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
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from .._cooldown import Cooldown
from .._deadline import Deadline
from .._exceptions import ConfigError
from .base import CACHE_MODES, SCHEMA_VERSION, WRITE_MODES, CacheBase, check_ttl, mask_url, url_secrets
from .keys import KEY_VERSION

__all__ = ["RedisCache", "REDIS_SCHEMES"]

logger = logging.getLogger("llmutils")

REDIS_SCHEMES = ("redis", "rediss", "unix")
DEFAULT_SOCKET_TIMEOUT = 1.0  # seconds: a dead or hung Redis costs a call at most about this much
DEFAULT_RETRY_INTERVAL = 5.0  # seconds without trying Redis again after a fault
DEFAULT_LOCK_TTL = 60.0  # seconds a single-flight lock lives at most (a crashed holder blocks no longer)

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


# -- the Redis store ------------------------------------------------------------------------------

_LIVE: weakref.WeakSet[RedisCache] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """Fresh locks in a forked child (a thread that held one is not there); redis-py redials by itself."""
    for cache in list(_LIVE):
        cache._stats_lock = threading.Lock()
        cache._off.after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class RedisCache(CacheBase):
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
        self.ttl = check_ttl(ttl)
        self.retry_interval = float(retry_interval)
        self.lock_ttl = float(lock_ttl)
        self.prefix = prefix
        self._lock_prefix = prefix.replace(":v", ":lock:v", 1) if ":v" in prefix else prefix + "lock:"
        self._channel_prefix = prefix.replace(":v", ":done:v", 1) if ":v" in prefix else prefix + "done:"
        self._secrets = url_secrets(url)
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
        self._off = Cooldown(self.retry_interval, clock=lambda: self._clock())
        self._warned_values = False
        self._hits = self._misses = self._writes = self._errors = 0
        _LIVE.add(self)

    def __repr__(self) -> str:
        return f"RedisCache({self.path!r}, mode={self.mode!r})"

    @property
    def url(self) -> str:
        """The URL with its password masked (same as ``path``)."""
        return self.path

    @property
    def disabled(self) -> bool:
        """True while a fault keeps Redis out of use (until ``retry_interval`` has passed and it answers)."""
        return self._off.tripped

    # -- lookups and writes -------------------------------------------------------------------

    def get(self, key: str) -> Any | None:
        """Return the stored value (a fresh copy), or None on a miss, an expired entry or a fault."""
        if type(key) is not str and not isinstance(key, str):
            raise TypeError(f"cache key must be str, not {type(key).__name__}")
        mode = self.mode
        if mode == "off":
            return None
        if mode == "refresh" or not self._usable():
            self.count(misses=1)
            return None
        try:
            raw = self._redis.get(self.prefix + key)
        except self._errors_type as exc:
            self._fault("reading", exc)
            self.count(misses=1)
            return None
        self._ok()
        value = self._decode(key, raw)
        if value is _MISSING:
            self.count(misses=1)
            return None
        self.count(hits=1)
        return value

    def put(self, key: str, value: Any, ttl: float | None = None, *, deadline: Deadline | None = None) -> bool:
        """Write one entry; True if Redis took it (faults are logged and counted, never raised).

        Each command is bounded by ``socket_timeout``, so a write never waits on a lock.
        """
        text, ttl = self.entry_text(key, value, ttl, time.time())
        if not self._usable():
            return False
        try:
            self._redis.set(self.prefix + key, text.encode("utf-8", "surrogatepass"), px=_ms(ttl))
        except self._errors_type as exc:
            self._fault("writing", exc)
            return False
        self._ok()
        self.count(writes=1)
        return True

    def single_flight(
        self,
        key: str,
        send: Callable[[], Any],
        *,
        deadline: Deadline | None = None,
        lock_ttl: float | None = None,
    ) -> tuple[Any, bool]:
        """Return ``(value, True)`` if another process or machine stored ``key`` meanwhile, else
        ``(send(), False)`` after storing it: N workers asking the same thing make one call.

        A short lock (``SET NX PX``, at most ``lock_ttl`` or :attr:`lock_ttl` seconds) marks the one
        sending; the others wait for its notification (pub/sub), and send themselves if it fails or
        dies (its lock expires) without storing anything. Only in readwrite mode; otherwise, or when
        Redis is down, it just sends and stores. A waiter waits no longer than ``deadline`` allows;
        then ``send`` runs with what is left (and raises TotalTimeoutError when nothing is).
        """
        ttl = self.lock_ttl if lock_ttl is None else min(self.lock_ttl, max(0.1, lock_ttl))
        if deadline is not None and deadline.bounded:
            ttl = min(ttl, max(0.1, deadline.remaining()))
        if self.mode != "readwrite" or ttl <= 0 or not self._usable():
            return self._send_and_store(key, send, deadline), False
        token = uuid.uuid4().hex
        entry, lock = self.prefix + key, self._lock_prefix + key
        try:
            claimed = self._claim(keys=[entry, lock], args=[token, _ms(ttl)])
        except self._errors_type as exc:
            self._fault("taking the single-flight lock", exc)
            return self._send_and_store(key, send, deadline), False
        self._ok()
        if claimed[0] == 1:  # stored between our lookup and now
            value = self._decode(key, claimed[1])
            if value is not _MISSING:
                return value, True
        elif claimed[0] == 2:  # ours: send, store, release, wake the waiters
            try:
                return self._send_and_store(key, send, deadline), False
            finally:
                try:
                    self._release(keys=[lock], args=[token, self._channel_prefix + key])
                except self._errors_type as exc:
                    self._fault("releasing the single-flight lock", exc)
        else:
            value = self._wait(key, ttl if deadline is None else deadline.timeout_for(ttl) or 0.0)
            if value is not _MISSING:
                return value, True
        return self._send_and_store(key, send, deadline), False

    def _send_and_store(self, key: str, send: Callable[[], Any], deadline: Deadline | None) -> Any:
        value = send()
        self.set(key, value, deadline=deadline)
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
            self.count(errors=1)
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

    def iter_entries(self) -> Iterator[tuple[str, str | bytes]]:
        """Every stored ``(key, JSON bytes)``; raises :class:`ConfigError` when Redis cannot be read."""
        keys = list(self.keys())
        if self.disabled:
            raise ConfigError(f"cannot read {self.path} (see the warning above)")
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            try:
                values = self._redis.mget([self.prefix + k for k in chunk])
            except self._errors_type as exc:
                self._fault("reading", exc)
                raise ConfigError(f"reading {self.path} failed (see the warning above)") from None
            yield from ((k, v) for k, v in zip(chunk, values) if v is not None)

    def put_entries(self, entries: list[tuple[str, Any, float | None]]) -> int:
        """Write ``(key, value, ttl)`` entries in one pipeline; return how many Redis took."""
        if not entries or not self._usable():
            return 0
        now = time.time()
        try:
            with self._redis.pipeline(transaction=False) as pipe:
                for key, value, ttl in entries:
                    text, ttl = self.entry_text(key, value, ttl, now)
                    pipe.set(self.prefix + key, text.encode("utf-8", "surrogatepass"), px=_ms(ttl))
                pipe.execute()
        except self._errors_type as exc:
            self._fault("writing", exc)
            return 0
        self._ok()
        self.count(writes=len(entries))
        return len(entries)

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
        if self.mode not in WRITE_MODES:
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
        return not self._off.blocked()

    def _ok(self) -> None:
        if self._off.tripped and self._off.reset():
            logger.info("llmutils cache %s answers again; using it", self.path)

    def _fault(self, doing: str, exc: BaseException) -> None:
        """Count the error, keep Redis out of use for retry_interval, and log one WARNING per outage."""
        self.count(errors=1)
        first = self._off.trip()
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
