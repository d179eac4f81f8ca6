"""Tests for llmutils._ratelimit: fake clock and recorded sleeps, real threads for fairness."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from llmutils._exceptions import ConfigError, InvalidRequestError, RateLimitError
from llmutils._ratelimit import ConcurrencyLimiter, RateLimiter


class FakeClock:
    """A clock the test controls; ``sleep`` records the interval and advances the clock."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for a condition another thread brings about; fail the test after ``timeout``."""
    event = threading.Event()
    for _ in range(int(timeout / 0.001)):
        if predicate():
            return
        event.wait(0.001)
    raise AssertionError("condition not reached in time")


def limiter_with(clock: FakeClock, **kwargs: float | int | None) -> RateLimiter:
    return RateLimiter(clock=clock, sleep=clock.sleep, **kwargs)  # type: ignore[arg-type]


def test_rpm_spaces_requests_evenly() -> None:
    clock = FakeClock()
    limiter = limiter_with(clock, rpm=600)
    times = []
    for _ in range(5):
        limiter.acquire()
        times.append(clock.now)
    assert times == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert clock.sleeps == pytest.approx([0.1] * 4)


def test_rpm_burst_then_spaced_and_idle_refill_is_capped() -> None:
    clock = FakeClock()
    limiter = limiter_with(clock, rpm=600, rpm_burst=3)
    times = []
    for _ in range(5):
        limiter.acquire()
        times.append(clock.now)
    assert times == pytest.approx([0.0, 0.0, 0.0, 0.1, 0.2])
    clock.now += 60.0  # a long idle spell refills only up to the burst
    clock.sleeps.clear()
    for _ in range(4):
        limiter.acquire()
    assert clock.sleeps == pytest.approx([0.1])


def test_rpm_holds_the_rate_over_a_minute() -> None:
    clock = FakeClock()
    limiter = limiter_with(clock, rpm=600)
    count = 0
    while True:
        limiter.acquire()
        if clock.now > 60.0 + 1e-6:  # float sums of 0.1 drift a little
            break
        count += 1
    assert count == 601  # t = 0.0, 0.1, ..., 60.0


def test_tpm_waits_for_tokens_and_reconcile_refunds() -> None:
    clock = FakeClock()
    limiter = limiter_with(clock, tpm=6000)  # 100 tokens/s, burst one second = 100 tokens
    reservation = limiter.acquire(100)
    assert reservation.tokens == 100
    assert clock.sleeps == []
    reservation.reconcile(40)  # 60 unused tokens come back
    assert reservation.tokens == 40
    limiter.acquire(60)
    assert clock.sleeps == []
    limiter.acquire(50)
    assert clock.sleeps == pytest.approx([0.5])


def test_reconcile_debits_extra_tokens() -> None:
    clock = FakeClock()
    limiter = limiter_with(clock, tpm=6000)
    reservation = limiter.acquire(100)
    reservation.reconcile(300)  # 200 more than reserved: the bucket goes into debt
    limiter.acquire(100)
    assert clock.sleeps == pytest.approx([3.0])


def test_oversize_request_goes_when_bucket_is_full() -> None:
    clock = FakeClock()
    limiter = limiter_with(clock, tpm=6000)
    limiter.acquire(50)
    limiter.acquire(1000)  # bigger than the 100-token capacity: waits for a full bucket only
    assert clock.sleeps == pytest.approx([0.5])
    limiter.acquire(10)  # then the debt (-900) is paid off first
    assert clock.sleeps == pytest.approx([0.5, 9.1])


def test_tokens_ignored_without_tpm_and_both_axes_combine() -> None:
    clock = FakeClock()
    limiter = limiter_with(clock, rpm=60)
    assert limiter.acquire(10**9).tokens == 0
    clock2 = FakeClock()
    both = limiter_with(clock2, rpm=600, tpm=600, tpm_burst=10)
    both.acquire(10)
    both.acquire(5)  # rpm wants 0.1 s, tpm wants 0.5 s: the longer wait wins
    assert clock2.sleeps == pytest.approx([0.5])


def test_disabled_limiter_never_waits() -> None:
    clock = FakeClock()
    limiter = limiter_with(clock, rpm=0, tpm=None)
    assert not limiter.enabled
    for _ in range(100):
        limiter.acquire(1000).reconcile(5)
    assert clock.sleeps == []
    assert limiter_with(clock, tpm=1000).enabled


def test_pause_holds_acquisitions() -> None:
    clock = FakeClock()
    limiter = limiter_with(clock)
    limiter.pause(2.0)
    limiter.acquire()
    assert clock.sleeps == pytest.approx([2.0])
    limiter.acquire()
    assert clock.sleeps == pytest.approx([2.0])


