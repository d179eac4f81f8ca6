"""The SQLite cache store: keys, modes, TTL, counters, threads, processes, forks, faults, migration."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import sqlitedict

from llmutils.cache import CACHE_MODES, KEY_VERSION, CacheStats, SQLiteCache, import_pickle_cache, make_key
from llmutils.cache import keys as cache_keys
from llmutils.cache import sqlite as _cache
from llmutils.cache.base import META_TABLE, TABLE
from llmutils._exceptions import ConfigError

REPO = Path(__file__).resolve().parents[1]

RESPONSE: dict[str, Any] = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "gpt-4.1-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Grüße ✓"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
}


# -- helpers ---------------------------------------------------------------------------------


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "cache.sqlite"


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="llmutils")
    return caplog


def warnings_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    """WARNING-or-worse messages from any logger (sqlitedict's own ERRORs would show up here too)."""
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def query(path: Path, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql, args).fetchall()


def stored_keys(path: Path) -> set[str]:
    return {row[0] for row in query(path, f'SELECT key FROM "{TABLE}"')}


def run_py(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, env=child_env()
    )


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLMUTILS_", "OPENAI_", "AZURE_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


# -- keys ------------------------------------------------------------------------------------


def test_make_key_is_sha256_of_canonical_versioned_json() -> None:
    payload = {"model": "m", "messages": [{"role": "user", "content": "héllo"}], "temperature": 0.5}
    canonical = '{"messages":[{"content":"héllo","role":"user"}],"model":"m","temperature":0.5,"v":%d}' % KEY_VERSION
    assert make_key(payload) == hashlib.sha256(canonical.encode()).hexdigest()
    assert make_key(dict(reversed(list(payload.items())))) == make_key(payload)
    assert make_key({**payload, "temperature": 0.6}) != make_key(payload)


def test_make_key_changes_with_key_version(monkeypatch: pytest.MonkeyPatch) -> None:
    before = make_key({"model": "m"})
    monkeypatch.setattr(cache_keys, "KEY_VERSION", KEY_VERSION + 1)
    assert make_key({"model": "m"}) != before


def test_make_key_is_stable_across_processes() -> None:
    payload = {"b": [1, 2.5, None, True], "a": {"z": "ü", "y": {}}}
    code = "import json,sys; from llmutils.cache import make_key; print(make_key(json.loads(sys.argv[1])))"
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(payload)],
        capture_output=True, text=True, timeout=60, env=child_env(PYTHONHASHSEED="12345"),
    )
    assert out.stdout.strip() == make_key(payload)


@pytest.mark.parametrize(
    "bad",
    [b"bytes", {1, 2}, float("nan"), float("inf"), object(), {1: "int key"}, {("t",): 1}],
    ids=["bytes", "set", "nan", "inf", "object", "int-key", "tuple-key"],
)
def test_make_key_rejects_non_json(bad: Any) -> None:
    with pytest.raises(TypeError):
        make_key({"x": bad})


def test_make_key_reserves_v() -> None:
    with pytest.raises(ValueError, match="reserved"):
        make_key({"v": 2})


# -- construction and modes ------------------------------------------------------------------


def test_bad_mode_names_the_value(path: Path) -> None:
    with pytest.raises(ConfigError, match="'sometimes'"):
        SQLiteCache(path, mode="sometimes")


@pytest.mark.parametrize("ttl", [0, -1, float("inf"), "10", True])
def test_bad_ttl(path: Path, ttl: Any) -> None:
    with pytest.raises(ConfigError):
        SQLiteCache(path, ttl=ttl)


@pytest.mark.parametrize("mode", CACHE_MODES)
def test_construction_does_not_touch_the_file(path: Path, mode: str) -> None:
    cache = SQLiteCache(path, mode=mode)
    assert cache.mode == mode and cache.path == path
    assert not path.exists()
    cache.close()


def test_readwrite_round_trip_and_on_disk_format(path: Path) -> None:
    with SQLiteCache(path) as cache:
        assert cache.get("k") is None
        cache.set("k", RESPONSE)
        assert cache.get("k") == RESPONSE
        assert len(cache) == 1
        assert cache.stats() == CacheStats(hits=1, misses=1, writes=1, errors=0)
    # A person can read it with the sqlite3 shell: plain JSON text, a schema marker, WAL.
    [(key, kind, text)] = query(path, f'SELECT key, typeof(value), value FROM "{TABLE}"')
    assert (key, kind) == ("k", "text")
    entry = json.loads(text)
    assert entry["value"] == RESPONSE and entry["expires"] is None and isinstance(entry["created"], float)
    assert "Grüße" in text  # not \u-escaped
    assert query(path, f"SELECT json_extract(value, '$.value.model') FROM \"{TABLE}\"") == [("gpt-4.1-mini",)]
    assert query(path, f'SELECT value FROM "{META_TABLE}" WHERE key = ?', ("schema_version",)) == [("1",)]
    assert query(path, "PRAGMA journal_mode") == [("wal",)]


