"""Tests for llmutils._ratelimit_redis against a real redis-server and real subprocesses.

Waits are recorded through an injected ``sleep`` where the test only needs the schedule; the
multi-process tests count real acquisitions over a window, with bounds the limiter guarantees.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis_servers import CI_URL, NO_SERVER, REDIS_SERVER, RedisServer

import llmutils
from llmutils import OpenAIClient
from llmutils._deadline import Deadline
from llmutils._exceptions import ConfigError, InvalidRequestError, RateLimitError, TotalTimeoutError
from llmutils._ratelimit_redis import RedisRateLimiter, rate_limit_name
from llmutils.testing import Fault, OpenAITestServer

redis = pytest.importorskip("redis", reason="redis-py is not installed: pip install -e '.[test]'")


# Schedules and counts need Redis in use all along: a generous timeout (in the URL, which wins over
# the limiter's 0.5 s) keeps a busy machine from sending a limiter to its local fallback.
PATIENT = "?socket_timeout=5&socket_connect_timeout=5"


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The CI Redis, or one started for this module; tests use fresh limit names, so no flush."""
    if CI_URL:
        yield CI_URL + PATIENT
        return
    if REDIS_SERVER is None:
        pytest.skip(NO_SERVER)
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server.url + PATIENT
    finally:
        server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server this test may stop, freeze and restart."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not on PATH (apt-get install redis-server): this test needs its own server")
    server = RedisServer(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()


HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture
def name() -> str:
    return f"test-{uuid.uuid4().hex}"


class Recorder:
    """An injected ``sleep`` that records the waits and returns at once."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def schedule(limiters: list[RedisRateLimiter], waits: Recorder, tokens: int = 0) -> tuple[list[float], list[float]]:
    """Acquire once from each limiter in turn; return the recorded waits and the real time elapsed by
    the end of each acquire (the limiter read Redis' clock somewhere before that end)."""
    start = time.monotonic()
    elapsed = []
    for limiter in limiters:
        before = len(waits.waits)
        limiter.acquire(tokens)
        elapsed.append(time.monotonic() - start)
        if len(waits.waits) == before:
            waits.waits.append(0.0)
    return waits.waits, elapsed


def assert_on_schedule(waits: list[float], elapsed: list[float], slots: list[float]) -> None:
    """Each wait is its slot (seconds after the first call) less the real time already gone by."""
    for wait, gone, slot in zip(waits, elapsed, slots, strict=True):
        assert slot - gone - 0.002 <= wait <= slot + 0.002, (waits, elapsed, slots)


# -- schedule (one process, recorded waits) ----------------------------------------------------


def test_limiters_with_one_name_share_one_evenly_spaced_budget(redis_url: str, name: str) -> None:
    waits = Recorder()
    a = RedisRateLimiter(redis_url, name=name, rpm=600, sleep=waits)
    b = RedisRateLimiter(redis_url, name=name, rpm=600, sleep=waits)
    recorded, elapsed = schedule([a, b, a, b, a], waits)
    assert_on_schedule(recorded, elapsed, [0.0, 0.1, 0.2, 0.3, 0.4])


def test_other_names_have_their_own_budget(redis_url: str, name: str) -> None:
    waits = Recorder()
    a = RedisRateLimiter(redis_url, name=name, rpm=60, sleep=waits)
    other = RedisRateLimiter(redis_url, name=name + "-other", rpm=60, sleep=waits)
    recorded, elapsed = schedule([a, other, a], waits)
    assert_on_schedule(recorded, elapsed, [0.0, 0.0, 1.0])


def test_burst_then_spacing(redis_url: str, name: str) -> None:
    waits = Recorder()
    a = RedisRateLimiter(redis_url, name=name, rpm=600, rpm_burst=3, sleep=waits)
    recorded, elapsed = schedule([a] * 5, waits)
    assert_on_schedule(recorded, elapsed, [0.0, 0.0, 0.0, 0.1, 0.2])


def test_tokens_are_taken_with_the_request_and_reconciled(redis_url: str, name: str) -> None:
    waits = Recorder()
    # 6000 tpm = 100 tokens/s, burst one second's worth (100 tokens); no rpm limit.
    a = RedisRateLimiter(redis_url, name=name, tpm=6000, sleep=waits)
    start = time.monotonic()
    first = a.acquire(100)
    assert waits.waits == []
    a.acquire(100)
    gone = time.monotonic() - start
    assert 1.0 - gone - 0.002 <= waits.waits[-1] <= 1.002
    first.reconcile(150)  # 50 more tokens than estimated: the next slot moves half a second later
    a.acquire(100)
    gone = time.monotonic() - start
    assert 2.5 - gone - 0.002 <= waits.waits[-1] <= 2.502
    assert first.tokens == 150


def test_a_refund_brings_the_next_slot_forward(redis_url: str, name: str) -> None:
    waits = Recorder()
    a = RedisRateLimiter(redis_url, name=name, tpm=6000, sleep=waits)
    a.acquire(100)
    big = a.acquire(100)  # waits 1 s (recorded); the budget is now used up to 2 s from the start
    big.reconcile(0)  # nothing was used after all: 1 s refunded
    before = len(waits.waits)
    a.acquire(100)
    assert waits.waits[before] <= 1.002  # without the refund it would be about 2 s


def test_an_oversize_request_goes_when_the_budget_is_full_and_leaves_a_debt(redis_url: str, name: str) -> None:
    waits = Recorder()
    a = RedisRateLimiter(redis_url, name=name, tpm=6000, sleep=waits)
    start = time.monotonic()
    a.acquire(300)  # three seconds' worth, burst is one: goes at once
    assert waits.waits == []
    a.acquire(100)
    gone = time.monotonic() - start
    assert 3.0 - gone - 0.002 <= waits.waits[0] <= 3.002


def test_tokens_are_ignored_without_a_tpm_limit(redis_url: str, name: str) -> None:
    waits = Recorder()
    a = RedisRateLimiter(redis_url, name=name, rpm=6, sleep=waits)
    a.acquire(10**9)
    assert a.tpm is None and waits.waits == []


def test_timeout_raises_at_once_without_taking_a_slot(redis_url: str, name: str) -> None:
    waits = Recorder()
    a = RedisRateLimiter(redis_url, name=name, rpm=60, sleep=waits)
    a.acquire()
    with pytest.raises(RateLimitError, match=r"no slot within the 0\.5 s timeout") as info:
        a.acquire(timeout=0.5)
    assert waits.waits == []
    assert info.value.retry_after is not None and 0.5 < info.value.retry_after <= 1.0
    start = time.monotonic()
    a.acquire(timeout=5)  # the refused call took nothing: this one gets the slot one second in
    assert 1.0 - (time.monotonic() - start) - 0.01 <= waits.waits[0] <= 1.002


def test_the_call_deadline_bounds_the_wait(redis_url: str, name: str) -> None:
    waits = Recorder()
    a = RedisRateLimiter(redis_url, name=name, rpm=60, sleep=waits)
    a.acquire()
    with pytest.raises(TotalTimeoutError, match=r"total_timeout=0\.5s ran out waiting for the shared rate limit"):
        a.acquire(timeout=30, deadline=Deadline(0.5))
    with pytest.raises(RateLimitError, match=r"no slot within the 0\.2 s timeout"):
        a.acquire(timeout=0.2, deadline=Deadline(30))  # the shorter bound wins
    a.acquire(deadline=Deadline(5))
    assert waits.waits and waits.waits[0] <= 1.002


def test_a_pause_holds_every_limiter_with_the_name(redis_url: str, name: str) -> None:
    waits = Recorder()
    a = RedisRateLimiter(redis_url, name=name, rpm=6000, sleep=waits)
    b = RedisRateLimiter(redis_url, name=name, rpm=6000, sleep=waits)
    start = time.monotonic()
    a.pause(2.0)
    b.acquire()
    assert 2.0 - (time.monotonic() - start) - 0.002 <= waits.waits[0] <= 2.002


def test_a_pause_set_while_a_caller_sleeps_on_its_slot_gives_it_a_new_slot(redis_url: str, name: str) -> None:
    other = RedisRateLimiter(redis_url, name=name, rpm=60)
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 1:  # a 429 elsewhere, while this caller sleeps on its slot
            other.pause(3.0)

    a = RedisRateLimiter(redis_url, name=name, rpm=60, sleep=sleep)
    a.acquire()
    a.acquire()
    assert len(waits) == 2
    assert waits[0] <= 1.002 and 2.9 <= waits[1] <= 3.002


def test_pause_with_no_limits_still_holds(redis_url: str, name: str) -> None:
    waits = Recorder()
    a = RedisRateLimiter(redis_url, name=name, sleep=waits)
    assert a.enabled and a.rpm is None and a.tpm is None
    a.pause(1.0)
    a.acquire()
    assert 0.9 <= waits.waits[0] <= 1.002


def test_the_hash_expires_after_use(redis_url: str, name: str) -> None:
    RedisRateLimiter(redis_url, name=name, rpm=60).acquire()
    raw = redis.Redis.from_url(redis_url)
    try:
        key = f"llmutils:ratelimit:{{{name}}}"
        assert set(raw.hgetall(key)) == {b"r", b"t", b"p"}
        assert 60_000 <= raw.pttl(key) <= 61_000
    finally:
        raw.close()


# -- settings --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"url": "http://localhost:6379"}, "RATE_LIMIT_URL must be a Redis URL"),
        ({"url": "localhost:6379"}, "RATE_LIMIT_URL must be a Redis URL"),
        (
            {"url": "redis://:secret@localhost:notaport/0"},
            "RATE_LIMIT_URL 'redis://:\\*\\*\\*@localhost:notaport/0' cannot be used",
        ),
        ({"name": " "}, "RATE_LIMIT_NAME must be a non-empty string"),
        ({"rpm": -1}, "rpm must be a positive number"),
        ({"tpm": -5}, "tpm must be a positive number"),
        ({"rpm_burst": 0}, "rpm_burst must be at least 1"),
        ({"redis_timeout": 0}, "redis_timeout must be a positive number"),
        ({"retry_interval": -1}, "retry_interval must be a positive number"),
    ],
)
def test_bad_settings_fail_before_any_connection(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"url": "redis://127.0.0.1:1/0", "name": "n", **kwargs}
    with pytest.raises(ConfigError, match=message):
        RedisRateLimiter(**args)  # type: ignore[arg-type]


