"""The OpenAI Batch API path: the test server's files/batches endpoints, the JSONL builder, the runner and its ledger.

Everything runs against the real ``OpenAITestServer`` (through the openai SDK), real SQLite cache
files and, when ``$LLMUTILS_TEST_REDIS_URL`` is set, a real Redis. Polling waits are recorded
through an injected ``sleep``; the server's fast clock ends a batch after a few polls.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

import llmutils
from llmutils import BatchAPIError, ConfigError, InvalidRequestError, NonTerminalError, RetryPolicy, UsageTracker
from llmutils._apis.batch import InputFile, batch_url, build_input_files, read_results, request_line
from llmutils._batchapi import BatchAPI, BatchRun, RedisLedger, SQLiteLedger, open_ledger, run_batch_job
from llmutils.testing import BatchOutcome, Fault, OpenAITestServer

REDIS_URL = os.environ.get("LLMUTILS_TEST_REDIS_URL")  # read at import: the autouse fixture clears LLMUTILS_*


def _body(i: int, model: str = "gpt-4.1-mini") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": f"item {i}"}]}


def _requests(n: int, model: str = "gpt-4.1-mini") -> list[tuple[str, dict[str, Any]]]:
    return [(f"{i:064x}", _body(i, model)) for i in range(n)]


@pytest.fixture
def sdk(server: OpenAITestServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0) as c:
        yield c


@pytest.fixture
def azure_sdk(server: OpenAITestServer) -> Iterator[openai.AzureOpenAI]:
    with openai.AzureOpenAI(azure_endpoint=server.azure_endpoint, api_key="k", api_version="2024-10-21", max_retries=0) as c:
        yield c


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[Any]:
    c = llmutils.open_cache(tmp_path / "cache.sqlite")
    c.get("0" * 64)  # creates the file (and its schema) as a first call would
    yield c
    c.close()


def _api(sdk: Any, waits: list[float] | None = None) -> BatchAPI:
    policy = RetryPolicy(max_attempts=3, waiting_time=0.01, jitter=0, sleep=(waits if waits is not None else []).append)
    return BatchAPI(sdk, policy=policy)


def _run(requests: list[tuple[str, dict[str, Any]]], sdk: Any, cache: Any, **kwargs: Any) -> BatchRun:
    waits: list[float] = kwargs.pop("waits", [])
    kwargs.setdefault("url", batch_url("chat"))
    return run_batch_job(requests, api=_api(sdk), cache=cache, ledger=open_ledger(cache.path), sleep=waits.append, **kwargs)


def _creates(server: OpenAITestServer) -> int:
    return sum(1 for r in server.requests if r.method == "POST" and r.path.endswith("/batches"))


def _uploaded_lines(server: OpenAITestServer) -> list[dict[str, Any]]:
    lines = []
    for r in server.requests:
        if r.method == "POST" and r.path.endswith("/files"):
            lines += [json.loads(x) for x in r.body["file"]["content"].splitlines()]
    return lines


# -- the test server's Batch API ---------------------------------------------------------------------


def _upload(sdk: Any, lines: list[dict[str, Any]]) -> str:
    data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    return str(sdk.files.create(file=("in.jsonl", data), purpose="batch").id)


def _lines(n: int, url: str = "/v1/chat/completions") -> list[dict[str, Any]]:
    return [{"custom_id": f"k{i}", "method": "POST", "url": url, "body": _body(i)} for i in range(n)]


def test_server_batch_lifecycle_through_the_sdk(server: OpenAITestServer, sdk: openai.OpenAI) -> None:
    server.batch_api.polls = 2
    upload = sdk.files.create(file=("in.jsonl", b"".join(json.dumps(x).encode() + b"\n" for x in _lines(3))), purpose="batch")
    assert (upload.purpose, upload.status, upload.filename) == ("batch", "processed", "in.jsonl")
    assert server.requests[-1].body["purpose"] == "batch"  # a multipart form, parsed
    batch = sdk.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"a": "b"})
    assert (batch.status, batch.metadata, server.batch_api.created) == ("validating", {"a": "b"}, [batch.id])
    first = sdk.batches.retrieve(batch.id)
    assert first.status == "in_progress" and first.request_counts is not None and first.request_counts.total == 3
    done = sdk.batches.retrieve(batch.id)
    assert done.status == "completed" and done.error_file_id is None and done.completed_at is not None
    assert done.request_counts is not None and (done.request_counts.completed, done.request_counts.failed) == (3, 0)
    results = read_results(sdk.files.content(str(done.output_file_id)).content)
    assert results["k2"].ok and results["k2"].body["choices"][0]["message"]["content"] == "echo: item 2"
    assert [b.id for b in sdk.batches.list(limit=5).data] == [batch.id]


def test_server_scripted_outcomes(server: OpenAITestServer, sdk: openai.OpenAI) -> None:
    server.batch_api.script(
        BatchOutcome(line_fault=lambda line: Fault.bad_request("no k1") if line["custom_id"] == "k1" else None),
        BatchOutcome("expired", polls=1, answered=1),
        BatchOutcome("failed", polls=1),
    )
    ids = [sdk.batches.create(input_file_id=_upload(sdk, _lines(3)), endpoint="/v1/chat/completions", completion_window="24h").id for _ in range(3)]
    for _ in range(2):
        batches = [sdk.batches.retrieve(i) for i in ids]
    assert [b.status for b in batches] == ["completed", "expired", "failed"]
    line_error = read_results(sdk.files.content(str(batches[0].error_file_id)).content)["k1"]
    assert (line_error.status_code, line_error.error_message) == (400, "no k1")
    expired = read_results(sdk.files.content(str(batches[1].output_file_id)).content, sdk.files.content(str(batches[1].error_file_id)).content)
    assert expired["k0"].ok and (expired["k1"].error_code, expired["k2"].error_code) == ("batch_expired", "batch_expired")
    assert batches[2].output_file_id is None and batches[2].errors is not None


def test_server_validates_the_file_and_cancels(server: OpenAITestServer, sdk: openai.OpenAI) -> None:
    mixed = _lines(2)
    mixed[1]["body"]["model"] = "other"
    bad = sdk.batches.create(input_file_id=_upload(sdk, mixed), endpoint="/v1/chat/completions", completion_window="24h")
    sdk.batches.retrieve(bad.id)
    failed = sdk.batches.retrieve(bad.id)
    assert failed.status == "failed" and failed.errors is not None and failed.errors.data
    assert failed.errors.data[0].code == "model_mismatch"
    with pytest.raises(openai.BadRequestError):
        sdk.batches.create(input_file_id=_upload(sdk, _lines(1)), endpoint="/v1/chat/completions", completion_window="1h")
    with pytest.raises(openai.NotFoundError):
        sdk.batches.retrieve("batch_nope")
    with pytest.raises(openai.BadRequestError):
        sdk.files.create(file=("in.jsonl", b"{}\n"), purpose="batch", expires_after={"anchor": "created_at", "seconds": 10})
    with pytest.raises(openai.BadRequestError):
        sdk.batches.create(
            input_file_id=_upload(sdk, _lines(1)), endpoint="/v1/chat/completions", completion_window="24h",
            output_expires_after={"anchor": "created_at", "seconds": 99_999_999},
        )
    live = sdk.batches.create(input_file_id=_upload(sdk, _lines(2)), endpoint="/v1/chat/completions", completion_window="24h")
    assert sdk.batches.cancel(live.id).status == "cancelling"
    cancelled = sdk.batches.retrieve(live.id)
    assert cancelled.status == "cancelled" and cancelled.request_counts is not None and cancelled.request_counts.failed == 2
    with pytest.raises(openai.BadRequestError):
        sdk.batches.cancel(live.id)


def test_server_azure_paths(server: OpenAITestServer, azure_sdk: openai.AzureOpenAI) -> None:
    file_id = _upload(azure_sdk, _lines(2, url="/chat/completions"))
    batch = azure_sdk.batches.create(input_file_id=file_id, endpoint="/chat/completions", completion_window="24h")
    for _ in range(2):
        done = azure_sdk.batches.retrieve(batch.id)
    assert done.status == "completed"
    assert {r.path.split("/")[2] for r in server.requests} == {"files", "batches"}
    assert all(r.path.startswith("/openai/") and r.query["api-version"] == "2024-10-21" for r in server.requests)
    status, _, _ = _raw_get(server, "/openai/batches")
    assert status == 400  # api-version is required on these paths


def _raw_get(server: OpenAITestServer, path: str) -> tuple[int, dict[str, str], bytes]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


# -- JSONL lines ---------------------------------------------------------------------------------------


def test_lines_split_by_count_bytes_and_model() -> None:
    requests = _requests(7) + [("x" * 64, _body(9, model="gpt-4o"))]
    files = build_input_files(requests, "/v1/chat/completions", max_requests=3)
    assert [len(f.keys) for f in files] == [3, 3, 1, 1]
    assert [f.model for f in files] == ["gpt-4.1-mini"] * 3 + ["gpt-4o"]
    first = json.loads(files[0].content.splitlines()[0])
    assert first == {"custom_id": requests[0][0], "method": "POST", "url": "/v1/chat/completions", "body": requests[0][1]}
    size = len(request_line(requests[0][0], "/v1/chat/completions", requests[0][1]))
    by_bytes = build_input_files(requests[:7], "/v1/chat/completions", max_bytes=2 * size + 1)
    assert [len(f.keys) for f in by_bytes] == [2, 2, 2, 1]
    assert all(isinstance(f, InputFile) and len(f.content) <= 2 * size + 1 for f in by_bytes)


def test_lines_refuse_duplicates_and_oversize() -> None:
    with pytest.raises(InvalidRequestError, match="twice"):
        build_input_files([("a", _body(1)), ("a", _body(2))], "/v1/chat/completions")
    with pytest.raises(InvalidRequestError, match="send it live"):
        build_input_files([("a", _body(1))], "/v1/chat/completions", max_bytes=10)
    assert batch_url("chat", azure=True) == "/chat/completions"
    assert batch_url("responses") == "/v1/responses"


def test_read_results_prefers_an_answer_and_skips_junk() -> None:
    ok = {"custom_id": "a", "response": {"status_code": 200, "request_id": "r1", "body": {"id": "x"}}, "error": None}
    bad = {"custom_id": "a", "response": {"status_code": 500, "body": {"error": {"message": "boom", "code": None}}}, "error": None}
    gone = {"custom_id": "b", "response": None, "error": {"code": "batch_expired", "message": "late"}}
    results = read_results(json.dumps(bad) + "\nnot json\n{}\n", json.dumps(ok).encode() + b"\n" + json.dumps(gone).encode())
    assert results["a"].ok and results["a"].request_id == "r1"
    assert (results["b"].ok, results["b"].error_code, results["b"].error_message) == (False, "batch_expired", "late")
    assert set(results) == {"a", "b"}


# -- the runner ---------------------------------------------------------------------------------------


def test_cached_requests_are_not_sent_and_answers_land_in_the_cache(server: OpenAITestServer, sdk: openai.OpenAI, cache: Any) -> None:
    requests = _requests(30)
    for key, _ in requests[:5]:
        cache.set(key, {"cached": key})
    run = _run(requests, sdk, cache)
    assert len(_uploaded_lines(server)) == 25 and run.lines_submitted == 25
    [upload] = [r for r in server.requests if r.path == "/v1/files"]
    assert (upload.body["purpose"], upload.body["expires_after[seconds]"]) == ("batch", "2592000")  # 30 days, not forever
    created = server.batch_api.batch(run.submitted[0])
    assert created["metadata"] == {"created_by": "llmutils"}
    assert set(run.cached) == {k for k, _ in requests[:5]} and len(run.answers) == 25 and not run.errors
    assert cache.get(requests[7][0])["choices"][0]["message"]["content"] == "echo: item 7"
    server.reset()
    again = _run(requests, sdk, cache)
    assert server.request_count == 0 and len(again.cached) == 30


def test_polls_back_off_exponentially_up_to_the_cap(server: OpenAITestServer, sdk: openai.OpenAI, cache: Any) -> None:
    server.batch_api.polls = 7
    waits: list[float] = []
    run = _run(_requests(2), sdk, cache, waits=waits, poll_interval=5, poll_max=60)
    assert waits == [5, 10, 20, 40, 60, 60] and len(run.answers) == 2


def test_a_run_interrupted_after_submission_resumes_the_same_batch(server: OpenAITestServer, sdk: openai.OpenAI, cache: Any) -> None:
    def interrupt(_seconds: float) -> None:
        raise KeyboardInterrupt

    requests = _requests(6)
    server.batch_api.polls = 2  # still in progress at the first poll, so the run sleeps (and is interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_batch_job(requests, api=_api(sdk), cache=cache, ledger=open_ledger(cache.path), url=batch_url("chat"), sleep=interrupt)
    [job] = SQLiteLedger(cache.path).jobs(open_only=True, with_keys=True)
    assert job.batch_id == server.batch_api.created[0] and len(job.keys) == 6 and not job.collected
    run = _run(requests, sdk, cache)
    assert _creates(server) == 1 and run.resumed == [job.batch_id] and run.submitted == [] and len(run.answers) == 6
    [done] = SQLiteLedger(cache.path).jobs()
    assert done.collected and done.status == "completed"


def test_a_lost_create_answer_is_retried_after_looking_for_the_batch(server: OpenAITestServer, sdk: openai.OpenAI, cache: Any) -> None:
    server.batch_api.script_http(Fault(), Fault.server_error())  # the upload works; the create gets a 500
    run = _run(_requests(3), sdk, cache)
    assert _creates(server) == 2 and len(server.batch_api.created) == 1 and len(run.answers) == 3
    assert any(r.method == "GET" and r.path == "/v1/batches" for r in server.requests)  # it looked before creating again


def test_a_crash_between_upload_and_create_adopts_the_created_batch(server: OpenAITestServer, sdk: openai.OpenAI, cache: Any) -> None:
    from llmutils._batchapi import BatchJob

    requests = _requests(3)
    [spec] = build_input_files(requests, batch_url("chat"))
    file_id = str(sdk.files.create(file=("in.jsonl", spec.content), purpose="batch").id)
    created = sdk.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    # the process died after the create reached the server, before it recorded the batch id
    SQLiteLedger(cache.path).save(BatchJob(input_file_id=file_id, batch_id=None, status="submitting", keys=spec.keys, endpoint=batch_url("chat")))
    run = _run(requests, sdk, cache)
    assert run.resumed == [created.id] and run.submitted == [] and _creates(server) == 1 and len(run.answers) == 3


def test_a_recorded_batch_the_server_does_not_know_is_sent_anew(server: OpenAITestServer, sdk: openai.OpenAI, cache: Any) -> None:
    from llmutils._batchapi import BatchJob

    requests = _requests(3)
    ledger = SQLiteLedger(cache.path)
    ledger.save(BatchJob(input_file_id="file-gone", batch_id="batch_gone", status="in_progress", keys=tuple(k for k, _ in requests)))
    run = _run(requests, sdk, cache)
    assert run.resumed == [] and len(run.submitted) == 1 and len(run.answers) == 3
    lost = ledger.find("batch_gone")
    assert lost is not None and (lost.status, lost.collected) == ("lost", True)


def test_errors_while_polling_are_retried_and_never_lose_the_batch(server: OpenAITestServer, sdk: openai.OpenAI, cache: Any) -> None:
    requests = _requests(4)
    server.batch_api.polls = 3
    waits: list[float] = []
    api = _api(sdk, waits)
    first = [True]

    def sleep(_seconds: float) -> None:
        if first[0]:
            first[0] = False
            server.batch_api.script_http(Fault.server_error(503), Fault.rate_limit(retry_after=0.01))

    run = run_batch_job(requests, api=api, cache=cache, ledger=open_ledger(cache.path), url=batch_url("chat"), sleep=sleep)
    assert len(run.answers) == 4 and len(waits) == 2
    server.reset()
    server.batch_api.polls = 3

    def fail_polls(_seconds: float) -> None:
        server.batch_api.script_http(*[Fault.server_error()] * 3)

    with pytest.raises(llmutils.RetriesExhaustedError, match="run the same command again to resume it") as info:
        run_batch_job(_requests(8)[4:], api=_api(sdk), cache=cache, ledger=open_ledger(cache.path), url=batch_url("chat"), sleep=fail_polls)
    assert server.batch_api.created[0] in str(info.value)
    run = _run(_requests(8)[4:], sdk, cache)
    assert _creates(server) == 1 and len(run.answers) == 4


def test_the_servers_wait_is_read_by_the_live_calls_rules(server: OpenAITestServer, sdk: openai.OpenAI) -> None:
    """retry-after-ms, Retry-After (seconds or an HTTP date) and LiteLLM's forwarded copies, as
    :mod:`llmutils._http` reads them for live calls; a wait past 120 s is not retried at all."""
    waits: list[float] = []
    api = _api(sdk, waits)
    server.batch_api.script_http(
        Fault.server_error(503).with_headers({"retry-after-ms": "20"}),
        Fault.server_error(502).with_headers({"llm_provider-retry-after": "0.03"}),
    )
    assert api.list() == ([], False)
    assert waits == [0.02, 0.03]
    server.batch_api.script_http(Fault.rate_limit(retry_after=300))
    with pytest.raises(llmutils.RateLimitError) as info:
        api.list()
    assert waits == [0.02, 0.03] and info.value.retry_after == 300 and info.value.retryable is False
    server.batch_api.script_http(Fault.server_error(503, should_retry=False))
    with pytest.raises(NonTerminalError) as refused:
        api.list()
    assert waits == [0.02, 0.03] and refused.value.retryable is False


def test_line_errors_and_unfinished_batches_become_per_request_errors(server: OpenAITestServer, sdk: openai.OpenAI, cache: Any) -> None:
    requests = _requests(4)
    bad_key = requests[1][0]
    server.batch_api.script(BatchOutcome(line_fault=lambda line: Fault.bad_request("bad item") if line["custom_id"] == bad_key else None))
    run = _run(requests, sdk, cache)
    batch_id = server.batch_api.created[0]
    assert set(run.errors) == {bad_key} and len(run.answers) == 3
    error = run.errors[bad_key]
    assert isinstance(error, InvalidRequestError) and error.status_code == 400 and batch_id in str(error) and "bad item" in str(error)
    assert cache.get(bad_key) is None

    server.batch_api.script(BatchOutcome("expired", answered=1))
    more = _requests(8)[4:]
    run = _run(more, sdk, cache)
    expired_id = server.batch_api.created[1]
    assert len(run.answers) == 1 and len(run.errors) == 3
    assert all(isinstance(e, BatchAPIError) and e.batch_id == expired_id and "batch_expired" in str(e) for e in run.errors.values())

    server.batch_api.script(BatchOutcome("failed"))
    run = _run(_requests(10)[8:], sdk, cache)
    assert len(run.errors) == 2 and all("failed" in str(e) and isinstance(e, BatchAPIError) for e in run.errors.values())

    server.batch_api.script(BatchOutcome("cancelled", answered=1))
    run = _run(_requests(13)[10:], sdk, cache)
    assert len(run.answers) == 1 and len(run.errors) == 2
    assert all(isinstance(e, BatchAPIError) and "batch_cancelled" in str(e) for e in run.errors.values())


def test_check_refuses_an_answer_which_is_then_not_cached(server: OpenAITestServer, sdk: openai.OpenAI, cache: Any) -> None:
    def check(body: dict[str, Any]) -> None:
        if body["choices"][0]["message"]["content"].endswith("1"):
            raise NonTerminalError("the response has no choices")

    seen: list[str] = []
    requests = _requests(3)
    run = _run(requests, sdk, cache, check=check, on_answer=lambda key, body: seen.append(key))
    assert set(run.errors) == {requests[1][0]} and cache.get(requests[1][0]) is None
    assert sorted(seen) == sorted(k for k, _ in requests if k != requests[1][0])


def test_the_split_makes_one_batch_per_limit(server: OpenAITestServer, sdk: openai.OpenAI, cache: Any) -> None:
    run = _run(_requests(10), sdk, cache, max_requests=4)
    assert len(run.submitted) == 3 and _creates(server) == 3 and len(run.answers) == 10
    jobs = [SQLiteLedger(cache.path).find(b) for b in run.submitted]
    assert sorted(j.request_count for j in jobs if j is not None) == [2, 4, 4]
    assert all(j is not None and j.collected and j.keys == () for j in jobs)  # collected: the keys are dropped


def test_a_request_too_big_for_a_batch_file_is_that_items_error(server: OpenAITestServer, sdk: openai.OpenAI, cache: Any) -> None:
    requests = _requests(3)
    requests[1][1]["messages"][0]["content"] = "x" * 5000
    run = _run(requests, sdk, cache, max_bytes=1000)
    assert set(run.errors) == {requests[1][0]} and isinstance(run.errors[requests[1][0]], BatchAPIError)
    assert len(run.answers) == 2 and len(_uploaded_lines(server)) == 2


def test_azure_paths(server: OpenAITestServer, azure_sdk: openai.AzureOpenAI, cache: Any) -> None:
    run = _run(_requests(3, model="my-batch-deployment"), azure_sdk, cache, url=batch_url("chat", azure=True))
    assert len(run.answers) == 3
    assert {json.loads(line)["url"] for r in server.requests if r.path == "/openai/files" for line in r.body["file"]["content"].splitlines()} == {"/chat/completions"}
    assert all(r.path.startswith("/openai/") for r in server.requests)
    assert not BatchAPI(azure_sdk).extras  # 2024-10-21: no expiry, no metadata
    with openai.AzureOpenAI(azure_endpoint=server.azure_endpoint, api_key="k", api_version="2025-04-01-preview") as newer:
        assert BatchAPI(newer).extras


def test_the_cache_must_be_on_and_writable(server: OpenAITestServer, sdk: openai.OpenAI, tmp_path: Path, cache: Any) -> None:
    with pytest.raises(ConfigError, match="cache on"):
        run_batch_job(_requests(1), api=_api(sdk), cache=None, ledger=open_ledger(tmp_path / "x"), url=batch_url("chat"))
    readonly = llmutils.open_cache(cache.path, mode="readonly")
    with pytest.raises(ConfigError, match="readwrite"):
        run_batch_job(_requests(1), api=_api(sdk), cache=readonly, ledger=open_ledger(cache.path), url=batch_url("chat"))
    readonly.close()
    assert server.request_count == 0


def test_a_file_that_is_not_a_cache_holds_no_ledger(tmp_path: Path) -> None:
    import sqlite3

    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(ConfigError, match="not an llmutils cache"):
        SQLiteLedger(other).jobs()


@pytest.mark.skipif(not REDIS_URL, reason="LLMUTILS_TEST_REDIS_URL is not set")
def test_the_redis_ledger_resumes_too(server: OpenAITestServer, sdk: openai.OpenAI) -> None:
    import redis

    assert REDIS_URL is not None
    redis.Redis.from_url(REDIS_URL).flushdb()
    cache = llmutils.open_cache(REDIS_URL)
    ledger = open_ledger(REDIS_URL)
    assert isinstance(ledger, RedisLedger)

    def interrupt(_seconds: float) -> None:
        raise KeyboardInterrupt

    server.batch_api.polls = 2
    try:
        with pytest.raises(KeyboardInterrupt):
            run_batch_job(_requests(3), api=_api(sdk), cache=cache, ledger=ledger, url=batch_url("chat"), sleep=interrupt)
        [open_job] = ledger.jobs(open_only=True, with_keys=True)
        assert set(open_job.keys) == {k for k, _ in _requests(3)}
        run = run_batch_job(_requests(3), api=_api(sdk), cache=cache, ledger=ledger, url=batch_url("chat"), sleep=lambda s: None)
        assert _creates(server) == 1 and len(run.answers) == 3
        [job] = ledger.jobs()
        assert job.collected and ledger.find(str(job.batch_id)) is not None
        assert ledger.find(str(job.batch_id)).request_count == 3  # type: ignore[union-attr]
    finally:
        ledger.close()
        cache.close()


# -- usage -----------------------------------------------------------------------------------------------


def test_batch_answers_cost_half() -> None:
    usage = UsageTracker(prices={"m": (2.0, 8.0)})
    usage.record("m", {"prompt_tokens": 1_000_000, "completion_tokens": 1_000_000})
    live = usage.cost()
    usage.record("m", {"prompt_tokens": 1_000_000, "completion_tokens": 1_000_000}, batch=True)
    totals = usage.totals()
    assert (totals.requests, totals.batch_requests, totals.batch_prompt_tokens) == (2, 1, 1_000_000)
    assert live == pytest.approx(10.0) and usage.cost() == pytest.approx(15.0)


# -- batch(..., via="batch-api") and the command line ---------------------------------------------------


@pytest.fixture
def fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Poll the test server every 10 ms (its clock ends a batch after a few polls)."""
    monkeypatch.setenv("LLMUTILS_BATCH_POLL_INTERVAL", "0.01")


