"""The clients against the local OpenAI-wire server: round trips, errors, retries, threads."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import llmutils
from llmutils import (
    AuthenticationError,
    AzureClient,
    ContentFilterError,
    InvalidRequestError,
    NonTerminalError,
    OpenAIClient,
    QuotaExceededError,
    RateLimitError,
    RetriesExhaustedError,
    RetryPolicy,
    TotalTimeoutError,
)
from llmutils.testing import Fault, OpenAITestServer

HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture
def waits() -> list[float]:
    return []


@pytest.fixture
def oai(server: OpenAITestServer, waits: list[float]) -> Iterator[OpenAIClient]:
    """An OpenAI client on the local server whose backoff is recorded, not slept, and has no jitter."""
    policy = RetryPolicy(max_attempts=4, waiting_time=1.0, backoff_factor=2.0, jitter=0, sleep=waits.append)
    with OpenAIClient(base_url=server.base_url, api_key="sk-test-secret", retry=policy) as client:
        yield client


@pytest.fixture
def azure(server: OpenAITestServer) -> Iterator[AzureClient]:
    with AzureClient(azure_endpoint=server.azure_endpoint, api_key="az-secret", model="my-deployment") as client:
        yield client


def test_openai_round_trip(oai: OpenAIClient, server: OpenAITestServer) -> None:
    assert oai.send_message(HELLO, temperature=0.2, seed=7) == {"role": "assistant", "content": "echo: hello"}
    request = server.requests[-1]
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-test-secret"
    assert request.body["temperature"] == 0.2 and request.body["seed"] == 7
    assert request.body["model"] == llmutils.DEFAULTS["MODEL"]


def test_embedding_round_trip(oai: OpenAIClient, server: OpenAITestServer) -> None:
    vector = oai.get_embedding("some text")
    assert isinstance(vector, list) and len(vector) == 8 and all(isinstance(x, float) for x in vector)
    assert server.requests[-1].body["model"] == "text-embedding-3-small"
    assert oai.get_embeddings(["a", "some text"])[1] == vector


def test_azure_round_trip_uses_deployment_path(azure: AzureClient, server: OpenAITestServer) -> None:
    assert azure.send_message(HELLO)["content"] == "echo: hello"
    request = server.requests[-1]
    assert request.deployment == "my-deployment"
    assert request.query["api-version"] == llmutils.DEFAULTS["AZURE_API_VERSION"]
    assert request.headers["api-key"] == "az-secret"
    assert len(azure.get_embedding("x", model="emb-deployment")) == 8
    assert server.requests[-1].deployment == "emb-deployment"


def test_azure_token_provider_without_key(server: OpenAITestServer) -> None:
    with AzureClient(azure_endpoint=server.azure_endpoint, azure_ad_token_provider=lambda: "entra-token") as client:
        client.send_message(HELLO)
    assert server.requests[-1].headers["authorization"] == "Bearer entra-token"


def test_azure_key_from_older_env_var(server: OpenAITestServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZURE_OPENAI_KEY", "old-name-key")
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", server.azure_endpoint)
    monkeypatch.setenv("OPENAI_API_VERSION", "2025-01-01-preview")
    with AzureClient() as client:
        client.send_message(HELLO)
    assert server.requests[-1].headers["api-key"] == "old-name-key"
    assert server.requests[-1].query["api-version"] == "2025-01-01-preview"


def test_n_greater_than_one_returns_every_choice(oai: OpenAIClient) -> None:
    answers = oai.send_message(HELLO, n=3)
    assert [a["content"] for a in answers] == ["echo: hello", "echo: hello [1]", "echo: hello [2]"]


def test_tool_calls_are_returned(oai: OpenAIClient) -> None:
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}]
    message = oai.send_message([{"role": "user", "content": "call it"}], tools=tools)
    assert message["content"] is None
    assert message["tool_calls"][0]["function"]["name"] == "lookup"


def test_reasoning_model_gets_only_what_it_accepts(oai: OpenAIClient, server: OpenAITestServer) -> None:
    oai.send_message(HELLO, model="o4-mini", temperature=0.5, max_tokens=300, reasoning_effort="low")
    body = server.requests[-1].body
    assert body["max_completion_tokens"] == 300 and body["reasoning_effort"] == "low"
    for rejected in ("temperature", "top_p", "max_tokens", "frequency_penalty", "presence_penalty"):
        assert rejected not in body


def test_json_mode_passes_response_format(oai: OpenAIClient, server: OpenAITestServer) -> None:
    message = oai.send_message(HELLO, response_format={"type": "json_object"})
    assert message["content"] == '{"echo": "hello"}'
    assert server.requests[-1].body["response_format"] == {"type": "json_object"}


@pytest.mark.parametrize(
    "bad, culprit",
    [
        ("hello", "got str"),
        ([], "non-empty list"),
        (["hello"], "messages[0] must be a dict"),
        ([{"content": "no role"}], "messages[0] has no 'role'"),
    ],
)
def test_bad_messages_fail_before_any_request(oai: OpenAIClient, server: OpenAITestServer, bad: object, culprit: str) -> None:
    with pytest.raises(InvalidRequestError, match=culprit.replace("[", r"\[").replace("]", r"\]")):
        oai.send_message(bad)  # type: ignore[arg-type]
    assert server.request_count == 0


@pytest.mark.parametrize("name", ["temperature", "max_tokens", "timeout", "waiting_time", "exponential_backoff_factor", "stop"])
def test_bad_parameter_type_fails_before_any_request(oai: OpenAIClient, server: OpenAITestServer, name: str) -> None:
    with pytest.raises(InvalidRequestError, match=name):
        oai.send_message(HELLO, **{name: {"not": "right"}})
    assert server.request_count == 0


@pytest.mark.parametrize(
    "fault", [Fault.rate_limit(), Fault.server_error(), Fault.server_error(503), Fault.status(408), Fault.not_json(), Fault.html()]
)
def test_retryable_failure_then_success(oai: OpenAIClient, server: OpenAITestServer, waits: list[float], fault: Fault) -> None:
    server.script(fault)
    assert oai.send_message(HELLO)["content"] == "echo: hello"
    assert server.request_count == 2
    assert waits == [1.0]


def test_timeout_is_retried(server: OpenAITestServer, waits: list[float]) -> None:
    server.script(Fault.slow(2.0))
    policy = RetryPolicy(max_attempts=2, jitter=0, sleep=waits.append)
    with OpenAIClient(base_url=server.base_url, api_key="k", retry=policy) as client:
        assert client.send_message(HELLO, timeout=0.3)["content"] == "echo: hello"
    assert server.request_count == 2


def test_backoff_grows_and_is_capped(oai: OpenAIClient, server: OpenAITestServer, waits: list[float]) -> None:
    server.script(*[Fault.server_error()] * 3)
    oai.send_message(HELLO, waiting_time=2, exponential_backoff_factor=3)
    assert waits == [2.0, 6.0, 8.0]  # MAX_WAIT defaults to the SDK's cap of one backoff wait


@pytest.mark.parametrize(
    "fault, error",
    [
        (Fault.bad_request(), InvalidRequestError),
        (Fault.status(404), InvalidRequestError),
        (Fault.status(422), InvalidRequestError),
        (Fault.unauthorized(), AuthenticationError),
        (Fault.status(403), AuthenticationError),
        (Fault.insufficient_quota(), QuotaExceededError),
        (Fault.content_filter(), ContentFilterError),
    ],
)
def test_terminal_errors_send_exactly_one_request(
    oai: OpenAIClient, server: OpenAITestServer, waits: list[float], fault: Fault, error: type
) -> None:
    server.script(fault)
    with pytest.raises(error) as info:
        oai.send_message(HELLO)
    assert server.request_count == 1 and waits == []
    assert info.value.status_code == fault.status_code
    assert info.value.request_id and info.value.request_id.startswith("req_")
    assert info.value.attempts == 1


def test_authentication_error_names_the_source_never_the_key(oai: OpenAIClient, server: OpenAITestServer) -> None:
    server.script(Fault.unauthorized())
    with pytest.raises(AuthenticationError) as info:
        oai.send_message(HELLO)
    text = str(info.value)
    assert "api_key argument" in text and server.base_url in text
    assert "sk-test-secret" not in text and "sk-test-secret" not in repr(oai)


def test_missing_key_fails_before_any_request(server: OpenAITestServer) -> None:
    with pytest.raises(AuthenticationError, match="OPENAI_API_KEY"):
        OpenAIClient().send_message(HELLO)
    assert server.request_count == 0


def test_retry_after_is_honoured(oai: OpenAIClient, server: OpenAITestServer, waits: list[float]) -> None:
    server.script(Fault.rate_limit(retry_after=7), Fault.rate_limit(retry_after_ms=250))
    oai.send_message(HELLO)
    assert waits == [7.0, 0.25]


def test_retry_after_is_not_capped_by_max_wait(server: OpenAITestServer, waits: list[float]) -> None:
    server.script(Fault.rate_limit(retry_after=100))  # obeyed in full up to 120 s, as the SDK does
    policy = RetryPolicy(max_wait=20, jitter=0, sleep=waits.append)
    with OpenAIClient(base_url=server.base_url, api_key="k", retry=policy) as client:
        client.send_message(HELLO)
    assert waits == [100.0]


def test_retry_after_beyond_total_timeout_fails_at_once(oai: OpenAIClient, server: OpenAITestServer, waits: list[float]) -> None:
    server.script(Fault.rate_limit(retry_after=30))
    with pytest.raises(TotalTimeoutError) as info:
        oai.send_message(HELLO, total_timeout=5)
    assert server.request_count == 1 and waits == []
    assert isinstance(info.value.__cause__, RateLimitError)


def test_total_timeout_bounds_slow_attempts(server: OpenAITestServer) -> None:
    server.script(Fault.slow(5), Fault.slow(5), Fault.slow(5))
    with OpenAIClient(base_url=server.base_url, api_key="k", retry=RetryPolicy(max_attempts=10, waiting_time=0.01, jitter=0)) as client:
        with pytest.raises(TotalTimeoutError) as info:
            client.send_message(HELLO, timeout=60, total_timeout=0.5)
    assert isinstance(info.value, RetriesExhaustedError)
    assert info.value.attempts is not None and info.value.attempts < 10


def test_retries_exhausted_chains_the_last_error(oai: OpenAIClient, server: OpenAITestServer, waits: list[float]) -> None:
    server.script(*[Fault.server_error(502)] * 4)
    with pytest.raises(RetriesExhaustedError) as info:
        oai.send_message(HELLO)
    assert info.value.attempts == 4 and server.request_count == 4
    assert isinstance(info.value.__cause__, NonTerminalError)
    assert info.value.__cause__.status_code == 502
    assert waits == [1.0, 2.0, 4.0]


def test_each_retry_logs_a_warning(oai: OpenAIClient, server: OpenAITestServer, caplog: pytest.LogCaptureFixture) -> None:
    server.script(Fault.server_error(), Fault.rate_limit())
    with caplog.at_level("WARNING", logger="llmutils"):
        oai.send_message(HELLO)
    retries = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert [r.getMessage().split()[:2] for r in retries] == [["attempt", "1"], ["attempt", "2"]]
    assert "429" in retries[1].getMessage()


def test_sixteen_threads_share_one_client(oai: OpenAIClient, server: OpenAITestServer) -> None:
    results: dict[int, object] = {}
    barrier = threading.Barrier(16)

    def work(i: int) -> None:
        barrier.wait()
        for j in range(5):
            answer = oai.send_message([{"role": "user", "content": f"question {i}-{j}"}])
            results[(i, j)] = answer["content"]  # type: ignore[index]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {(i, j): f"echo: question {i}-{j}" for i in range(16) for j in range(5)}
    assert server.request_count == 80
    assert len(oai._sdk_clients) == 1


def test_sdk_client_is_not_shared_across_fork(oai: OpenAIClient) -> None:
    oai.send_message(HELLO)
    parent_sdk = next(iter(oai._sdk_clients.values()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # child: must build its own SDK client and still work
        code = 1
        try:
            answer = oai.send_message([{"role": "user", "content": "from child"}])
            fresh = next(iter(oai._sdk_clients.values())) is not parent_sdk
            code = 0 if answer["content"] == "echo: from child" and fresh else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert oai.send_message(HELLO)["content"] == "echo: hello"


def test_import_does_not_import_openai_or_tiktoken() -> None:
    code = "import sys, llmutils; print('openai' in sys.modules, 'tiktoken' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.split() == ["False", "False"]


def test_stream_is_refused(oai: OpenAIClient) -> None:
    with pytest.raises(InvalidRequestError, match="stream"):
        oai.send_message(HELLO, stream=True)


def test_custom_compatible_endpoint_needs_no_key(server: OpenAITestServer) -> None:
    with OpenAIClient(base_url=server.base_url, model="llama3.2") as local:
        assert local.send_message(HELLO)["content"] == "echo: hello"
    assert server.requests[-1].body["model"] == "llama3.2"


def test_mock_client_echoes_and_scripts() -> None:
    mock = llmutils.MockClient(answers=["first", {"role": "assistant", "content": "second"}])
    assert mock.send_message(HELLO)["content"] == "first"
    assert mock.send_message(HELLO)["content"] == "second"
    assert mock.send_message(HELLO) == {"role": "assistant", "content": "echo: hello"}
    assert [m["content"] for m in mock.send_message(HELLO, n=2)] == ["echo: hello", "echo: hello [1]"]
    assert mock.get_embedding("x") == mock.get_embedding("x")
    assert mock.calls == 6


@pytest.mark.parametrize(
    "kwargs, culprit",
    [({"n": None}, "n must be"), ({"n": 0}, "n must be"), ({"timeout": -1}, "timeout must be > 0"),
     ({"total_timeout": 0}, "total_timeout must be > 0"), ({"max_attempts": 0}, "max_attempts must be > 0"),
     ({"total_timeout": float("nan")}, "total_timeout must be > 0"), ({"timeout": float("inf")}, "timeout must be > 0")],
)
def test_bad_counts_and_durations_fail_before_any_request(oai: OpenAIClient, server: OpenAITestServer, kwargs: dict, culprit: str) -> None:
    with pytest.raises(InvalidRequestError, match=culprit):
        oai.send_message(HELLO, **kwargs)
    assert server.request_count == 0


def test_unserialisable_content_is_an_invalid_request(oai: OpenAIClient, server: OpenAITestServer) -> None:
    with pytest.raises(InvalidRequestError):
        oai.send_message([{"role": "user", "content": object()}])
    assert server.request_count == 0


@pytest.mark.parametrize("url", ["localhost:8000/v1", "http://[::1/v1", "ftp://example.com/v1", "http://"])
def test_bad_base_url_fails_at_once(url: str) -> None:
    with pytest.raises(llmutils.ConfigError, match="BASE_URL"):
        OpenAIClient(base_url=url)
    with pytest.raises(llmutils.ConfigError, match="AZURE_ENDPOINT"):
        AzureClient(azure_endpoint=url)


@pytest.mark.parametrize(
    "body",
    [{"id": "x", "choices": []}, {"id": "x", "choices": [1]}, {"id": "x"}, [1, 2]],
    ids=["no-choices", "choice-not-a-dict", "no-choices-key", "not-an-object"],
)
def test_malformed_chat_response_is_retried(oai: OpenAIClient, server: OpenAITestServer, body: object) -> None:
    server.script(Fault.status(200, body=body))
    assert oai.send_message(HELLO)["content"] == "echo: hello"
    assert server.request_count == 2


def test_malformed_embedding_response_is_retried(oai: OpenAIClient, server: OpenAITestServer) -> None:
    server.script(Fault.status(200, body={"object": "list", "data": [{"index": 0}]}))
    assert len(oai.get_embedding("x")) == 8
    assert server.request_count == 2


def test_content_filtered_answer_is_terminal(oai: OpenAIClient, server: OpenAITestServer) -> None:
    server.chat_handler = lambda body: {
        "id": "x", "object": "chat.completion", "model": body["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": None}, "finish_reason": "content_filter"}],
    }
    with pytest.raises(ContentFilterError):
        oai.send_message(HELLO)
    assert server.request_count == 1


def test_total_timeout_bounds_the_wait_for_a_call_slot(server: OpenAITestServer) -> None:
    inside, release = threading.Event(), threading.Event()

    def hold(body: dict) -> str:
        inside.set()
        release.wait(10)
        return "done"

    server.chat_handler = hold
    with OpenAIClient(base_url=server.base_url, api_key="k", max_concurrent_calls=1) as client:
        first = threading.Thread(target=client.send_message, args=(HELLO,))
        first.start()
        assert inside.wait(10)
        try:
            with pytest.raises(TotalTimeoutError, match="MAX_CONCURRENT_MODEL_CALLS"):
                client.send_message([{"role": "user", "content": "other"}], total_timeout=0.2)
        finally:
            release.set()
            first.join()
    assert server.request_count == 1


def test_total_timeout_bounds_the_wait_for_an_identical_request(server: OpenAITestServer, tmp_path) -> None:
    inside, release = threading.Event(), threading.Event()

    def hold(body: dict) -> str:
        inside.set()
        release.wait(10)
        return "done"

    server.chat_handler = hold
    with OpenAIClient(base_url=server.base_url, api_key="k", cache_api_calls=True, cache_file_name=tmp_path / "c.sqlite") as client:
        first = threading.Thread(target=client.send_message, args=(HELLO,))
        first.start()
        assert inside.wait(10)
        try:
            with pytest.raises(TotalTimeoutError, match="identical request"):
                client.send_message(HELLO, total_timeout=0.2)
        finally:
            release.set()
            first.join()
    assert server.request_count == 1


def test_fork_while_a_request_is_in_flight_does_not_hang_the_child(server: OpenAITestServer, tmp_path) -> None:
    inside, release = threading.Event(), threading.Event()
    calls = []

    def hold_first(body: dict) -> str:
        calls.append(1)
        if len(calls) == 1:
            inside.set()
            release.wait(10)
        return "answer"

    server.chat_handler = hold_first
    client = OpenAIClient(base_url=server.base_url, api_key="k", cache_api_calls=True, cache_file_name=tmp_path / "c.sqlite")
    first = threading.Thread(target=client.send_message, args=(HELLO,))
    first.start()
    assert inside.wait(10)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = 0 if client.send_message(HELLO, total_timeout=20)["content"] == "answer" else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        release.set()
        first.join()
        client.close()


def test_repr_without_an_endpoint_and_with_a_password_in_the_url(server: OpenAITestServer) -> None:
    assert "not configured" in repr(AzureClient())
    url = server.base_url.replace("http://", "http://user:hunter2@")
    with OpenAIClient(base_url=url, api_key="k") as client:
        server.script(Fault.unauthorized())
        with pytest.raises(AuthenticationError) as info:
            client.send_message(HELLO)
        assert "hunter2" not in str(info.value) and "hunter2" not in repr(client)
        assert "***" in str(info.value)


def test_azure_deployment_of_a_reasoning_model_via_aliases(server: OpenAITestServer) -> None:
    llmutils.force_default_value("MODEL_ALIASES", "prod-reasoner=o3-mini")
    with AzureClient(azure_endpoint=server.azure_endpoint, api_key="k") as client:
        client.send_message(HELLO, model="prod-reasoner", temperature=0.3, max_tokens=99)
    body = server.requests[-1].body
    assert "temperature" not in body and body["max_completion_tokens"] == 99


@pytest.mark.parametrize(
    ("key", "problem"),
    [("sk-test-secret-1234\n", "newline"), (" sk-test-secret-1234", "spaces"), ("sk-test secret-1234", "whitespace inside")],
)
def test_a_key_with_whitespace_is_rejected_before_any_request(
    server: OpenAITestServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, key: str, problem: str
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", key)
    with OpenAIClient(base_url=server.base_url) as client, pytest.raises(AuthenticationError) as info:
        client.send_message(HELLO)
    message = str(info.value)
    assert "OPENAI_API_KEY environment variable" in message and problem in message
    assert "secret" not in message and "1234" not in message and "secret" not in caplog.text
    assert server.request_count == 0
    with OpenAIClient(base_url=server.base_url, api_key=key) as client, pytest.raises(AuthenticationError, match="the api_key argument"):
        client.get_embedding("x")
    assert server.request_count == 0


def test_a_server_message_quoting_part_of_the_key_is_scrubbed(server: OpenAITestServer, caplog: pytest.LogCaptureFixture) -> None:
    key = "sk-proj-abcdefghijklmnop1234"
    quoted = f"Incorrect API key provided: {key[:6]}**************{key[-4:]}. You can find your API key at https://platform.openai.com/account/api-keys."
    server.script(Fault.status(401, body={"error": {"message": quoted, "type": "invalid_request_error", "code": "invalid_api_key"}}))
    with OpenAIClient(base_url=server.base_url, api_key=key) as client, pytest.raises(AuthenticationError) as info:
        client.send_message(HELLO)
    shown = [str(info.value), str(info.value.__cause__), repr(info.value.__cause__), caplog.text]
    for text in shown:
        assert key[:6] not in text and key[-4:] not in text
    assert "Incorrect API key provided: ***." in str(info.value)


FORK_MID_IMPORT = """
import faulthandler, os, sys, threading, time
import llmutils
from llmutils.testing import OpenAITestServer