def test_off_never_touches_the_file(path: Path) -> None:
    with SQLiteCache(path, mode="off") as cache:
        cache.set("k", RESPONSE)
        assert cache.get("k") is None
        assert len(cache) == 0
        assert cache.stats() == CacheStats()
    assert not path.exists()


@pytest.mark.parametrize("mode", ["readonly", "replay"])
def test_read_only_modes_read_but_never_write(path: Path, mode: str) -> None:
    with SQLiteCache(path) as rw:
        rw.set("k", RESPONSE)
    before = path.read_bytes()
    with SQLiteCache(path, mode=mode) as ro:
        assert ro.mode == mode
        assert ro.get("k") == RESPONSE
        assert ro.get("other") is None
        ro.set("new", {"a": 1})
        assert ro.get("new") is None
        assert ro.stats() == CacheStats(hits=1, misses=2, writes=0, errors=0)
        for write in (ro.clear, ro.vacuum, ro.purge_expired):
            with pytest.raises(ConfigError, match=mode):
                write()
    assert path.read_bytes() == before
    assert stored_keys(path) == {"k"}


@pytest.mark.parametrize("mode", ["readonly", "replay"])
def test_read_only_modes_on_a_missing_file(path: Path, mode: str, logs: pytest.LogCaptureFixture) -> None:
    with SQLiteCache(path, mode=mode) as cache:
        assert cache.get("k") is None
        assert cache.get("k") is None
        assert cache.disabled
    assert not path.exists()
    [message] = warnings_logged(logs)
    assert str(path) in message and "does not exist" in message


def test_refresh_skips_reads_and_overwrites(path: Path) -> None:
    with SQLiteCache(path) as rw:
        rw.set("k", {"old": True})
    with SQLiteCache(path, mode="refresh") as refresh:
        assert refresh.get("k") is None
        refresh.set("k", {"new": True})
        assert refresh.stats() == CacheStats(hits=0, misses=1, writes=1, errors=0)
    with SQLiteCache(path) as rw:
        assert rw.get("k") == {"new": True}
        assert len(rw) == 1


def test_hit_returns_a_fresh_copy(path: Path) -> None:
    with SQLiteCache(path) as cache:
        value = {"choices": [{"message": {"content": "a"}}]}
        cache.set("k", value)
        value["choices"].append("mutated after set")
        first = cache.get("k")
        first["choices"][0]["message"]["content"] = "mutated by a caller"
        second = cache.get("k")
        assert second == {"choices": [{"message": {"content": "a"}}]}
        assert second is not first


def test_set_rejects_non_json_values(path: Path) -> None:
    with SQLiteCache(path) as cache:
        for bad in (b"x", {1: "a"}, float("nan"), object()):
            with pytest.raises(TypeError):
                cache.set("k", {"v": bad})
        with pytest.raises(TypeError):
            cache.set(1, {})  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            cache.get({"not": "a key"})  # type: ignore[arg-type]
        assert cache.get("k") is None
        assert not cache.disabled


# -- TTL, counters, maintenance --------------------------------------------------------------


def test_ttl_per_cache_and_per_entry(path: Path) -> None:
    now = [1000.0]
    with SQLiteCache(path, ttl=10, clock=lambda: now[0]) as cache:
        cache.set("default", 1)
        cache.set("long", 2, ttl=100)
        with SQLiteCache(path, clock=lambda: now[0]) as no_ttl:
            no_ttl.set("forever", 3)
        now[0] = 1009.9
        assert [cache.get(k) for k in ("default", "long", "forever")] == [1, 2, 3]
        now[0] = 1010.0
        assert [cache.get(k) for k in ("default", "long", "forever")] == [None, 2, 3]
        now[0] = 10**9
        assert [cache.get(k) for k in ("default", "long", "forever")] == [None, None, 3]
        assert len(cache) == 3
        assert cache.purge_expired() == 2
        assert stored_keys(path) == {"forever"}
        assert cache.stats() == CacheStats(hits=6, misses=3, writes=2, errors=0)


