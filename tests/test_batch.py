"""batch() and map_calls(): input order, per-item errors, the cache on re-runs, threads, Ctrl-C."""

from __future__ import annotations

import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from llmutils import (
    AuthenticationError,
    ConfigError,
    InvalidRequestError,
    MockClient,
    NotAttemptedError,
    OpenAIClient,
    TemplateError,
    override_defaults,
)
from llmutils._batch import BatchResult, FailFast, ReorderBuffer, batch, is_connection_failure, map_calls
from llmutils.testing import Fault, OpenAITestServer


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _batch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("llmutils-batch-")]


def _join_batch_threads() -> None:
    """Wait for the workers to exit (Ctrl-C may have come while one was still being started)."""
    deadline = time.monotonic() + 5
    while _batch_threads() and time.monotonic() < deadline:
        for thread in _batch_threads():
            try:
                thread.join(max(0.0, deadline - time.monotonic()))
            except RuntimeError:  # "cannot join thread before it is started": it is starting now
                pass
    assert not _batch_threads(), "batch worker threads are still running"


def test_results_come_back_in_input_order_whatever_the_finishing_order() -> None:
    third_done = threading.Event()

    def handler(messages: list[dict[str, Any]], params: dict[str, Any]) -> str:
        text = messages[-1]["content"]
        if text == "0":
            assert third_done.wait(5)  # item 0 finishes after item 3
        if text == "3":
            third_done.set()
        return f"answer {text}"

    client = MockClient(handler=handler)
    finishing: list[int] = []
    results = map_calls(
        lambda text: client.send_message(_user(text)),
        [str(i) for i in range(8)],
        workers=4,
        client=client,
        on_result=lambda r: finishing.append(r.index),
    )
    assert [r.index for r in results] == list(range(8))
    assert [r.content for r in results] == [f"answer {i}" for i in range(8)]
    assert finishing.index(3) < finishing.index(0)
    assert all(r.ok and not r.cached and r.tokens > 0 for r in results)


def test_item_shapes_messages_dict_and_template_variables() -> None:
    client = MockClient()
    results = batch(
        [_user("plain"), {"messages": _user("wrapped"), "id": "x"}, {"text": "A story.", "max_words": 5}],
        client=client,
        user_template="summarize",
    )
    assert [r.ok for r in results] == [True, True, True]
    assert results[0].output == {"role": "assistant", "content": "echo: plain"}
    assert results[1].content == "echo: wrapped"
    assert results[2].content is not None and "at most 5 words" in results[2].content
    assert results[2].input == {"text": "A story.", "max_words": 5}


def test_template_variables_may_have_any_name(tmp_path: Path) -> None:
    (tmp_path / "hello.j2").write_text("Hello {{ name }}.", encoding="utf-8")
    items = [
        {"template_dirs": "x", "text": "A story."},  # a name batch() also takes as a keyword; unused
        {"template_dirs": "x", "system_template": "y", "client": "z", "text": "Another."},
    ]
    results = batch(items, client=MockClient(), user_template="summarize")
    assert [r.error for r in results] == [None, None]
    assert results[0].content is not None and "A story." in results[0].content
    named = batch([{"name": "Ann"}], client=MockClient(), user_template="hello", template_dirs=tmp_path)
    assert named[0].error is None and named[0].content == "echo: Hello Ann."


def test_bad_items_are_kept_as_errors_and_the_rest_goes_on() -> None:
    results = batch(
        [{"text": "no template given"}, 42, {"messages": "not a list"}, _user("fine")],
        client=MockClient(),
    )
    assert [type(r.error) for r in results] == [InvalidRequestError, InvalidRequestError, InvalidRequestError, type(None)]
    assert "no template was given" in str(results[0].error)
    assert results[3].ok and results[3].content == "echo: fine"
    missing = batch([{"text": "x"}, {"wrong": "x"}], client=MockClient(), user_template="summarize")
    assert missing[0].ok and isinstance(missing[1].error, TemplateError) and missing[1].output is None


def test_a_failing_request_is_kept_and_the_others_succeed() -> None:
    def handler(messages: list[dict[str, Any]], params: dict[str, Any]) -> str:
        if messages[-1]["content"] == "bad":
            raise InvalidRequestError("scripted failure")
        return "ok"

    results = batch([_user("a"), _user("bad"), _user("c")], client=MockClient(handler=handler), workers=3)
    assert [r.ok for r in results] == [True, False, True]
    assert isinstance(results[1].error, InvalidRequestError) and str(results[1].error) == "scripted failure"
    assert results[1].index == 1 and results[1].input == _user("bad")