def _client(server: OpenAITestServer, tmp_path: Path, **kwargs: Any) -> llmutils.OpenAIClient:
    return llmutils.OpenAIClient(base_url=server.base_url, api_key="k", cache_api_calls=True, cache_file_name=tmp_path / "c.sqlite", **kwargs)


def _items(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"item {i}"}] for i in range(n)]


def test_batch_via_the_batch_api_skips_cached_items_and_fills_the_cache(server: OpenAITestServer, tmp_path: Path, fast_polls: None) -> None:
    items = _items(30)
    with _client(server, tmp_path, prices={"gpt-4.1-mini": (1.0, 4.0)}) as client:
        for messages in items[:5]:
            client.send_message(messages, temperature=0)  # five answers already in the cache
        server.reset()
        results = llmutils.batch(items, client=client, via="batch-api", temperature=0)
        assert len(_uploaded_lines(server)) == 25 and _creates(server) == 1
        assert [r.content for r in results] == [f"echo: item {i}" for i in range(30)]
        assert [r.cached for r in results] == [True] * 5 + [False] * 25 and all(r.ok and r.tokens > 0 for r in results)
        totals = client.usage.totals()
        assert (totals.requests, totals.batch_requests, totals.cached_requests) == (30, 25, 5)  # 5 live sends above
        live_cost = (5 * 2 * 1.0 + 5 * 3 * 4.0) / 1e6  # the five live calls: 2 prompt words, 3 answer words each
        assert client.usage.cost() == pytest.approx(live_cost * (1 + 0.5 * 25 / 5))
        server.reset()
        # a later live call of the same request is a cache hit; so is the whole batch, live or not
        assert client.send_message(items[17], temperature=0)["content"] == "echo: item 17"
        assert client.last_call is not None and client.last_call.cached
        assert all(r.cached for r in llmutils.batch(items, client=client, via="batch-api", temperature=0))
        assert all(r.cached for r in llmutils.batch(items, client=client, temperature=0))
        assert server.request_count == 0


