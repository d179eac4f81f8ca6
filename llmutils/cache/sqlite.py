"""The response cache: one SQLite file of JSON values, shared by threads, processes and forks.

On disk (readable with the ``sqlite3`` shell)::

    responses(key TEXT PRIMARY KEY, value BLOB)   -- written by sqlitedict; value is JSON text:
        {"value": <the response>, "created": <unix time>, "expires": <unix time or null>}
    llmutils_meta(key TEXT PRIMARY KEY, value TEXT)  -- schema_version, format, created_by
    llmutils_leases(key TEXT PRIMARY KEY, holder TEXT, host TEXT, pid INTEGER, expires REAL)
        -- single-flight across processes: who is sending the request for a key right now

    $ sqlite3 llmutils_cache.sqlite "select key, json_extract(value, '$.value.model') from responses"

Writes go through one :class:`sqlitedict.SqliteDict` per cache object and process (autocommit, WAL,
JSON, never pickle); reads go through plain ``sqlite3`` connections from a small pool, which is
what keeps a hit near the cost of a raw ``SELECT``.

Single-flight across processes (readwrite mode): of N processes missing the same key at once, one
takes a short *lease* on it (a row in ``llmutils_leases`` with its pid, host and expiry, in one
``BEGIN IMMEDIATE`` transaction), sends the request, stores the answer and drops the row; the others
poll the file for that answer within their deadline, and send themselves only when the lease has
expired (``lease_ttl``, 60 s, or the holder's deadline) or its holder has died (its pid is gone, on
the same host), or when the holder gave up without an answer (then one of them takes the lease).

Faults never raise: they log one WARNING naming the file, count an error, and calls go on without
the cache (the file is left as it is). A transient fault (a lock held past ``busy_timeout``, a disk
I/O error, a full disk) turns the cache off for ``retry_interval`` seconds (30 by default); then it
is tried again, and one INFO says when it works again. Any other fault (a file that is not an
SQLite file or not a cache, a newer schema, a corrupt file, an unwritable place) turns it off for
the life of the object. Three faults leave it on: a write that cannot get the lock before the
call's deadline is dropped (one WARNING, one error counted); a write refused because of its entry
alone is skipped; a file that cannot be written (read-only file or file system) keeps serving hits
while writes pause for ``retry_interval``. A file deleted or replaced while in use is noticed by the
next write, which creates it again (one WARNING).
"""

from __future__ import annotations

import atexit
import errno
import itertools
import json
import logging
import math
import os
import socket
import sqlite3
import stat
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlitedict import SqliteDict

from .._cooldown import Cooldown
from .._deadline import Deadline
from .._exceptions import ConfigError
from .base import CACHE_MODES, META_TABLE, SCHEMA_VERSION, TABLE, VALUE_FORMAT, WRITE_MODES, CacheBase, check_ttl
from .keys import KEY_VERSION

__all__ = ["SQLiteCache", "DEFAULT_RETRY_INTERVAL", "DEFAULT_LEASE_TTL"]

logger = logging.getLogger("llmutils")

DEFAULT_RETRY_INTERVAL = 30.0  # seconds a transient fault keeps the cache off before it is tried again
DEFAULT_LEASE_TTL = 60.0  # seconds a single-flight lease lives at most (a hung holder blocks no longer)

LEASE_TABLE = "llmutils_leases"
_CREATE_LEASES = (
    f'CREATE TABLE IF NOT EXISTS "{LEASE_TABLE}" '
    "(key TEXT PRIMARY KEY, holder TEXT NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL, expires REAL NOT NULL)"
)
_LEASE_POLL_FIRST = 0.002  # seconds between looks for the holder's answer, growing to
_LEASE_POLL_MAX = 0.05
_LEASE_SHARE_OF_DEADLINE = 0.25  # of the call's time left, spent at most waiting for the lock to take a lease
_HOST = socket.gethostname()
_lease_ids = itertools.count()
_SELECT_LEASE = 'SELECT holder, host, pid, expires FROM "llmutils_leases" WHERE key = ?'
_TAKE_LEASE = 'INSERT OR REPLACE INTO "llmutils_leases" (key, holder, host, pid, expires) VALUES (?, ?, ?, ?, ?)'
_DROP_LEASE = 'DELETE FROM "llmutils_leases" WHERE key = ? AND holder = ?'
_MINE = object()
_NOTHING = object()


def _holder_alive(host: str, pid: int) -> bool:
    """False only when the lease's holder ran on this host and its process is gone."""
    if host != _HOST or pid == os.getpid() or os.name == "nt":  # elsewhere (or Windows): trust the expiry
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists but belongs to another user
        return True
    return True

_SQLITE_HEADER = b"SQLite format 3\x00"
_SELECT = f'SELECT value FROM "{TABLE}" WHERE key = ?'
_CREATE_TABLE = f'CREATE TABLE IF NOT EXISTS "{TABLE}" (key TEXT PRIMARY KEY, value BLOB)'  # sqlitedict's DDL
_CREATE_META = f'CREATE TABLE IF NOT EXISTS "{META_TABLE}" (key TEXT PRIMARY KEY, value TEXT)'
# What failed, ranked: an outage ends when something at least as demanding works again.
_OPEN, _READ, _WRITE = 0, 1, 2