def test_http_error_on_one_item_against_the_server(server: OpenAITestServer) -> None:
    server.script(Fault.bad_request("no such thing"))
    with OpenAIClient(base_url=server.base_url, api_key="k") as client:
        results = batch([_user("first"), _user("second")], client=client, workers=1)
    assert isinstance(results[0].error, InvalidRequestError) and results[0].error.status_code == 400
    assert results[1].content == "echo: second"
    assert server.request_count == 2


def test_a_bug_that_is_not_an_llmutils_error_propagates() -> None:
    def handler(messages: list[dict[str, Any]], params: dict[str, Any]) -> str:
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError, match="a bug"):
        batch([_user(str(i)) for i in range(20)], client=MockClient(handler=handler), workers=2)
    _join_batch_threads()


def test_rerun_with_the_cache_on_makes_no_network_call(server: OpenAITestServer, tmp_path: Path) -> None:
    items = [_user(f"question {i}") for i in range(10)]
    cache_file = tmp_path / "cache.sqlite"
    with OpenAIClient(base_url=server.base_url, api_key="k", cache_api_calls=True, cache_file_name=cache_file) as client:
        first = batch(items, client=client, workers=4, temperature=0)
    assert server.request_count == 10
    assert all(r.ok and not r.cached and r.tokens > 0 for r in first)
    with OpenAIClient(base_url=server.base_url, api_key="k", cache_api_calls=True, cache_file_name=cache_file) as client:
        second = batch(items, client=client, workers=4, temperature=0)
        assert client.usage.totals().cached_requests == 10 and client.usage.totals().requests == 0
    assert server.request_count == 10
    assert all(r.cached for r in second)
    assert [r.output for r in second] == [r.output for r in first]


def test_workers_run_at_the_same_time() -> None:
    workers = 4
    barrier = threading.Barrier(workers, timeout=5)  # broken (an error) unless all 4 are inside at once

    def handler(messages: list[dict[str, Any]], params: dict[str, Any]) -> str:
        barrier.wait()
        return "together"

    results = batch([_user(str(i)) for i in range(workers)], client=MockClient(handler=handler), workers=workers)
    assert [r.content for r in results] == ["together"] * workers


def test_workers_see_the_callers_context_overrides() -> None:
    models: list[str] = []

    def handler(messages: list[dict[str, Any]], params: dict[str, Any]) -> str:
        models.append(params["model"])
        return "ok"

    with override_defaults(model="context-model"):
        batch([_user("a"), _user("b")], client=MockClient(handler=handler), workers=2)
    assert models == ["context-model", "context-model"]


def test_progress_is_off_by_default_and_on_when_asked(capsys: pytest.CaptureFixture[str]) -> None:
    batch([_user("a")], client=MockClient())
    assert capsys.readouterr().err == ""
    batch([_user("a"), _user("a")], client=MockClient(), progress=True)
    err = capsys.readouterr().err
    assert "2/2" in err and "cached=0" in err and "failed=0" in err and "tokens=" in err


def test_stop_from_the_calling_thread_drops_items_not_started() -> None:
    calls: list[str] = []
    gate = threading.Event()

    def handler(messages: list[dict[str, Any]], params: dict[str, Any]) -> str:
        calls.append(messages[-1]["content"])
        if len(calls) > 1:
            assert gate.wait(5)  # in flight while the calling thread stops the run
        return "ok"

    client = MockClient(handler=handler)

    def interrupt(result: BatchResult) -> None:
        raise KeyboardInterrupt

    try:
        with pytest.raises(KeyboardInterrupt):
            map_calls(client.send_message, [_user(str(i)) for i in range(50)], workers=1, client=client, on_result=interrupt)
    finally:
        gate.set()
    _join_batch_threads()
    # The first item, and the one a worker had taken when Ctrl-C came if its call got past the retry
    # policy's check first (a stopped run sends nothing more: that call is then not attempted); no more.
    assert calls in (["0"], ["0", "1"])


@pytest.mark.skipif(sys.platform == "win32", reason="pthread_kill is POSIX")
def test_ctrl_c_returns_promptly_while_requests_hang() -> None:
    release = threading.Event()
    started: list[str] = []
    main = threading.main_thread().ident
    assert main is not None

    def handler(messages: list[dict[str, Any]], params: dict[str, Any]) -> str:
        started.append(messages[-1]["content"])
        if len(started) == 1:
            signal.pthread_kill(main, signal.SIGINT)  # a real Ctrl-C, delivered to the calling thread
        release.wait(10)
        return "late"

    t0 = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            batch([_user(str(i)) for i in range(20)], client=MockClient(handler=handler), workers=2)
        assert time.monotonic() - t0 < 3  # did not wait for the hanging requests
    finally:
        release.set()
    _join_batch_threads()
    assert len(started) <= 2  # nothing new started after Ctrl-C


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="workers"):
        batch([_user("a")], client=MockClient(), workers=0)
    assert batch([], client=MockClient()) == []


