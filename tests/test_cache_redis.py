"""The Redis cache: choosing the backend, round trips, modes, TTL, processes, single-flight, faults, copy.

Tests that need a server use ``$LLMUTILS_TEST_REDIS_URL`` (``.ci/run`` starts one and sets it; the
tests flush it) or start their own ``redis-server`` on a free port; they skip when neither is there.
Tests that kill, restart or password-protect a server always start their own.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import llmutils
from llmutils import CacheMissError, ConfigError, OpenAIClient
from llmutils.cache import CacheBackend, RedisCache, SQLiteCache, copy_cache, is_cache_url, make_key, mask_url, open_cache
from llmutils.cli import main
from llmutils.testing import Fault, OpenAITestServer

redis = pytest.importorskip("redis", reason="redis-py is not installed: pip install -e '.[test]'")

REDIS_SERVER = shutil.which("redis-server")
CI_URL = os.environ.get("LLMUTILS_TEST_REDIS_URL")  # read at import: the autouse fixture clears LLMUTILS_*
NO_SERVER = "no Redis: redis-server is not on PATH (apt-get install redis-server) and LLMUTILS_TEST_REDIS_URL is not set"
HELLO = [{"role": "user", "content": "hello"}]


# -- a real redis-server -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pings(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


class RedisServer:
    """A redis-server of our own in ``directory``, on 127.0.0.1, that a test may kill and restart."""

    def __init__(self, directory: Path, *extra: str) -> None:
        self.directory = directory
        self.port = _free_port()
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        assert REDIS_SERVER is not None
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory), *self.extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not _pings(self.port):  # readiness: the server answers PING
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.01)
        return self

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
            self.proc = None


@pytest.fixture(scope="session")
def _redis_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if CI_URL:
        probe = redis.Redis.from_url(CI_URL, socket_timeout=2, socket_connect_timeout=2)
        try:
            probe.ping()
        except redis.RedisError as exc:
            pytest.fail(f"LLMUTILS_TEST_REDIS_URL={mask_url(CI_URL)} does not answer: {exc}")
        finally:
            probe.close()
        yield CI_URL
        return
    if REDIS_SERVER is None:
        pytest.skip(NO_SERVER)
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def url(_redis_session: str) -> Iterator[str]:
    """The session's Redis URL, flushed: every test starts with an empty server."""
    with raw_client(_redis_session) as r:
        r.flushall()
    yield _redis_session


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Start redis-servers this test may kill, restart or configure (a password, persistence)."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not on PATH (apt-get install redis-server): this test needs its own server")
    started: list[RedisServer] = []

    def start(*extra: str) -> RedisServer:
        directory = tmp_path / f"redis{len(started)}"
        directory.mkdir()
        server = RedisServer(directory, *extra).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def raw_client(url: str) -> Any:
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="llmutils")
    return caplog


def warnings_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def api_client(server: OpenAITestServer, url: str, **kwargs: Any) -> OpenAIClient:
    return OpenAIClient(base_url=server.base_url, api_key="k", cache_api_calls=True, cache_url=url, **kwargs)


def ask(client: OpenAIClient, text: str) -> bool:
    """Send ``text``; check the answer; return whether it came from the cache."""
    assert client.send_message([{"role": "user", "content": text}])["content"] == f"echo: {text}"
    assert client.last_call is not None
    return client.last_call.cached


def the_cache(client: OpenAIClient) -> RedisCache:
    cache = client._cache(client.settings())
    assert isinstance(cache, RedisCache)
    return cache


# -- choosing the backend (no server needed) -----------------------------------------------------


