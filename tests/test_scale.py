"""Outgrowing one process: picklable clients, single-flight across processes on SQLite, batches on executors.

Real components only: llmutils' test server on 127.0.0.1, real SQLite files, real subprocesses
(spawned, so nothing is inherited by fork), a real redis-server and a real Dask cluster.
"""

from __future__ import annotations

import json
import operator
import os
import pickle
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import pytest

import llmutils
from llmutils import AzureClient, LLMCall, MockClient, OpenAIClient, RetryPolicy
from llmutils._deadline import Deadline
from llmutils.cache import SQLiteCache, make_key
from llmutils.testing import OpenAITestServer

HELLO = [{"role": "user", "content": "hello"}]


# -- pickling ---------------------------------------------------------------------------------------


def roundtrip(obj: Any) -> Any:
    return pickle.loads(pickle.dumps(obj))  # noqa: S301 - our own bytes


def test_every_client_kind_pickles_to_its_configuration(tmp_path: Path) -> None:
    clients = [
        OpenAIClient(
            api_key="sk-explicit",
            base_url="http://127.0.0.1:9/v1",
            model="m",
            rpm=60,
            cache_api_calls=True,
            cache_file_name=tmp_path / "c.sqlite",
            rate_limit_url="redis://127.0.0.1:9/0",
            default_headers={"X-Team": "a"},
            prices={"m": (1.0, 2.0)},
        ),
        AzureClient(
            api_key="az-explicit", azure_endpoint="https://x.openai.azure.com", api_version="2024-10-21", model="dep"
        ),
        MockClient(answers=["first", "second"], model="mock-model"),
    ]
    for client in clients:
        copy = roundtrip(client)
        assert type(copy) is type(client)
        assert copy.settings() == client.settings()
        assert copy._lock is not client._lock
    assert clients[0].settings()["RATE_LIMIT_URL"] == "redis://127.0.0.1:9/0"
    openai_copy, azure_copy, mock_copy = (roundtrip(c) for c in clients)
    assert openai_copy._api_key == "sk-explicit" and openai_copy._default_headers == {"X-Team": "a"}
    assert azure_copy._api_key == "az-explicit" and azure_copy._api_version == "2024-10-21"
    assert mock_copy.send_message(HELLO)["content"] == "first"  # the scripted answers travel


def test_runtime_state_stays_behind(server: OpenAITestServer, tmp_path: Path) -> None:
    client = OpenAIClient(
        base_url=server.base_url,
        api_key="k",
        cache_api_calls=True,
        cache_file_name=tmp_path / "c.sqlite",
        rpm=6000,
        max_concurrent_calls=4,
    )
    client.send_message(HELLO)  # opens the SDK's connections, the cache file and the limiters
    assert client._sdk_clients and client._caches and client._limits and client.usage.totals().requests == 1
    copy = roundtrip(client)
    assert not copy._sdk_clients and not copy._caches and not copy._limits and not copy._inflight
    assert copy.usage.totals().requests == 0 and copy.last_call is None
    assert copy.send_message(HELLO)["content"] == "echo: hello" and copy.last_call.cached  # same cache file
    mock = MockClient()
    mock.send_message(HELLO)
    assert mock.calls == 1 and roundtrip(mock).calls == 0


def test_a_key_from_the_environment_does_not_travel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-the-environment")
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "az-from-the-environment")
    for client in (OpenAIClient(), AzureClient(azure_endpoint="https://x.openai.azure.com")):
        assert b"from-the-environment" not in pickle.dumps(client)
    assert b"sk-explicit" in pickle.dumps(OpenAIClient(api_key="sk-explicit"))  # said in the README


def test_an_azure_entra_provider_given_travels_and_a_default_one_does_not() -> None:
    given = AzureClient(azure_endpoint="https://x.openai.azure.com", azure_ad_token_provider=_token)
    assert roundtrip(given)._token_provider is _token
    default = AzureClient(azure_endpoint="https://x.openai.azure.com")
    default._entra_token_provider = threading.Lock()  # stands for DefaultAzureCredential's provider: never pickled
    assert roundtrip(default)._entra_token_provider is None


