"""Tests for llmutils._usage: exact thread-safe totals, cached vs billed, and cost estimates."""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from llmutils._exceptions import ConfigError
from llmutils._usage import ModelUsage, UsageTracker, get_prices, set_prices

# The shipped price table is genai-prices', which needs Python 3.11+ (on 3.10 only overrides price).
needs_genai_prices = pytest.mark.skipif(
    importlib.util.find_spec("genai_prices") is None, reason="genai-prices (the default prices) needs Python 3.11+"
)


@pytest.fixture(autouse=True)
def restore_prices() -> Iterator[None]:
    saved = get_prices()
    yield
    set_prices(saved, replace=True)


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def test_totals_from_16_threads_are_exact() -> None:
    tracker = UsageTracker()
    start = threading.Barrier(16, timeout=5.0)

    def worker(n: int) -> None:
        start.wait()
        for i in range(500):
            model = "gpt-4o" if (n + i) % 2 else "gpt-4o-mini"
            tracker.record(model, usage(3, 2), cached=i % 5 == 0)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10.0)
    snap = tracker.snapshot()
    assert set(snap) == {"gpt-4o", "gpt-4o-mini"}
    assert sum(u.requests + u.cached_requests for u in snap.values()) == 16 * 500
    total = tracker.totals()
    assert total.cached_requests == 16 * 100
    assert total.requests == 16 * 400
    assert (total.prompt_tokens, total.completion_tokens) == (16 * 400 * 3, 16 * 400 * 2)
    assert (total.cached_prompt_tokens, total.cached_completion_tokens) == (16 * 100 * 3, 16 * 100 * 2)
    assert total.total_tokens == 16 * 400 * 5
    assert total.cached_prompt_tokens + total.cached_completion_tokens == 16 * 100 * 5


def test_cached_hits_are_counted_apart_and_not_billed() -> None:
    tracker = UsageTracker(prices={"gpt-4o-mini": (0.15, 0.60)})  # USD per 1M tokens, on every Python
    tracker.record("gpt-4o-mini", usage(1_000_000, 0), cached=False)
    tracker.record("gpt-4o-mini", usage(1_000_000, 1_000_000), cached=True)
    tracker.record("gpt-4o-mini", None, cached=True)
    (only,) = tracker.snapshot().values()
    assert only == ModelUsage(
        requests=1,
        cached_requests=2,
        prompt_tokens=1_000_000,
        completion_tokens=0,
        cached_prompt_tokens=1_000_000,
        cached_completion_tokens=1_000_000,
        cost=pytest.approx(0.15),
    )
    assert tracker.cost() == pytest.approx(0.15)


def test_usage_none_counts_the_request_only_and_other_shapes() -> None:
    tracker = UsageTracker()
    tracker.record("text-embedding-3-small", None, cached=False)
    tracker.record("text-embedding-3-small", {"prompt_tokens": 10, "total_tokens": 10}, cached=False)
    tracker.record("gpt-5", {"input_tokens": 7, "output_tokens": 4, "total_tokens": 11}, cached=False)
    tracker.record("gpt-5", SimpleNamespace(prompt_tokens=1, completion_tokens=2, total_tokens=3), cached=False)
    snap = tracker.snapshot()
    assert (snap["text-embedding-3-small"].requests, snap["text-embedding-3-small"].prompt_tokens) == (2, 10)
    assert (snap["gpt-5"].prompt_tokens, snap["gpt-5"].completion_tokens) == (8, 6)


@needs_genai_prices
def test_cost_with_default_prices() -> None:
    tracker = UsageTracker()
    assert tracker.cost() == 0.0
    tracker.record("gpt-4o", usage(1_000_000, 1_000_000), cached=False)
    tracker.record("gpt-4.1-mini", usage(500_000, 250_000), cached=False)
    assert tracker.snapshot()["gpt-4o"].cost == pytest.approx(12.5)
    assert tracker.cost() == pytest.approx(12.5 + 0.2 + 0.4)
    assert tracker.totals().cost == pytest.approx(13.1)


def test_cost_with_overridden_prices() -> None:
    tracker = UsageTracker(prices={"gpt-4o": (1.0, 2.0), "my-finetune": (3.0, 4.0)})
    tracker.record("gpt-4o", usage(1_000_000, 1_000_000), cached=False)
    tracker.record("my-finetune", usage(1_000_000, 0), cached=False)
    assert tracker.cost() == pytest.approx(3.0 + 3.0)
    assert tracker.cost(prices={"my-finetune": (0.0, 0.0)}) == pytest.approx(3.0)
    assert UsageTracker().cost() == 0.0

    set_prices({"gpt-4o": (10.0, 10.0)})  # process-wide; the tracker's own entry still wins
    assert tracker.cost() == pytest.approx(6.0)
    other = UsageTracker()
    other.record("gpt-4o", usage(1_000_000, 0), cached=False)
    assert other.cost() == pytest.approx(10.0)

    set_prices({"only-model": (1.0, 1.0)}, replace=True)
    assert set(get_prices()) == {"only-model"}


