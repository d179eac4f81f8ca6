"""The per-call deadline: every wait inside a call ends by ``total_timeout`` (plus a little)."""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx2
import pytest

from llmutils import OpenAIClient, RetryPolicy, TotalTimeoutError
from llmutils._deadline import Deadline
from llmutils._ratelimit import RateLimiter
from llmutils._transport import LeanTransport, call_deadline
from llmutils.testing import Fault, OpenAITestServer

HELLO = [{"role": "user", "content": "hello"}]
SLACK = 0.5  # what the issue allows past total_timeout


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="llmutils")
    return caplog


def warnings_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "llmutils"]


# -- the value itself ---------------------------------------------------------------------------


def test_an_unbounded_deadline_never_expires_and_bounds_nothing() -> None:
    deadline = Deadline(None)
    assert not deadline.bounded and not deadline.expired
    assert deadline.remaining() == math.inf
    assert deadline.timeout_for(None) is None and deadline.timeout_for(3.0) == 3.0
    deadline.check("doing nothing")


def test_a_bounded_deadline_counts_down_and_raises_when_spent() -> None:
    clock = FakeClock()
    deadline = Deadline(5, clock=clock)
    assert deadline.remaining() == 5.0 and deadline.timeout_for(60.0) == 5.0 and deadline.timeout_for(2.0) == 2.0
    clock.now += 4.5
    assert deadline.timeout_for(None) == pytest.approx(0.5)
    clock.now += 1
    assert deadline.expired and deadline.remaining() == 0.0
    with pytest.raises(TotalTimeoutError, match=r"total_timeout=5s ran out waiting for a slot"):
        deadline.check("waiting for a slot")


def test_at_expiry_runs_the_callback_only_when_the_deadline_passes_inside_the_block() -> None:
    fired = threading.Event()
    with Deadline(0.05).at_expiry(fired.set):
        assert fired.wait(5)
    quiet = threading.Event()
    with Deadline(0.2).at_expiry(quiet.set):
        pass
    assert not quiet.wait(0.4)  # the deadline passes after the block: the callback must not run


def test_leaving_the_block_waits_for_a_callback_already_running() -> None:
    # The callback shuts a socket down: the connection must not go back to the pool meanwhile.
    started, release, left = threading.Event(), threading.Event(), threading.Event()

    def callback() -> None:
        started.set()
        release.wait(10)

    def call() -> None:
        with Deadline(0.01).at_expiry(callback):
            started.wait(10)
        left.set()

    thread = threading.Thread(target=call)
    thread.start()
    assert started.wait(10)
    assert not left.wait(0.2)  # still inside the callback: the block has not been left
    release.set()
    assert left.wait(10)
    thread.join(10)


# -- the body read -----------------------------------------------------------------------------


@pytest.fixture
def client(server: OpenAITestServer) -> Iterator[OpenAIClient]:
    policy = RetryPolicy(max_attempts=3, waiting_time=0.01, jitter=0)
    with OpenAIClient(base_url=server.base_url, api_key="k", retry=policy) as c:
        yield c


def test_a_trickling_body_ends_at_the_deadline_not_at_a_read_timeout(client: OpenAIClient, server: OpenAITestServer) -> None:
    # One byte per second: no read ever waits long enough for timeout=2 to fire, so only the
    # call's deadline can end it (the whole body would take minutes).
    server.script(Fault.trickle(1))
    started = time.monotonic()
    with pytest.raises(TotalTimeoutError, match="reading the response body") as info:
        client.send_message(HELLO, timeout=2, total_timeout=1.5)
    elapsed = time.monotonic() - started
    assert 1.4 <= elapsed < 1.5 + SLACK
    assert info.value.attempts == 1 and server.request_count == 1


def test_a_slow_trickle_that_finishes_in_time_is_read_whole(client: OpenAIClient, server: OpenAITestServer) -> None:
    server.script(Fault.trickle(2000))
    assert client.send_message(HELLO, total_timeout=30) == {"role": "assistant", "content": "echo: hello"}


def test_timeout_stays_the_limit_of_one_attempt(server: OpenAITestServer) -> None:
    waits: list[float] = []
    policy = RetryPolicy(max_attempts=2, waiting_time=0.01, jitter=0, sleep=waits.append)
    server.script(Fault.slow(1.0))
    with OpenAIClient(base_url=server.base_url, api_key="k", retry=policy) as c:
        assert c.send_message(HELLO, timeout=0.3, total_timeout=10)["content"] == "echo: hello"
    assert server.request_count == 2 and waits == [0.01]


# -- every byte of an attempt: error bodies the SDK reads itself, the head, the connect ---------


class SilentServer:
    """Accepts connections and reads the request, then sends ``head`` one byte every ``pace``
    seconds, forever (an empty ``head``: nothing at all), until closed."""

    def __init__(self, head: bytes = b"", pace: float = 0.2) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.head = head
        self.pace = pace
        self.accepted = 0
        self.stopping = threading.Event()
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self.conns.append(conn)
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            for i in range(len(self.head)):
                if self.stopping.wait(self.pace):
                    return
                conn.sendall(self.head[i : i + 1])
            self.stopping.wait()

    def close(self) -> None:
        self.stopping.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() (a close alone does not, on Linux)
        self.sock.close()
        for conn in self.conns:
            conn.close()
        self.thread.join(5)


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    raw = SilentServer()
    yield raw
    raw.close()


@pytest.fixture
def trickling_head() -> Iterator[SilentServer]:
    raw = SilentServer(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + b"x-padding: " + b"." * 1000 + b"\r\n\r\n{}")
    yield raw
    raw.close()