def _token() -> str:
    return "entra-token"


def test_llmcall_and_retry_policy_pickle() -> None:
    call = LLMCall("system_default", "summarize", output_type=int, client=MockClient(answers=["7", "8"]), temperature=0)
    call.call(text="x")
    assert call.messages is not None
    copy = roundtrip(call)
    assert copy.messages is None and copy.model_output is None and copy.model_params == {"temperature": 0}
    assert call.call(text="x") == 8 and copy.call(text="y") == 8  # the answers left travelled
    policy = RetryPolicy(max_attempts=3, waiting_time=0.5, total_timeout=9.0)
    assert roundtrip(policy) == policy


def test_an_unpicklable_injected_piece_is_named() -> None:
    client = MockClient(handler=lambda messages, params: "x")
    with pytest.raises((pickle.PicklingError, AttributeError), match="lambda"):
        pickle.dumps(client)


@pytest.fixture
def keyed_server() -> Iterator[OpenAITestServer]:
    with OpenAITestServer(api_key="sk-worker-env") as srv:
        yield srv


def test_clients_and_llmcall_work_in_a_spawned_process(
    keyed_server: OpenAITestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-worker-env")  # the worker reads its own environment
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "sk-worker-env")
    ask = operator.methodcaller("send_message", HELLO)
    openai_client = OpenAIClient(base_url=keyed_server.base_url)
    azure = AzureClient(azure_endpoint=keyed_server.azure_endpoint, model="my-deployment")
    mock = MockClient(answers=["scripted"])
    summarize = LLMCall("system_default", "summarize", client=OpenAIClient(base_url=keyed_server.base_url))
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        assert pool.submit(ask, openai_client).result(timeout=60)["content"] == "echo: hello"
        assert pool.submit(ask, azure).result(timeout=60)["content"] == "echo: hello"
        assert pool.submit(ask, mock).result(timeout=60)["content"] == "scripted"
        assert "echo:" in pool.submit(summarize.call, text="a long story").result(timeout=60)
        pid = pool.submit(os.getpid).result(timeout=60)
    assert pid != os.getpid()
    assert keyed_server.request_count == 3
    assert keyed_server.requests[1].deployment == "my-deployment"


# -- single-flight across processes on SQLite ------------------------------------------------------

SQLITE_CHILD = textwrap.dedent(
    """
    import json, random, sys, threading
    import llmutils

    args = json.loads(sys.argv[1])
    client = llmutils.OpenAIClient(base_url=args["base_url"], api_key="k", cache_api_calls=True,
                                   cache_file_name=args["cache"])
    print("ready", flush=True)
    sys.stdin.readline()
    wrong = []

    def run(seed):
        order = list(range(args["prompts"]))
        random.Random(seed).shuffle(order)
        for i in order:
            text = f"shared prompt {i}"
            answer = client.send_message([{"role": "user", "content": text}])["content"]
            if answer != f"echo: {text}":
                wrong.append(answer)

    threads = [threading.Thread(target=run, args=(args["seed"] * 100 + t,)) for t in range(args["threads"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"wrong": wrong}), flush=True)
    """
)


def test_four_processes_eight_threads_share_one_request_per_prompt_on_sqlite(
    server: OpenAITestServer, tmp_path: Path
) -> None:
    server.latency = 0.02  # long enough for identical requests of several processes to overlap
    cache = str(tmp_path / "shared.sqlite")
    SQLiteCache(cache).set(make_key({"warm": True}), {"x": 1})  # the file exists before the race
    spec = {"base_url": server.base_url, "cache": cache, "prompts": 100, "threads": 8}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SQLITE_CHILD, json.dumps({**spec, "seed": n})],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(4)
    ]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert json.loads(out.splitlines()[-1])["wrong"] == []
    assert server.request_count == 100
    assert sorted(r.body["messages"][-1]["content"] for r in server.requests) == sorted(
        f"shared prompt {i}" for i in range(100)
    )