def test_counters_are_exact_under_threads(path: Path) -> None:
    with SQLiteCache(path) as cache:
        cache.set("hit", 1)
        cache.reset_stats()

        def work() -> None:
            for _ in range(200):
                assert cache.get("hit") == 1
                assert cache.get("miss") is None

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert cache.stats() == CacheStats(hits=1600, misses=1600, writes=0, errors=0)
        cache.reset_stats()
        assert cache.stats() == CacheStats()


def test_len_info_clear_vacuum_close(path: Path) -> None:
    cache = SQLiteCache(path)
    for i in range(50):
        cache.set(f"k{i}", {"i": i, "pad": "x" * 1000})
    info = cache.info()
    assert info["path"] == str(path) and info["entries"] == 50 and info["mode"] == "readwrite"
    assert info["key_version"] == KEY_VERSION and info["size_bytes"] > 50_000 and info["disabled"] is False
    cache.clear()
    assert len(cache) == 0
    cache.vacuum()
    assert cache.info()["size_bytes"] < info["size_bytes"]
    cache.close()
    cache.close()  # twice is fine
    cache.set("again", 1)  # a closed cache reopens on use
    assert cache.get("again") == 1
    cache.close()
    assert query(path, f'SELECT value FROM "{META_TABLE}" WHERE key = ?', ("schema_version",)) == [("1",)]


# -- threads and processes -------------------------------------------------------------------


def test_threads_share_one_cache_without_loss(path: Path) -> None:
    errors: list[BaseException] = []
    with SQLiteCache(path) as cache:

        def write(t: int) -> None:
            try:
                for i in range(250):
                    cache.set(f"t{t}-{i}", {"t": t, "i": i})
                    assert cache.get(f"t{t}-{i}") == {"t": t, "i": i}
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=write, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert cache.stats() == CacheStats(hits=2000, misses=0, writes=2000, errors=0)
    assert len(stored_keys(path)) == 2000


WRITER = """
import sys
from llmutils.cache import SQLiteCache
path, wid, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
with SQLiteCache(path) as cache:
    for i in range(n):
        cache.set(f"{wid}-{i}", {"w": wid, "i": i})
    s = cache.stats()
print("writes", s.writes, "errors", s.errors, "disabled", cache.disabled)
"""

READER = """
import sys
from llmutils.cache import SQLiteCache
path, n = sys.argv[1], int(sys.argv[2])
with SQLiteCache(path) as cache:
    for i in range(n):
        value = cache.get(f"w{i % 4}-{i % 250}")
        assert value is None or value["i"] == i % 250
    s = cache.stats()
print("reads", s.hits + s.misses, "errors", s.errors, "disabled", cache.disabled)
"""