def test_timeout_raises_at_once_when_the_wait_is_known_too_long() -> None:
    clock = FakeClock()
    limiter = limiter_with(clock, rpm=60)
    limiter.acquire()
    with pytest.raises(RateLimitError, match="timeout") as info:
        limiter.acquire(timeout=0.5)
    assert info.value.retry_after == pytest.approx(1.0)
    assert clock.sleeps == []
    assert limiter.waiting == 0
    with pytest.raises(RateLimitError):
        limiter.acquire(timeout=0)
    limiter.acquire(timeout=1.0)
    assert clock.sleeps == pytest.approx([1.0])


def test_timeout_of_a_queued_waiter_and_refund_wakes_the_head() -> None:
    limiter = RateLimiter(tpm=60, tpm_burst=10)  # real clock: 1 token/s
    first = limiter.acquire(10)
    done = threading.Event()

    def head() -> None:
        limiter.acquire(10)  # would wait 10 s on its condition variable
        done.set()

    thread = threading.Thread(target=head)
    thread.start()
    wait_until(lambda: limiter.waiting == 1)
    with pytest.raises(RateLimitError, match="queued ahead"):
        limiter.acquire(1, timeout=0.01)
    assert limiter.waiting == 1
    first.reconcile(0)  # the refund wakes the head at once
    assert done.wait(5.0)
    thread.join(5.0)
    assert limiter.waiting == 0


def test_waiters_are_served_in_arrival_order() -> None:
    clock = FakeClock()
    release = threading.Event()
    head_sleeping = threading.Event()
    sleepers: list[str] = []

    def gated_sleep(seconds: float) -> None:
        sleepers.append(threading.current_thread().name)  # only the head ever sleeps
        head_sleeping.set()
        assert release.wait(5.0)
        clock.sleep(seconds)

    limiter = RateLimiter(rpm=60, clock=clock, sleep=gated_sleep)
    limiter.acquire()  # empty the bucket: every later caller must wait its turn
    names = [f"t{i}" for i in range(8)]
    threads = [threading.Thread(target=limiter.acquire, name=name) for name in names]
    threads[0].start()
    assert head_sleeping.wait(5.0)
    for i, thread in enumerate(threads[1:], start=2):
        thread.start()
        wait_until(lambda i=i: limiter.waiting == i)  # type: ignore[misc]
    release.set()
    for thread in threads:
        thread.join(5.0)
        assert not thread.is_alive()
    assert sleepers == names
    assert clock.sleeps == pytest.approx([1.0] * 8)
    assert limiter.waiting == 0


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="rpm"):
        RateLimiter(rpm=-1)
    with pytest.raises(ConfigError, match="rpm_burst"):
        RateLimiter(rpm=10, rpm_burst=0)
    with pytest.raises(ConfigError, match="tpm_burst"):
        RateLimiter(tpm=10, tpm_burst=-1)
    with pytest.raises(InvalidRequestError):
        RateLimiter(tpm=10).acquire(-1)
    with pytest.raises(ConfigError):
        ConcurrencyLimiter(-1)


def test_concurrency_limiter_never_exceeds_cap() -> None:
    cap, workers = 4, 16
    limiter = ConcurrencyLimiter(cap)
    inside = threading.Barrier(cap, timeout=5.0)  # proves `cap` calls do run together
    lock = threading.Lock()
    current = peak = 0
    seen_in_flight: list[int] = []

    def call() -> None:
        nonlocal current, peak
        with limiter:
            with lock:
                current += 1
                peak = max(peak, current)
                seen_in_flight.append(limiter.in_flight)
            inside.wait()
            with lock:
                current -= 1

    threads = [threading.Thread(target=call) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10.0)
        assert not thread.is_alive()
    assert peak == cap
    assert max(seen_in_flight) <= cap
    assert limiter.in_flight == 0
    assert not inside.broken


def test_concurrency_limiter_unlimited_and_timeout() -> None:
    unlimited = ConcurrencyLimiter(None)
    assert unlimited.max_in_flight is None
    everyone = threading.Barrier(16, timeout=5.0)

    def call() -> None:
        with unlimited:
            everyone.wait()

    threads = [threading.Thread(target=call) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10.0)
    assert not everyone.broken
    assert unlimited.in_flight == 0

    one = ConcurrencyLimiter(1)
    assert one.acquire()
    assert one.in_flight == 1
    assert not one.acquire(timeout=0)
    one.release()
    with one:
        assert one.in_flight == 1
    assert one.in_flight == 0