def test_default_client_is_the_configured_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMUTILS_API_TYPE", "mock")
    assert batch([_user("hi")])[0].content == "echo: hi"


# -- one bad item fails alone; fail fast; the reusable pieces --------------------------------------


def test_template_errors_on_an_items_values_fail_that_item_only(tmp_path: Path) -> None:
    (tmp_path / "share.j2").write_text("{{ text }}: {{ 100 / parts }}", encoding="utf-8")
    items: list[Any] = [
        {"text": "a", "parts": 4},
        {"text": "b", "parts": 0},
        {"text": "c", "parts": "x"},
        "not variables",
        {"text": "d", "parts": 5},
    ]
    results = batch(items, client=MockClient(), user_template="share", template_dirs=tmp_path, workers=2)
    assert [r.ok for r in results] == [True, False, False, False, True]
    assert isinstance(results[1].error, TemplateError) and "'parts' (int)" in str(results[1].error)
    assert isinstance(results[2].error, TemplateError) and "TypeError" in str(results[2].error)
    assert isinstance(results[3].error, InvalidRequestError)
    assert results[4].content == "echo: d: 20.0"


def test_a_missing_template_raises_before_any_request(server: OpenAITestServer) -> None:
    with OpenAIClient(base_url=server.base_url, api_key="k") as client:
        with pytest.raises(TemplateError, match="'summarise' not found"):
            batch([_user("own messages"), {"text": "x"}], client=client, user_template="summarise")
    assert server.request_count == 0