def test_an_expired_batch_with_fallback_live_completes_with_live_calls(server: OpenAITestServer, tmp_path: Path, fast_polls: None) -> None:
    server.batch_api.script(BatchOutcome("expired", answered=3))
    with _client(server, tmp_path) as client:
        results = llmutils.batch(_items(8), client=client, via="batch-api", fallback="live")
    assert [r.content for r in results] == [f"echo: item {i}" for i in range(8)] and all(r.ok for r in results)
    live = [r for r in server.requests if r.path == "/v1/chat/completions"]
    assert sorted(r.body["messages"][0]["content"] for r in live) == [f"item {i}" for i in range(3, 8)]
    server.batch_api.script(BatchOutcome("expired", answered=1))
    with _client(server, tmp_path / "other") as client:
        results = llmutils.batch(_items(3), client=client, via="batch-api")
    assert [r.ok for r in results] == [True, False, False]
    assert isinstance(results[1].error, BatchAPIError) and results[1].error.batch_id == server.batch_api.created[-1]


def test_a_line_error_becomes_that_items_error(server: OpenAITestServer, tmp_path: Path, fast_polls: None) -> None:
    server.batch_api.script(BatchOutcome(line_fault=lambda line: Fault.bad_request("no thanks") if "item 2" in json.dumps(line) else None))
    with _client(server, tmp_path) as client:
        results = llmutils.batch(_items(4), client=client, via="batch-api", fallback="live")
    assert [r.ok for r in results] == [True, True, False, True]
    error = results[2].error
    assert isinstance(error, InvalidRequestError) and "no thanks" in str(error) and server.batch_api.created[0] in str(error)
    assert not any(r.path == "/v1/chat/completions" for r in server.requests)  # a 400 is not worth a live retry