def test_open_cache_maps_locations_to_backends(tmp_path: Path) -> None:
    assert isinstance(open_cache("c.sqlite"), SQLiteCache)
    assert open_cache("sqlite:///rel/c.sqlite").path == tmp_path / "rel" / "c.sqlite"  # type: ignore[attr-defined]
    assert open_cache(f"sqlite:///{tmp_path}/abs.sqlite").path == tmp_path / "abs.sqlite"  # type: ignore[attr-defined]
    for url in ("redis://localhost:6379/0", "rediss://u:p@h:6380/1", "unix:///tmp/redis.sock?db=2"):
        cache = open_cache(url, mode="readonly", ttl=5)
        assert isinstance(cache, RedisCache) and isinstance(cache, CacheBackend)
        assert (cache.mode, cache.ttl) == ("readonly", 5.0)
        cache.close()
    assert isinstance(open_cache("x.sqlite"), CacheBackend)
    assert is_cache_url("redis://h") and not is_cache_url("C:\\cache.sqlite") and not is_cache_url("dir/c.sqlite")
    with pytest.raises(ConfigError, match="unknown scheme 'memcached'") as err:
        open_cache("memcached://:topsecret@h:11211")
    assert "topsecret" not in str(err.value)
    with pytest.raises(ConfigError, match="names no file"):
        open_cache("sqlite://")
    with pytest.raises(ConfigError, match="cache mode"):
        RedisCache("redis://h", mode="sometimes")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@host:6379/0", "redis://:***@host:6379/0"),
        ("rediss://alice:s3cret@host:6380/1", "rediss://alice:***@host:6380/1"),
        ("redis://alice@host/0", "redis://alice@host/0"),
        ("unix:///run/redis.sock?db=1&password=s3cret", "unix:///run/redis.sock?db=1&password=***"),
        ("redis://host:6379/0", "redis://host:6379/0"),
    ],
)
def test_passwords_are_masked(url: str, shown: str) -> None:
    assert mask_url(url) == shown
    with RedisCache(url) as cache:
        assert cache.path == cache.url == shown
        assert "s3cret" not in repr(cache) and "s3cret" not in str(cache.info())


@pytest.mark.parametrize("password", ["s3#cret", "s3/cret", "s3?cret", "s3@cret", "a#b/c?d"])
def test_passwords_with_url_delimiters_are_masked_whole(password: str) -> None:
    url = f"redis://alice:{password}@cache.internal:6379/0"
    assert mask_url(url) == "redis://alice:***@cache.internal:6379/0"
    assert mask_url(f"redis://:{password}@h:1/0?db=2") == "redis://:***@h:1/0?db=2"


def test_without_redis_py_a_clear_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(ConfigError, match=r"pip install 'llmutils-openai\[redis\]'") as err:
        open_cache("redis://:s3cret@host:6379/0")
    assert "s3cret" not in str(err.value)


def test_off_mode_never_connects(logs: pytest.LogCaptureFixture) -> None:
    with RedisCache(f"redis://127.0.0.1:{_free_port()}/0", mode="off") as cache:
        cache.set("k", 1)
        assert cache.get("k") is None and len(cache) == 0
        assert cache.stats() == llmutils.CacheStats()
    assert warnings_logged(logs) == []


# -- round trips, modes, TTL ---------------------------------------------------------------------


def test_round_trip_format_counters_clear(url: str) -> None:
    value = {"choices": [{"message": {"role": "assistant", "content": "Grüße ✓"}}], "n": 1.5}
    key = make_key({"q": 1})
    with RedisCache(url) as cache, raw_client(url) as r:
        assert cache.get(key) is None
        cache.set(key, value)
        got = cache.get(key)
        assert got == value
        got["n"] = 2  # a hit is a fresh copy
        assert cache.get(key) == value
        stored = json.loads(r.get(f"llmutils:v1:{key}"))
        assert stored["value"] == value and stored["expires"] is None and isinstance(stored["created"], float)
        assert r.pttl(f"llmutils:v1:{key}") == -1  # no ttl, no expiry
        with pytest.raises(TypeError, match="not a JSON value"):
            cache.set("bad", {"x": {1, 2}})
        assert cache.stats() == llmutils.CacheStats(hits=2, misses=1, writes=1, errors=0)
        cache.reset_stats()
        assert cache.stats().hits == 0
        r.set("someone:else", "x")
        r.set("llmutils:v1:broken", b"not json")
        assert cache.get("broken") is None and cache.stats().errors == 1
        assert len(cache) == 2
        info = cache.info()
        assert info["entries"] == 2 and info["backend"] == "redis" and info["redis_version"] and not info["disabled"]
        cache.clear()
        assert len(cache) == 0 and r.get("someone:else") == b"x"  # only our prefix is cleared


@pytest.mark.parametrize("mode", ["readonly", "replay"])
def test_read_only_modes_read_but_never_write(url: str, mode: str) -> None:
    with RedisCache(url) as writer, RedisCache(url, mode=mode) as reader:
        writer.set("k", 1)
        assert reader.get("k") == 1
        reader.set("k2", 2)
        assert writer.get("k2") is None
        with pytest.raises(ConfigError, match="readwrite"):
            reader.clear()