def test_processes_write_one_file_without_loss(path: Path) -> None:
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(path), f"w{w}", "250"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=child_env())
        for w in range(4)
    ] + [
        subprocess.Popen([sys.executable, "-c", READER, str(path), "2000"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=child_env())
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0 and err == "", err
    assert [o.split() for o, _ in outputs[:4]] == [["writes", "250", "errors", "0", "disabled", "False"]] * 4
    assert [o.split() for o, _ in outputs[4:]] == [["reads", "2000", "errors", "0", "disabled", "False"]] * 2
    assert stored_keys(path) == {f"w{w}-{i}" for w in range(4) for i in range(250)}
    assert query(path, "PRAGMA integrity_check") == [("ok",)]


def _fork(child: Any) -> int:
    """Fork; run ``child()`` in the child and leave with its exit code (never back into pytest)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork with threads
        pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            code = child()
        finally:
            os._exit(code)
    return pid


def test_fork_after_open(path: Path) -> None:
    with SQLiteCache(path) as cache:
        cache.set("parent", 1)
        assert cache.get("parent") == 1  # reader and writer both open before the fork

        def child() -> int:
            ok = cache.get("parent") == 1 and not cache.disabled
            cache.set("child", 2)
            ok = ok and cache.get("child") == 2 and cache.stats().errors == 0
            cache.close()
            return 0 if ok else 3

        pid = _fork(child)
        assert os.waitpid(pid, 0)[1] == 0
        assert cache.get("child") == 2
        cache.set("parent-after", 3)
        assert cache.get("parent-after") == 3
        assert cache.stats().errors == 0 and not cache.disabled
    assert stored_keys(path) == {"parent", "child", "parent-after"}


def test_fork_while_other_threads_use_the_cache(path: Path) -> None:
    stop = threading.Event()
    errors: list[BaseException] = []
    with SQLiteCache(path) as cache:
        cache.set("base", 0)

        def busy() -> None:
            i = 0
            try:
                while not stop.is_set():
                    cache.set(f"thread-{i}", i)
                    assert cache.get("base") == 0
                    i += 1
            except BaseException as exc:  # pragma: no cover
                errors.append(exc)

        thread = threading.Thread(target=busy)
        thread.start()
        try:
            pids = []
            for n in range(4):
                pids.append(_fork(lambda n=n: 0 if (cache.set(f"child-{n}", n), cache.get(f"child-{n}"))[1] == n else 3))
            statuses = [os.waitpid(pid, 0)[1] for pid in pids]
        finally:
            stop.set()
            thread.join()
        assert statuses == [0] * 4 and errors == []
        assert cache.stats().errors == 0
    assert {f"child-{n}" for n in range(4)} <= stored_keys(path)
    assert query(path, "PRAGMA integrity_check") == [("ok",)]


FORK_WITHOUT_HOOKS = """
import os, sys, weakref
from llmutils.cache import sqlite as _cache
cache = _cache.SQLiteCache(sys.argv[1])
cache.set("parent", 1)
assert cache.get("parent") == 1
_cache._LIVE = weakref.WeakSet()  # as if the fork bypassed os.register_at_fork
pid = os.fork()
if pid == 0:
    ok = cache.get("parent") == 1
    cache.set("child", 2)
    ok = ok and cache.get("child") == 2 and not cache.disabled
    cache.close()
    os._exit(0 if ok else 3)
assert os.waitpid(pid, 0)[1] == 0
assert cache.get("child") == 2 and not cache.disabled
cache.close()
print("ok")
"""


def test_fork_without_hooks_reopens_in_the_child(path: Path) -> None:
    out = run_py(FORK_WITHOUT_HOOKS, str(path))
    assert (out.returncode, out.stdout.strip(), out.stderr) == (0, "ok", "")


# -- faults ----------------------------------------------------------------------------------


def assert_degraded(cache: SQLiteCache, logs: pytest.LogCaptureFixture, *words: str) -> None:
    """Calls never raise, the cache turns itself off, and exactly one WARNING names the file."""
    cache.set("k", RESPONSE)
    assert cache.get("k") is None
    cache.set("k2", RESPONSE)
    assert cache.get("k2") is None
    assert cache.disabled
    assert cache.stats().errors >= 1
    [message] = warnings_logged(logs)
    assert str(cache.path) in message
    for word in words:
        assert word in message


@pytest.mark.parametrize(
    "content",
    [b"{'old': 'pickle or text'}\n" * 50, b"SQLite format 3\x00" + bytes(range(256)) * 16],
    ids=["not-sqlite", "sqlite-header-then-garbage"],
)
def test_corrupt_file_degrades_and_is_left_alone(path: Path, content: bytes, logs: pytest.LogCaptureFixture) -> None:
    path.write_bytes(content)
    with SQLiteCache(path) as cache:
        assert_degraded(cache, logs)
    assert path.read_bytes() == content
    assert not Path(f"{path}-wal").exists()


def test_damaged_pages_never_raise(path: Path, logs: pytest.LogCaptureFixture) -> None:
    with SQLiteCache(path) as cache:
        for i in range(300):
            cache.set(f"k{i}", {"i": i, "pad": "x" * 500})
    data = bytearray(path.read_bytes())
    middle = len(data) // 2 // 4096 * 4096
    data[middle:middle + 16384] = bytes(range(256)) * 64  # four b-tree pages; the schema is intact
    path.write_bytes(bytes(data))
    with SQLiteCache(path) as cache:
        for i in range(300):
            value = cache.get(f"k{i}")
            assert value is None or value["i"] == i
            cache.set(f"new{i}", {"i": i})
        assert cache.disabled and cache.stats().errors == 1 and cache.stats().hits > 0
    [message] = warnings_logged(logs)
    assert str(path) in message and "malformed" in message


def test_someone_elses_sqlite_file_is_left_alone(path: Path, logs: pytest.LogCaptureFixture) -> None:
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE notes (body TEXT)")
        conn.commit()
    with SQLiteCache(path) as cache:
        assert_degraded(cache, logs, "not an llmutils cache")
    assert query(path, "SELECT name FROM sqlite_master") == [("notes",)]


def test_newer_schema_is_left_alone(path: Path, logs: pytest.LogCaptureFixture) -> None:
    with SQLiteCache(path) as cache:
        cache.set("old", 1)
    with closing(sqlite3.connect(path)) as conn:
        conn.execute(f'UPDATE "{META_TABLE}" SET value = ? WHERE key = ?', ("99", "schema_version"))
        conn.commit()
    with SQLiteCache(path) as cache:
        assert_degraded(cache, logs, "newer llmutils")


def test_bad_row_is_a_miss_not_a_fault(path: Path, logs: pytest.LogCaptureFixture) -> None:
    with SQLiteCache(path) as cache:
        cache.set("good", 1)
        with closing(sqlite3.connect(path)) as conn:
            conn.executemany(
                f'INSERT INTO "{TABLE}" VALUES (?, ?)',
                [("bad", "not json"), ("list", "[1]"), ("no-value", "{}"), ("bad-expiry", '{"value":1,"expires":"soon"}')],
            )
            conn.commit()
        for key in ("bad", "list", "no-value", "bad-expiry"):
            assert cache.get(key) is None
        assert cache.get("good") == 1
        assert not cache.disabled
        assert cache.stats() == CacheStats(hits=1, misses=4, writes=1, errors=4)
        cache.set("bad", 2)  # the next answer repairs it
        assert cache.get("bad") == 2
    assert len(warnings_logged(logs)) == 1


def test_unwritable_directory_chmod(tmp_path: Path, logs: pytest.LogCaptureFixture) -> None:
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod does not stop root from writing (see the root variants below)")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with SQLiteCache(locked / "cache.sqlite") as cache:
            assert_degraded(cache, logs)
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("where", ["parent-is-a-file", "path-is-a-directory"])
def test_unusable_location(tmp_path: Path, where: str, logs: pytest.LogCaptureFixture) -> None:
    if where == "parent-is-a-file":
        (tmp_path / "file").write_text("user data")
        target = tmp_path / "file" / "cache.sqlite"
    else:
        target = tmp_path / "cache.sqlite"
        target.mkdir()
    with SQLiteCache(target) as cache:
        assert_degraded(cache, logs)
    if where == "parent-is-a-file":
        assert (tmp_path / "file").read_text() == "user data"
    else:
        assert target.is_dir() and list(target.iterdir()) == []


def test_lock_held_past_busy_timeout(path: Path, logs: pytest.LogCaptureFixture) -> None:
    with SQLiteCache(path, busy_timeout=0.05) as cache:
        cache.set("before", 1)
        errors: list[BaseException] = []
        with closing(sqlite3.connect(path, isolation_level=None)) as other:
            other.execute("BEGIN EXCLUSIVE")

            def write(t: int) -> None:
                try:
                    for i in range(5):
                        cache.set(f"t{t}-{i}", i)
                except BaseException as exc:  # pragma: no cover
                    errors.append(exc)

            threads = [threading.Thread(target=write, args=(t,)) for t in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            other.execute("ROLLBACK")
        assert errors == []
        assert cache.disabled and cache.stats().writes == 1
        [message] = warnings_logged(logs)
        assert str(path) in message and "locked" in message
    assert stored_keys(path) == {"before"}


def infos_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and r.name == "llmutils"]


def test_a_lock_is_transient_the_cache_is_tried_again_after_the_back_off(
    path: Path, logs: pytest.LogCaptureFixture
) -> None:
    now = [1000.0]
    with SQLiteCache(path, busy_timeout=0, retry_interval=30, clock=lambda: now[0]) as cache:
        cache.set("before", 1)
        with closing(sqlite3.connect(path, isolation_level=None)) as other:
            other.execute("BEGIN EXCLUSIVE")
            cache.set("during", 2)  # locked: a fault
            assert cache.disabled and cache.stats().errors == 1
            assert cache.get("before") is None  # off: not even read
            now[0] += 29.9
            cache.set("during", 2)
            assert cache.disabled and cache.stats().errors == 1  # not tried within the back-off
            now[0] += 0.1
            cache.set("during", 2)  # tried again, still locked: off for another 30 s, no new WARNING
            assert cache.disabled and cache.stats().errors == 2
            other.execute("ROLLBACK")
        assert cache.get("before") is None
        now[0] += 30
        assert cache.get("before") == 1 and not cache.disabled
        assert infos_logged(logs) == []  # reads work, but what failed was a write
        cache.set("after", 3)
        assert infos_logged(logs) == [f"llmutils cache {path} works again; using it"]
        [warning] = warnings_logged(logs)
        assert str(path) in warning and "locked" in warning and "tried again in 30s" in warning

        with closing(sqlite3.connect(path, isolation_level=None)) as other:  # a second outage
            other.execute("BEGIN EXCLUSIVE")
            cache.set("during", 2)
            other.execute("ROLLBACK")
        assert cache.disabled and len(warnings_logged(logs)) == 2
        now[0] += 30
        cache.set("last", 4)
        assert not cache.disabled and len(infos_logged(logs)) == 2
        assert cache.stats().errors == 3
    assert stored_keys(path) == {"before", "after", "last"}


def test_a_lock_while_opening_is_transient(path: Path, logs: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    with closing(sqlite3.connect(path, isolation_level=None)) as other:
        other.execute("BEGIN EXCLUSIVE")  # not WAL yet: even reading the schema waits for this lock
        other.execute("CREATE TABLE IF NOT EXISTS t (x)")
        with SQLiteCache(path, busy_timeout=0, clock=lambda: now[0]) as cache:
            assert cache.get("k") is None and cache.disabled
            other.execute("ROLLBACK")
            assert cache.get("k") is None and cache.disabled
            now[0] += 30
            cache.set("k", 1)
            assert cache.get("k") == 1 and not cache.disabled
    assert len(warnings_logged(logs)) == 1 and len(infos_logged(logs)) == 1


@pytest.mark.parametrize("damage", ["not-sqlite", "someone-elses", "newer-schema", "malformed"])
def test_permanent_faults_stay_off_for_the_life_of_the_object(
    path: Path, damage: str, logs: pytest.LogCaptureFixture
) -> None:
    if damage == "not-sqlite":
        path.write_bytes(b"{'old': 'pickle or text'}\n" * 50)
    elif damage == "someone-elses":
        with closing(sqlite3.connect(path)) as conn:
            conn.execute("CREATE TABLE notes (body TEXT)")
    else:
        with SQLiteCache(path) as cache:
            for i in range(300):
                cache.set(f"k{i}", {"i": i, "pad": "x" * 500})
        if damage == "newer-schema":
            with closing(sqlite3.connect(path)) as conn:
                conn.execute(f'UPDATE "{META_TABLE}" SET value = ? WHERE key = ?', ("99", "schema_version"))
                conn.commit()
        else:
            data = bytearray(path.read_bytes())
            middle = len(data) // 2 // 4096 * 4096
            data[middle:middle + 16384] = bytes(range(256)) * 64
            path.write_bytes(bytes(data))
    content = path.read_bytes()
    now = [0.0]
    with SQLiteCache(path, clock=lambda: now[0]) as cache:
        for i in range(300):
            cache.get(f"k{i}")
        assert cache.disabled
        errors = cache.stats().errors
        now[0] += 1e9
        for i in range(300):
            assert cache.get(f"k{i}") is None
            cache.set(f"new{i}", i)
        assert cache.disabled and cache.stats().errors == errors
    assert len(warnings_logged(logs)) == 1 and infos_logged(logs) == []
    assert path.read_bytes() == content


def test_which_faults_are_transient() -> None:
    def chained(cause: BaseException) -> BaseException:
        try:
            raise _cache._Fault("stayed locked") from cause
        except _cache._Fault as fault:
            return fault

    transient = [
        sqlite3.OperationalError("database is locked"),  # no sqlite_errorcode (as on Python 3.10)
        sqlite3.OperationalError("disk I/O error"),
        sqlite3.OperationalError("database or disk is full"),
        OSError(28, "No space left on device"),
        chained(sqlite3.OperationalError("database table is locked")),
    ]
    permanent = [
        None,
        sqlite3.DatabaseError("file is not a database"),
        sqlite3.DatabaseError("database disk image is malformed"),
        PermissionError(13, "Permission denied"),
        _cache._Fault("was written by a newer llmutils"),
    ]
    assert [_cache._is_transient(e) for e in transient] == [True] * len(transient)
    assert [_cache._is_transient(e) for e in permanent] == [False] * len(permanent)


@pytest.mark.parametrize("interval", [-1, math.inf, "30", True])
def test_bad_retry_interval(path: Path, interval: Any) -> None:
    with pytest.raises(ConfigError, match="retry_interval"):
        SQLiteCache(path, retry_interval=interval)


DISK_FULL = """
import logging, resource, signal, sys
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
from llmutils.cache import SQLiteCache
cache = SQLiteCache(sys.argv[1])
cache.set("first", 0)
resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))
for i in range(2000):
    cache.set(f"k{i}", {"i": i, "pad": "x" * 2000})
    if cache.disabled:
        break
    print(f"k{i}", flush=True)
