"""Interoperability: llmutils against a real LiteLLM proxy on 127.0.0.1, fully offline.

The proxy runs ``tests/litellm/config.yaml``: models that answer from ``mock_response`` (their
``api_base`` is a dead loopback port, nothing leaves the machine), and models forwarded to an
:class:`~llmutils.testing.OpenAITestServer` this module starts, so what LiteLLM really does to a
provider's answer (``llm_provider-*`` headers, rewritten error bodies) reaches llmutils as it is.

``$LLMUTILS_TEST_LITELLM`` names the ``litellm`` executable (``.ci/run`` installs
``litellm[proxy]`` in its own venv and sets it); without it the module is skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2
import pytest

from llmutils import (
    AuthenticationError,
    AzureClient,
    InvalidRequestError,
    LLMUtilsError,
    MalformedResponseError,
    OpenAIClient,
    QuotaExceededError,
    RateLimitError,
    RetriesExhaustedError,
    RetryPolicy,
    override_defaults,
)
from llmutils.testing import Fault, OpenAITestServer

LITELLM = os.environ.get("LLMUTILS_TEST_LITELLM")  # read at import: the autouse fixture clears LLMUTILS_*
CONFIG = Path(__file__).parent / "litellm" / "config.yaml"
MASTER_KEY = "sk-test-master"
VIRTUAL_KEY = "sk-test-virtual"
START_TIMEOUT = 120.0  # seconds for the proxy to answer its health check (about 9 s on 2 busy cores)
STOP_TIMEOUT = 15.0
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

if not LITELLM:
    pytest.skip(
        "no LiteLLM proxy: set LLMUTILS_TEST_LITELLM to a `litellm` executable from a venv with "
        "`pip install 'litellm[proxy]' prisma` (.ci/run does this)",
        allow_module_level=True,
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Proxy:
    """A running LiteLLM proxy and the OpenAITestServer its ``upstream`` models forward to."""

    url: str
    upstream: OpenAITestServer
    log: Path
    started_in: float

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"


def _wait_until_healthy(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """Poll the liveness endpoint until it answers 200, the process dies, or START_TIMEOUT passes."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"litellm exited with {process.returncode} before it was ready:\n{log.read_text()[-3000:]}")
        try:
            if httpx2.get(f"{url}/health/liveliness", timeout=2.0).status_code == 200:
                return
        except httpx2.HTTPError:
            pass
        time.sleep(0.2)  # polling interval of a bounded readiness wait
    pytest.fail(f"litellm did not answer {url}/health/liveliness within {START_TIMEOUT:g} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """Start ``litellm --config tests/litellm/config.yaml`` on a free 127.0.0.1 port; stop it after the module."""
    assert LITELLM is not None
    executable = shutil.which(LITELLM) or LITELLM
    workdir = tmp_path_factory.mktemp("litellm")
    log = workdir / "proxy.log"
    port = _free_port()
    with OpenAITestServer() as upstream:
        env = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith(("OPENAI_", "AZURE_", "ANTHROPIC_", "LITELLM_", "LLMUTILS_"))
            and not name.upper().endswith("_PROXY")
        }
        env.update(
            LITELLM_LOCAL_MODEL_COST_MAP="True",  # no download of the price list
            LITELLM_TELEMETRY="False",
            LITELLM_LOG="ERROR",
            LLMUTILS_TEST_UPSTREAM=upstream.base_url,
            NO_PROXY="*",
        )
        started = time.monotonic()
        with log.open("wb") as out:
            process = subprocess.Popen(
                [executable, "--config", str(CONFIG), "--host", "127.0.0.1", "--port", str(port)],
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_until_healthy(url, process, log)
            yield Proxy(url=url, upstream=upstream, log=log, started_in=time.monotonic() - started)
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(STOP_TIMEOUT)


@pytest.fixture
def upstream(proxy: Proxy) -> OpenAITestServer:
    """The OpenAITestServer behind the ``upstream`` models, reset for each test."""
    proxy.upstream.reset()
    proxy.upstream.chat_handler = None
    proxy.upstream.stream_interval = 0.0
    return proxy.upstream


def _client(proxy: Proxy, waits: list[float] | None = None, **kwargs: object) -> OpenAIClient:
    retry = RetryPolicy(max_attempts=3, waiting_time=0.5, jitter=0, sleep=(waits.append if waits is not None else lambda s: None))
    return OpenAIClient(base_url=proxy.base_url, api_key=kwargs.pop("api_key", MASTER_KEY), retry=retry, **kwargs)  # type: ignore[arg-type]


HI = [{"role": "user", "content": "hi"}]


def test_the_proxy_started(proxy: Proxy) -> None:
    assert proxy.started_in < START_TIMEOUT
    print(f"litellm proxy ready in {proxy.started_in:.1f} s")


def test_chat_through_v1(proxy: Proxy) -> None:
    with _client(proxy, model="gpt-4o-mini") as client:
        assert client.send_message(HI) == {"role": "assistant", "content": "hello from litellm"}
        assert client.last_call is not None and client.last_call.model == "gpt-4o-mini"


def test_chat_through_the_proxy_to_a_real_upstream(proxy: Proxy, upstream: OpenAITestServer) -> None:
    with _client(proxy, model="upstream") as client:
        assert client.send_message([{"role": "user", "content": "ping"}])["content"] == "echo: ping"
    assert upstream.request_count == 1
    # Only what is set is sent, and LiteLLM adds nothing: the provider sees {model, messages}.
    assert upstream.requests[0].body == {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "ping"}]}


def test_chat_through_the_azure_deployment_route(proxy: Proxy) -> None:
    retry = RetryPolicy(max_attempts=1)
    with AzureClient(azure_endpoint=proxy.url, api_key=MASTER_KEY, api_version="2024-10-21", model="my-deployment", retry=retry) as client:
        assert client.send_message(HI) == {"role": "assistant", "content": "hello from azure"}


def test_an_anthropic_model_answers_a_plain_send_message(proxy: Proxy) -> None:
    with _client(proxy, model="claude-3-5-haiku") as client:
        assert client.send_message(HI) == {"role": "assistant", "content": "hello from claude"}


def test_litellm_rejects_sampling_parameters_anthropic_does_not_take(proxy: Proxy) -> None:
    """What the issue saw: the parameter check runs offline, and a 400 is not retried."""
    with _client(proxy, model="claude-3-5-haiku") as client:
        with pytest.raises(InvalidRequestError, match="does not support parameters") as caught:
            client.send_message(HI, presence_penalty=0.5)
    assert caught.value.status_code == 400 and caught.value.attempts == 1


def test_a_gateway_alias_of_a_reasoning_model_answers_a_plain_call(proxy: Proxy) -> None:
    with _client(proxy, model="reasoner") as client:
        assert client.send_message(HI)["content"] == "hello from the reasoner"


def test_model_aliases_tell_that_a_gateway_alias_is_a_reasoning_model(proxy: Proxy) -> None:
    with override_defaults(MODEL_ALIASES="reasoner=o3-mini"), _client(proxy, model="reasoner") as client:
        assert client.send_message(HI, temperature=0.2)["content"] == "hello from the reasoner"


def test_a_429_whose_retry_after_arrives_as_llm_provider_retry_after(proxy: Proxy, upstream: OpenAITestServer) -> None:
    upstream.script(Fault.rate_limit(retry_after=7))
    waits: list[float] = []
    with _client(proxy, waits, model="upstream") as client:
        assert client.send_message(HI)["content"] == "echo: hi"
    assert waits == [7.0]
    assert upstream.request_count == 2


def test_litellm_forwards_the_providers_retry_headers_under_a_prefix(proxy: Proxy, upstream: OpenAITestServer) -> None:
    """The wire itself, as llmutils' rules expect it (no llmutils involved)."""
    upstream.script(Fault.rate_limit(retry_after=7), Fault.rate_limit(retry_after_ms=2500))
    body = {"model": "upstream", "messages": HI}
    headers = {"Authorization": f"Bearer {MASTER_KEY}"}
    first = httpx2.post(f"{proxy.base_url}/chat/completions", json=body, headers=headers, timeout=30)
    second = httpx2.post(f"{proxy.base_url}/chat/completions", json=body, headers=headers, timeout=30)
    assert first.status_code == second.status_code == 429
    assert "retry-after" not in first.headers and first.headers["llm_provider-retry-after"] == "7"
    assert "retry-after-ms" not in second.headers and second.headers["llm_provider-retry-after-ms"] == "2500"
    assert UUID.match(first.headers["x-litellm-call-id"]) and "x-request-id" not in first.headers
    assert first.json()["error"]["type"] == "throttling_error" and first.json()["error"]["code"] == "429"


def test_a_forwarded_wait_over_120_s_fails_at_once_with_the_wait(proxy: Proxy, upstream: OpenAITestServer) -> None:
    upstream.script(Fault.rate_limit(retry_after=300))
    waits: list[float] = []
    with _client(proxy, waits, model="upstream") as client:
        with pytest.raises(RateLimitError, match="300") as caught:
            client.send_message(HI)
    assert waits == [] and upstream.request_count == 1
    assert caught.value.status_code == 429


def test_an_exhausted_quota_rewritten_by_litellm_is_not_retried(proxy: Proxy, upstream: OpenAITestServer) -> None:
    upstream.script(Fault.insufficient_quota(), Fault.insufficient_quota(), Fault.insufficient_quota())
    waits: list[float] = []
    with _client(proxy, waits, model="upstream") as client:
        with pytest.raises(QuotaExceededError, match="exceeded your current quota") as caught:
            client.send_message(HI)
    assert upstream.request_count == 1 and waits == []
    assert caught.value.code == "429" and caught.value.type == "throttling_error"  # type: ignore[attr-defined]


def test_a_forwarded_x_should_retry_false_is_obeyed(proxy: Proxy, upstream: OpenAITestServer) -> None:
    upstream.script(Fault.server_error(503).with_headers({"x-should-retry": "false"}))
    with _client(proxy, model="upstream") as client:
        with pytest.raises(LLMUtilsError) as caught:
            client.send_message(HI)
    assert upstream.request_count == 1 and caught.value.attempts == 1


def test_a_mocked_rate_limit_is_retried_then_gives_up(proxy: Proxy) -> None:
    waits: list[float] = []
    with _client(proxy, waits, model="rate-limited") as client:
        with pytest.raises(RetriesExhaustedError) as caught:
            client.send_message(HI)
    assert caught.value.attempts == 3 and len(waits) == 2
    assert isinstance(caught.value.__cause__, RateLimitError) and caught.value.status_code == 429


def test_context_window_exceeded_is_terminal(proxy: Proxy) -> None:
    with _client(proxy, model="too-long") as client:
        with pytest.raises(InvalidRequestError, match="context window") as caught:
            client.send_message(HI)
    assert caught.value.status_code == 400 and caught.value.attempts == 1


def test_errors_carry_what_litellm_said(proxy: Proxy) -> None:
    with _client(proxy, model="too-long") as client:
        with pytest.raises(InvalidRequestError) as caught:
            client.send_message(HI)
    error = caught.value
    assert (error.code, error.type, error.param) == ("400", "invalid_request_error", None)  # type: ignore[attr-defined]
    assert error.request_id is not None and UUID.match(error.request_id)
    assert error.headers["x-litellm-call-id"] == error.request_id  # type: ignore[attr-defined]


def test_a_rejected_key(proxy: Proxy) -> None:
    with _client(proxy, model="gpt-4o-mini", api_key="sk-not-a-key") as client:
        with pytest.raises(AuthenticationError, match="Invalid proxy server token") as caught:
            client.send_message(HI)
    assert caught.value.status_code == 401 and caught.value.attempts == 1
    assert "sk-not-a-key" not in str(caught.value)


def test_a_virtual_key_is_accepted(proxy: Proxy) -> None:
    with _client(proxy, model="gpt-4o-mini", api_key=VIRTUAL_KEY) as client:
        assert client.send_message(HI)["content"] == "hello from litellm"


def test_a_rejected_key_carries_litellms_fields(proxy: Proxy) -> None:
    with _client(proxy, model="gpt-4o-mini", api_key="sk-not-a-key") as client:
        with pytest.raises(AuthenticationError) as caught:
            client.send_message(HI)
    assert (caught.value.code, caught.value.type) == ("401", "auth_error")  # type: ignore[attr-defined]


def test_embeddings_through_the_proxy(proxy: Proxy, upstream: OpenAITestServer) -> None:
    with _client(proxy, embedding_model="upstream-embedding") as client:
        vectors = client.get_embeddings(["a", "b", "c"])
    with OpenAIClient(base_url=upstream.base_url, api_key="k", embedding_model="x") as direct:
        assert vectors == direct.get_embeddings(["a", "b", "c"])
    assert len(vectors) == 3 and upstream.requests[0].body["input"] == ["a", "b", "c"]


def test_a_mocked_embedding(proxy: Proxy) -> None:
    with _client(proxy, embedding_model="text-embedding-3-small") as client:
        assert client.get_embedding("a") == [0.1, 0.2, 0.3]


def test_a_wrong_embedding_count_raises_at_once(proxy: Proxy) -> None:
    """LiteLLM's mock answers ONE vector for three inputs: the same on every attempt."""
    waits: list[float] = []
    with _client(proxy, waits, embedding_model="text-embedding-3-small") as client:
        with pytest.raises(MalformedResponseError, match="3 inputs got 1 embedding") as caught:
            client.get_embeddings(["a", "b", "c"])
    assert caught.value.attempts == 1 and waits == []


def test_the_cache_sends_one_request_for_two_identical_calls(proxy: Proxy, upstream: OpenAITestServer, tmp_path: Path) -> None:
    cache = tmp_path / "cache.sqlite"
    with _client(proxy, model="upstream", cache_api_calls=True, cache_file_name=cache) as client:
        first = client.send_message([{"role": "user", "content": "cache me"}])
        second = client.send_message([{"role": "user", "content": "cache me"}])
        assert client.last_call is not None and client.last_call.cached
    assert first == second == {"role": "assistant", "content": "echo: cache me"}
    assert upstream.request_count == 1


def test_the_responses_api_through_the_proxy_to_a_real_upstream(proxy: Proxy, upstream: OpenAITestServer) -> None:
    """LiteLLM's /v1/responses: the chat-shaped mapping reaches the provider as sent, and comes back."""
    tools = [{"type": "function", "function": {"name": "get_w", "parameters": {"type": "object", "properties": {}}}}]
    with _client(proxy, model="upstream", api="responses") as client:
        text = client.send_message([{"role": "system", "content": "S"}, {"role": "user", "content": "ping"}], max_tokens=50)
        assert text == {"role": "assistant", "content": "echo: ping"}
        assert client.last_call is not None and client.last_call.kind == "responses"
        assert client.last_call.usage is not None and client.last_call.usage["prompt_tokens"] > 0
        called = client.send_message([{"role": "user", "content": "call get_w"}], tools=tools)
        assert called["content"] is None and called["tool_calls"][0]["function"]["name"] == "get_w"
        raw = client.create_response(input="hello", store=False)
        assert raw["output"][0]["content"][0]["text"] == "echo: hello"
    assert [request.path for request in upstream.requests] == ["/v1/responses"] * 3
    assert upstream.requests[0].body == {
        "model": "gpt-4o-mini",
        "instructions": "S",
        "input": [{"role": "user", "content": "ping"}],
        "max_output_tokens": 50,
    }


def test_a_mocked_model_answers_over_the_responses_api(proxy: Proxy) -> None:
    with _client(proxy, model="gpt-4o-mini", api="responses") as client:
        assert client.send_message(HI) == {"role": "assistant", "content": "hello from litellm"}


# -- streaming through the proxy --------------------------------------------------------------------


def test_a_stream_through_the_proxy_from_a_real_upstream(proxy: Proxy, upstream: OpenAITestServer, tmp_path: Path) -> None:
    """LiteLLM re-chunks the upstream's SSE; the text, the usage and the cache entry come through."""
    ask = [{"role": "user", "content": "one two three four five six"}]
    with _client(proxy, model="upstream", cache_api_calls=True, cache_file_name=tmp_path / "c.sqlite") as client:
        with client.stream_message(ask) as stream:
            pieces = list(stream)
        assert len(pieces) > 1 and "".join(pieces) == "echo: one two three four five six"
        assert upstream.requests[-1].body["stream"] is True
        assert stream.usage is not None and stream.usage["total_tokens"] > 0
        assert client.send_message(ask) == stream.message  # served from the cache
        assert upstream.request_count == 1


def test_a_mock_response_model_streams_through_the_proxy(proxy: Proxy) -> None:
    with _client(proxy, model="gpt-4o-mini") as client, client.stream_message(HI) as stream:
        assert "".join(stream) == "hello from litellm"
    assert stream.message == {"role": "assistant", "content": "hello from litellm"}


def test_a_stream_the_upstream_drops_after_content_is_interrupted(proxy: Proxy, upstream: OpenAITestServer) -> None:
    """LiteLLM turns the upstream's drop into a ``data: {"error": ...}`` event (code 500) mid-stream."""
    from llmutils import NonTerminalError, StreamInterruptedError

    upstream.script(Fault.drop_stream(after=4))
    # Paced like a model generating tokens: LiteLLM forwards the first chunks before the drop. Sent
    # back to back, it sometimes read the drop first and answered with an error before any content,
    # which is (rightly) retried.
    upstream.stream_interval = 0.1
    with _client(proxy, model="upstream") as client:
        with pytest.raises(StreamInterruptedError) as info:
            with client.stream_message([{"role": "user", "content": "one two three four five six"}]) as stream:
                list(stream)
    assert info.value.partial_text == stream.text == "echo: one two "
    assert isinstance(info.value.__cause__, NonTerminalError)
    assert upstream.request_count == 1  # not retried after content