def test_bad_items_and_misuse_fail_before_any_request(server: OpenAITestServer, tmp_path: Path, fast_polls: None) -> None:
    with _client(server, tmp_path) as client:
        results = llmutils.batch([{"no": "template"}, *_items(1), [{"content": "no role"}]], client=client, via="batch-api")
        assert isinstance(results[0].error, InvalidRequestError) and results[1].ok
        assert isinstance(results[2].error, InvalidRequestError) and "role" in str(results[2].error)
        server.reset()
        with pytest.raises(InvalidRequestError, match="temperature must be"):
            llmutils.batch(_items(1), client=client, via="batch-api", temperature="hot")
        with pytest.raises(ConfigError, match="via must be"):
            llmutils.batch(_items(1), client=client, via="carrier-pigeon")
        with pytest.raises(ConfigError, match="fallback"):
            llmutils.batch(_items(1), client=client, fallback="live")
    with llmutils.OpenAIClient(base_url=server.base_url, api_key="k") as no_cache, pytest.raises(ConfigError, match="cache on"):
        llmutils.batch(_items(1), client=no_cache, via="batch-api")
    with pytest.raises(ConfigError, match="OpenAI or Azure"):
        llmutils.batch(_items(1), client=llmutils.MockClient(cache_api_calls=True), via="batch-api")
    assert server.request_count == 0