def test_bad_prices_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="gpt-x"):
        UsageTracker(prices={"gpt-x": (1.0,)})  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match="negative"):
        set_prices({"gpt-x": (-1.0, 1.0)})


@needs_genai_prices
def test_date_suffixed_models_match_their_family() -> None:
    tracker = UsageTracker()
    tracker.record("gpt-4o-2024-08-06", usage(1_000_000, 0), cached=False)
    tracker.record("gpt-4o-mini-2024-07-18", usage(1_000_000, 0), cached=False)
    tracker.record("GPT-4.1-nano-2025-04-14", usage(1_000_000, 0), cached=False)
    snap = tracker.snapshot()
    assert snap["gpt-4o-2024-08-06"].cost == pytest.approx(2.50)
    assert snap["gpt-4o-mini-2024-07-18"].cost == pytest.approx(0.15)  # the longest prefix wins
    assert snap["GPT-4.1-nano-2025-04-14"].cost == pytest.approx(0.10)


def test_a_family_prefix_is_not_a_different_model() -> None:
    tracker = UsageTracker(prices={"o9": (1.0, 1.0)})
    tracker.record("o9-mini", usage(10, 10), cached=False)  # not a snapshot of o9
    assert tracker.snapshot()["o9-mini"].cost is None


def test_unknown_model_has_no_cost_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    tracker = UsageTracker(prices={"gpt-4o": (2.5, 10.0)})  # priced on every Python
    tracker.record("gpt-4o", usage(1_000_000, 0), cached=False)
    tracker.record("my-deployment", usage(10, 10), cached=False)
    tracker.record("cached-only", usage(10, 10), cached=True)
    with caplog.at_level(logging.DEBUG, logger="llmutils"):
        snap = tracker.snapshot()
        assert tracker.cost() is None
        assert tracker.totals().cost is None
    assert snap["my-deployment"].cost is None
    assert snap["gpt-4o"].cost == pytest.approx(2.5)
    assert snap["cached-only"].cost == 0.0  # nothing billed, so nothing to price
    lines = [r for r in caplog.records if "my-deployment" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].levelno == logging.DEBUG


def test_snapshot_is_a_copy_and_reset_clears() -> None:
    tracker = UsageTracker()
    tracker.record("gpt-4o", usage(1, 1), cached=False)
    tracker.snapshot()["gpt-4o"].requests = 99
    assert tracker.snapshot()["gpt-4o"].requests == 1
    tracker.reset()
    assert tracker.snapshot() == {}
    assert tracker.totals() == ModelUsage(cost=0.0)


@pytest.mark.parametrize(
    "bad",
    [
        {"prompt_tokens": "n/a"},
        {"prompt_tokens": 3, "completion_tokens": [1]},
        {"input_tokens": float("nan")},
        {"prompt_tokens": float("inf")},
        {"prompt_tokens": -5, "completion_tokens": 2},
        {"prompt_tokens": True},
        {"prompt_tokens": 1, "prompt_tokens_details": {"cached_tokens": "lots"}},
        SimpleNamespace(prompt_tokens="n/a", completion_tokens=1),
    ],
    ids=["text", "list", "nan", "inf", "negative", "bool", "detail", "object"],
)
def test_record_never_raises_bad_usage_counts_as_unknown(bad: object, caplog: pytest.LogCaptureFixture) -> None:
    tracker = UsageTracker()
    caplog.set_level(logging.DEBUG, logger="llmutils")
    assert tracker.record("m", bad) is False
    assert tracker.record("m", bad, cached=True) is False
    assert tracker.record("m", usage(2, 3)) is True
    totals = tracker.snapshot()["m"]
    assert (totals.requests, totals.cached_requests, totals.prompt_tokens, totals.completion_tokens) == (2, 1, 2, 3)
    assert totals.cached_prompt_tokens == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'m'" in warnings[0] and "unknown" in warnings[0]  # logged once


def test_record_of_no_usage_is_not_bad_usage(caplog: pytest.LogCaptureFixture) -> None:
    tracker = UsageTracker()
    with caplog.at_level(logging.WARNING, logger="llmutils"):
        assert tracker.record("m", None) is True
        assert tracker.record("m", {"prompt_tokens": 4.0, "completion_tokens": None}) is True
    assert tracker.totals().prompt_tokens == 4 and caplog.records == []
