"""The cache as the clients use it: hits send nothing, the key covers what changes an answer."""

from __future__ import annotations

import json
import logging
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import llmutils
from llmutils import CacheMissError, InvalidRequestError, OpenAIClient, RetriesExhaustedError, RetryPolicy
from llmutils.testing import Fault, OpenAITestServer

HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture
def cache_file(tmp_path: Path) -> Path:
    return tmp_path / "cache.sqlite"


@pytest.fixture
def cached(server: OpenAITestServer, cache_file: Path) -> Iterator[OpenAIClient]:
    policy = RetryPolicy(max_attempts=2, jitter=0, sleep=lambda s: None)
    with OpenAIClient(base_url=server.base_url, api_key="k", cache_api_calls=True, cache_file_name=cache_file, retry=policy) as client:
        yield client


def test_chat_hit_sends_nothing(cached: OpenAIClient, server: OpenAITestServer) -> None:
    first = cached.send_message(HELLO, temperature=0)
    assert cached.last_call is not None and cached.last_call.cached is False
    second = cached.send_message(HELLO, temperature=0)
    assert second == first and server.request_count == 1
    assert cached.last_call.cached is True
    stats = cached.cache_stats()
    assert (stats.hits, stats.misses, stats.writes, stats.errors) == (1, 1, 1, 0)
    usage = cached.usage.totals()
    assert usage.requests == 1 and usage.cached_requests == 1


def test_embedding_hit_sends_nothing(cached: OpenAIClient, server: OpenAITestServer) -> None:
    vector = cached.get_embedding("text")
    assert cached.get_embedding("text") == vector and server.request_count == 1
    cached.get_embedding("other text")
    assert server.request_count == 2


def test_hit_returns_a_copy(cached: OpenAIClient) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    ask = [{"role": "user", "content": "call f"}]
    first = cached.send_message(ask, tools=tools)
    first["tool_calls"][0]["function"]["name"] = "mutated"
    first["content"] = "mutated"
    again = cached.send_message(ask, tools=tools)
    assert again["tool_calls"][0]["function"]["name"] == "f" and again["content"] is None
    again["tool_calls"].clear()
    assert cached.send_message(ask, tools=tools)["tool_calls"]


@pytest.mark.parametrize(
    "change",
    [
        {"temperature": 0.5},
        {"top_p": 0.9},
        {"max_tokens": 7},
        {"frequency_penalty": 0.1},
        {"presence_penalty": 0.1},
        {"stop": ["x"]},
        {"n": 2},
        {"seed": 1},
        {"response_format": {"type": "json_object"}},
        {"model": "gpt-4o"},
        {"tools": [{"type": "function", "function": {"name": "g", "parameters": {}}}]},
    ],
)
def test_output_affecting_change_is_a_miss(cached: OpenAIClient, server: OpenAITestServer, change: dict) -> None:
    cached.send_message(HELLO)
    cached.send_message(HELLO, **change)
    assert server.request_count == 2


def test_transport_settings_do_not_change_the_key(cached: OpenAIClient, server: OpenAITestServer) -> None:
    cached.send_message(HELLO, timeout=10)
    cached.send_message(HELLO, timeout=99, max_attempts=3, waiting_time=5, exponential_backoff_factor=3, total_timeout=50)
    assert server.request_count == 1


def test_dict_order_does_not_change_the_key(cached: OpenAIClient, server: OpenAITestServer) -> None:
    cached.send_message([{"role": "user", "content": "x"}], response_format={"type": "json_object"}, seed=3)
    cached.send_message([{"content": "x", "role": "user"}], seed=3, response_format={"type": "json_object"})
    assert server.request_count == 1


def test_endpoint_is_part_of_the_key(server: OpenAITestServer, cache_file: Path) -> None:
    with OpenAIClient(base_url=server.base_url, api_key="k", cache_api_calls=True, cache_file_name=cache_file) as a:
        a.send_message(HELLO)
    with llmutils.AzureClient(azure_endpoint=server.azure_endpoint, api_key="k", cache_api_calls=True, cache_file_name=cache_file) as b:
        b.send_message(HELLO)
    assert server.request_count == 2


