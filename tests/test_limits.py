"""Client-side limits exercised through a client: MAX_CONCURRENT_MODEL_CALLS, RPM, TPM, 429 pauses, CLI flags.

Every test talks to the real local server on real threads. Nothing sleeps to wait for an effect:
requests are held in the server's ``chat_handler`` with Events, and the rate limiter the client
builds from its settings is replaced (at the ``llmutils._clients.RateLimiter`` seam) by one on a
fake clock whose ``sleep`` records the wait and advances the clock.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

import llmutils
from llmutils import OpenAIClient, RetryPolicy
from llmutils import _clients
from llmutils._deadline import Deadline
from llmutils._ratelimit import ConcurrencyLimiter, RateLimiter, Reservation
from llmutils.cli import main
from llmutils.testing import Fault, OpenAITestServer

HELLO = [{"role": "user", "content": "hello"}]
WAIT = 10.0  # upper bound on any Event/Condition wait: a hang fails the test instead of blocking it


class FakeClock:
    """A monotonic clock that only moves when ``sleep`` is called; the sleeps are recorded."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.sleeps.append(seconds)
            self.now += seconds


class Limiters:
    """Replaces the RateLimiter the client builds: fake clock, and a record of what it was asked."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.built: list[dict[str, Any]] = []
        self.acquired: list[int] = []
        self.pauses: list[float] = []
        self.instances: list[RateLimiter] = []

    def __call__(self, **kwargs: Any) -> RateLimiter:
        self.built.append(kwargs)
        spy = self

        class SpyLimiter(RateLimiter):
            def acquire(self, tokens: int = 0, *, timeout: float | None = None, deadline: Deadline | None = None) -> Reservation:
                spy.acquired.append(tokens)
                return super().acquire(tokens, timeout=timeout, deadline=deadline)

            def pause(self, seconds: float) -> None:
                spy.pauses.append(seconds)
                super().pause(seconds)

        limiter = SpyLimiter(clock=self.clock, sleep=self.clock.sleep, **kwargs)
        self.instances.append(limiter)
        return limiter


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def limiters(monkeypatch: pytest.MonkeyPatch, clock: FakeClock) -> Limiters:
    spy = Limiters(clock)
    monkeypatch.setattr(_clients, "RateLimiter", spy)
    return spy


def _chat_response(content: str, total_tokens: int) -> dict[str, Any]:
    """A whole chat completion for ``chat_handler`` to return, with the usage we want the client to see."""
    return {
        "id": "chatcmpl-limits",
        "object": "chat.completion",
        "created": 0,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": total_tokens - 1, "total_tokens": total_tokens},
    }


# -- MAX_CONCURRENT_MODEL_CALLS ----------------------------------------------------------------


def test_max_concurrent_calls_caps_requests_in_flight(server: OpenAITestServer, monkeypatch: pytest.MonkeyPatch) -> None:
    calls, cap = 12, 3
    cond = threading.Condition()
    state = {"inside": 0, "max_inside": 0, "arrived": 0}
    release = threading.Event()
    slots: list[ConcurrencyLimiter] = []

    class CountingSlots(ConcurrencyLimiter):
        """Counts the calls that reached the concurrency limiter, parked or not."""

        def __init__(self, max_in_flight: int | None) -> None:
            super().__init__(max_in_flight)
            slots.append(self)

        def acquire(self, *, timeout: float | None = None) -> bool:
            with cond:
                state["arrived"] += 1
                cond.notify_all()
            return super().acquire(timeout=timeout)

    monkeypatch.setattr(_clients, "ConcurrencyLimiter", CountingSlots)

    def handler(body: dict[str, Any]) -> str:
        with cond:
            state["inside"] += 1
            state["max_inside"] = max(state["max_inside"], state["inside"])
            cond.notify_all()
        try:
            assert release.wait(WAIT), "the test never released the held requests"
            return "held: " + body["messages"][-1]["content"]
        finally:
            with cond:
                state["inside"] -= 1

    server.chat_handler = handler
    answers: dict[int, Any] = {}
    errors: list[BaseException] = []

    with OpenAIClient(base_url=server.base_url, api_key="k", max_concurrent_calls=cap) as client:

        def call(i: int) -> None:
            try:
                answers[i] = client.send_message([{"role": "user", "content": f"q{i}"}])
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=call, args=(i,), daemon=True) for i in range(calls)]
        try:
            for t in threads:
                t.start()
            with cond:
                # Every call has reached the limiter and `cap` of them are held in the server; the
                # other nine can only be parked in the limiter, since the held ones keep their slots.
                reached = cond.wait_for(lambda: state["arrived"] == calls and state["inside"] >= cap, WAIT)
                assert reached, f"never saw {calls} calls at the limiter and {cap} in the server: {state}"
            assert len(slots) == 1 and slots[0].max_in_flight == cap
            assert slots[0].in_flight == cap
            assert server.request_count == cap
            with cond:
                assert state["inside"] == cap
        finally:
            release.set()
            for t in threads:
                t.join(WAIT)

    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    assert answers == {i: {"role": "assistant", "content": f"held: q{i}"} for i in range(calls)}
    assert state["max_inside"] == cap
    assert server.request_count == calls
    assert slots[0].in_flight == 0


# -- RPM ---------------------------------------------------------------------------------------


def test_rpm_spaces_a_clients_requests(server: OpenAITestServer, limiters: Limiters, clock: FakeClock) -> None:
    arrivals: list[float] = []

    def handler(body: dict[str, Any]) -> str:
        arrivals.append(clock())
        return "ok"

    server.chat_handler = handler
    with OpenAIClient(base_url=server.base_url, api_key="k", rpm=600) as client:
        for _ in range(5):
            assert client.send_message(HELLO) == {"role": "assistant", "content": "ok"}

    assert limiters.built == [{"rpm": 600, "tpm": None}]
    assert clock.sleeps == pytest.approx([0.1] * 4)
    assert arrivals == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


def test_rpm_spaces_requests_from_many_threads(server: OpenAITestServer, limiters: Limiters, clock: FakeClock) -> None:
    start = threading.Barrier(5)
    errors: list[BaseException] = []

    with OpenAIClient(base_url=server.base_url, api_key="k", rpm=600) as client:

        def call() -> None:
            try:
                start.wait(WAIT)
                client.send_message(HELLO)
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=call, daemon=True) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)

    assert not errors, errors
    assert len(limiters.instances) == 1  # one limiter shared by every thread of the client
    assert server.request_count == 5
    assert clock.sleeps == pytest.approx([0.1] * 4)
    assert clock.now == pytest.approx(0.4)


def test_each_distinct_limit_setting_gets_its_own_limiter(server: OpenAITestServer, limiters: Limiters, clock: FakeClock) -> None:
    with OpenAIClient(base_url=server.base_url, api_key="k") as client:
        for _ in range(3):  # as two threads would, interleaved: rpm=60 and rpm=61 in turn
            with llmutils.override_defaults(rpm=60):
                client.send_message(HELLO)
            with llmutils.override_defaults(rpm=61):
                client.send_message(HELLO)
    # Two limiters, kept: not one rebuilt back and forth (which let every request through at once).
    assert limiters.built == [{"rpm": 60.0, "tpm": None}, {"rpm": 61.0, "tpm": None}]
    assert server.request_count == 6
    assert clock.now >= 2 * 60 / 61 - 1e-9  # each limiter held its own spacing: 3 requests per limit


def test_threads_with_the_same_limit_setting_share_one_limiter(server: OpenAITestServer, limiters: Limiters, clock: FakeClock) -> None:
    start = threading.Barrier(4)
    errors: list[BaseException] = []
    with OpenAIClient(base_url=server.base_url, api_key="k") as client:

        def call(rpm: int) -> None:
            try:
                with llmutils.override_defaults(rpm=rpm):
                    start.wait(WAIT)
                    client.send_message(HELLO)
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=call, args=(rpm,), daemon=True) for rpm in (600, 600, 601, 601)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
    assert not errors, errors
    assert sorted(b["rpm"] for b in limiters.built) == [600.0, 601.0]
    assert server.request_count == 4


# -- TPM ---------------------------------------------------------------------------------------


def test_tpm_reserves_the_estimate_and_the_next_call_waits(
    server: OpenAITestServer, limiters: Limiters, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    estimated: list[dict[str, Any]] = []

    def estimate(params: dict[str, Any]) -> int:
        estimated.append(params)
        return 100

    monkeypatch.setattr(OpenAIClient, "_estimate_tokens", staticmethod(estimate))
    # 6000 tpm = 100 tokens/s with a one-second (100-token) bucket: each call empties it.
    with OpenAIClient(base_url=server.base_url, api_key="k", tpm=6000) as client:
        client.send_message(HELLO, max_tokens=50)
        assert clock.sleeps == []
        client.send_message(HELLO, max_tokens=50)

    assert limiters.built == [{"rpm": None, "tpm": 6000}]
    assert [p["max_tokens"] for p in estimated] == [50, 50]
    assert limiters.acquired == [100, 100]
    assert clock.sleeps == pytest.approx([1.0])
    assert server.request_count == 2


def test_tpm_debits_usage_above_the_estimate(
    server: OpenAITestServer, limiters: Limiters, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(OpenAIClient, "_estimate_tokens", staticmethod(lambda params: 100))
    server.chat_handler = lambda body: _chat_response("long answer", total_tokens=250)
    with OpenAIClient(base_url=server.base_url, api_key="k", tpm=6000) as client:
        client.send_message(HELLO)
        client.send_message(HELLO)

    # The first call cost 250, not 100: the bucket is 150 in debt, so the next waits 250 tokens' worth.
    assert clock.sleeps == pytest.approx([2.5])


def test_no_tpm_no_estimate(server: OpenAITestServer, limiters: Limiters, monkeypatch: pytest.MonkeyPatch) -> None:
    def estimate(params: dict[str, Any]) -> int:
        raise AssertionError("tokens were counted with no TPM limit")

    monkeypatch.setattr(OpenAIClient, "_estimate_tokens", staticmethod(estimate))
    with OpenAIClient(base_url=server.base_url, api_key="k", rpm=600) as client:
        client.send_message(HELLO)
    assert limiters.acquired == [0]


# -- 429 Retry-After pauses the shared limiter ----------------------------------------------------


def test_retry_after_pauses_the_limiter_for_other_threads(
    server: OpenAITestServer, limiters: Limiters, clock: FakeClock
) -> None:
    other: dict[str, Any] = {}
    arrivals: list[tuple[str, float]] = []

    def handler(body: dict[str, Any]) -> str:
        arrivals.append((body["messages"][-1]["content"], clock()))
        return "ok"

    server.chat_handler = handler
    server.script(Fault.rate_limit(retry_after=20))  # obeyed in full for the pause and the wait (max_wait caps only our backoff)

    def backoff(seconds: float) -> None:
        """The first thread's retry wait: meanwhile another thread calls and must wait out the pause."""
        other["backoff"] = seconds

        def call() -> None:
            try:
                other["answer"] = client.send_message([{"role": "user", "content": "other"}])
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                other["error"] = exc

        t = threading.Thread(target=call, daemon=True)
        t.start()
        t.join(WAIT)

    policy = RetryPolicy(max_attempts=3, waiting_time=1.0, max_wait=5, jitter=0, sleep=backoff)
    with OpenAIClient(base_url=server.base_url, api_key="k", rpm=600, retry=policy) as client:
        assert client.send_message(HELLO) == {"role": "assistant", "content": "ok"}

    assert "error" not in other, other.get("error")
    assert other["backoff"] == 20.0
    assert limiters.pauses == [20.0]
    assert other["answer"] == {"role": "assistant", "content": "ok"}
    # The 429 was answered at t=0; the other thread waited the 20 s pause, the retry 0.1 s more (rpm).
    assert clock.sleeps == pytest.approx([20.0, 0.1])
    assert arrivals == [("other", pytest.approx(20.0)), ("hello", pytest.approx(20.1))]
    assert server.request_count == 3


