"""Prices: genai-prices underneath, overrides on top, prompt-cache, reasoning and Batch API tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

import llmutils
from llmutils._exceptions import ConfigError
from llmutils._prices import BATCH_DISCOUNT, token_cost
from llmutils._usage import UsageTracker, get_prices, set_prices

pytest.importorskip("genai_prices", reason="genai-prices needs Python 3.11+")

M = 1_000_000


@pytest.fixture(autouse=True)
def restore_prices() -> Iterator[None]:
    saved = get_prices()
    yield
    set_prices(saved, replace=True)


def chat_usage(prompt: int, completion: int, *, cached: int = 0, reasoning: int = 0) -> dict[str, object]:
    """A chat completions usage object as OpenAI sends it (cached/reasoning are parts of the totals)."""
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }


def test_prices_come_from_genai_prices() -> None:
    from genai_prices import Usage, calc_price

    result = calc_price(Usage(input_tokens=M, output_tokens=M), "gpt-4o-mini", provider_id="openai")
    expected = float(result.total_price)
    tracker = UsageTracker(aliases={})
    tracker.record("gpt-4o-mini", chat_usage(M, M))
    assert tracker.cost() == pytest.approx(expected)
    assert expected == pytest.approx(0.15 + 0.60)  # OpenAI's list price, as the database has it
    # A model newer than the old hand-kept table (August 2025) is priced too.
    assert token_cost("gpt-5.1", input_tokens=M, output_tokens=0) is not None


def test_cached_input_tokens_cost_their_price() -> None:
    tracker = UsageTracker(aliases={})
    tracker.record("gpt-4o-mini", chat_usage(M, 0, cached=400_000))
    (usage,) = tracker.snapshot().values()
    assert usage.cached_tokens == 400_000
    # 600k uncached at $0.15/M + 400k cached at $0.075/M, not 1M at $0.15/M.
    assert usage.cost == pytest.approx(0.6 * 0.15 + 0.4 * 0.075)
    # The Responses API names: input_tokens_details / output_tokens_details.
    tracker = UsageTracker(aliases={})
    tracker.record(
        "gpt-4o-mini",
        {"input_tokens": M, "output_tokens": 0, "input_tokens_details": {"cached_tokens": 400_000}},
    )
    assert tracker.cost() == pytest.approx(0.6 * 0.15 + 0.4 * 0.075)


def test_reasoning_tokens_are_billed_as_output() -> None:
    tracker = UsageTracker(aliases={})
    # completion_tokens already includes the 900 reasoning tokens: they are neither free nor counted twice.
    tracker.record("o4-mini", chat_usage(0, 1_000, reasoning=900))
    total = tracker.totals()
    assert (total.completion_tokens, total.reasoning_tokens) == (1_000, 900)
    assert tracker.cost() == pytest.approx(1_000 * 4.40 / M)


def test_batch_api_calls_are_priced_at_the_batch_discount() -> None:
    assert token_cost("gpt-4.1-mini", input_tokens=M, output_tokens=M, batch=True) == pytest.approx(
        token_cost("gpt-4.1-mini", input_tokens=M, output_tokens=M) * BATCH_DISCOUNT  # type: ignore[operator]
    )
    # A model genai-prices has no batch prices for: half the standard price all the same.
    standard = token_cost("text-embedding-3-small", input_tokens=M, output_tokens=0)
    assert token_cost("text-embedding-3-small", input_tokens=M, output_tokens=0, batch=True) == pytest.approx(
        standard * BATCH_DISCOUNT  # type: ignore[operator]
    )
    tracker = UsageTracker(aliases={})
    tracker.record("gpt-4.1-mini", chat_usage(M, M))  # live
    tracker.record("gpt-4.1-mini", chat_usage(M, M), batch=True)  # through the Batch API
    tracker.record("gpt-4.1-mini", chat_usage(M, M), cached=True, batch=True)  # from the llmutils cache: free
    (usage,) = tracker.snapshot().values()
    assert (usage.requests, usage.cached_requests, usage.prompt_tokens) == (2, 1, 2 * M)
    assert (usage.batch_requests, usage.batch_prompt_tokens, usage.batch_completion_tokens) == (1, M, M)
    assert usage.cost == pytest.approx((0.40 + 1.60) * 1.5)
    # Overrides get the discount too.
    assert tracker.cost(prices={"gpt-4.1-mini": (1.0, 1.0)}) == pytest.approx(2.0 + 1.0)


def test_overrides_win_over_genai_prices() -> None:
    tracker = UsageTracker(prices={"gpt-4o-mini": (1.0, 2.0, 0.5)}, aliases={})
    tracker.record("gpt-4o-mini-2024-07-18", chat_usage(M, M, cached=M // 2))
    assert tracker.cost() == pytest.approx(0.5 * 1.0 + 0.5 * 0.5 + 2.0)  # a snapshot finds its family
    assert tracker.cost(prices={"gpt-4o-mini-2024-07-18": (0.0, 0.0)}) == 0.0  # per call wins
    set_prices({"my-finetune": (3.0, 12.0)})  # process-wide
    other = UsageTracker(aliases={})
    other.record("my-finetune", chat_usage(M, 0, cached=M))  # no cached price given: the input price
    assert other.cost() == pytest.approx(3.0)
    with pytest.raises(ConfigError, match="my-model"):
        UsageTracker(prices={"my-model": (1.0, 2.0, 3.0, 4.0)})  # type: ignore[dict-item]


def test_unpriced_models_are_listed_not_counted_as_free() -> None:
    tracker = UsageTracker(aliases={})
    tracker.record("gpt-4o", chat_usage(M, 0))
    tracker.record("my-local-llama", chat_usage(10, 10))
    tracker.record("served-from-cache", chat_usage(10, 10), cached=True)  # nothing billed: nothing to price
    assert tracker.cost() is None
    assert tracker.totals().cost is None
    assert tracker.unpriced_models() == ["my-local-llama"]
    assert tracker.unpriced_models(prices={"my-local-llama": (0, 0)}) == []
    assert tracker.cost(prices={"my-local-llama": (0, 0)}) == pytest.approx(2.50)


def test_a_gateway_alias_is_priced_through_model_aliases(monkeypatch: pytest.MonkeyPatch) -> None:
    tracker = UsageTracker()  # aliases from the MODEL_ALIASES setting, read when a cost is asked for
    tracker.record("gpt-mock", chat_usage(M, M))
    assert tracker.unpriced_models() == ["gpt-mock"]
    monkeypatch.setenv("LLMUTILS_MODEL_ALIASES", "gpt-mock=gpt-4o-mini")
    assert tracker.unpriced_models() == []
    assert tracker.cost() == pytest.approx(0.15 + 0.60)
    explicit = UsageTracker(aliases={"my-deployment": "gpt-4o"})
    explicit.record("my-deployment", chat_usage(M, 0))
    assert explicit.cost() == pytest.approx(2.50)


def test_a_provider_prefixed_gateway_name_is_priced_at_that_provider() -> None:
    assert token_cost("anthropic/claude-3-5-sonnet", input_tokens=M, output_tokens=0) == pytest.approx(3.0)


def test_a_client_totals_are_priced() -> None:
    client = llmutils.MockClient(model="gpt-4o-mini")
    client.send_message([{"role": "user", "content": "hi"}])
    assert client.usage.totals().requests == 1
    assert client.usage.unpriced_models() == []
    assert client.usage.cost() is not None and client.usage.cost() > 0  # type: ignore[operator]


def test_prices_need_no_network() -> None:
    """genai-prices' data ships in the package: a cost with every socket refused still works."""
    script = (
        "import socket, json\n"
        "def refuse(*a, **k):\n"
        "    raise OSError('network used')\n"
        "socket.socket.connect = refuse\n"
        "socket.socket.connect_ex = refuse\n"
        "socket.create_connection = refuse\n"
        "socket.getaddrinfo = refuse\n"
        "from llmutils._usage import UsageTracker\n"
        "t = UsageTracker(aliases={})\n"
        "t.record('gpt-4o', {'prompt_tokens': 1000000, 'completion_tokens': 0})\n"
        "t.record('gpt-4.1-mini', {'prompt_tokens': 1000000, 'completion_tokens': 0}, batch=True)\n"
        "print(json.dumps({'cost': t.cost(), 'unpriced': t.unpriced_models()}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMUTILS_")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out == {"cost": pytest.approx(2.50 + 0.20), "unpriced": []}


def test_import_llmutils_does_not_import_genai_prices() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, llmutils; print('genai_prices' in sys.modules)"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.stdout.strip() == "False", proc.stderr