def test_same_request_in_a_fresh_process_is_a_hit(cached: OpenAIClient, server: OpenAITestServer, cache_file: Path) -> None:
    cached.send_message(HELLO, temperature=0, seed=5)
    code = f"""
import llmutils
c = llmutils.OpenAIClient(base_url={server.base_url!r}, api_key="k", cache_api_calls=True, cache_file_name={str(cache_file)!r})
print(c.send_message({HELLO!r}, seed=5, temperature=0)["content"], c.last_call.cached)
c.close()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["echo:", "hello", "True"]
    assert server.request_count == 1


def test_errors_are_never_stored(cached: OpenAIClient, server: OpenAITestServer, cache_file: Path) -> None:
    server.script(Fault.bad_request())
    with pytest.raises(InvalidRequestError):
        cached.send_message(HELLO)
    server.script(Fault.server_error(), Fault.server_error())
    with pytest.raises(RetriesExhaustedError):
        cached.send_message(HELLO)
    assert cached.send_message(HELLO)["content"] == "echo: hello"
    assert server.request_count == 4


def test_stored_entries_are_plain_json(cached: OpenAIClient, cache_file: Path) -> None:
    cached.send_message(HELLO)
    cached.close()
    with sqlite3.connect(cache_file) as db:
        rows = db.execute("select key, value from responses").fetchall()
    db.close()
    assert len(rows) == 1 and len(rows[0][0]) == 64
    stored = json.loads(rows[0][1])
    assert stored["value"]["choices"][0]["message"]["content"] == "echo: hello"
    assert b"\x80" not in cache_file.read_bytes()[:2]  # no pickle protocol marker at the start


def test_replay_mode_miss_raises_and_sends_nothing(server: OpenAITestServer, cache_file: Path) -> None:
    with OpenAIClient(base_url=server.base_url, api_key="k", cache_api_calls=True, cache_file_name=cache_file) as rec:
        rec.send_message(HELLO)
    with OpenAIClient(
        base_url=server.base_url, api_key="k", cache_api_calls=True, cache_file_name=cache_file, cache_mode="replay"
    ) as replay:
        assert replay.send_message(HELLO)["content"] == "echo: hello"
        with pytest.raises(CacheMissError, match="replay"):
            replay.send_message([{"role": "user", "content": "never recorded"}])
    assert server.request_count == 1


def test_replay_with_unusable_file_still_sends_nothing(server: OpenAITestServer, tmp_path: Path) -> None:
    bad = tmp_path / "not-a-db.sqlite"
    bad.write_bytes(b"this is not sqlite" * 100)
    with OpenAIClient(base_url=server.base_url, api_key="k", cache_api_calls=True, cache_file_name=bad, cache_mode="replay") as replay:
        with pytest.raises(CacheMissError):
            replay.send_message(HELLO)
    assert server.request_count == 0


def test_readonly_and_refresh_modes(server: OpenAITestServer, cache_file: Path) -> None:
    common = dict(base_url=server.base_url, api_key="k", cache_api_calls=True, cache_file_name=cache_file)
    with OpenAIClient(**common, cache_mode="readonly") as ro:
        ro.send_message(HELLO)
        ro.send_message(HELLO)
        assert ro.cache_stats().writes == 0
    assert server.request_count == 2
    with OpenAIClient(**common, cache_mode="refresh") as refresh:
        refresh.send_message(HELLO)
        refresh.send_message(HELLO)
    assert server.request_count == 4
    with OpenAIClient(**common, cache_mode="readonly") as ro:
        ro.send_message(HELLO)
    assert server.request_count == 4


def test_corrupt_file_degrades_with_one_warning(server: OpenAITestServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = tmp_path / "corrupt.sqlite"
    original = b"garbage that is not a database" * 50
    bad.write_bytes(original)
    with caplog.at_level("WARNING", logger="llmutils"):
        with OpenAIClient(base_url=server.base_url, api_key="k", cache_api_calls=True, cache_file_name=bad) as client:
            assert client.send_message(HELLO)["content"] == "echo: hello"
            assert client.send_message(HELLO)["content"] == "echo: hello"
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and str(bad) in warnings[0].getMessage()
    assert bad.read_bytes() == original
    assert server.request_count == 2


def test_force_api_cache_turns_the_cache_on_for_registered_clients(server: OpenAITestServer, cache_file: Path) -> None:
    llmutils.register_client("local", OpenAIClient(base_url=server.base_url, api_key="k"))
    llmutils.force_api_type("local")
    llmutils.force_api_cache(True, cache_file)
    llmutils.client().send_message(HELLO)
    llmutils.client().send_message(HELLO)
    assert server.request_count == 1 and cache_file.exists()


def test_set_api_cache_per_client(server: OpenAITestServer, cache_file: Path) -> None:
    with OpenAIClient(base_url=server.base_url, api_key="k") as client:
        client.set_api_cache(True, cache_file)
        client.send_message(HELLO)
        client.send_message(HELLO)
        client.set_api_cache(False)
        client.send_message(HELLO)
    assert server.request_count == 2


def test_ttl_expires_entries(server: OpenAITestServer, cache_file: Path) -> None:
    with OpenAIClient(
        base_url=server.base_url, api_key="k", cache_api_calls=True, cache_file_name=cache_file, cache_ttl=0.000001
    ) as client:
        client.send_message(HELLO)
        client.send_message(HELLO)
    assert server.request_count == 2


def test_mock_client_goes_through_the_cache(cache_file: Path) -> None:
    mock = llmutils.MockClient(cache_api_calls=True, cache_file_name=cache_file)
    mock.send_message(HELLO)
    mock.send_message(HELLO)
    assert mock.calls == 1 and mock.last_call is not None and mock.last_call.cached
    mock.close()


def test_identical_requests_in_flight_make_one_call(server: OpenAITestServer, cache_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmutils import _clients

    waiting = threading.Semaphore(0)

    class CountingEvent(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            waiting.release()  # a follower is now parked on the leader's flight
            return super().wait(timeout)

    original_init = _clients._Flight.__init__

    def init(self: _clients._Flight) -> None:
        original_init(self)
        self.done = CountingEvent()

    monkeypatch.setattr(_clients._Flight, "__init__", init)
    arrived = threading.Event()
    release = threading.Event()

    def slow_answer(body: dict) -> str:
        arrived.set()
        release.wait(10)
        return "shared answer"

    server.chat_handler = slow_answer
    results: list[str] = []
    with OpenAIClient(base_url=server.base_url, api_key="k", cache_api_calls=True, cache_file_name=cache_file) as client:
        threads = [threading.Thread(target=lambda: results.append(client.send_message(HELLO)["content"])) for _ in range(8)]
        threads[0].start()
        assert arrived.wait(10)
        for t in threads[1:]:
            t.start()
        assert all(waiting.acquire(timeout=10) for _ in threads[1:])
        release.set()
        for t in threads:
            t.join()
        assert client.usage.totals().requests == 1 and client.usage.totals().cached_requests == 7
    assert results == ["shared answer"] * 8
    assert server.request_count == 1


def test_replay_from_cache_never_imports_openai(cached: OpenAIClient, server: OpenAITestServer, cache_file: Path) -> None:
    cached.send_message(HELLO)
    cached.get_embedding("text")
    code = f"""