def test_retry_after_does_not_pause_without_a_limit(server: OpenAITestServer, limiters: Limiters, clock: FakeClock) -> None:
    waits: list[float] = []
    server.script(Fault.rate_limit(retry_after=5))
    policy = RetryPolicy(max_attempts=3, waiting_time=1.0, max_wait=20, jitter=0, sleep=waits.append)
    with OpenAIClient(base_url=server.base_url, api_key="k", retry=policy) as client:
        assert client.send_message(HELLO) == {"role": "assistant", "content": "echo: hello"}

    assert limiters.built == [{"rpm": None, "tpm": None}]
    assert waits == [5.0]  # the retry still honours Retry-After
    assert limiters.pauses == []
    assert clock.sleeps == []
    assert server.request_count == 2


# -- the command line ----------------------------------------------------------------------------


def test_cli_rpm_and_tpm_reach_the_client(
    server: OpenAITestServer, limiters: Limiters, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(OpenAIClient, "_estimate_tokens", staticmethod(lambda params: 10))
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"}]}) + "\n" for i in range(3)))

    code = main(
        [
            "--api-type", "openai", "--base-url", server.base_url,
            "batch", str(src), str(out), "--rpm", "6000", "--tpm", "60000", "--workers", "2", "--no-progress", "--no-cache",
        ]
    )  # fmt: skip

    assert code == 0
    assert limiters.built == [{"rpm": 6000.0, "tpm": 60000.0}]
    assert limiters.acquired == [10, 10, 10]
    assert server.request_count == 3
    assert [json.loads(line)["output"] for line in out.read_text().splitlines()] == [f"echo: q{i}" for i in range(3)]