def test_azure_client_through_the_batch_api(server: OpenAITestServer, tmp_path: Path, fast_polls: None) -> None:
    with llmutils.AzureClient(
        azure_endpoint=server.azure_endpoint, api_key="k", api_version="2024-10-21", model="my-batch-deployment",
        cache_api_calls=True, cache_file_name=tmp_path / "c.sqlite",
    ) as client:
        results = llmutils.batch(_items(3), client=client, via="batch-api")
        assert [r.content for r in results] == [f"echo: item {i}" for i in range(3)]
        lines = _uploaded_lines(server)
        assert {line["url"] for line in lines} == {"/chat/completions"} and {line["body"]["model"] for line in lines} == {"my-batch-deployment"}
        assert all(r.path.startswith("/openai/") and r.query.get("api-version") == "2024-10-21" for r in server.requests)
        create = next(r for r in server.requests if r.method == "POST" and r.path == "/openai/batches")
        assert set(create.body) == {"input_file_id", "endpoint", "completion_window"}  # the GA version gets the bare request
        assert not any(k.startswith("expires_after") for r in server.requests if r.path == "/openai/files" for k in r.body)
        server.reset()
        assert client.send_message(_items(3)[1])["content"] == "echo: item 1" and server.request_count == 0


def _cli(server: OpenAITestServer, *args: str) -> list[str]:
    return ["--base-url", server.base_url, *args]