with OpenAITestServer() as server:
    client = llmutils.OpenAIClient(base_url=server.base_url, api_key="k")
    hello = [{"role": "user", "content": "hi"}]
    first = threading.Thread(target=client.send_message, args=(hello,))
    first.start()  # its first call imports openai, builds the SDK, detects the platform...
    end = time.monotonic() + 30
    while "openai" not in sys.modules and time.monotonic() < end:
        time.sleep(0.0005)
    pid = os.fork()  # ...and the fork comes in the middle of that
    if pid == 0:
        faulthandler.dump_traceback_later(90, exit=True)  # a hung child exits 1 with its stack
        code = 1
        try:
            code = 0 if client.send_message(hello, total_timeout=60)["content"] == "echo: hi" else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    first.join()
    print(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_fork_during_the_first_call_leaves_a_working_child() -> None:
    done = subprocess.run([sys.executable, "-c", FORK_MID_IMPORT], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0 and done.stdout.strip() == "0", done.stdout + done.stderr[-3000:]


def _nested(depth: int) -> object:
    value: object = "hi"
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("cache", [False, True])
def test_messages_nested_thousands_deep_are_an_invalid_request(server: OpenAITestServer, tmp_path, cache: bool) -> None:
    deep = [{"role": "user", "content": _nested(5000)}]
    with OpenAIClient(base_url=server.base_url, api_key="k", cache_api_calls=cache, cache_file_name=tmp_path / "c.sqlite") as client:
        with pytest.raises(InvalidRequestError, match="nested too deeply"):
            client.send_message(deep)
        with pytest.raises(InvalidRequestError, match="nested too deeply"):
            llmutils.MockClient().send_message(deep)
        assert client.send_message(HELLO)["content"] == "echo: hello"  # the client still works
    assert server.request_count == 1


def test_n_is_capped_at_the_apis_limit(server: OpenAITestServer) -> None:
    with pytest.raises(InvalidRequestError, match="n must be an int from 1 to 128"):
        llmutils.MockClient().send_message(HELLO, n=10**6)
    assert len(llmutils.MockClient().send_message(HELLO, n=128)) == 128


@pytest.mark.parametrize("texts", [None, 3, object(), "one string", [], ["ok", 3]])
def test_texts_that_are_not_a_list_of_str_are_an_invalid_request(texts: object) -> None:
    with pytest.raises(InvalidRequestError, match="texts must be a non-empty list of str"):
        llmutils.MockClient().get_embeddings(texts)  # type: ignore[arg-type]


# -- build_request and the other seams (for code that sends another way, e.g. the Batch API) ----------


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_build_request_is_the_body_and_key_send_message_uses(
    server: OpenAITestServer, tmp_path: Path, api: str
) -> None:
    args: dict[str, Any] = {"model": "gpt-4.1-mini", "temperature": 0.5, "max_tokens": 20, "stop": ["END"], "seed": 7}
    args["timeout"] = 30  # how to send: not part of the request
    path = "/chat/completions" if api == "chat" else "/responses"
    cache = tmp_path / "c.sqlite"
    with OpenAIClient(base_url=server.base_url, api_key="k", cache_api_calls=True, cache_file_name=cache) as client:
        request = client.build_request(HELLO, api=api, **args)
        assert server.request_count == 0 and client.cache_stats().misses == 0  # nothing sent, nothing looked up
        assert (request.kind, request.path, request.endpoint) == (api, path, server.base_url)
        client.send_message(HELLO, api=api, **args)
        sent = server.requests[-1]
        assert sent.path == "/v1" + request.path and sent.body == request.body
        backend = client.cache_backend()
        assert backend is not None and backend.get(request.cache_key) is not None  # stored under that key
        client.send_message(HELLO, api=api, **args)
        assert client.last_call is not None and client.last_call.cached and server.request_count == 1


def test_build_request_checks_its_arguments_as_send_message_does() -> None:
    mock = llmutils.MockClient()
    cases: list[tuple[Any, dict[str, Any], str]] = [
        ([], {}, "non-empty list"),
        ([{"content": "no role"}], {}, "role"),
        ([{"type": "message", "content": "an item"}], {"api": "chat"}, "role"),
        (HELLO, {"temperature": "hot"}, "temperature must be"),
        (HELLO, {"n": 0}, "n must be"),
        (HELLO, {"n": 2, "api": "responses"}, "n"),
        (HELLO, {"stream": True}, "stream=True"),
        (HELLO, {"api": "completions"}, "api must be"),
        (HELLO, {"response_format": object()}, "JSON"),
    ]
    for messages, kwargs, match in cases:
        with pytest.raises(InvalidRequestError, match=match):
            mock.build_request(messages, **kwargs)
    assert mock.calls == 0
    item = {"type": "message", "role": "user", "content": "x"}
    assert mock.build_request([item], api="responses").kind == "responses"


def test_the_seams_are_the_clients_own(server: OpenAITestServer, tmp_path: Path) -> None:
    recorded: list[float] = []
    policy = RetryPolicy(max_attempts=2, sleep=recorded.append)
    with OpenAIClient(base_url=server.base_url, api_key="k", retry=policy) as client:
        sdk = client.sdk_client()
        assert sdk is client.sdk_client() and str(sdk.base_url).rstrip("/") == server.base_url
        assert sdk.files.list().data == [] and server.requests[-1].path == "/v1/files"  # the client's key and endpoint
        resolved = client.retry_policy()
        assert resolved.max_attempts == 2 and resolved.sleep == recorded.append
        assert resolved.max_wait == llmutils.DEFAULTS["MAX_WAIT"]  # the configuration under the injected policy
        assert client.cache_backend() is None  # the cache is off by default
        client.set_api_cache(True, tmp_path / "c.sqlite")
        cache = client.cache_backend()
        assert cache is not None and cache is client.cache_backend() and str(cache.path) == str(tmp_path / "c.sqlite")
    assert OpenAIClient(base_url="http://user:pw@127.0.0.1:1/v1", api_key="k").endpoint_url() == "http://user:***@127.0.0.1:1/v1"
    azure = AzureClient(azure_endpoint=server.azure_endpoint, api_key="k", model="d")
    assert str(azure.sdk_client("/responses").base_url).endswith("/openai/v1/")  # Responses: Azure's v1 path
    assert azure.sdk_client() is not azure.sdk_client("/responses")
    with pytest.raises(llmutils.ConfigError, match="no openai SDK client"):
        llmutils.MockClient().sdk_client()
    with pytest.raises(llmutils.ConfigError, match="AZURE_ENDPOINT"):
        AzureClient(api_key="k").endpoint_url()