def timed_call(call: Callable[[], object]) -> tuple[float, pytest.ExceptionInfo[TotalTimeoutError]]:
    started = time.monotonic()
    with pytest.raises(TotalTimeoutError) as info:
        call()
    return time.monotonic() - started, info


@pytest.mark.parametrize("fault", [Fault.server_error(500).trickling(1), Fault.rate_limit().trickling(1)], ids=["500", "429"])
def test_an_error_body_that_trickles_ends_at_the_deadline(client: OpenAIClient, server: OpenAITestServer, fault: Fault) -> None:
    # The SDK reads an error body itself, before it raises: every byte of it is bounded too.
    server.script(fault)
    elapsed, info = timed_call(lambda: client.send_message(HELLO, timeout=2, total_timeout=1.5))
    assert 1.4 <= elapsed < 1.5 + SLACK
    assert server.request_count == 1 and info.value.attempts == 1


def test_an_error_body_that_trickles_in_a_stream_call_ends_at_the_deadline(client: OpenAIClient, server: OpenAITestServer) -> None:
    server.script(Fault.server_error(503).trickling(1))
    elapsed, _ = timed_call(lambda: "".join(client.stream_message(HELLO, timeout=2, total_timeout=1.5)))
    assert 1.4 <= elapsed < 1.5 + SLACK and server.request_count == 1


def test_headers_that_never_come_end_at_the_deadline(silent: SilentServer) -> None:
    with OpenAIClient(base_url=silent.url, api_key="k", retry=RetryPolicy(max_attempts=3, waiting_time=0.01, jitter=0)) as c:
        elapsed, info = timed_call(lambda: c.send_message(HELLO, timeout=60, total_timeout=1))
    assert 0.9 <= elapsed < 1 + SLACK
    assert silent.accepted == 1 and "total_timeout=1s" in str(info.value)


def test_a_head_that_trickles_ends_at_the_deadline_not_at_a_read_timeout(trickling_head: SilentServer) -> None:
    # One byte of the status line and headers every 0.2 s: no read waits for timeout=2.
    with OpenAIClient(base_url=trickling_head.url, api_key="k", retry=RetryPolicy(max_attempts=3, waiting_time=0.01, jitter=0)) as c:
        elapsed, _ = timed_call(lambda: c.send_message(HELLO, timeout=2, total_timeout=1.5))
    assert 1.4 <= elapsed < 1.5 + SLACK and trickling_head.accepted == 1


def test_the_transport_bounds_each_wait_by_the_call_deadline_only_inside_call_deadline(trickling_head: SilentServer) -> None:
    with httpx2.Client(transport=LeanTransport()) as http:
        started = time.monotonic()
        with call_deadline(Deadline(0.6)), pytest.raises(httpx2.ReadTimeout):
            http.post(trickling_head.url, content=b"{}", timeout=5)
        assert 0.6 <= time.monotonic() - started < 0.6 + SLACK
        with call_deadline(Deadline(None)), pytest.raises(httpx2.ReadTimeout):
            http.post(trickling_head.url, content=b"{}", timeout=0.1)  # the per-read timeout, as before


# -- the rate limiter, the call slot, the backoff ------------------------------------------------


def test_the_rate_limiter_wait_is_bounded_by_the_deadline() -> None:
    limiter = RateLimiter(rpm=1)
    limiter.acquire()
    started = time.monotonic()
    with pytest.raises(TotalTimeoutError, match="rate limit"):
        limiter.acquire(deadline=Deadline(0.2))
    assert time.monotonic() - started < 0.2 + SLACK


def test_a_backoff_that_would_end_past_the_deadline_is_not_slept(server: OpenAITestServer) -> None:
    waits: list[float] = []
    policy = RetryPolicy(max_attempts=5, waiting_time=10, jitter=0, sleep=waits.append)
    server.script(Fault.server_error())
    with OpenAIClient(base_url=server.base_url, api_key="k", retry=policy) as c, pytest.raises(TotalTimeoutError) as info:
        c.send_message(HELLO, total_timeout=2)
    assert waits == [] and info.value.attempts == 1 and server.request_count == 1


# -- the cache ---------------------------------------------------------------------------------

HOLD_WRITE_LOCK = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")  # the write lock, as a long VACUUM or an open sqlite3 shell would hold it
print("locked", flush=True)
sys.stdin.read()
conn.execute("ROLLBACK")
"""


def test_a_sqlite_write_lock_held_by_another_process_never_makes_a_call_miss_its_deadline(
    server: OpenAITestServer, tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "c.sqlite"
    with OpenAIClient(base_url=server.base_url, api_key="k", cache_api_calls=True, cache_file_name=path) as c:
        c.send_message([{"role": "user", "content": "make the file"}])
        with subprocess.Popen(
            [sys.executable, "-c", HOLD_WRITE_LOCK, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        ) as holder:
            assert holder.stdin is not None and holder.stdout is not None
            try:
                assert holder.stdout.readline().strip() == "locked"
                for text in ("one", "two"):
                    started = time.monotonic()
                    answer = c.send_message([{"role": "user", "content": text}], total_timeout=1)
                    assert time.monotonic() - started < 1 + SLACK  # the busy timeout is 30 s
                    assert answer["content"] == f"echo: {text}"
                assert c.cache_stats().errors == 2
                late = [m for m in warnings_logged(logs) if "total_timeout" in m]
                assert len(late) == 1 and str(path) in late[0]
            finally:
                holder.stdin.close()
                holder.wait(10)
        c.send_message([{"role": "user", "content": "three"}], total_timeout=1)
        assert c.cache_stats().writes == 2  # the cache stayed on: "make the file" and "three"
        assert c.send_message([{"role": "user", "content": "three"}])["content"] == "echo: three"
        assert c.last_call is not None and c.last_call.cached
    assert len(warnings_logged(logs)) == 1