def test_cli_batch_via_the_batch_api_and_its_rerun(
    server: OpenAITestServer, tmp_path: Path, fast_polls: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from llmutils.cli import main

    monkeypatch.setenv("OPENAI_API_KEY", "k")
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(6)))
    server.batch_api.script(BatchOutcome(line_fault=lambda line: Fault.bad_request("bad p4") if "p4" in json.dumps(line) else None))
    code = main(["batch", "in.jsonl", "out.jsonl", *_cli(server), "--via", "batch-api", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "6 items: 5 ok, 1 failed" in err
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(6)) and records[0]["output"] == "echo: p0"
    assert records[4]["error"]["type"] == "InvalidRequestError" and "bad p4" in records[4]["error"]["message"]
    server.reset()
    code = main(["batch", "in.jsonl", "out2.jsonl", *_cli(server), "--via", "batch-api", "--fallback", "live", "--no-progress"])
    assert code == 0 and _creates(server) == 1 and len(_uploaded_lines(server)) == 1  # five from the cache, the failed one again
    assert "6 items: 6 ok, 0 failed, 5 cached" in capsys.readouterr().err

    capsys.readouterr()
    assert main(["batch-api", "list", *_cli(server)]) == 0
    out = capsys.readouterr().out
    assert "completed" in out and "collected" in out
    assert main(["batch", "in.jsonl", "out.jsonl", *_cli(server), "--fallback", "live"]) == 2


def test_cli_batch_api_status_and_cancel(
    server: OpenAITestServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from llmutils.cli import main

    monkeypatch.setenv("OPENAI_API_KEY", "k")
    server.batch_api.polls = 2
    batch_id = server_batch(server)
    assert main(["batch-api", "status", batch_id, *_cli(server)]) == 0
    assert f"{batch_id}  in_progress" in capsys.readouterr().out
    assert main(["batch-api", "cancel", batch_id, *_cli(server)]) == 0
    assert "cancelling" in capsys.readouterr().out
    assert main(["batch-api", "list", "--remote", *_cli(server)]) == 0
    assert batch_id in capsys.readouterr().out
    assert main(["batch-api", "status", "batch_nope", *_cli(server)]) == 1
    assert "404" in capsys.readouterr().err
    monkeypatch.delenv("OPENAI_API_KEY")
    assert main(["batch-api", "list", "--cache-file", str(tmp_path / "none.sqlite")]) == 0  # local: no key, no network
    assert "no Batch API jobs recorded" in capsys.readouterr().out


def server_batch(server: OpenAITestServer) -> str:
    with openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0) as sdk:
        return str(sdk.batches.create(input_file_id=_upload(sdk, _lines(2)), endpoint="/v1/chat/completions", completion_window="24h").id)


def test_cli_run_interrupted_after_submission_resumes_the_same_batch(
    server: OpenAITestServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import signal
    import subprocess
    import sys
    import time

    from llmutils.cli import main

    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(5)))
    server.batch_api.polls = 1_000_000  # the batch never ends while the first run polls
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "AZURE_", "LLMUTILS_"))}
    env.update(OPENAI_API_KEY="k", LLMUTILS_BATCH_POLL_INTERVAL="0.05", LLMUTILS_BATCH_POLL_MAX="0.05")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmutils", *_cli(server), "batch", "in.jsonl", "out.jsonl", "--via", "batch-api"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not any(r.path.startswith("/v1/batches/") for r in server.requests):  # submitted, and polling
            assert proc.poll() is None and time.monotonic() < deadline, "the run never polled its batch"
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130 and "run the same command again to resume" in err and "Traceback" not in err
    [batch_id] = server.batch_api.created
    server.batch_api.polls = 1
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    monkeypatch.setenv("LLMUTILS_BATCH_POLL_INTERVAL", "0.01")
    assert main([*_cli(server), "batch", "in.jsonl", "out.jsonl", "--via", "batch-api", "--no-progress"]) == 0
    assert server.batch_api.created == [batch_id] and _creates(server) == 1
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["output"] for r in records] == [f"echo: p{i}" for i in range(5)]


