"""Cooldown: "off for N seconds, then try again", the breaker behind the caches and tiktoken."""

from __future__ import annotations

import math

from llmutils._cooldown import Cooldown


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_transient_fault_blocks_for_the_interval_then_allows_a_try() -> None:
    clock = Clock()
    breaker = Cooldown(30, clock=clock)
    assert not breaker.blocked() and not breaker.tripped and breaker.remaining() == 0
    assert breaker.trip() is True  # the first fault of an outage: worth a WARNING
    assert breaker.trip() is False  # still the same outage
    assert breaker.blocked() and breaker.remaining() == 30
    clock.now = 29.9
    assert breaker.blocked()
    clock.now = 30
    assert not breaker.blocked() and breaker.tripped  # may be tried; the outage is not over yet
    assert breaker.reset() is True and not breaker.tripped  # it worked: worth an INFO
    assert breaker.reset() is False


def test_a_permanent_fault_blocks_for_good_and_counts_as_a_new_outage() -> None:
    clock = Clock()
    breaker = Cooldown(5, clock=clock)
    assert breaker.trip() is True
    assert breaker.trip(permanent=True) is True  # now worse: worth its own WARNING
    clock.now = 1e9
    assert breaker.blocked() and breaker.permanent and breaker.remaining() == math.inf


def test_an_interval_given_per_trip() -> None:
    clock = Clock()
    breaker = Cooldown(5, clock=clock)
    breaker.trip(interval=600)
    clock.now = 599
    assert breaker.blocked()
    clock.now = 600
    assert not breaker.blocked()
