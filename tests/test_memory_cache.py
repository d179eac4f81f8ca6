"""The in-memory tier (CACHE_MEMORY_ITEMS): LRU in front of SQLite or Redis, fresh copies, TTL, clear, stats."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

import llmutils
from llmutils.cache import CacheBackend, MemoryCache, SQLiteCache, open_cache
from llmutils.testing import OpenAITestServer

REDIS_URL = os.environ.get("LLMUTILS_TEST_REDIS_URL")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def answer(text: str) -> dict[str, Any]:
    return {"choices": [{"message": {"role": "assistant", "content": text}}], "usage": {"total_tokens": 3}}


def test_open_cache_wraps_the_store_only_when_asked(tmp_path: Path) -> None:
    plain = open_cache(tmp_path / "a.sqlite")
    tiered = open_cache(tmp_path / "b.sqlite", memory_items=10)
    assert isinstance(plain, SQLiteCache)
    assert isinstance(tiered, MemoryCache) and isinstance(tiered, CacheBackend)
    assert tiered.path == tiered.store.path and tiered.mode == "readwrite"
    plain.close()
    tiered.close()


def test_a_hit_from_memory_is_a_fresh_copy_and_skips_the_store(tmp_path: Path) -> None:
    cache = MemoryCache(SQLiteCache(str(tmp_path / "c.sqlite")), 10)
    cache.set("k", answer("one"))
    first = cache.get("k")
    assert first == answer("one")
    first["choices"][0]["message"]["content"] = "mutated by the caller"
    assert cache.get("k") == answer("one")
    assert cache.store.stats().hits == 0  # both served from memory
    assert cache.stats().hits == 2 and cache.stats().writes == 1
    cache.close()


def test_the_least_recently_used_answer_falls_out(tmp_path: Path) -> None:
    store = SQLiteCache(str(tmp_path / "c.sqlite"))
    cache = MemoryCache(store, 2)
    for key in ("a", "b"):
        cache.set(key, answer(key))
    cache.get("a")  # "b" is now the least recently used
    cache.set("c", answer("c"))
    assert cache.info()["memory_items"] == 2
    store.reset_stats()
    assert cache.get("a") == answer("a") and cache.get("c") == answer("c")
    assert store.stats().hits == 0
    assert cache.get("b") == answer("b")  # from the store, which still has it
    assert store.stats().hits == 1
    cache.close()


def test_ttl_is_respected_in_memory(tmp_path: Path) -> None:
    clock = FakeClock()
    cache = MemoryCache(SQLiteCache(str(tmp_path / "c.sqlite"), ttl=60), 10, clock=clock)
    cache.set("k", answer("x"))
    clock.now += 59
    assert cache.get("k") == answer("x")
    assert cache.store.stats().hits == 0
    clock.now += 2  # past the TTL: memory drops it and asks the store
    cache.store.clear()
    assert cache.get("k") is None
    cache.close()


def test_with_a_ttl_store_reads_are_not_kept(tmp_path: Path) -> None:
    path = str(tmp_path / "c.sqlite")
    with SQLiteCache(path, ttl=60) as writer:
        writer.set("k", answer("x"))
    cache = MemoryCache(SQLiteCache(path, ttl=60), 10)
    assert cache.get("k") == answer("x") and cache.get("k") == answer("x")
    assert cache.store.stats().hits == 2  # the entry's age is unknown here: the store decides each time
    cache.close()


def test_without_a_ttl_store_reads_are_kept(tmp_path: Path) -> None:
    path = str(tmp_path / "c.sqlite")
    with SQLiteCache(path) as writer:
        writer.set("k", answer("x"))
    cache = MemoryCache(SQLiteCache(path), 10)
    assert cache.get("k") == answer("x") and cache.get("k") == answer("x")
    assert cache.store.stats().hits == 1 and cache.stats().hits == 2
    cache.close()


def test_clear_clears_memory_and_store(tmp_path: Path) -> None:
    cache = MemoryCache(SQLiteCache(str(tmp_path / "c.sqlite")), 10)
    cache.set("k", answer("x"))
    cache.clear()
    assert cache.get("k") is None and len(cache) == 0
    cache.close()


def test_refresh_mode_never_serves_from_memory(tmp_path: Path) -> None:
    cache = MemoryCache(SQLiteCache(str(tmp_path / "c.sqlite"), mode="refresh"), 10)
    cache.set("k", answer("x"))
    assert cache.get("k") is None
    cache.close()


def test_another_process_writes_are_not_seen_until_the_entry_falls_out(tmp_path: Path) -> None:
    # What the README says: the tier may serve an answer another writer has since replaced.
    path = str(tmp_path / "c.sqlite")
    cache = MemoryCache(SQLiteCache(path), 10)
    cache.set("k", answer("old"))
    with SQLiteCache(path) as other:
        other.set("k", answer("new"))
    assert cache.get("k") == answer("old")
    cache.close()


def test_threads_share_the_tier_safely(tmp_path: Path) -> None:
    cache = MemoryCache(SQLiteCache(str(tmp_path / "c.sqlite")), 50)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(200):
                key = f"k{(t * 7 + i) % 80}"
                got = cache.get(key)
                if got is None:
                    cache.set(key, answer(key))
                elif got != answer(key):
                    errors.append(AssertionError(got))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert cache.info()["memory_items"] <= 50
    cache.close()


@pytest.mark.skipif(not REDIS_URL, reason="set LLMUTILS_TEST_REDIS_URL to run against redis-server")
def test_in_front_of_redis() -> None:
    assert REDIS_URL is not None
    cache = open_cache(REDIS_URL, memory_items=10)
    assert isinstance(cache, MemoryCache)
    cache.clear()
    cache.set("llmutils-test-memory-k", answer("r"))
    assert cache.get("llmutils-test-memory-k") == answer("r")
    assert cache.store.stats().hits == 0 and cache.stats().hits == 1
    cache.clear()
    assert cache.get("llmutils-test-memory-k") is None
    cache.close()


def test_client_with_cache_memory_items(server: OpenAITestServer, tmp_path: Path) -> None:
    with llmutils.OpenAIClient(
        base_url=server.base_url, api_key="k", model="m", cache_api_calls=True, cache_file_name=tmp_path / "c.sqlite",
        cache_memory_items=100,
    ) as client:
        messages = [{"role": "user", "content": "remember me"}]
        first = client.send_message(messages)
        first["content"] = "mutated"
        assert client.send_message(messages) == {"role": "assistant", "content": "echo: remember me"}
        assert client.last_call is not None and client.last_call.cached
        assert server.request_count == 1
        stats = client.cache_stats()
        assert stats.hits == 1 and stats.writes == 1


def test_cache_memory_items_from_the_config(server: OpenAITestServer, tmp_path: Path) -> None:
    llmutils.force_default_value("CACHE_MEMORY_ITEMS", 100)
    with llmutils.OpenAIClient(
        base_url=server.base_url, api_key="k", model="m", cache_api_calls=True, cache_file_name=tmp_path / "c.sqlite"
    ) as client:
        messages = [{"role": "user", "content": "from the config"}]
        client.send_message(messages)
        client.send_message(messages)
        assert server.request_count == 1 and client.cache_stats().hits == 1
    with pytest.raises(llmutils.ConfigError, match="CACHE_MEMORY_ITEMS"):
        llmutils.force_default_value("CACHE_MEMORY_ITEMS", -1)