def test_fail_fast_after_an_authentication_error(
    server: OpenAITestServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(server, "api_key", "right")
    seen: list[int] = []
    with OpenAIClient(base_url=server.base_url, api_key="wrong") as client:
        results = batch([_user(str(i)) for i in range(30)], client=client, workers=3, on_result=lambda r: seen.append(r.index))
    assert server.request_count <= 3  # the first 401 stops every worker before it takes another item
    assert [r.index for r in results] == list(range(30)) and sorted(seen) == list(range(30))
    failed = [r for r in results if r.attempted]
    assert len(failed) == server.request_count and all(isinstance(r.error, AuthenticationError) for r in failed)
    skipped = [r for r in results if not r.attempted]
    assert len(skipped) == 30 - server.request_count
    assert all(isinstance(r.error, NotAttemptedError) and "AuthenticationError" in r.error.reason for r in skipped)
    warnings = [r.getMessage() for r in caplog.records if "stopped early" in r.getMessage()]
    assert len(warnings) == 1 and f"{len(skipped)} of 30 items not attempted" in warnings[0]


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


@pytest.mark.parametrize(("limit", "expected_attempted"), [(None, 12), (0, 12), (1, 1), (4, 4)])
def test_fail_fast_after_n_connection_failures_in_a_row(limit: int | None, expected_attempted: int) -> None:
    with OpenAIClient(base_url=_closed_port_url(), api_key="k") as client:
        results = batch([_user(str(i)) for i in range(12)], client=client, workers=1, max_connection_failures=limit, max_attempts=1)
    assert sum(r.attempted for r in results) == expected_attempted
    assert all(is_connection_failure(r.error) for r in results if r.attempted and r.error is not None)
    assert all(isinstance(r.error, NotAttemptedError) for r in results if not r.attempted)
    with pytest.raises(ConfigError, match="max_connection_failures"):
        batch([_user("a")], client=MockClient(), max_connection_failures=-1)


def test_the_default_is_five_connection_failures() -> None:
    with OpenAIClient(base_url=_closed_port_url(), api_key="k") as client:
        results = batch([_user(str(i)) for i in range(9)], client=client, workers=1, max_attempts=1)
    assert sum(r.attempted for r in results) == 5


def test_a_dead_endpoint_stops_the_batch_promptly_items_in_flight_included(caplog: pytest.LogCaptureFixture) -> None:
    """The default retries (5 attempts, backoff from 1 s) on 8 workers: each failed attempt counts, and
    once the rule trips the items in flight leave their backoff sleep at once (was 33 s for 20 items)."""
    started = time.monotonic()
    with OpenAIClient(base_url=_closed_port_url(), api_key="k") as client:
        results = batch([_user(str(i)) for i in range(20)], client=client, workers=8)
    elapsed = time.monotonic() - started
    assert elapsed < 10, f"took {elapsed:.1f}s"  # start-up and one backoff at most; 33 s when each item ran 5 attempts
    assert [r.index for r in results] == list(range(20)) and not any(r.ok for r in results)
    in_flight = [r for r in results if r.attempted]
    assert 1 <= len(in_flight) <= 8 and all(is_connection_failure(r.error) for r in in_flight)
    assert all("not retried because the batch stopped early: 5 connection failures in a row" in str(r.error)
               for r in in_flight if r.error.attempts < 5)
    assert all(isinstance(r.error, NotAttemptedError) for r in results if not r.attempted)
    stopped = [r.getMessage() for r in caplog.records if "stopped early" in r.getMessage()]
    assert len(stopped) == 1 and stopped[0].startswith("batch stopped early: 5 connection failures in a row")


def test_each_failed_attempt_counts_toward_fail_fast() -> None:
    """One item's own retries count: with 3 allowed, the first item stops the batch after its 3rd attempt."""
    from llmutils import RetriesExhaustedError, RetryPolicy

    waits: list[float] = []
    policy = RetryPolicy(max_attempts=5, waiting_time=1, jitter=0, sleep=waits.append)
    with OpenAIClient(base_url=_closed_port_url(), api_key="k", retry=policy) as client:
        results = batch([_user(str(i)) for i in range(4)], client=client, workers=1, max_connection_failures=3)
    first, *rest = results
    assert isinstance(first.error, RetriesExhaustedError) and first.error.attempts == 3 and waits == [1, 2]
    assert "not retried because the batch stopped early: 3 connection failures in a row" in str(first.error)
    assert all(isinstance(r.error, NotAttemptedError) for r in rest)


def test_an_http_answer_between_attempts_resets_the_count(server: OpenAITestServer) -> None:
    from llmutils._exceptions import NonTerminalError

    connection = NonTerminalError("connection error")
    connection.__cause__ = ConnectionRefusedError(111, "refused")
    rule = FailFast(max_connection_failures=2)
    assert rule.observe_attempt(connection) is False
    assert rule.observe_attempt(NonTerminalError("HTTP 503", status_code=503)) is False  # the server answered
    assert rule.observe_attempt(connection) is False
    assert rule.observe(BatchResult(0, None, error=connection)) is False  # counted already, as an attempt
    other = NonTerminalError("connection error")
    other.__cause__ = ConnectionRefusedError(111, "refused")
    assert rule.observe_attempt(other) is True and rule.reason is not None
    assert rule.reason.startswith("2 connection failures in a row")


def test_fail_fast_rule_counts_only_connection_failures_in_a_row(server: OpenAITestServer) -> None:
    from llmutils import RetriesExhaustedError

    connection = RetriesExhaustedError("gave up")
    connection.__cause__ = ConnectionRefusedError(111, "refused")
    http_error = InvalidRequestError("HTTP 400", status_code=400)
    rule = FailFast(max_connection_failures=2)
    assert rule.observe(BatchResult(0, None, error=connection)) is False
    assert rule.observe(BatchResult(1, None, output="x", cached=True)) is False  # a cache hit proves nothing
    assert rule.observe(BatchResult(2, None, error=http_error)) is False  # the server answered: count reset
    assert rule.observe(BatchResult(3, None, error=connection)) is False
    assert rule.observe(BatchResult(4, None, error=TemplateError("bad"))) is False  # failed before sending
    assert rule.observe(BatchResult(5, None, error=connection)) is True
    assert rule.reason is not None and rule.reason.startswith("2 connection failures in a row")
    assert rule.observe(BatchResult(6, None, error=AuthenticationError("no"))) is False  # says so once
    assert not is_connection_failure(http_error) and is_connection_failure(connection)


def test_reorder_buffer_hands_results_out_in_input_order() -> None:
    buffer = ReorderBuffer()
    assert buffer.push(BatchResult(2, "c")) == [] and buffer.push(BatchResult(1, "b")) == []
    assert len(buffer) == 2 and buffer.next_index == 0
    assert [r.index for r in buffer.push(BatchResult(0, "a"))] == [0, 1, 2]
    assert buffer.push(BatchResult(4, "e")) == [] and buffer.push(BatchResult(6, "g")) == []
    assert [r.index for r in buffer.drain()] == [4, 6] and len(buffer) == 0
    with pytest.raises(ValueError, match="already pushed"):
        buffer.push(BatchResult(1, "b"))


def test_progress_bar_prints_log_lines_above_itself(capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("LOG %(message)s"))
    llm_logger = logging.getLogger("llmutils")
    llm_logger.addHandler(handler)

    def handler_fn(messages: list[dict[str, Any]], params: dict[str, Any]) -> str:
        logging.getLogger("llmutils").warning("inside item %s", messages[-1]["content"])
        return "ok"

    try:
        batch([_user("a"), _user("b")], client=MockClient(handler=handler_fn), progress=True, workers=1)
    finally:
        llm_logger.removeHandler(handler)
    assert llm_logger.handlers == [] or handler not in llm_logger.handlers
    err = capsys.readouterr().err
    segments = [s for s in err.replace("\r", "\n").split("\n") if "LOG" in s]
    assert segments == ["LOG inside item a", "LOG inside item b"], err