def test_refresh_skips_reads_and_overwrites(url: str) -> None:
    with RedisCache(url) as cache, RedisCache(url, mode="refresh") as refresh:
        cache.set("k", 1)
        assert refresh.get("k") is None
        refresh.set("k", 2)
        assert cache.get("k") == 2


def test_ttl_is_native_redis_expiry(url: str) -> None:
    with RedisCache(url, ttl=60) as cache, raw_client(url) as r:
        cache.set("a", 1)
        cache.set("b", 2, ttl=5)
        assert 59_000 < r.pttl("llmutils:v1:a") <= 60_000
        assert 4_000 < r.pttl("llmutils:v1:b") <= 5_000
        entry = json.loads(r.get("llmutils:v1:a"))
        assert entry["expires"] == pytest.approx(entry["created"] + 60)
        cache.set("c", 3, ttl=0.05)
        deadline = time.monotonic() + 5
        while cache.get("c") is not None:  # Redis itself drops it: poll until it does
            assert time.monotonic() < deadline, "the entry never expired"
            time.sleep(0.01)
        assert r.exists("llmutils:v1:c") == 0


def test_client_chooses_the_backend(url: str, server: OpenAITestServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # CACHE_URL (here from the environment) wins over the configured CACHE_FILE_NAME.
    monkeypatch.setenv("LLMUTILS_CACHE_URL", url)
    with OpenAIClient(base_url=server.base_url, api_key="k", cache_api_calls=True) as client:
        assert [ask(client, "one"), ask(client, "one")] == [False, True]
        assert client.cache_stats() == llmutils.CacheStats(hits=1, misses=1, writes=1, errors=0)
    monkeypatch.delenv("LLMUTILS_CACHE_URL")
    assert not (tmp_path / "llmutils_cache.sqlite").exists()
    # force_api_cache() with a URL as the "file name"; then the cache_url= argument.
    llmutils.force_api_cache(True, url)
    with OpenAIClient(base_url=server.base_url, api_key="k") as client:
        assert ask(client, "one") is True
    llmutils.force_api_cache(True, "local.sqlite")
    with OpenAIClient(base_url=server.base_url, api_key="k", cache_url=url) as client:
        assert ask(client, "one") is True
    with OpenAIClient(base_url=server.base_url, api_key="k") as client:
        assert ask(client, "one") is False  # the SQLite file: a different cache
    assert server.request_count == 2
    with RedisCache(url) as cache:
        assert len(cache) == 1


def test_an_explicit_cache_file_wins_over_a_cache_url_from_the_environment_or_config(
    url: str, server: OpenAITestServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMUTILS_CACHE_URL", url)
    with OpenAIClient(base_url=server.base_url, api_key="k", cache_api_calls=True, cache_file_name="arg.sqlite") as client:
        assert [ask(client, "one"), ask(client, "one")] == [False, True]
    with OpenAIClient(base_url=server.base_url, api_key="k") as client:
        client.set_api_cache(True, "set.sqlite")
        assert ask(client, "two") is False
    monkeypatch.delenv("LLMUTILS_CACHE_URL")
    (tmp_path / "config.ini").write_text(f"[OpenAI]\nCACHE_URL = {url}\nCACHE_API_CALLS = true\n", encoding="utf-8")
    llmutils.force_api_cache(True, "forced.sqlite")
    with OpenAIClient(base_url=server.base_url, api_key="k") as client:
        assert ask(client, "three") is False
    with RedisCache(url) as cache:
        assert len(cache) == 0  # every call named a file: Redis was never written
    for name, count in (("arg.sqlite", 1), ("set.sqlite", 1), ("forced.sqlite", 1)):
        with llmutils.SQLiteCache(tmp_path / name) as cache:
            assert len(cache) == count, name
    # Named last, in the same layer as a URL: the file still wins.
    with OpenAIClient(base_url=server.base_url, api_key="k", cache_url=url) as client:
        client.set_api_cache(True, "set.sqlite")
        assert ask(client, "two") is True  # the same file as above, not Redis
    llmutils.force_default_value("CACHE_URL", url)
    llmutils.force_api_cache(True, "forced.sqlite")
    with OpenAIClient(base_url=server.base_url, api_key="k") as client:
        assert ask(client, "three") is True
    with RedisCache(url) as cache:
        assert len(cache) == 0
    # Without an explicit file, the configured URL applies again.
    llmutils._config.reset_forced_values()
    with OpenAIClient(base_url=server.base_url, api_key="k") as client:
        assert ask(client, "four") is False
    with RedisCache(url) as cache:
        assert len(cache) == 1


def test_replay_miss_names_the_masked_url(server: OpenAITestServer) -> None:
    with api_client(server, f"redis://:s3cret@127.0.0.1:{_free_port()}/0", cache_mode="replay") as client:
        with pytest.raises(CacheMissError, match=r"redis://:\*\*\*@127\.0\.0\.1") as err:
            ask(client, "never recorded")
    assert "s3cret" not in str(err.value) and server.request_count == 0


# -- processes and threads, single-flight --------------------------------------------------------

def _child(url: str, base_url: str, proc: int, threads: int, shared: int, own: int, start: Any, results: Any) -> None:
    """One process: ``threads`` threads each ask the ``shared`` questions, then ``own`` of their own."""
    errors: list[str] = []
    cached: list[bool] = []
    lock = threading.Lock()
    with OpenAIClient(base_url=base_url, api_key="k", cache_api_calls=True, cache_url=url) as client:
        together = threading.Barrier(threads)

        def work(t: int) -> None:
            together.wait()
            for prompt in [f"shared {i}" for i in range(shared)] + [f"own {proc}-{t}-{i}" for i in range(own)]:
                try:
                    was_cached = ask(client, prompt)
                    with lock:
                        cached.append(was_cached)
                except Exception as exc:  # reported to the test, which fails on any
                    with lock:
                        errors.append(repr(exc))

        pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        start.wait(30)  # every process begins at once
        for th in pool:
            th.start()
        for th in pool:
            th.join()
        results.put({"errors": errors, "calls": len(cached), "cached": sum(cached), "cache_errors": client.cache_stats().errors})


def run_processes(url: str, server: OpenAITestServer, procs: int, threads: int, shared: int, own: int) -> list[dict[str, Any]]:
    """Run ``procs`` processes of :func:`_child` against one Redis and one API; return their reports.

    They fork from a forkserver that has already imported llmutils and openai, so starting four
    costs milliseconds instead of four imports of openai.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["llmutils", "openai", __name__])
    start = ctx.Barrier(procs)
    results = ctx.Queue()
    children = [
        ctx.Process(target=_child, args=(url, server.base_url, p, threads, shared, own, start, results)) for p in range(procs)
    ]
    for child in children:
        child.start()
    try:
        reports = [results.get(timeout=60) for _ in children]
    finally:
        for child in children:
            child.join(30)
            if child.exitcode is None:
                child.kill()
                child.join()
        results.close()
        results.join_thread()
    assert [child.exitcode for child in children] == [0] * procs
    return reports


def test_four_processes_eight_threads_share_one_redis(url: str, server: OpenAITestServer, tmp_path: Path) -> None:
    server.latency = 0.01
    procs, threads, shared, own = 4, 8, 8, 4
    results = run_processes(url, server, procs, threads, shared, own)
    assert [r["errors"] for r in results] == [[]] * procs
    assert sum(r["calls"] for r in results) == procs * threads * (shared + own)
    assert sum(r["cache_errors"] for r in results) == 0
    expected = shared + procs * threads * own  # every distinct request once, the shared ones too
    assert server.request_count == expected
    with RedisCache(url) as cache:
        assert len(cache) == expected
    assert sum(r["cached"] for r in results) == procs * threads * (shared + own) - expected


def test_single_flight_across_processes(url: str, server: OpenAITestServer, tmp_path: Path) -> None:
    server.latency = 0.5  # the one call is slow: the other processes ask while it is in flight
    procs = 4
    results = run_processes(url, server, procs, 1, 1, 0)
    assert [r["errors"] for r in results] == [[]] * procs
    assert server.request_count == 1
    assert sum(r["cached"] for r in results) == procs - 1


def test_a_dead_lock_holder_blocks_no_longer_than_its_lock(url: str, server: OpenAITestServer, logs: pytest.LogCaptureFixture) -> None:
    with api_client(server, url) as client, raw_client(url) as r:
        ask(client, "hello")  # learn the request's key, then forget the answer
        [entry] = r.keys("llmutils:v1:*")
        r.delete(entry)
        server.reset()
        r.set(entry.replace(b"llmutils:v1:", b"llmutils:lock:v1:"), "a crashed process", px=300)  # never released
        started = time.monotonic()
        assert ask(client, "hello") is False
        assert time.monotonic() - started >= 0.2  # it waited for the holder...
        assert server.request_count == 1  # ...then, with no answer stored, sent the request itself
        assert ask(client, "hello") is True
    assert warnings_logged(logs) == []


def test_a_dead_lock_holder_never_makes_a_call_miss_its_total_timeout(url: str, server: OpenAITestServer) -> None:
    with api_client(server, url) as client, raw_client(url) as r:
        ask(client, "hello")
        [entry] = r.keys("llmutils:v1:*")
        r.delete(entry)
        server.reset()
        # A holder that died right after taking a long lock: its lock outlives the caller's budget.
        r.set(entry.replace(b"llmutils:v1:", b"llmutils:lock:v1:"), "a crashed process", px=60_000)
        started = time.monotonic()
        with pytest.raises(llmutils.TotalTimeoutError):
            client.send_message([{"role": "user", "content": "hello"}], total_timeout=1)
        assert time.monotonic() - started < 1.5
        assert server.request_count == 0  # it waited for the holder until its own deadline, no longer


def test_a_failing_holder_releases_its_lock(url: str, server: OpenAITestServer) -> None:
    server.script(Fault.bad_request())
    with api_client(server, url) as client, raw_client(url) as r:
        with pytest.raises(llmutils.InvalidRequestError):
            ask(client, "hello")
        assert list(r.scan_iter("llmutils:lock:*")) == []
        assert ask(client, "hello") is False and ask(client, "hello") is True


FORK = r"""
import os, sys
from llmutils.cache import RedisCache
cache = RedisCache(sys.argv[1])
cache.set("parent", 1)
pid = os.fork()
if pid == 0:  # the child redials on its own connections
    ok = cache.get("parent") == 1
    cache.set("child", 2)
    cache.close()
    os._exit(0 if ok else 1)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0
assert cache.get("child") == 2 and cache.stats().errors == 0
cache.close()
print("ok")
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_after_use(url: str) -> None:
    done = subprocess.run([sys.executable, "-c", FORK, url], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


# -- faults: down at start, killed mid-run, timeouts, a wrong password ---------------------------


def test_redis_down_at_start(server: OpenAITestServer, logs: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    with api_client(server, f"redis://:s3cret@127.0.0.1:{_free_port()}/0") as client:
        the_cache(client)._clock = clock
        assert [ask(client, "a"), ask(client, "a"), ask(client, "b")] == [False, False, False]
        assert client.cache_stats().errors == 1  # within the back-off Redis is not even tried
        clock.advance(6)
        assert ask(client, "a") is False
        assert client.cache_stats().errors == 2
    assert server.request_count == 4
    warned = warnings_logged(logs)
    assert len(warned) == 1 and "redis://:***@127.0.0.1" in warned[0] and "calls go on without the cache" in warned[0]
    assert "s3cret" not in logs.text


def test_redis_killed_mid_run_and_restarted(server: OpenAITestServer, own_redis: Callable[..., RedisServer], logs: pytest.LogCaptureFixture) -> None:
    redis_server = own_redis("--appendonly", "yes", "--appendfsync", "always")
    clock = FakeClock()
    with api_client(server, redis_server.url) as client:
        the_cache(client)._clock = clock
        assert [ask(client, "a"), ask(client, "a")] == [False, True]
        redis_server.kill()
        assert [ask(client, "a"), ask(client, "b")] == [False, False]  # calls go on, without the cache
        clock.advance(6)
        assert ask(client, "b") is False  # tried again: still down, no second WARNING
        redis_server.start()  # same port; its append-only file still has "a"
        assert ask(client, "a") is False  # still in the back-off
        clock.advance(6)
        assert [ask(client, "a"), ask(client, "b"), ask(client, "b")] == [True, False, True]
        assert not the_cache(client).disabled
    assert server.request_count == 6
    warned = warnings_logged(logs)
    assert len(warned) == 1 and redis_server.url.split("/0")[0] in warned[0]
    assert any(r.levelno == logging.INFO and "answers again" in r.getMessage() for r in logs.records)


def test_wrong_password(server: OpenAITestServer, own_redis: Callable[..., RedisServer], logs: pytest.LogCaptureFixture) -> None:
    redis_server = own_redis("--requirepass", "right-one")
    wrong = f"redis://:hunter2@127.0.0.1:{redis_server.port}/0"
    with api_client(server, wrong) as client:
        assert [ask(client, "a"), ask(client, "a")] == [False, False]
    warned = warnings_logged(logs)
    assert len(warned) == 1 and "redis://:***@" in warned[0] and "Authentication" in warned[0], warned
    assert "hunter2" not in logs.text
    with api_client(server, f"redis://:right-one@127.0.0.1:{redis_server.port}/0") as client:
        assert [ask(client, "a"), ask(client, "a")] == [False, True]


def test_a_hung_redis_times_out(logs: pytest.LogCaptureFixture) -> None:
    with socket.socket() as hung:  # accepts connections (the kernel's backlog) and never answers
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)
        with RedisCache(f"redis://127.0.0.1:{hung.getsockname()[1]}/0", socket_timeout=0.2) as cache:
            started = time.monotonic()
            assert cache.get("k") is None
            cache.set("k", 1)  # in the back-off: not even tried
            assert time.monotonic() - started < 2
            assert cache.disabled and cache.stats().errors == 1
    warned = warnings_logged(logs)
    assert len(warned) == 1 and "Timeout" in warned[0]


# -- the command line: stats, clear, copy ------------------------------------------------------------


def test_copy_sqlite_into_redis_and_cache_commands(url: str, server: OpenAITestServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with OpenAIClient(base_url=server.base_url, api_key="k", cache_api_calls=True, cache_file_name="c.sqlite") as client:
        for text in ("a", "b", "c"):
            ask(client, text)
    with SQLiteCache("c.sqlite", ttl=3600) as sqlite_cache:
        sqlite_cache.set("with-ttl", 1)
    with SQLiteCache("c.sqlite", ttl=1, clock=lambda: time.time() - 100) as stale:
        stale.set("expired", 2)  # written "100 s ago" with a 1 s lifetime
    masked = url  # no password in the test URL
    assert main(["cache", "copy", "c.sqlite", url]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"copied 4 entries from {tmp_path / 'c.sqlite'} to {masked}; skipped 1 expired"), out
    with raw_client(url) as r:
        assert 3_500_000 < r.pttl("llmutils:v1:with-ttl") <= 3_600_000
    # The same requests now come from Redis, in replay mode: nothing is sent.
    with api_client(server, url, cache_mode="replay") as client:
        assert all(ask(client, text) for text in ("a", "b", "c"))
    assert server.request_count == 3
    assert main(["cache", "stats", "--cache-url", url]) == 0
    out = capsys.readouterr().out
    assert "entries: 4" in out and f"path: {url}" in out and "backend: redis" in out
    assert main(["cache", "vacuum", "--cache-url", url]) == 1
    assert "SQLite" in capsys.readouterr().err
    assert main(["cache", "clear", "--cache-url", url]) == 0
    assert capsys.readouterr().out.startswith(f"cleared 4 entries from {url}")
    (tmp_path / "old.pickle").write_bytes(pickle.dumps({"old-key": {"choices": []}}))
    assert main(["cache", "import-pickle", "old.pickle", "--trusted", "--cache-url", url]) == 0
    assert capsys.readouterr().out.startswith(f"imported 1 entries from old.pickle into {url}")
    with RedisCache(url) as cache:
        assert cache.get("legacy:old-key") == {"choices": []}
        cache.clear()
    # Back the other way, and the errors.
    with RedisCache(url) as cache:
        cache.set("k", {"x": 1}, ttl=600)
    assert main(["cache", "copy", url, "back.sqlite"]) == 0
    capsys.readouterr()
    with SQLiteCache("back.sqlite", mode="readonly") as back:
        assert back.get("k") == {"x": 1}
    assert main(["cache", "copy", "missing.sqlite", url]) == 1
    assert "no cache file" in capsys.readouterr().err
    dead = f"redis://:s3cret@127.0.0.1:{_free_port()}/0"
    assert main(["cache", "copy", "c.sqlite", dead]) == 1
    err = capsys.readouterr().err
    assert "copying into redis://:***@" in err and "s3cret" not in err
    assert main(["cache", "stats", "--cache-url", dead]) == 1
    assert "s3cret" not in capsys.readouterr().err


def test_copy_cache_function(url: str, tmp_path: Path) -> None:
    with SQLiteCache(tmp_path / "s.sqlite") as source, RedisCache(url) as dest, RedisCache(url, mode="readonly") as ro:
        for i in range(1200):  # more than one pipeline batch
            source.set(f"k{i}", i)
        result = copy_cache(source, dest, batch_size=500)
        assert (result.copied, result.expired, result.invalid) == (1200, 0, 0)
        assert len(dest) == 1200 and dest.get("k1199") == 1199
        with pytest.raises(ConfigError, match="readwrite"):
            copy_cache(source, ro)