def test_duplicates_n_and_the_progress_bar(server: OpenAITestServer, tmp_path: Path, fast_polls: None, capsys: pytest.CaptureFixture[str]) -> None:
    items = _items(3) + _items(1)  # the last item repeats the first: one line, two results
    with _client(server, tmp_path) as client:
        results = llmutils.batch(items, client=client, via="batch-api", progress=True, n=2)
    assert len(_uploaded_lines(server)) == 3
    assert [r.output[1]["content"] for r in results] == ["echo: item 0 [1]", "echo: item 1 [1]", "echo: item 2 [1]", "echo: item 0 [1]"]
    err = capsys.readouterr().err
    assert "batch-api" in err and "req" in err  # the bar, drawn from the batch's request counts


def test_the_responses_api_through_the_batch_api(server: OpenAITestServer, tmp_path: Path, fast_polls: None) -> None:
    with _client(server, tmp_path) as client:
        results = llmutils.batch(_items(3), client=client, via="batch-api", api="responses")
        assert [r.content for r in results] == [f"echo: item {i}" for i in range(3)] and all(r.tokens > 0 for r in results)
        lines = _uploaded_lines(server)
        assert {line["url"] for line in lines} == {"/v1/responses"} and all("input" in line["body"] for line in lines)
        server.reset()
        # the same request live is a cache hit: same body, same key
        assert client.send_message(_items(3)[2], api="responses")["content"] == "echo: item 2" and server.request_count == 0
        assert client.usage.totals().batch_requests == 3