print("disabled", cache.disabled, "errors", cache.stats().errors, flush=True)
cache.close()
"""


def test_full_disk_degrades(path: Path) -> None:
    out = run_py(DISK_FULL, str(path))
    assert out.returncode == 0, out.stderr
    *keys, last = out.stdout.split("\n")[:-1]
    assert last == "disabled True errors 1"
    assert 10 < len(keys) < 2000
    [warning] = out.stderr.splitlines()
    assert warning.startswith("WARNING llmutils") and str(path) in warning
    assert "tried again in 30s" in warning  # transient: retried after the back-off
    assert query(path, "PRAGMA integrity_check") == [("ok",)]
    assert set(keys) | {"first"} <= stored_keys(path)


SIGKILL_WRITER = """
import sys
from llmutils.cache import SQLiteCache
cache = SQLiteCache(sys.argv[1])
i = 0
while True:
    cache.set(f"k{i}", {"i": i, "pad": "x" * 1500})
    print(f"k{i}", flush=True)  # printed only once the write is committed
    i += 1
"""


def test_sigkill_mid_write_keeps_every_committed_entry(path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGKILL_WRITER, str(path)], stdout=subprocess.PIPE, text=True, env=child_env()
    )
    assert proc.stdout is not None
    with proc.stdout:
        keys = [proc.stdout.readline().strip() for _ in range(1500)]  # > 1000 pages: checkpoints happen
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert query(path, "PRAGMA integrity_check") == [("ok",)]
    assert set(keys) <= stored_keys(path)
    with SQLiteCache(path) as cache:
        assert cache.get(keys[-1]) == {"i": len(keys) - 1, "pad": "x" * 1500}
        assert not cache.disabled


EXIT_WITHOUT_CLOSE = """
import sys
from llmutils.cache import SQLiteCache
cache = SQLiteCache(sys.argv[1])
cache.set("k", {"a": 1})
assert cache.get("k") == {"a": 1}
other = SQLiteCache(sys.argv[1], mode="refresh")
other.set("k2", 2)
print("done")
"""


def test_no_hang_at_exit(path: Path) -> None:
    out = run_py(EXIT_WITHOUT_CLOSE, str(path), timeout=30)
    assert (out.returncode, out.stdout.strip(), out.stderr) == (0, "done", "")
    assert stored_keys(path) == {"k", "k2"}


# -- pickle: never in the store, only in the trusted migration -------------------------------


def test_store_never_pickles(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("pickle used by the cache store")

    for module in (pickle, sqlitedict):
        for name in ("dumps", "loads", "dump", "load"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, forbidden)
    now = [0.0]
    with SQLiteCache(path, ttl=5, clock=lambda: now[0]) as cache:
        cache.set("k", RESPONSE)
        assert cache.get("k") == RESPONSE
        cache.set("k", {"replaced": True})
        now[0] = 10
        assert cache.purge_expired() == 1
        cache.clear()
        cache.set("k3", [1, "two", None])
        assert len(cache) == 1
    assert query(path, f'SELECT typeof(value), json_valid(value) FROM "{TABLE}"') == [("text", 1)]


class _RunsCode:
    """Unpickling this makes a directory: proof that a pickle can run code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