import sys, llmutils
c = llmutils.OpenAIClient(base_url={server.base_url!r}, api_key="k", cache_api_calls=True,
                          cache_file_name={str(cache_file)!r}, cache_mode="replay")
c.send_message({HELLO!r}); c.get_embedding("text"); c.close()
print("openai" in sys.modules, "tiktoken" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["False", "False"]


def _identical_calls(client: OpenAIClient, count: int) -> list[object]:
    """Send HELLO from ``count`` threads at once; return each one's answer or exception."""
    start = threading.Barrier(count)
    results: list[object] = [None] * count

    def call(i: int) -> None:
        start.wait(10)
        try:
            results[i] = client.send_message(HELLO)
        except Exception as exc:  # checked by the test
            results[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_identical_requests_in_flight_share_a_terminal_failure(cached: OpenAIClient, server: OpenAITestServer) -> None:
    # Every request would get the 400 (the leader's answer comes late, so the others are waiting by then).
    rejected = Fault(status_code=400, body={"error": {"message": "bad", "type": "invalid_request_error"}}, delay=1.0)
    server.script(*[rejected] * 8)
    results = _identical_calls(cached, 8)
    assert all(isinstance(r, InvalidRequestError) for r in results), results
    assert server.request_count == 1
    assert sorted(r.attempts for r in results) == [0] * 7 + [1]  # type: ignore[union-attr]


def test_a_retryable_failure_is_not_shared_past_a_waiters_own_budget(server: OpenAITestServer, cache_file: Path) -> None:
    server.script(Fault(status_code=503, body={"error": {"message": "busy", "type": "server_error"}}, delay=1.0))
    policy = RetryPolicy(max_attempts=1)
    with OpenAIClient(base_url=server.base_url, api_key="k", cache_api_calls=True, cache_file_name=cache_file, retry=policy) as client:
        results = _identical_calls(client, 2)
    failed = [r for r in results if isinstance(r, RetriesExhaustedError)]
    answered = [r for r in results if isinstance(r, dict)]
    assert len(failed) == 1 and answered == [{"role": "assistant", "content": "echo: hello"}]
    assert server.request_count == 2  # the waiter sent its own request


def test_a_response_whose_usage_is_not_numeric_is_answered_cached_and_counted_unknown(
    server: OpenAITestServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "gpt-4.1-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": "n/a", "completion_tokens": "n/a", "total_tokens": "n/a"},
    }
    server.script(Fault.status(200, body=body))
    caplog.set_level(logging.DEBUG, logger="llmutils")
    hello = [{"role": "user", "content": "hello"}]
    with OpenAIClient(base_url=server.base_url, api_key="k", cache_api_calls=True, cache_file_name=tmp_path / "c.sqlite") as client:
        for _ in range(3):  # the first from the server, then from the cache: never a raw ValueError
            assert client.send_message(hello) == {"role": "assistant", "content": "hi"}
            assert client.last_call is not None and client.last_call.usage is None
        totals = client.usage.totals()
    assert server.request_count == 1
    assert (totals.requests, totals.cached_requests, totals.prompt_tokens, totals.completion_tokens) == (1, 2, 0, 0)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "usage" in r.getMessage()]
    assert len(warned) == 1