def test_bad_token_count_is_refused(redis_url: str, name: str) -> None:
    with pytest.raises(InvalidRequestError, match="tokens must be an integer >= 0"):
        RedisRateLimiter(redis_url, name=name, rpm=60).acquire(-1)


def test_default_name_keeps_the_endpoint_and_drops_secrets() -> None:
    assert rate_limit_name("https://api.openai.com/v1/") == "https://api.openai.com/v1"
    assert rate_limit_name("https://me:sk-secret@host:8443/v1?api-key=sk-x") == "https://host:8443/v1"


def test_repr_masks_the_password() -> None:
    limiter = RedisRateLimiter("redis://:hunter2@127.0.0.1:1/0", name="n", rpm=60)
    assert "hunter2" not in repr(limiter) and "***" in repr(limiter)


# -- faults (a server of the test's own) -----------------------------------------------------------


def llmutils_records(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "llmutils" and r.levelno == level]


def test_redis_down_falls_back_to_local_limits_with_one_warning_and_comes_back(
    own_redis: RedisServer, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llmutils")
    limiter = RedisRateLimiter(own_redis.url, name=name, rpm=60_000, retry_interval=0.05)
    limiter.acquire()
    assert limiter.shared
    own_redis.stop()
    for _ in range(20):
        limiter.acquire(timeout=5)  # goes on with the local limiter
    assert not limiter.shared
    warnings = llmutils_records(caplog, logging.WARNING)
    assert len(warnings) == 1
    assert name in warnings[0] and "locally" in warnings[0] and f"127.0.0.1:{own_redis.port}" in warnings[0]
    own_redis.start()  # same port
    deadline = time.monotonic() + 10
    while not limiter.shared:
        assert time.monotonic() < deadline, "the limiter did not go back to Redis"
        limiter.acquire(timeout=5)
    assert len(llmutils_records(caplog, logging.WARNING)) == 1
    assert any("is back in use" in m for m in llmutils_records(caplog, logging.INFO))


def test_no_redis_round_trip_while_backing_off(own_redis: RedisServer, name: str) -> None:
    limiter = RedisRateLimiter(own_redis.url, name=name, rpm=60_000, retry_interval=3600)
    limiter.acquire()
    own_redis.stop()
    limiter.acquire()
    assert not limiter.shared
    own_redis.start()  # back, but the back-off has an hour to run: no call looks
    for _ in range(5):
        limiter.acquire()
    assert not limiter.shared
    raw = redis.Redis.from_url(own_redis.url)
    try:
        assert raw.exists(f"llmutils:ratelimit:{{{name}}}") == 0
    finally:
        raw.close()


def test_a_hung_redis_counts_as_down_after_redis_timeout(
    own_redis: RedisServer, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = RedisRateLimiter(own_redis.url, name=name, rpm=60_000, redis_timeout=0.2, retry_interval=3600)
    limiter.acquire()
    own_redis.freeze()
    try:
        start = time.monotonic()
        limiter.acquire(timeout=10)
        assert time.monotonic() - start < 5  # one redis_timeout, not the call's whole bound
        assert not limiter.shared
        assert len(llmutils_records(caplog, logging.WARNING)) == 1
        assert "Timeout" in llmutils_records(caplog, logging.WARNING)[0]
    finally:
        own_redis.thaw()


def test_a_pause_reaches_the_local_fallback_too(own_redis: RedisServer, name: str) -> None:
    waits = Recorder()
    limiter = RedisRateLimiter(own_redis.url, name=name, rpm=60_000, retry_interval=3600, sleep=waits)
    own_redis.stop()
    limiter.pause(0.3)
    start = time.monotonic()
    limiter.acquire()
    assert time.monotonic() - start >= 0.25


# -- many processes ---------------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import json, logging, sys, threading, time
    from llmutils._ratelimit_redis import RedisRateLimiter

    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    args = json.loads(sys.argv[1])
    limiter = RedisRateLimiter(args["url"], name=args["name"], rpm=args["rpm"], retry_interval=3600)
    stamps = []

    running = threading.Event()

    def run(until):
        while True:
            limiter.acquire(timeout=30)
            now = time.time()
            if now >= until:
                return
            stamps.append((now, limiter.shared))
            if not running.is_set():
                running.set()
                print("running", flush=True)

    run(0)  # connect and take one slot, then tell the parent and wait for its word
    print("ready", flush=True)
    word = json.loads(sys.stdin.readline())
    if "after" in word:
        for _ in range(word["after"]):
            limiter.acquire(timeout=30)
            stamps.append((time.time(), limiter.shared))
    else:
        time.sleep(max(0.0, word["start"] - time.time()))
        threads = [threading.Thread(target=run, args=(word["until"],)) for _ in range(args["threads"])]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    print(json.dumps(stamps), flush=True)
    """
)


def spawn(count: int, **args: object) -> list[subprocess.Popen[str]]:
    """Start ``count`` children and return once each has connected and taken its first slot."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, json.dumps({"threads": 1, **args})],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return procs


def tell(procs: list[subprocess.Popen[str]], **word: object) -> None:
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(word) + "\n")
        proc.stdin.flush()


def results(procs: list[subprocess.Popen[str]]) -> list[tuple[list[tuple[float, bool]], str]]:
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr
        out.append(([tuple(s) for s in json.loads(stdout.splitlines()[-1])], stderr))
    return out


def test_four_processes_share_one_rate_and_one_pause(redis_url: str, name: str) -> None:
    rate = 6000  # per minute = 100 per second, for every process together
    procs = spawn(4, url=redis_url, name=name, rpm=rate, threads=2)
    pauser = RedisRateLimiter(redis_url, name=name, rpm=rate)
    start = time.time() + 0.2
    tell(procs, start=start, until=start + 3.3)
    for proc in procs:  # every child has started sending
        assert proc.stdout is not None and proc.stdout.readline().strip() == "running"
    before = time.time()
    pauser.pause(0.8)  # a 429's Retry-After, seen by one process
    after = time.time()
    lo, hi = before + 1.0, min(before + 2.7, start + 3.0)  # a window of up to 1.7 s after the pause
    children = results(procs)
    assert all(shared for child, _ in children for _t, shared in child)
    stamps = sorted(t for child, _ in children for t, _shared in child)
    count = sum(lo <= t < hi for t in stamps)
    assert hi - lo >= 1.0, "the children started too late for the window"
    expected = rate / 60 * (hi - lo)  # about 170; without sharing it would be 4 times as many
    assert 0.95 * expected <= count <= 1.05 * expected, count
    shares = [sum(lo <= t < hi for t, _ in child) / count for child, _ in children]
    assert all(0.15 <= share <= 0.35 for share in shares), shares  # first come, first served: nobody starves
    for child, _ in children:
        times = [t for t, _ in child]
        assert not any(after + 0.05 < t < before + 0.75 for t in times), times  # all four held by the pause,
        assert any(t > before + 0.8 for t in times)  # and going on after it


def test_redis_stopped_mid_run_each_process_goes_on_locally_with_one_warning(own_redis: RedisServer, name: str) -> None:
    procs = spawn(2, url=own_redis.url, name=name, rpm=60_000)
    own_redis.stop()
    tell(procs, after=20)
    for child, stderr in results(procs):
        assert len(child) == 20 and not any(shared for _t, shared in child)
        warnings = [line for line in stderr.splitlines() if line.startswith("WARNING llmutils")]
        assert len(warnings) == 1, stderr
        assert "locally" in warnings[0]


# -- through clients ---------------------------------------------------------------------------------


def test_clients_with_rate_limit_url_share_one_budget_named_after_the_endpoint(
    server: OpenAITestServer, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMUTILS_RATE_LIMIT_URL", redis_url)  # the environment, for one of them
    a = OpenAIClient(base_url=server.base_url, api_key="k", rpm=1200)
    b = OpenAIClient(base_url=server.base_url, api_key="k", rpm=1200, rate_limit_url=redis_url)  # the argument
    name = rate_limit_name(server.base_url)
    raw = redis.Redis.from_url(redis_url)
    try:
        raw.delete(f"llmutils:ratelimit:{{{name}}}")
        start = time.monotonic()
        for i in range(5):
            a.send_message([{"role": "user", "content": f"a{i}"}])
            b.send_message([{"role": "user", "content": f"b{i}"}])
        elapsed = time.monotonic() - start
        assert raw.exists(f"llmutils:ratelimit:{{{name}}}") == 1
    finally:
        raw.close()
    assert elapsed >= 9 * 0.05 - 0.01  # ten requests 50 ms apart between the two (each alone: 0.2 s)
    assert server.request_count == 10


def test_rate_limit_name_splits_or_joins_budgets(server: OpenAITestServer, redis_url: str, name: str) -> None:
    client = OpenAIClient(base_url=server.base_url, api_key="k", rpm=60, rate_limit_url=redis_url, rate_limit_name=name)
    client.send_message(HELLO)
    other = RedisRateLimiter(redis_url, name=name, rpm=60)
    with pytest.raises(RateLimitError):  # the client took the budget's slot: the next is a second away
        other.acquire(timeout=0.5)


def test_a_429_retry_after_pauses_every_client_on_the_url(server: OpenAITestServer, redis_url: str, name: str) -> None:
    waits = Recorder()
    a = OpenAIClient(base_url=server.base_url, api_key="k", rate_limit_url=redis_url, rate_limit_name=name, sleep=waits)
    b = OpenAIClient(base_url=server.base_url, api_key="k", rate_limit_url=redis_url, rate_limit_name=name)
    server.script(Fault.rate_limit(retry_after=1))
    with pytest.raises(llmutils.LLMUtilsError):
        a.send_message(HELLO, max_attempts=1)
    start = time.monotonic()
    b.send_message(HELLO)  # no rpm/tpm set: the shared pause alone holds it
    assert time.monotonic() - start >= 0.8


def test_a_bad_rate_limit_url_fails_before_any_request(server: OpenAITestServer) -> None:
    with pytest.raises(ConfigError, match="RATE_LIMIT_URL"):
        OpenAIClient(base_url=server.base_url, api_key="k", rate_limit_url="http://:hunter2@localhost:6379")
    assert server.request_count == 0


def test_without_rate_limit_url_nothing_changes(server: OpenAITestServer) -> None:
    client = OpenAIClient(base_url=server.base_url, api_key="k", rpm=600)
    client.send_message(HELLO)
    assert [type(limiter).__name__ for limiter, _ in client._limits.values()] == ["RateLimiter"]


def test_a_client_goes_on_when_its_rate_limit_redis_stops(
    server: OpenAITestServer, own_redis: RedisServer, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = OpenAIClient(
        base_url=server.base_url, api_key="k", rpm=60_000, rate_limit_url=own_redis.url, rate_limit_name=name
    )
    client.send_message(HELLO)
    own_redis.stop()
    for i in range(5):
        assert client.send_message([{"role": "user", "content": f"after {i}"}])["content"] == f"echo: after {i}"
    assert len(llmutils_records(caplog, logging.WARNING)) == 1
    assert server.request_count == 6