def test_import_pickle_refuses_untrusted(tmp_path: Path, path: Path) -> None:
    marker = tmp_path / "code-ran"
    old = tmp_path / "openai_api_cache.pickle"
    old.write_bytes(pickle.dumps({"k": _RunsCode(marker)}))
    with SQLiteCache(path) as cache:
        with pytest.raises(ConfigError, match="runs any code"):
            import_pickle_cache(old, cache)
    assert not marker.exists()
    assert not path.exists()


def test_import_pickle_trusted(tmp_path: Path, path: Path, logs: pytest.LogCaptureFixture) -> None:
    from openai.types.chat import ChatCompletion

    completion = ChatCompletion.model_validate({**RESPONSE, "created": 1700000000})
    old = tmp_path / "openai_api_cache.pickle"
    old.write_bytes(pickle.dumps({"plain": RESPONSE, "sdk": completion, "odd": {1, 2}, "text": "ok"}))
    with SQLiteCache(path) as cache:
        assert import_pickle_cache(old, cache, trusted=True) == 3
        assert cache.get("legacy:plain") == RESPONSE
        assert cache.get("legacy:sdk") == completion.model_dump(mode="json")
        assert cache.get("legacy:text") == "ok"
        assert cache.get("legacy:odd") is None
    [message] = warnings_logged(logs)
    assert "skipped 1" in message and str(old) in message
    with SQLiteCache(path, mode="readonly") as ro, pytest.raises(ConfigError, match="readonly"):
        import_pickle_cache(old, ro, trusted=True)


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"just some text\n", "UnpicklingError"),
        (pickle.dumps({"k": RESPONSE})[:-20], "truncated"),
        (b"", "EOFError"),
    ],
    ids=["text", "truncated", "empty"],
)
def test_import_pickle_of_a_bad_file_names_it(tmp_path: Path, path: Path, content: bytes, why: str) -> None:
    old = tmp_path / "openai_api_cache.pickle"
    old.write_bytes(content)
    with SQLiteCache(path) as cache:
        with pytest.raises(ConfigError, match="is not a pickle file") as info:
            import_pickle_cache(old, cache, trusted=True)
        assert str(old) in str(info.value) and why in str(info.value)
        assert len(cache) == 0 and not cache.disabled