class _Fault(Exception):
    """Internal: the cache cannot be used; the message says why, for the one WARNING."""


def _as_is(text: str) -> str:
    """sqlitedict encoder: values arrive already encoded as JSON text."""
    return text


# -- process-wide bookkeeping: sqlitedict's log noise, forks, exit -------------------------------

_QUIET_THREADS: set[int] = set()  # threads whose sqlitedict ERROR lines our one WARNING replaces


class _QuietSqliteDict(logging.Filter):
    """Drop sqlitedict's multi-line ERROR logs for failures that llmutils reports itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread not in _QUIET_THREADS


_sqlitedict_log = logging.getLogger("sqlitedict.SqliteMultithread")
if not any(isinstance(f, _QuietSqliteDict) for f in _sqlitedict_log.filters):
    _sqlitedict_log.addFilter(_QuietSqliteDict())


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence sqlitedict's own error logging for the calling thread while it runs our write."""
    ident = threading.get_ident()
    _QUIET_THREADS.add(ident)
    try:
        yield
    finally:
        _QUIET_THREADS.discard(ident)


_LIVE: weakref.WeakSet[SQLiteCache] = weakref.WeakSet()
_FORKING: list[SQLiteCache] = []
_ABANDONED: list[Any] = []  # connections inherited through a fork without our hooks: never used, never closed


def _before_fork() -> None:
    """Quiesce and close every cache so no SQLite connection or writer thread crosses the fork."""
    _FORKING[:] = list(_LIVE)
    for cache in _FORKING:
        cache._before_fork()


def _after_fork_in_parent() -> None:
    """Let the parent's caches run again; they reopen on next use."""
    for cache in _FORKING:
        cache._after_fork(child=False)
    _FORKING.clear()


def _after_fork_in_child() -> None:
    """Give the child's caches fresh locks; they open their own connections on first use."""
    for cache in _FORKING:
        cache._after_fork(child=True)
    _FORKING.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)


@atexit.register
def _close_all_at_exit() -> None:
    """Close caches the program left open, while sqlitedict's worker threads still run."""
    for cache in list(_LIVE):
        try:
            cache.close()
        except Exception:  # pragma: no cover - best effort at exit
            pass


# -- the store ---------------------------------------------------------------------------------