def test_azure_responses_go_through_the_v1_path(server: OpenAITestServer, tmp_path: Path, fast_polls: None) -> None:
    with llmutils.AzureClient(
        azure_endpoint=server.azure_endpoint, api_key="k", api_version="2024-10-21", model="my-batch-deployment",
        cache_api_calls=True, cache_file_name=tmp_path / "c.sqlite",
    ) as client:
        results = llmutils.batch(_items(2), client=client, via="batch-api", api="responses")
        assert [r.content for r in results] == ["echo: item 0", "echo: item 1"]
        assert {r.path for r in server.requests if r.method == "POST"} == {"/openai/v1/files", "/openai/v1/batches"}
        assert {line["url"] for line in _uploaded_lines(server)} == {"/v1/responses"}


def test_cli_an_expired_batch_with_fallback_live_completes_with_live_calls(
    server: OpenAITestServer, tmp_path: Path, fast_polls: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from llmutils.cli import main

    monkeypatch.setenv("OPENAI_API_KEY", "k")
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(5)))
    server.batch_api.script(BatchOutcome("expired", answered=2))
    assert main(["batch", "in.jsonl", "out.jsonl", *_cli(server), "--via", "batch-api", "--fallback", "live", "--no-progress"]) == 0
    assert "5 items: 5 ok, 0 failed" in capsys.readouterr().err
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["output"] for r in records] == [f"echo: p{i}" for i in range(5)]
    assert len([r for r in server.requests if r.path == "/v1/chat/completions"]) == 3 and _creates(server) == 1