# -- the file changing under a cache in use -----------------------------------------------------


def test_a_file_deleted_while_in_use_is_recreated_by_the_next_write(path: Path, logs: pytest.LogCaptureFixture) -> None:
    with SQLiteCache(path) as cache:
        cache.set("before", 1)
        assert cache.get("before") == 1
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        cache.set("after", 2)  # not into the deleted inode
        cache.set("again", 3)
        assert cache.get("after") == 2 and cache.get("before") is None
        assert not cache.disabled
    assert stored_keys(path) == {"after", "again"}
    [message] = warnings_logged(logs)
    assert str(path) in message and "deleted" in message


def test_an_empty_file_becomes_a_cache(path: Path, logs: pytest.LogCaptureFixture) -> None:
    path.write_bytes(b"")  # e.g. made by `touch` or tempfile.mkstemp()
    with SQLiteCache(path) as cache:
        cache.set("k", {"v": 1})
        assert cache.get("k") == {"v": 1} and cache.stats().errors == 0
    assert stored_keys(path) == {"k"} and warnings_logged(logs) == []


@pytest.fixture
def immutable() -> Iterator[Callable[[Path], None]]:
    """Make files read-only even for root (chattr +i), and writable again afterwards."""
    if shutil.which("chattr") is None:
        pytest.skip("needs chattr to make a file read-only for root")
    made: list[Path] = []

    def make(target: Path) -> None:
        if subprocess.run(["chattr", "+i", str(target)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not supported here")
        made.append(target)

    yield make
    for target in made:
        subprocess.run(["chattr", "-i", str(target)], check=False)


def test_a_read_only_cache_file_keeps_serving_hits(path: Path, logs: pytest.LogCaptureFixture, immutable: Callable[[Path], None]) -> None:
    with SQLiteCache(path) as cache:
        cache.set("stored", 1)
    immutable(path)
    with SQLiteCache(path) as cache:
        assert cache.get("stored") == 1
        cache.set("new", 2)  # cannot be stored...
        cache.set("newer", 3)
        assert cache.get("stored") == 1 and not cache.disabled  # ...but the hits go on
        assert cache.stats() == CacheStats(hits=2, misses=0, writes=0, errors=1)
    [message] = warnings_logged(logs)
    assert str(path) in message and "keeps serving" in message


def test_the_old_modules_pickle_cache_names_the_migration(tmp_path: Path, logs: pytest.LogCaptureFixture) -> None:
    """A CACHE_FILE_NAME still pointing at the old pickle cache says how to migrate it, and it is left alone."""
    old = tmp_path / "openai_api_cache.pickle"
    old.write_bytes(pickle.dumps({"some old key": "an old answer"}))
    before = old.read_bytes()
    with SQLiteCache(old) as cache:
        assert_degraded(cache, logs, "import-pickle", "--trusted")
    assert old.read_bytes() == before