class SQLiteCache(CacheBase):
    """A response cache in one SQLite file, safe to share across threads, processes and forks.

    Usage::

        with SQLiteCache("llmutils_cache.sqlite", ttl=86400) as cache:
            key = make_key({"model": "gpt-4.1-mini", "messages": messages})
            response = cache.get(key)
            if response is None:
                response = call_the_api()
                cache.set(key, response)

    ``mode`` is one of CACHE_MODES: ``readwrite`` (default), ``readonly``, ``replay`` (reads
    only; the client raises CacheMissError on a miss), ``refresh`` (never reads, overwrites) or
    ``off`` (never touches the file). ``ttl`` (seconds) is the lifetime given to entries this object
    writes, None for no expiry. ``busy_timeout`` is how long SQLite waits for another process's lock.
    After a transient fault (locked, disk I/O, disk full) the cache is off for ``retry_interval``
    seconds, measured with ``clock``; other faults turn it off for good (see the module docstring).
    Nothing touches the file before the first call; ``close()`` (or ``with``) releases it.
    ``stats()`` counts a miss for every lookup not served from the file (refresh mode and a
    disabled cache included) and an error for every fault or unreadable entry.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        mode: str = "readwrite",
        ttl: float | None = None,
        busy_timeout: float = 30.0,
        retry_interval: float = DEFAULT_RETRY_INTERVAL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if mode not in CACHE_MODES:
            raise ConfigError(f"cache mode {mode!r} is not one of {', '.join(CACHE_MODES)}")
        if not isinstance(busy_timeout, (int, float)) or isinstance(busy_timeout, bool) or not 0 <= busy_timeout < math.inf:
            raise ConfigError(f"busy_timeout {busy_timeout!r} must be a number of seconds >= 0")
        if not isinstance(retry_interval, (int, float)) or isinstance(retry_interval, bool) or not 0 <= retry_interval < math.inf:
            raise ConfigError(f"retry_interval {retry_interval!r} must be a number of seconds >= 0")
        self.path = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
        self.mode = mode
        self.ttl = check_ttl(ttl)
        self.busy_timeout = float(busy_timeout)
        self.retry_interval = float(retry_interval)
        self._clock = clock
        self._lock = threading.Lock()  # open/close/fork and every write
        self._stats_lock = threading.Lock()
        self._pool_lock = threading.Lock()  # read connections
        self._pool_cv = threading.Condition(self._pool_lock)  # waits for in-flight reads before a fork
        self._pool: list[tuple[int, sqlite3.Connection]] = []
        self._busy = 0  # read connections checked out
        self._frozen = False  # a fork is under way: no new reads
        self._gen = 0  # bumped on close/fork: older read connections are closed, not pooled
        self._ready = False
        self._db: SqliteDict | None = None
        self._pid = os.getpid()
        # Off after a fault: for retry_interval seconds if transient, for good otherwise.
        self._off = Cooldown(self.retry_interval, clock=lambda: self._clock())
        self._outage: int | None = None  # rank of what failed in the current outage (_OPEN/_READ/_WRITE)
        self._busy_ms = int(self.busy_timeout * 1000)  # the writer's busy_timeout now
        self._warned_deadline = False
        self._identity: tuple[int, int] | None = None  # (device, inode) of the file opened
        # A file we may read but not write (read-only file or file system): hits go on, writes pause.
        self._no_writes = Cooldown(self.retry_interval, clock=lambda: self._clock())
        self._warned_entry = False
        self._warned_rows = False
        self._leases_ready = False  # the lease table has been created (or found) through this object
        self._hits = self._misses = self._writes = self._errors = 0
        _LIVE.add(self)

    def __repr__(self) -> str:
        return f"SQLiteCache({str(self.path)!r}, mode={self.mode!r})"

    @property
    def disabled(self) -> bool:
        """True while a fault keeps this cache out of use: until ``retry_interval`` has passed after a
        transient fault (locked, disk I/O, disk full), for good after any other fault."""
        return self._off.blocked()

    # -- lookups and writes -------------------------------------------------------------------

    def get(self, key: str) -> Any | None:
        """Return a fresh copy of the stored value, or None on a miss, an expired entry or a fault."""
        if type(key) is not str and not isinstance(key, str):
            raise TypeError(f"cache key must be str, not {type(key).__name__}")
        mode = self.mode
        if mode == "off":
            return None
        if (
            mode == "refresh"
            or self._off.blocked()
            or not (self._ready and self._pid == os.getpid()) and not self._open()
        ):
            self.count(misses=1)
            return None
        item = self._checkout()
        if item is None:
            self.count(misses=1)
            return None
        try:
            row = item[1].execute(_SELECT, (key,)).fetchone()
        except sqlite3.Error as exc:
            self._checkin(item, keep=False)
            self._fault(f"reading failed ({type(exc).__name__}: {exc})", exc, _READ)
            self.count(misses=1)
            return None
        self._checkin(item)
        if self._outage is not None:
            self._works(_READ)
        if row is None:
            self.count(misses=1)
            return None
        try:
            entry = json.loads(row[0])
            value = entry["value"]
            expires = entry.get("expires")
            expired = expires is not None and self._clock() >= expires
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            self._bad_row(key, exc)
            return None
        if expired:
            self.count(misses=1)
            return None
        self.count(hits=1)
        return value

    def put(self, key: str, value: Any, ttl: float | None = None, *, deadline: Deadline | None = None) -> bool:
        """Write one entry; True if it was committed (faults are logged and counted, never raised).

        With a bounded ``deadline`` the write waits for another writer (a thread of this process,
        or another process's lock) only as long as the call has left: a write that cannot finish in
        time is dropped, counted as an error and logged once, and the cache stays on.
        """
        text, ttl = self.entry_text(key, value, ttl, self._clock())
        if self._off.blocked() or self._no_writes.blocked():
            return False
        wait = None if deadline is None else deadline.timeout_for(self.busy_timeout)
        if not (self._lock.acquire() if wait is None else self._lock.acquire(timeout=wait)):
            self._late_write("another thread was still writing")
            return False
        try:
            if self._ready and self._pid == os.getpid():
                self._check_still_there()
            db = self._writer()
            if db is None:
                return False
            limit = self.busy_timeout if deadline is None else deadline.timeout_for(self.busy_timeout)
            busy_ms = int(self.busy_timeout * 1000 if limit is None else limit * 1000)
            with _quiet():
                try:
                    if busy_ms != self._busy_ms:
                        db.conn.select_one(f"PRAGMA busy_timeout = {busy_ms}")
                        self._busy_ms = busy_ms
                    db[key] = text  # autocommit=True: blocks until committed, raises the write's own error
                except Exception as exc:
                    self._close_writer()
                    if busy_ms < int(self.busy_timeout * 1000) and _is_busy_error(exc):
                        self._late_write("the file stayed locked by another connection")
                        return False
                    if _is_entry_error(exc):
                        self._bad_entry(key, exc)
                        return False
                    if _is_readonly_error(exc):
                        self._read_only(exc)
                        return False
                    self._fault(f"writing failed ({type(exc).__name__}: {exc})", exc, _WRITE)
                    return False
        finally:
            self._lock.release()
        self.count(writes=1)
        if self._outage is not None:
            self._works(_WRITE)
        if self._no_writes.tripped and self._no_writes.reset():
            logger.info("llmutils cache %s can be written again; storing new answers", self.path)
        return True

    def _check_still_there(self) -> None:
        """Before a write (``_lock`` held): if the file was deleted or replaced since it was opened,
        log one WARNING and close everything, so the write recreates the file instead of going to
        the deleted one."""
        try:
            st = os.stat(self.path)
            identity: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except OSError:
            identity = None
        if identity == self._identity:
            return
        logger.warning(
            "llmutils cache %s was %s while in use; creating it again for this write",
            self.path,
            "deleted" if identity is None else "replaced by another file",
        )
        self._close_writer()
        self._drain_pool()
        self._ready = False
        self._identity = None

    def _read_only(self, exc: BaseException) -> None:
        """The file cannot be written (read-only file or file system): keep serving hits, pause writes."""
        self.count(errors=1)
        if self._no_writes.trip():
            logger.warning(
                "llmutils cache %s cannot be written (%s); it keeps serving the answers it holds, new "
                "answers are not stored (tried again in %gs)",
                self.path,
                exc,
                self.retry_interval,
            )

    def _bad_entry(self, key: str, exc: BaseException) -> None:
        """A write refused because of that entry alone (too big, not encodable): an error, the cache stays on."""
        self.count(errors=1)
        level = logging.DEBUG if self._warned_entry else logging.WARNING
        self._warned_entry = True
        logger.log(level, "llmutils cache %s: entry %s could not be stored (%s: %s); it is not cached", self.path, key, type(exc).__name__, exc)

    def _late_write(self, why: str) -> None:
        """A write given up because the call's deadline came first: an error, one WARNING, cache stays on."""
        self.count(errors=1)
        level = logging.DEBUG if self._warned_deadline else logging.WARNING
        self._warned_deadline = True
        logger.log(
            level,
            "llmutils cache %s: a write was dropped because %s past the call's total_timeout; "
            "the answer was returned without being cached",
            self.path,
            why,
        )

    # -- single-flight across processes: leases -----------------------------------------------

    lease_ttl: float = DEFAULT_LEASE_TTL
    """Seconds a single-flight lease lives at most (less when the holder's deadline is nearer)."""

    def single_flight(self, key: str, send: Callable[[], Any], *, deadline: Deadline | None = None) -> tuple[Any, bool]:
        """Return ``(value, True)`` if another process stored ``key`` meanwhile, else ``(send(), False)``
        after storing it: N processes asking the same thing at once make one call.

        One caller takes the key's lease (see the module docstring) and sends; the others poll the
        file for its answer and take the lease themselves when it expires, its holder dies, or the
        holder gives up without an answer. Only in readwrite mode while the file works; otherwise
        (or when the lease table cannot be used) it just sends and stores. A waiter waits no longer
        than ``deadline`` allows; then ``send`` runs with what is left (and raises
        TotalTimeoutError when nothing is).
        """
        if self.mode != "readwrite" or self._off.blocked():
            return super().single_flight(key, send, deadline=deadline)
        holder = f"{_HOST}:{os.getpid()}:{next(_lease_ids)}"
        delay = _LEASE_POLL_FIRST
        while True:
            ttl = self.lease_ttl if deadline is None else (deadline.timeout_for(self.lease_ttl) or 0.0)
            if ttl <= 0:
                break
            other = self._take_lease(key, holder, ttl, deadline)
            if other is None:  # the lease table cannot be used: no cross-process single-flight
                break
            if other is _MINE:
                try:
                    value, _ = self._look(key)  # stored between the caller's lookup and the lease
                    if value is not _NOTHING:
                        return value, True
                    return super().single_flight(key, send, deadline=deadline)
                finally:
                    self._drop_lease(key, holder)
            # Another process holds the lease: wait for its answer while the lease stands.
            while True:
                value, lease = self._look(key)
                if value is not _NOTHING:
                    return value, True
                now = self._clock()
                if lease is None or lease[3] <= now or not _holder_alive(lease[1], lease[2]):
                    break  # released without an answer, expired, or its holder died: take it
                left = None if deadline is None else deadline.timeout_for(None)
                if left is not None and left <= 0:
                    return super().single_flight(key, send, deadline=deadline)  # raises the deadline's error
                time.sleep(min(delay, lease[3] - now, math.inf if left is None else left))
                delay = min(delay * 2, _LEASE_POLL_MAX)
        return super().single_flight(key, send, deadline=deadline)

    def _take_lease(self, key: str, holder: str, ttl: float, deadline: Deadline | None) -> Any:
        """Take ``key``'s lease for ``ttl`` seconds unless a live holder has it.

        Returns ``_MINE``, or the other holder's row, or None when the lease table cannot be used.
        """
        if not (self._ready and self._pid == os.getpid()) and not self._open():
            return None
        try:
            conn = self._connect(readonly=False)
        except sqlite3.Error as exc:
            logger.debug("llmutils cache %s: no lease (%s)", self.path, exc)
            return None
        try:
            # Wait for the write lock as a cache write does, but spend at most a quarter of what is
            # left of the call's time on it: then go without a lease (and maybe send a duplicate).
            wait = self.busy_timeout
            if deadline is not None and deadline.bounded:
                wait = min(wait, deadline.remaining() * _LEASE_SHARE_OF_DEADLINE)
            conn.execute(f"PRAGMA busy_timeout = {int(wait * 1000)}")
            if not self._leases_ready:
                conn.execute(_CREATE_LEASES)
                self._leases_ready = True
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute(_SELECT_LEASE, (key,)).fetchone()
                now = self._clock()
                if row is not None and row[0] != holder and row[3] > now and _holder_alive(row[1], row[2]):
                    conn.execute("COMMIT")
                    return row
                conn.execute(
                    _TAKE_LEASE,
                    (key, holder, _HOST, os.getpid(), now + ttl),
                )
                conn.execute("COMMIT")
                return _MINE
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            logger.debug("llmutils cache %s: no lease (%s)", self.path, exc)
            return None
        finally:
            conn.close()

    def _drop_lease(self, key: str, holder: str) -> None:
        """Delete ``key``'s lease row if it is still ``holder``'s."""
        try:
            conn = self._connect(readonly=False)
            try:
                conn.execute(_DROP_LEASE, (key, holder))
            finally:
                conn.close()
        except sqlite3.Error as exc:  # the lease then ends at its expiry
            logger.debug("llmutils cache %s: dropping a lease failed (%s)", self.path, exc)

    def _look(self, key: str) -> tuple[Any, tuple[str, str, int, float] | None]:
        """The stored value (or ``_NOTHING``) and the key's lease row, without counting a lookup."""
        item = self._checkout()
        if item is None:
            return _NOTHING, None
        try:
            row = item[1].execute(_SELECT, (key,)).fetchone()
            lease = item[1].execute(_SELECT_LEASE, (key,)).fetchone()
        except sqlite3.Error:
            self._checkin(item, keep=False)
            return _NOTHING, None
        self._checkin(item)
        if row is None:
            return _NOTHING, lease
        try:
            entry = json.loads(row[0])
            expires = entry.get("expires")
            if expires is not None and self._clock() >= expires:
                return _NOTHING, lease
            return entry["value"], lease
        except (TypeError, ValueError, KeyError, AttributeError):
            return _NOTHING, lease

    # -- maintenance --------------------------------------------------------------------------

    def __len__(self) -> int:
        """Number of stored entries, expired ones included (0 when off or disabled)."""
        rows = self._query(f'SELECT COUNT(*) FROM "{TABLE}"')
        return rows[0][0] if rows else 0

    def info(self) -> dict[str, Any]:
        """Path, entries, size on disk (file plus WAL), mode, key and schema versions, disabled."""
        size = 0
        for suffix in ("", "-wal"):
            try:
                size += os.stat(f"{self.path}{suffix}").st_size
            except OSError:
                pass
        return {
            "path": str(self.path),
            "entries": len(self),
            "size_bytes": size,
            "mode": self.mode,
            "ttl": self.ttl,
            "key_version": KEY_VERSION,
            "schema_version": SCHEMA_VERSION,
            "disabled": self._off.blocked(),
        }

    def iter_entries(self) -> Iterator[tuple[str, str | bytes]]:
        """Every stored ``(key, JSON text)``, read through a read-only connection of its own.

        Raises :class:`ConfigError` when the file cannot be read as a cache.
        """
        len(self)  # opens and checks the file: a file that is not a cache turns the cache off
        if self.disabled:
            raise ConfigError(f"cannot read {self.path} as a cache (see the warning above)")
        conn = sqlite3.connect(f"file:{quote(str(self.path))}?mode=ro", uri=True, timeout=self.busy_timeout)
        try:
            yield from conn.execute(f'SELECT key, value FROM "{TABLE}"')
        finally:
            conn.close()

    def clear(self) -> None:
        """Delete every entry (the file, its schema marker and its WAL setting stay)."""
        self._require_writable("clear()")
        with self._lock:
            db = self._writer()
            if db is None:
                return
            with _quiet():
                try:
                    db.clear()
                except Exception as exc:
                    self._close_writer()
                    self._fault(f"clearing failed ({type(exc).__name__}: {exc})", exc, _WRITE)
                    return
        if self._outage is not None:
            self._works(_WRITE)

    def purge_expired(self) -> int:
        """Delete entries whose TTL has run out; return how many were deleted."""
        self._require_writable("purge_expired()")
        now = self._clock()
        expired: list[str] = []
        for key, text in self._query(f'SELECT key, value FROM "{TABLE}"'):
            try:
                expires = json.loads(text).get("expires")
            except (TypeError, ValueError, AttributeError):
                continue
            if isinstance(expires, (int, float)) and now >= expires:
                expired.append(key)
        if not expired:
            return 0
        with self._lock:
            db = self._writer()
            if db is None:
                return 0
            with _quiet():
                try:
                    for key in expired:
                        db.conn.execute(f'DELETE FROM "{TABLE}" WHERE key = ?', (key,))
                    db.commit()  # blocking: surfaces any error of the deletes here
                except Exception as exc:
                    self._close_writer()
                    self._fault(f"purging failed ({type(exc).__name__}: {exc})", exc, _WRITE)
                    return 0
        if self._outage is not None:
            self._works(_WRITE)
        return len(expired)

    def vacuum(self) -> None:
        """Rebuild the file to give back the space of deleted entries, and truncate the WAL."""
        self._require_writable("vacuum()")
        if self._off.blocked() or not self._open():
            return
        with self._lock:
            try:
                conn = self._connect(readonly=False)
                try:
                    conn.execute("VACUUM")
                    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                finally:
                    conn.close()
            except sqlite3.Error as exc:
                self._fault(f"vacuum failed ({type(exc).__name__}: {exc})", exc, _WRITE)
                return
        if self._outage is not None:
            self._works(_WRITE)

    def close(self) -> None:
        """Close every connection and the writer thread; safe to call twice; later calls reopen."""
        with self._lock:
            if self._pid != os.getpid():
                self._forget_inherited()
                return
            self._drain_pool()
            self._close_writer()
            self._ready = False

    # -- internals: opening ------------------------------------------------------------------

    def _open(self) -> bool:
        """Check and prepare the file once per (re)open; on a fault degrade and return False."""
        with self._lock:
            if self._pid != os.getpid():
                self._forget_inherited()
            if self._off.blocked():
                return False
            if self._ready:
                return True
            try:
                self._prepare()
            except _Fault as fault:
                self._fault(str(fault), fault.__cause__, _OPEN)
                return False
            self._ready = True
        if self._outage is not None:
            self._works(_OPEN)
        return True

    def _prepare(self) -> None:
        """Refuse what is not our cache file, else create it (WAL, schema marker) if we may write."""
        writable = self.mode in WRITE_MODES
        path = self.path
        try:
            st: os.stat_result | None = os.stat(path)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise _Fault(f"cannot be reached ({exc})") from exc
        if st is None:
            if not writable:
                raise _Fault(f"does not exist, so mode {self.mode!r} has nothing to read")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise _Fault(f"cannot be created ({exc})") from exc
        elif stat.S_ISDIR(st.st_mode):
            raise _Fault("is a directory, not a cache file")
        elif not stat.S_ISREG(st.st_mode):
            raise _Fault("is not a regular file")
        elif st.st_size > 0:
            try:
                with open(path, "rb") as f:
                    header = f.read(len(_SQLITE_HEADER))
            except OSError as exc:
                raise _Fault(f"cannot be read ({exc})") from exc
            if header != _SQLITE_HEADER:
                hint = ""
                if header[:1] == b"\x80" or path.suffix in (".pickle", ".pkl"):  # the old module's pickle cache
                    hint = (
                        "; it looks like the old module's pickle cache: migrate it with "
                        f"'llmutils cache import-pickle {path} --trusted --cache-file llmutils_cache.sqlite' "
                        "and point CACHE_FILE_NAME at the new file"
                    )
                raise _Fault(f"is not an SQLite database (it does not start with the SQLite header){hint}")
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                conn = self._connect(readonly=not writable, create=writable)
                try:
                    self._init_schema(conn, writable)
                    st = os.stat(path)
                    self._identity = (st.st_dev, st.st_ino)
                finally:
                    conn.close()
                return
            except sqlite3.OperationalError as exc:
                if _is_busy(exc) and time.monotonic() < deadline:
                    time.sleep(0.01)  # some paths (e.g. switching to WAL) return BUSY without waiting
                    continue
                raise _Fault(_describe(exc, self.busy_timeout)) from exc
            except sqlite3.Error as exc:
                raise _Fault(_describe(exc, self.busy_timeout)) from exc

    def _init_schema(self, conn: sqlite3.Connection, writable: bool) -> None:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if META_TABLE in tables:
            row = conn.execute(f'SELECT value FROM "{META_TABLE}" WHERE key = ?', ("schema_version",)).fetchone()
            try:
                version = int(row[0])
            except (TypeError, ValueError):
                raise _Fault(f"has an {META_TABLE} table without a valid schema_version") from None
            if version > SCHEMA_VERSION:
                raise _Fault(
                    f"was written by a newer llmutils (schema {version}; this one reads {SCHEMA_VERSION}): "
                    "upgrade llmutils or use another cache file"
                )
            if TABLE in tables:
                if writable:
                    self._ensure_wal(conn)
                return
        elif tables:
            raise _Fault(f"is an SQLite database but not an llmutils cache (its tables: {', '.join(sorted(tables))})")
        if not writable:
            raise _Fault(f"holds no cache yet, so mode {self.mode!r} has nothing to read")
        self._ensure_wal(conn)
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(_CREATE_META)
            conn.executemany(
                f'INSERT OR IGNORE INTO "{META_TABLE}" (key, value) VALUES (?, ?)',
                [
                    ("schema_version", str(SCHEMA_VERSION)),
                    ("format", f"table {TABLE}: key = make_key() sha256 hex, value = JSON {VALUE_FORMAT}"),
                    ("created_by", "llmutils"),
                ],
            )
            conn.execute(_CREATE_TABLE)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @staticmethod
    def _ensure_wal(conn: sqlite3.Connection) -> None:
        if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":  # pragma: no cover - file systems without shared memory
                logger.debug("llmutils cache: WAL is not available here (journal_mode=%s)", mode)

    def _connect(self, *, readonly: bool, create: bool = False) -> sqlite3.Connection:
        """A plain connection: read-only (mode=ro), or read-write without creating the file unless ``create``."""
        flag = "ro" if readonly else ("rwc" if create else "rw")
        uri = f"file:{quote(str(self.path))}?mode={flag}"
        return sqlite3.connect(uri, uri=True, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False)

    def _writer(self) -> SqliteDict | None:
        """The process's sqlitedict for this file, opened on first write (caller holds ``_lock``)."""
        if self._pid != os.getpid():
            self._forget_inherited()
        if self._off.blocked():
            return None
        if not self._ready:
            try:
                self._prepare()
            except _Fault as fault:
                self._fault(str(fault), fault.__cause__, _OPEN)
                return None
            self._ready = True
        if self._db is None:
            with _quiet():
                try:
                    db = SqliteDict(
                        str(self.path),
                        tablename=TABLE,
                        flag="c",
                        autocommit=True,  # the default (False) drops every uncommitted write
                        journal_mode="WAL",  # anything else switches the file back to DELETE
                        encode=_as_is,
                        decode=json.loads,
                        outer_stack=False,
                    )
                except Exception as exc:
                    self._fault(f"opening the writer failed ({type(exc).__name__}: {exc})", exc, _WRITE)
                    return None
                _QUIET_THREADS.add(db.conn.ident)
                try:
                    # sqlitedict's timeout= is its thread start-up wait and it sets synchronous=OFF.
                    db.conn.select_one(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
                    self._busy_ms = int(self.busy_timeout * 1000)
                    db.conn.select_one("PRAGMA synchronous = NORMAL")
                except Exception as exc:
                    self._db = db
                    self._close_writer()
                    self._fault(f"opening the writer failed ({type(exc).__name__}: {exc})", exc, _WRITE)
                    return None
            self._db = db
        return self._db

    # -- internals: read connections ---------------------------------------------------------

    def _checkout(self) -> tuple[int, sqlite3.Connection] | None:
        with self._pool_lock:
            while self._frozen:
                self._pool_cv.wait()
            self._busy += 1
            if self._pool:
                return self._pool.pop()
            gen = self._gen
        try:
            conn = self._connect(readonly=self.mode not in WRITE_MODES)
            try:
                conn.execute("PRAGMA query_only = ON")  # readers never write, whatever the mode
            except BaseException:
                conn.close()
                raise
        except sqlite3.Error as exc:
            self._checkin(None)
            self._fault(f"opening a reader failed ({type(exc).__name__}: {exc})", exc, _READ)
            return None
        return gen, conn

    def _checkin(self, item: tuple[int, sqlite3.Connection] | None, keep: bool = True) -> None:
        with self._pool_lock:
            self._busy -= 1
            if item is not None:
                if keep and item[0] == self._gen and not self._off.blocked():
                    self._pool.append(item)
                else:
                    item[1].close()
            if self._frozen and self._busy == 0:
                self._pool_cv.notify_all()

    def _drain_pool(self) -> None:
        """Close idle read connections; ones in use close when they come back."""
        with self._pool_lock:
            self._gen += 1
            items, self._pool = self._pool, []
            for _, conn in items:
                conn.close()

    def _query(self, sql: str) -> list[Any]:
        """All rows of a maintenance query through a pooled reader; [] when off, disabled or on a fault."""
        if (
            self.mode == "off"
            or self._off.blocked()
            or not (self._ready and self._pid == os.getpid()) and not self._open()
        ):
            return []
        item = self._checkout()
        if item is None:
            return []
        try:
            rows = item[1].execute(sql).fetchall()
        except sqlite3.Error as exc:
            self._checkin(item, keep=False)
            self._fault(f"reading failed ({type(exc).__name__}: {exc})", exc, _READ)
            return []
        self._checkin(item)
        if self._outage is not None:
            self._works(_READ)
        return rows

    # -- internals: faults, closing, forks ---------------------------------------------------

    def _fault(self, reason: str, exc: BaseException | None = None, op: int = _OPEN) -> None:
        """Count the error and turn the cache off: for ``retry_interval`` seconds if the fault is
        transient, else for good; log one WARNING naming the file per outage."""
        transient = _is_transient(exc)
        self.count(errors=1)
        with self._stats_lock:
            self._outage = op if self._outage is None else max(self._outage, op)
        first = self._off.trip(permanent=not transient)
        if first:
            if self._off.permanent:
                then = "calls go on without the cache and the file is left as it is"
            else:
                then = f"calls go on without the cache, which is tried again in {self.retry_interval:g}s"
            logger.warning("llmutils cache %s %s; %s", self.path, reason, then)
            logger.debug("llmutils cache %s fault detail", self.path, exc_info=exc)
        else:
            logger.debug("llmutils cache %s (still off) %s", self.path, reason)
        self._drain_pool()

    def _works(self, op: int) -> None:
        """An ``op`` succeeded: end the outage if it is at least as demanding as what failed."""
        with self._stats_lock:
            if self._outage is None or op < self._outage or self._off.blocked():
                return
            self._outage = None
        self._off.reset()
        logger.info("llmutils cache %s works again; using it", self.path)

    def _bad_row(self, key: str, exc: BaseException) -> None:
        """A stored value that is not our JSON envelope: a miss and an error, but the cache stays on."""
        self.count(misses=1, errors=1)
        level = logging.DEBUG if self._warned_rows else logging.WARNING
        self._warned_rows = True
        logger.log(level, "llmutils cache %s: entry %s is not a valid cache value (%s); treated as a miss", self.path, key, exc)

    def _require_writable(self, what: str) -> None:
        if self.mode not in WRITE_MODES:
            raise ConfigError(f"{what} writes to the cache, but {self.path} is open in mode {self.mode!r}; use 'readwrite'")

    def _close_writer(self) -> None:
        """Stop this object's sqlitedict thread (caller holds ``_lock``); never hangs on a dead thread."""
        db, self._db = self._db, None
        if db is None:
            return
        worker = db.conn
        with _quiet():
            try:
                if worker is not None and worker.is_alive():
                    db.close(do_log=False)
                else:
                    db.close(do_log=False, force=True)
            except Exception:
                try:
                    db.close(do_log=False, force=True)
                except Exception:  # pragma: no cover
                    pass
        if worker is not None:
            worker.join(timeout=max(self.busy_timeout, 1.0))
            _QUIET_THREADS.discard(worker.ident or 0)

    def _forget_inherited(self) -> None:
        """In a child forked without our hooks: drop the parent's connections unused and unclosed."""
        db, self._db = self._db, None
        if db is not None:
            _ABANDONED.append(db.conn)
            db.conn = None  # its __del__/close() would otherwise talk to a thread that is gone
        with self._pool_lock:
            _ABANDONED.extend(self._pool)
            self._pool = []
            self._gen += 1
            self._busy = 0
        self._ready = False
        self._pid = os.getpid()

    def _before_fork(self) -> None:
        self._lock.acquire()
        self._pool_cv.acquire()
        self._frozen = True
        try:
            while self._busy:
                self._pool_cv.wait()
            self._gen += 1
            items, self._pool = self._pool, []
            for _, conn in items:
                conn.close()
            self._close_writer()
            self._ready = False
        except Exception:  # pragma: no cover - never let a fork fail because of the cache
            logger.debug("llmutils cache %s: closing before fork failed", self.path, exc_info=True)

    def _after_fork(self, *, child: bool) -> None:
        self._frozen = False
        if child:
            # Only this thread survives the fork: fresh locks are safe and cannot be stuck.
            self._lock = threading.Lock()
            self._stats_lock = threading.Lock()
            self._off.after_fork()
            self._no_writes.after_fork()
            self._pool_lock = threading.Lock()
            self._pool_cv = threading.Condition(self._pool_lock)
            self._busy = 0
            self._pid = os.getpid()
            return
        self._pool_cv.notify_all()
        self._pool_cv.release()
        self._lock.release()


def _is_busy_error(exc: BaseException | None) -> bool:
    """True when ``exc`` (or what it chains) is SQLite's "database is locked"/"busy"."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, sqlite3.OperationalError):
            return _is_busy(exc)
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def _is_readonly_error(exc: BaseException | None) -> bool:
    """True for SQLite's "attempt to write a readonly database" (SQLITE_READONLY and its variants)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, sqlite3.Error):
            code = getattr(exc, "sqlite_errorcode", None)
            if isinstance(code, int) and code & 0xFF == 8:
                return True
            return "readonly database" in str(exc).lower()
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def _is_entry_error(exc: BaseException | None) -> bool:
    """True when a write failed because of its entry alone (too big, not encodable), not the store."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, (UnicodeError, OverflowError, sqlite3.InterfaceError, sqlite3.DataError)):
            return True
        if isinstance(exc, sqlite3.Error):
            code = getattr(exc, "sqlite_errorcode", None)
            return code == 18 or "too big" in str(exc).lower()  # SQLITE_TOOBIG
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


_TRANSIENT_SQLITE_CODES = frozenset({5, 6, 10, 13})  # SQLITE_BUSY, SQLITE_LOCKED, SQLITE_IOERR, SQLITE_FULL
_TRANSIENT_SQLITE_TEXT = ("locked", "busy", "disk i/o error", "disk is full")
_TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name) for name in ("EIO", "ENOSPC", "EDQUOT", "EFBIG", "EAGAIN", "EBUSY") if hasattr(errno, name)
)


def _is_transient(exc: BaseException | None) -> bool:
    """True for a fault that may pass by itself: locked/busy, disk I/O error, disk full (or quota)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, sqlite3.Error):
            code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
            if isinstance(code, int):
                return code & 0xFF in _TRANSIENT_SQLITE_CODES
            text = str(exc).lower()
            return any(word in text for word in _TRANSIENT_SQLITE_TEXT)
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc.errno in _TRANSIENT_ERRNOS
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def _describe(exc: sqlite3.Error, busy_timeout: float) -> str:
    if isinstance(exc, sqlite3.OperationalError) and _is_busy(exc):
        return f"stayed locked by another connection for more than busy_timeout={busy_timeout:g}s ({exc})"
    return f"could not be opened as a cache ({type(exc).__name__}: {exc})"