def test_a_lone_surrogate_in_the_input_fails_that_call_alone(cached: OpenAIClient, server: OpenAITestServer) -> None:
    with pytest.raises(InvalidRequestError, match=r"messages\[0\]\['content'\] holds a lone surrogate"):
        cached.send_message([{"role": "user", "content": "bad \ud83d half"}])
    assert server.request_count == 0  # refused before anything was sent
    for _ in range(2):
        assert cached.send_message(HELLO)["content"] == "echo: hello"
    assert cached.last_call is not None and cached.last_call.cached  # the cache stayed on
    assert cached.cache_stats().errors == 0


def test_a_lone_surrogate_in_an_answer_is_stored_and_served_faithfully(
    cached: OpenAIClient, server: OpenAITestServer, cache_file: Path
) -> None:
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "gpt-4.1-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "half \ud83d emoji"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
    server.script(Fault.status(200, body=body))
    first = cached.send_message(HELLO)
    assert first["content"] == "half \ud83d emoji"
    assert cached.send_message(HELLO) == first and cached.last_call is not None and cached.last_call.cached
    assert cached.send_message([{"role": "user", "content": "next"}])["content"] == "echo: next"
    assert cached.cache_stats().errors == 0 and cached.cache_stats().writes == 2
    with sqlite3.connect(cache_file) as conn:  # readable by anyone: escaped, not broken, UTF-8
        texts = [row[0] for row in conn.execute("SELECT value FROM responses")]
    assert any("\\ud83d" in text for text in texts)


def test_a_200_holding_nan_is_retried_and_never_cached(cached: OpenAIClient, server: OpenAITestServer) -> None:
    nan_body = (
        '{"id":"x","object":"chat.completion","model":"m","choices":[{"index":0,"message":{"role":"assistant",'
        '"content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":NaN,"completion_tokens":1,"total_tokens":Infinity}}'
    )
    server.script(Fault.status(200, body=nan_body))
    assert cached.send_message(HELLO)["content"] == "echo: hello"  # the second attempt's answer, not a TypeError
    assert server.request_count == 2
    assert cached.send_message(HELLO)["content"] == "echo: hello"
    assert cached.last_call is not None and cached.last_call.cached
    assert cached.cache_stats().errors == 0


def test_a_mock_answer_that_is_not_json_is_an_invalid_request(cache_file: Path) -> None:
    import datetime

    answer = {"role": "assistant", "content": "x", "when": datetime.date(2026, 1, 1)}
    client = llmutils.MockClient(answers=[answer], cache_api_calls=True, cache_file_name=cache_file)
    with pytest.raises(InvalidRequestError, match=r"\['when'\] is a date, not a JSON value"):
        client.send_message(HELLO)
    assert client.send_message(HELLO)["content"] == "echo: hello" and client.cache_stats().errors == 0
    client.close()