def test_a_waiter_takes_over_when_the_lease_expires(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    holder, waiter = SQLiteCache(path), SQLiteCache(path)
    holder.lease_ttl = 0.3
    key = make_key({"q": 1})
    holding, release = threading.Event(), threading.Event()

    def stuck() -> dict[str, Any]:
        holding.set()
        release.wait(30)
        return {"from": "holder"}

    thread = threading.Thread(target=holder.single_flight, args=(key, stuck))
    thread.start()
    try:
        assert holding.wait(10)
        value, shared = waiter.single_flight(key, lambda: {"from": "waiter"}, deadline=Deadline(20))
        assert (value, shared) == ({"from": "waiter"}, False)  # the hung holder's lease ran out
    finally:
        release.set()
        thread.join(10)


def test_a_waiter_gets_the_holders_answer(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    holder, waiter = SQLiteCache(path), SQLiteCache(path)
    key = make_key({"q": 2})
    holding, release = threading.Event(), threading.Event()
    sent: list[str] = []

    def slow() -> dict[str, Any]:
        holding.set()
        release.wait(30)
        return {"from": "holder"}

    thread = threading.Thread(target=holder.single_flight, args=(key, slow))
    thread.start()
    try:
        assert holding.wait(10)
        timer = threading.Timer(0.2, release.set)
        timer.start()
        value, shared = waiter.single_flight(
            key, lambda: sent.append("waiter") or {"from": "waiter"}, deadline=Deadline(20)
        )
        assert (value, shared, sent) == ({"from": "holder"}, True, [])
    finally:
        release.set()
        thread.join(10)


def test_a_waiter_sends_itself_when_the_holder_fails(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    holder, waiter = SQLiteCache(path), SQLiteCache(path)
    key = make_key({"q": 3})
    holding, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def failing() -> dict[str, Any]:
        holding.set()
        release.wait(30)
        raise llmutils.NonTerminalError("HTTP 500")

    def hold() -> None:
        try:
            holder.single_flight(key, failing)
        except llmutils.NonTerminalError as exc:
            errors.append(exc)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert holding.wait(10)
        threading.Timer(0.1, release.set).start()
        value, shared = waiter.single_flight(key, lambda: {"from": "waiter"}, deadline=Deadline(20))
        assert (value, shared) == ({"from": "waiter"}, False)
    finally:
        release.set()
        thread.join(10)
    assert len(errors) == 1


def test_a_waiter_takes_over_at_once_when_the_holder_process_died(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    key = make_key({"q": 4})
    code = textwrap.dedent(
        f"""
        import threading
        from llmutils.cache import SQLiteCache

        def hang():
            print("holding", flush=True)
            threading.Event().wait()

        SQLiteCache({str(path)!r}).single_flight({key!r}, hang)
        """
    )
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "holding"
        finally:
            proc.kill()
            proc.wait(10)  # reaped: its pid is gone
    waiter = SQLiteCache(path)
    value, shared = waiter.single_flight(key, lambda: {"from": "waiter"}, deadline=Deadline(5))
    assert (value, shared) == ({"from": "waiter"}, False)  # long before the 60 s lease would end


def test_the_deadline_bounds_the_wait_for_a_lease(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    holder, waiter = SQLiteCache(path), SQLiteCache(path)
    key = make_key({"q": 5})
    holding, release = threading.Event(), threading.Event()
    thread = threading.Thread(
        target=holder.single_flight, args=(key, lambda: holding.set() or (release.wait(30) and {"x": 1}))
    )
    thread.start()
    try:
        assert holding.wait(10)

        def send() -> dict[str, Any]:
            raise deadline.error("sending")  # what the client's send does when nothing is left

        deadline = Deadline(0.3)
        with pytest.raises(llmutils.TotalTimeoutError):
            waiter.single_flight(key, send, deadline=deadline)
        assert deadline.expired
    finally:
        release.set()
        thread.join(10)


def test_leases_are_rows_a_person_can_read(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "c.sqlite"
    cache = SQLiteCache(path)
    key = make_key({"q": 6})
    seen: list[Any] = []

    def look() -> dict[str, Any]:
        with sqlite3.connect(path) as conn:
            seen.extend(conn.execute("SELECT key, pid, expires > strftime('%s','now') FROM llmutils_leases").fetchall())
        return {"x": 1}

    assert cache.single_flight(key, look) == ({"x": 1}, False)
    assert seen == [(key, os.getpid(), 1)]
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM llmutils_leases").fetchone()[0] == 0  # dropped after
    assert cache.get(key) == {"x": 1}


# -- batches on executors --------------------------------------------------------------------------


def fail_on_fail(body: dict[str, Any]) -> str:
    """A chat_handler: a 500 for the prompt "FAIL", else the usual echo."""
    text = body["messages"][-1]["content"]
    if text == "FAIL":
        raise RuntimeError("this item fails on the server")
    return f"echo: {text}"


def prompts(tag: str, n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"{tag} {i}"}] for i in range(n)]


@pytest.fixture(scope="module")
def spawn_pool() -> Iterator[ProcessPoolExecutor]:
    """Two spawned worker processes, shared by the tests of this module (starting them takes seconds)."""
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        yield pool


def test_batch_on_a_process_pool_keeps_order_and_per_item_errors(
    server: OpenAITestServer, tmp_path: Path, spawn_pool: ProcessPoolExecutor
) -> None:
    server.chat_handler = fail_on_fail
    client = OpenAIClient(
        base_url=server.base_url,
        api_key="k",
        cache_api_calls=True,
        cache_file_name=tmp_path / "c.sqlite",
        retry=RetryPolicy(max_attempts=1),
    )
    items: list[Any] = prompts("pool", 30)
    items[7] = [{"role": "user", "content": "FAIL"}]
    seen: list[int] = []
    results = llmutils.batch(
        items, client=client, workers=4, executor=spawn_pool, chunk_size=5, on_result=lambda r: seen.append(r.index)
    )
    assert [r.index for r in results] == list(range(30))
    assert [r.content for r in results if r.index != 7] == [f"echo: pool {i}" for i in range(30) if i != 7]
    assert (
        not results[7].ok
        and isinstance(results[7].error, llmutils.LLMUtilsError)
        and results[7].error.status_code == 500
    )
    assert sorted(seen) == list(range(30))
    assert server.request_count == 30
    again = llmutils.batch(items, client=client, workers=4, executor=spawn_pool, chunk_size=5)
    assert [r.cached for r in again] == [i != 7 for i in range(30)]  # the failed item is sent again, alone
    assert server.request_count == 31


def test_map_calls_on_a_process_pool_refuses_what_cannot_pickle_before_any_request(
    server: OpenAITestServer, spawn_pool: ProcessPoolExecutor
) -> None:
    client = OpenAIClient(base_url=server.base_url, api_key="k")
    with pytest.raises(llmutils.ConfigError, match="cannot be pickled"):
        llmutils.map_calls(lambda m: client.send_message(m), prompts("x", 3), client=client, executor=spawn_pool)
    assert server.request_count == 0


def test_map_calls_takes_any_executor_and_checks_it(server: OpenAITestServer) -> None:
    from concurrent.futures import ThreadPoolExecutor

    client = OpenAIClient(base_url=server.base_url, api_key="k")
    with ThreadPoolExecutor(2) as pool:
        results = llmutils.map_calls(_Ask(client), prompts("t", 9), client=client, executor=pool, chunk_size=2)
    assert [r.output["content"] for r in results] == [f"echo: t {i}" for i in range(9)]
    with pytest.raises(llmutils.ConfigError, match=r"executor must be a concurrent\.futures\.Executor"):
        llmutils.map_calls(_Ask(client), prompts("t", 1), client=client, executor=object())  # type: ignore[arg-type]
    with pytest.raises(llmutils.ConfigError, match="chunk_size must be an int >= 1"):
        llmutils.map_calls(_Ask(client), prompts("t", 1), client=client, executor=pool, chunk_size=0)


class _Ask:
    """A picklable fn for map_calls: send the item's messages with ``client``."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def __call__(self, messages: list[dict[str, str]]) -> Any:
        return self.client.send_message(messages)


def test_the_calling_process_settings_go_with_the_chunks(
    server: OpenAITestServer, spawn_pool: ProcessPoolExecutor
) -> None:
    client = OpenAIClient(base_url=server.base_url, api_key="k")
    with llmutils.override_defaults(model="model-from-the-caller"):
        llmutils.batch(prompts("s", 2), client=client, executor=spawn_pool)
    assert {r.body["model"] for r in server.requests} == {"model-from-the-caller"}


def test_ctrl_c_cancels_the_chunks_not_started(server: OpenAITestServer) -> None:
    from concurrent.futures import ThreadPoolExecutor

    client = OpenAIClient(base_url=server.base_url, api_key="k")
    got: list[int] = []

    def interrupt(result: llmutils.BatchResult) -> None:
        got.append(result.index)
        raise KeyboardInterrupt

    with ThreadPoolExecutor(1) as pool, pytest.raises(KeyboardInterrupt):
        llmutils.batch(prompts("c", 40), client=client, workers=1, executor=pool, chunk_size=4, on_result=interrupt)
    assert got == [0]
    assert 4 <= server.request_count <= 8  # the first chunk, and at most the one running when Ctrl-C came


def test_fail_fast_stops_the_chunks_not_started(server: OpenAITestServer) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with OpenAITestServer(api_key="the-right-key") as keyed:
        client = OpenAIClient(base_url=keyed.base_url, api_key="a-wrong-key")
        with ThreadPoolExecutor(1) as pool:
            results = llmutils.batch(prompts("f", 20), client=client, workers=1, executor=pool, chunk_size=2)
        assert isinstance(results[0].error, llmutils.AuthenticationError)
        assert all(not r.attempted for r in results[4:])  # chunks 3 to 10 were cancelled
        assert sum(r.attempted for r in results) == keyed.request_count <= 2  # one per chunk that ran


def test_chunks_of_a_batch_share_one_client_per_worker(spawn_pool: ProcessPoolExecutor) -> None:
    results = llmutils.map_calls(_WhichClient(MockClient()), range(24), executor=spawn_pool, chunk_size=2)
    seen: dict[int, set[int]] = {}
    for r in results:
        pid, client_id = r.output
        seen.setdefault(pid, set()).add(client_id)
    assert os.getpid() not in seen
    assert all(len(ids) == 1 for ids in seen.values()), seen  # twelve chunks, one client per worker


class _WhichClient:
    """A picklable fn that tells which process and which client object ran the item."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def __call__(self, item: Any) -> tuple[int, int]:
        return os.getpid(), id(self.client)


# -- a Dask cluster with the Redis cache and the Redis limiter ------------------------------------


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from redis_servers import CI_URL, NO_SERVER, REDIS_SERVER, RedisServer

    if CI_URL:
        yield CI_URL
        return
    if REDIS_SERVER is None:
        pytest.skip(NO_SERVER)
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def dask_client() -> Iterator[Any]:
    """A Dask cluster of 2 worker processes on 127.0.0.1, shared by the tests of this module."""
    distributed = pytest.importorskip("distributed", reason="Dask is not installed: pip install -e '.[test]'")
    with (
        distributed.LocalCluster(
            n_workers=2, processes=True, threads_per_worker=1, host="127.0.0.1", dashboard_address="127.0.0.1:0"
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client


@pytest.fixture
def dask_executor(dask_client: Any) -> Any:
    return dask_client.get_executor()


def test_a_batch_on_a_dask_cluster_shares_the_redis_cache_and_limiter(
    server: OpenAITestServer, redis_url: str, dask_executor: Any
) -> None:
    import uuid

    tag = uuid.uuid4().hex  # keys of our own on a shared Redis
    unique = prompts(f"dask {tag}", 150)
    items: list[Any] = unique + [unique[(i * 7) % 150] for i in range(50)]  # 200 items, 50 of them repeats
    items.insert(100, {"messages": "not a list"})  # fails alone, before any request
    # Exact counts need the cache up all along: a generous timeout keeps a busy machine from
    # turning it off for a while (a slow Redis degrades to "no cache" by design).
    patient = f"{redis_url}?socket_timeout=10&socket_connect_timeout=10"
    client = OpenAIClient(
        base_url=server.base_url,
        api_key="k",
        cache_api_calls=True,
        cache_url=patient,
        rpm=60_000,
        rate_limit_url=redis_url,
        rate_limit_name=f"test-{tag}",
    )
    # total_timeout: on a machine too busy to answer, fail within minutes rather than hang.
    results = llmutils.batch(items, client=client, workers=4, executor=dask_executor, total_timeout=120)
    assert [r.index for r in results] == list(range(201))
    assert isinstance(results[100].error, llmutils.InvalidRequestError)
    expected = [None if isinstance(item, dict) else f"echo: {item[0]['content']}" for item in items]
    assert [r.content for r in results] == expected
    assert server.request_count == 150  # every repeat waited for its twin, whichever worker sent it
    again = llmutils.batch(items, client=client, workers=4, executor=dask_executor, total_timeout=120)
    assert server.request_count == 150
    assert [r.cached for r in again] == [i != 100 for i in range(201)]
    assert [r.content for r in again] == expected
    import redis

    raw = redis.Redis.from_url(redis_url)
    try:
        assert raw.exists(f"llmutils:ratelimit:{{test-{tag}}}") == 1  # the workers took their slots there
    finally:
        raw.close()


def test_cli_batch_on_a_dask_cluster(
    server: OpenAITestServer, redis_url: str, dask_client: Any, tmp_path: Path
) -> None:
    import uuid

    from llmutils.cli import main

    tag = uuid.uuid4().hex
    lines = [{"prompt": f"cli dask {tag} {i % 6}"} for i in range(12)]  # 6 prompts, each twice
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    argv = [
        "--base-url",
        server.base_url,
        "batch",
        "in.jsonl",
        "out.jsonl",
        "--no-progress",
        "-w",
        "2",
        "--cache-url",
        f"{redis_url}?socket_timeout=10",
        "--dask-scheduler",
        dask_client.scheduler.address,
    ]
    assert main(argv) == 0
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["index"] for o in out] == list(range(12))
    assert [o["input"] for o in out] == lines
    assert server.request_count == 6


def test_cli_batch_on_local_processes(server: OpenAITestServer, tmp_path: Path) -> None:
    from llmutils.cli import main

    lines = [{"prompt": f"cli processes {i % 10}"} for i in range(30)] + [{"messages": "not a list"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    argv = [
        "--base-url",
        server.base_url,
        "batch",
        "in.jsonl",
        "out.jsonl",
        "--no-progress",
        "-w",
        "3",
        "--processes",
        "2",
    ]
    assert main(argv) == 1  # one item failed, alone
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["index"] for o in out] == list(range(31))
    assert out[30]["error"]["type"] == "InvalidRequestError" and all("output" in o for o in out[:30])
    assert server.request_count == 10  # the SQLite cache (on by default): one request per prompt across both processes


def test_cli_batch_processes_and_dask_are_exclusive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from llmutils.cli import main

    (tmp_path / "in.jsonl").write_text('{"prompt": "x"}\n')
    assert main(["batch", "in.jsonl", "out.jsonl", "--processes", "2", "--dask-scheduler", "tcp://127.0.0.1:1"]) == 2
    assert "not allowed with argument --processes" in capsys.readouterr().err
    assert main(["batch", "in.jsonl", "out.jsonl", "--processes", "0"]) == 2
