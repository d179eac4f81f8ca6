"""Tests for llmutils.testing.OpenAITestServer, driven through the real openai SDK."""

from __future__ import annotations

import http.client
import json
import statistics
import time
from collections.abc import Iterator

import openai
import pytest

from llmutils.testing import Fault, OpenAITestServer, RecordedRequest

USER_HI = [{"role": "user", "content": "hello world"}]


@pytest.fixture
def client(server: OpenAITestServer) -> Iterator[openai.OpenAI]:
    """An OpenAI SDK client pointed at the shared test server, without SDK retries."""
    with openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0) as c:
        yield c


@pytest.fixture
def azure(server: OpenAITestServer) -> Iterator[openai.AzureOpenAI]:
    """An AzureOpenAI SDK client pointed at the shared test server, without SDK retries."""
    with openai.AzureOpenAI(
        azure_endpoint=server.azure_endpoint, api_key="k", api_version="2024-10-21", max_retries=0
    ) as c:
        yield c


def _raw(server: OpenAITestServer, method: str, path: str, body: object = None) -> tuple[int, dict[str, str], bytes]:
    """Send one request with http.client and return status, lower-cased headers and body."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        payload = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=payload, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


# -- normal answers -----------------------------------------------------------------------------


def test_chat_round_trip(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model="gpt-4o-mini", messages=USER_HI)
    assert resp.object == "chat.completion"
    assert resp.model == "gpt-4o-mini"
    assert len(resp.choices) == 1
    choice = resp.choices[0]
    assert (choice.index, choice.finish_reason) == (0, "stop")
    assert choice.message.role == "assistant"
    assert choice.message.content == "echo: hello world"
    assert resp.usage is not None
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens > 0


def test_chat_echoes_last_user_message_and_text_parts(client: openai.OpenAI) -> None:
    messages = [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "text", "text": "second"}]},
    ]
    resp = client.chat.completions.create(model="m", messages=messages)  # type: ignore[arg-type]
    assert resp.choices[0].message.content == "echo: second"


def test_chat_n_choices(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model="m", messages=USER_HI, n=3)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert [c.message.content for c in resp.choices] == [
        "echo: hello world",
        "echo: hello world [1]",
        "echo: hello world [2]",
    ]


def test_chat_tool_call(client: openai.OpenAI) -> None:
    tools = [
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "other", "parameters": {"type": "object"}}},
    ]
    resp = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "call the weather"}], tools=tools  # type: ignore[arg-type]
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.type == "function"
    assert (call.function.name, call.function.arguments) == ("get_weather", "{}")


def test_chat_tools_without_call_prefix_echo(client: openai.OpenAI) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    resp = client.chat.completions.create(model="m", messages=USER_HI, tools=tools)  # type: ignore[arg-type]
    assert resp.choices[0].message.content == "echo: hello world"
    assert resp.choices[0].message.tool_calls is None


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "json_object"},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
    ],
)
def test_chat_json_mode(client: openai.OpenAI, response_format: dict) -> None:
    resp = client.chat.completions.create(model="m", messages=USER_HI, response_format=response_format)  # type: ignore[arg-type]
    assert json.loads(resp.choices[0].message.content or "") == {"echo": "hello world"}


def test_chat_handler_string_and_dict(server: OpenAITestServer, client: openai.OpenAI) -> None:
    seen: list[dict] = []

    def handler(body: dict) -> str:
        seen.append(body)
        return "scripted"

    server.chat_handler = handler
    resp = client.chat.completions.create(model="m", messages=USER_HI)
    assert resp.choices[0].message.content == "scripted"
    assert seen[0]["messages"] == USER_HI

    full = {
        "id": "chatcmpl-x",
        "object": "chat.completion",
        "created": 1,
        "model": "custom",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "whole"}, "finish_reason": "length"}],
    }
    server.chat_handler = lambda body: full
    resp = client.chat.completions.create(model="m", messages=USER_HI)
    assert (resp.model, resp.choices[0].message.content, resp.choices[0].finish_reason) == ("custom", "whole", "length")


def test_chat_handler_exception_gives_500(server: OpenAITestServer, client: openai.OpenAI) -> None:
    def handler(body: dict) -> str:
        raise RuntimeError("boom")

    server.chat_handler = handler
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="m", messages=USER_HI)


def test_embeddings(client: openai.OpenAI) -> None:
    resp = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert resp.object == "list"
    assert resp.model == "text-embedding-3-small"
    assert [d.index for d in resp.data] == [0, 1]
    a, b = resp.data[0].embedding, resp.data[1].embedding
    assert len(a) == 8 and a != b
    assert all(-1.0 <= x <= 1.0 for x in a + b)
    assert resp.usage.prompt_tokens == resp.usage.total_tokens == 2
    # Deterministic, the same for a single string, and identical in float and base64 encodings.
    again = client.embeddings.create(model="e", input="a", encoding_format="float")
    assert again.data[0].embedding == a


def test_embeddings_dimensions(client: openai.OpenAI) -> None:
    resp = client.embeddings.create(model="e", input="text", dimensions=40)
    assert len(resp.data[0].embedding) == 40


def test_azure_chat_and_embeddings(azure: openai.AzureOpenAI, server: OpenAITestServer) -> None:
    resp = azure.chat.completions.create(model="my-deployment", messages=USER_HI)
    assert resp.choices[0].message.content == "echo: hello world"
    emb = azure.embeddings.create(model="emb-deployment", input="x")
    assert len(emb.data[0].embedding) == 8
    chat_req, emb_req = server.requests
    assert chat_req.path == "/openai/deployments/my-deployment/chat/completions"
    assert chat_req.deployment == "my-deployment"
    assert chat_req.query == {"api-version": "2024-10-21"}
    assert chat_req.headers["api-key"] == "k"
    assert emb_req.path == "/openai/deployments/emb-deployment/embeddings"
    assert emb_req.deployment == "emb-deployment"


# -- errors from the server itself ------------------------------------------------------------------


def test_unknown_path_is_404_with_openai_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.models.list()
    assert info.value.status_code == 404
    assert info.value.body == {
        "message": "Invalid URL (GET /v1/models)",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }


def test_raw_response_headers_and_request_ids(server: OpenAITestServer) -> None:
    status, headers, body = _raw(server, "POST", "/v1/nope", {})
    assert status == 404
    assert json.loads(body)["error"]["type"] == "invalid_request_error"
    assert headers["content-length"] == str(len(body))
    first = headers["x-request-id"]
    status, headers, body = _raw(server, "POST", "/v1/chat/completions", {"model": "m", "messages": USER_HI})
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert headers["x-request-id"].startswith("req_") and headers["x-request-id"] != first
    assert [r.request_id for r in server.requests] == [first, headers["x-request-id"]]


def test_azure_without_api_version_is_400(server: OpenAITestServer) -> None:
    status, headers, body = _raw(server, "POST", "/openai/deployments/d/chat/completions", {"messages": USER_HI})
    assert status == 400
    assert "api-version" in json.loads(body)["error"]["message"]
    assert "x-request-id" in headers


def test_invalid_json_body_is_400(server: OpenAITestServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request("POST", "/v1/chat/completions", body=b"{not json", headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 400
        assert json.loads(resp.read())["error"]["code"] == "invalid_json"
    finally:
        conn.close()
    assert server.requests[-1].body is None


def test_chunked_request_body(server: OpenAITestServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        parts = [b'{"model": "m", ', b'"messages": [{"role": "user", "content": "chunked"}]}']
        conn.request("POST", "/v1/chat/completions", body=iter(parts), encode_chunked=True)
        resp = conn.getresponse()
        assert json.loads(resp.read())["choices"][0]["message"]["content"] == "echo: chunked"
        conn.request("POST", "/v1/embeddings", body=json.dumps({"model": "e", "input": "x"}).encode())
        assert conn.getresponse().status == 200  # the same keep-alive connection stayed in sync
    finally:
        conn.close()


def test_missing_messages_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=[])
    assert info.value.param == "messages"


# -- recording ------------------------------------------------------------------------------------


def test_requests_are_recorded(server: OpenAITestServer, client: openai.OpenAI) -> None:
    assert server.request_count == 0
    client.chat.completions.create(model="m", messages=USER_HI, temperature=0)
    client.embeddings.create(model="e", input="x")
    assert server.request_count == 2
    chat, emb = server.requests
    assert isinstance(chat, RecordedRequest)
    assert (chat.method, chat.path, chat.query, chat.deployment) == ("POST", "/v1/chat/completions", {}, None)
    assert chat.body == {"model": "m", "messages": USER_HI, "temperature": 0}
    assert chat.headers["authorization"] == "Bearer k"
    assert chat.headers["content-type"] == "application/json"
    assert emb.path == "/v1/embeddings" and emb.body["input"] == "x"
    server.reset()
    assert server.requests == [] and server.request_count == 0


# -- api_key enforcement ------------------------------------------------------------------------------


def test_api_key_enforced() -> None:
    with OpenAITestServer(api_key="secret") as srv:
        with openai.OpenAI(base_url=srv.base_url, api_key="secret", max_retries=0) as good:
            assert good.chat.completions.create(model="m", messages=USER_HI).choices
        with openai.OpenAI(base_url=srv.base_url, api_key="wrong", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError) as info:
                bad.chat.completions.create(model="m", messages=USER_HI)
            assert info.value.code == "invalid_api_key"
            with pytest.raises(openai.AuthenticationError):
                bad.embeddings.create(model="e", input="x")
        kwargs = {"azure_endpoint": srv.azure_endpoint, "api_version": "2024-10-21", "max_retries": 0}
        with openai.AzureOpenAI(api_key="secret", **kwargs) as good_azure:  # type: ignore[arg-type]
            assert good_azure.chat.completions.create(model="d", messages=USER_HI).choices
        with openai.AzureOpenAI(api_key="wrong", **kwargs) as bad_azure:  # type: ignore[arg-type]
            with pytest.raises(openai.AuthenticationError):
                bad_azure.chat.completions.create(model="d", messages=USER_HI)


# -- scripted faults ----------------------------------------------------------------------------------


def test_faults_are_fifo_then_normal(server: OpenAITestServer, client: openai.OpenAI) -> None:
    server.script(Fault.server_error(), Fault.bad_request("nope"))
    assert server.pending_faults == 2
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="m", messages=USER_HI)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="e", input="x")  # embeddings consume faults too
    assert server.pending_faults == 0
    assert client.chat.completions.create(model="m", messages=USER_HI).choices[0].message.content


def test_reset_clears_faults(server: OpenAITestServer, client: openai.OpenAI) -> None:
    server.script(Fault.server_error())
    server.reset()
    assert server.pending_faults == 0
    assert client.chat.completions.create(model="m", messages=USER_HI).choices


def test_script_rejects_non_faults(server: OpenAITestServer) -> None:
    with pytest.raises(TypeError):
        server.script(500)  # type: ignore[arg-type]


def test_fault_status(server: OpenAITestServer, client: openai.OpenAI) -> None:
    server.script(
        Fault.status(418, headers={"x-extra": "1"}),
        Fault.status(409, body={"error": {"message": "busy", "type": "t", "param": None, "code": "c"}}),
    )
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="m", messages=USER_HI)
    assert info.value.status_code == 418
    assert info.value.response.headers["x-extra"] == "1"
    assert info.value.request_id is not None and info.value.request_id.startswith("req_")
    with pytest.raises(openai.ConflictError) as conflict:
        client.chat.completions.create(model="m", messages=USER_HI)
    assert conflict.value.body == {"message": "busy", "type": "t", "param": None, "code": "c"}


def test_fault_rate_limit_headers(server: OpenAITestServer, client: openai.OpenAI) -> None:
    server.script(Fault.rate_limit(retry_after=2), Fault.rate_limit(retry_after_ms=1500, code=None))
    with pytest.raises(openai.RateLimitError) as first:
        client.chat.completions.create(model="m", messages=USER_HI)
    assert first.value.status_code == 429
    assert first.value.code == "rate_limit_exceeded"
    assert first.value.response.headers["retry-after"] == "2"
    assert "retry-after-ms" not in first.value.response.headers
    with pytest.raises(openai.RateLimitError) as second:
        client.chat.completions.create(model="m", messages=USER_HI)
    assert second.value.code is None
    assert second.value.response.headers["retry-after-ms"] == "1500"
    assert "retry-after" not in second.value.response.headers


def test_fault_insufficient_quota(server: OpenAITestServer, client: openai.OpenAI) -> None:
    server.script(Fault.insufficient_quota())
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="m", messages=USER_HI)
    assert info.value.code == "insufficient_quota"
    assert info.value.type == "insufficient_quota"


@pytest.mark.parametrize("code", [500, 502, 503])
def test_fault_server_error(server: OpenAITestServer, client: openai.OpenAI, code: int) -> None:
    server.script(Fault.server_error(code))
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="m", messages=USER_HI)
    assert info.value.status_code == code


def test_fault_bad_request(server: OpenAITestServer, client: openai.OpenAI) -> None:
    server.script(Fault.bad_request("context too long", code="context_length_exceeded"))
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=USER_HI)
    assert info.value.message.endswith("context too long")
    assert info.value.code == "context_length_exceeded"


def test_fault_unauthorized(server: OpenAITestServer, client: openai.OpenAI) -> None:
    server.script(Fault.unauthorized())
    with pytest.raises(openai.AuthenticationError) as info:
        client.chat.completions.create(model="m", messages=USER_HI)
    assert info.value.status_code == 401


def test_fault_content_filter(server: OpenAITestServer, azure: openai.AzureOpenAI) -> None:
    server.script(Fault.content_filter())
    with pytest.raises(openai.BadRequestError) as info:
        azure.chat.completions.create(model="d", messages=USER_HI)
    assert info.value.code == "content_filter"


def test_fault_not_json(server: OpenAITestServer) -> None:
    server.script(Fault.not_json())
    status, headers, body = _raw(server, "POST", "/v1/chat/completions", {"model": "m", "messages": USER_HI})
    assert status == 200
    assert headers["content-type"] == "application/json"
    with pytest.raises(ValueError):
        json.loads(body)


def test_fault_not_json_through_sdk(server: OpenAITestServer, client: openai.OpenAI) -> None:
    # Documents SDK behaviour our client must handle: openai 3.x lets json's error escape untyped.
    server.script(Fault.not_json())
    with pytest.raises(ValueError):
        client.chat.completions.create(model="m", messages=USER_HI)


def test_fault_html(server: OpenAITestServer, client: openai.OpenAI) -> None:
    server.script(Fault.html())
    raw = client.chat.completions.with_raw_response.create(model="m", messages=USER_HI)
    assert raw.status_code == 200
    assert raw.headers["content-type"].startswith("text/html")
    assert "<html>" in raw.text


def test_fault_slow_times_out_without_blocking_others_and_stop_is_prompt() -> None:
    srv = OpenAITestServer().start()
    try:
        srv.script(Fault.slow(30))
        with openai.OpenAI(base_url=srv.base_url, api_key="k", max_retries=0, timeout=0.2) as impatient:
            with pytest.raises(openai.APITimeoutError):
                impatient.chat.completions.create(model="m", messages=USER_HI)
        # The slow handler is still waiting on its own thread; other requests are served.
        with openai.OpenAI(base_url=srv.base_url, api_key="k", max_retries=0, timeout=5) as other:
            assert other.chat.completions.create(model="m", messages=USER_HI).choices
    finally:
        started = time.monotonic()
        srv.stop()
        assert time.monotonic() - started < 1.5


def test_fault_slow_then_normal_answer(server: OpenAITestServer, client: openai.OpenAI) -> None:
    server.script(Fault.slow(0.05))
    assert client.chat.completions.create(model="m", messages=USER_HI).choices[0].message.content == "echo: hello world"


# -- lifecycle and performance --------------------------------------------------------------------------


def test_lifecycle() -> None:
    srv = OpenAITestServer()
    with pytest.raises(RuntimeError):
        srv.base_url
    with srv:
        assert srv.base_url == f"http://127.0.0.1:{srv.port}/v1"
        assert srv.azure_endpoint == f"http://127.0.0.1:{srv.port}"
        with pytest.raises(RuntimeError):
            srv.start()
    srv.stop()  # idempotent
    with srv:  # restartable
        assert _raw(srv, "POST", "/v1/embeddings", {"model": "e", "input": "x"})[0] == 200


def test_stop_closes_idle_keep_alive_connections() -> None:
    srv = OpenAITestServer().start()
    with openai.OpenAI(base_url=srv.base_url, api_key="k", max_retries=0) as c:
        c.chat.completions.create(model="m", messages=USER_HI)  # leaves a pooled keep-alive connection
        started = time.monotonic()
        srv.stop()
        assert time.monotonic() - started < 1.5


def test_keep_alive_has_no_nagle_stall(client: openai.OpenAI, server: OpenAITestServer) -> None:
    # A response written in several segments stalls ~40 ms on a keep-alive connection (Nagle +
    # delayed ACK). The median is robust to a few slow outliers on a busy machine.
    client.chat.completions.create(model="m", messages=USER_HI)  # open the connection
    durations = []
    for _ in range(50):
        started = time.perf_counter()
        client.chat.completions.create(model="m", messages=USER_HI)
        durations.append(time.perf_counter() - started)
    assert statistics.median(durations) < 0.025, durations
    assert server.requests[-1].headers.get("connection") == "keep-alive"


def test_latency(server: OpenAITestServer, client: openai.OpenAI) -> None:
    server.latency = 0.1
    started = time.monotonic()
    client.chat.completions.create(model="m", messages=USER_HI)
    assert time.monotonic() - started >= 0.1


# -- the real world: what gateways and local servers send (issue 10) ------------------------------


def test_x_should_retry_false_stops_the_sdks_own_retries(server: OpenAITestServer) -> None:
    server.script(Fault.server_error(503, should_retry=False))
    with openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=2) as sdk:
        with pytest.raises(openai.InternalServerError) as caught:
            sdk.chat.completions.create(model="m", messages=USER_HI)
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert server.request_count == 1


def test_with_headers_adds_and_removes_headers(server: OpenAITestServer, client: openai.OpenAI) -> None:
    server.script(Fault.bad_request("no").with_headers({"x-request-id": None, "apim-request-id": "apim-1"}))
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="m", messages=USER_HI)
    headers = caught.value.response.headers
    assert "x-request-id" not in headers and headers["apim-request-id"] == "apim-1"
    assert caught.value.request_id is None


def test_retry_after_as_an_http_date(server: OpenAITestServer, client: openai.OpenAI) -> None:
    from llmutils._http import parse_retry_after

    server.script(Fault.retry_after_date(30), Fault.retry_after_date(-30, status=503))
    for expected, error in ((30, openai.RateLimitError), (-30, openai.InternalServerError)):
        with pytest.raises(error) as caught:
            client.chat.completions.create(model="m", messages=USER_HI)
        header = caught.value.response.headers["retry-after"]
        assert header.endswith(" GMT")
        assert parse_retry_after({"retry-after": header}) == pytest.approx(expected, abs=2)


def test_rate_limit_reset_and_should_retry_headers(server: OpenAITestServer, client: openai.OpenAI) -> None:
    server.script(Fault.rate_limit(reset_requests="1s", reset_tokens="6m0s", should_retry=True))
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="m", messages=USER_HI)
    headers = caught.value.response.headers
    assert headers["x-ratelimit-reset-requests"] == "1s" and headers["x-ratelimit-reset-tokens"] == "6m0s"
    assert headers["x-ratelimit-remaining-requests"] == headers["x-ratelimit-remaining-tokens"] == "0"
    assert headers["x-should-retry"] == "true" and "retry-after" not in headers


def test_litellm_shaped_errors(server: OpenAITestServer, client: openai.OpenAI) -> None:
    server.script(Fault.litellm_rate_limit(retry_after=7, retry_after_ms=7000), Fault.litellm_quota())
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(model="m", messages=USER_HI)
    headers = limited.value.response.headers
    assert headers["llm_provider-retry-after"] == "7" and headers["llm_provider-retry-after-ms"] == "7000"
    assert "retry-after" not in headers and "x-request-id" not in headers
    assert len(headers["x-litellm-call-id"]) == 36
    assert (limited.value.code, limited.value.type) == ("429", "throttling_error")
    with pytest.raises(openai.RateLimitError) as quota:
        client.chat.completions.create(model="m", messages=USER_HI)
    assert (quota.value.code, quota.value.type) == ("429", "throttling_error")
    assert "You exceeded your current quota" in quota.value.message


def test_fewer_choices_than_n(server: OpenAITestServer, client: openai.OpenAI) -> None:
    server.script(Fault.fewer_choices(1))
    answer = client.chat.completions.create(model="m", messages=USER_HI, n=3)
    assert [c.message.content for c in answer.choices] == ["echo: hello world"]
    assert len(client.chat.completions.create(model="m", messages=USER_HI, n=3).choices) == 3  # one request only


def test_fewer_embeddings_than_inputs(server: OpenAITestServer, client: openai.OpenAI) -> None:
    server.script(Fault.fewer_embeddings(1))
    assert len(client.embeddings.create(model="e", input=["a", "b", "c"]).data) == 1


def test_validation_errors_as_servers_send_them(server: OpenAITestServer, client: openai.OpenAI) -> None:
    from llmutils._http import is_validation_error

    server.script(Fault.validation_error(), Fault.validation_error(422, field="n"))
    with pytest.raises(openai.InternalServerError) as llama:
        client.chat.completions.create(model="m", messages=USER_HI)
    assert llama.value.type == "internal_server_error" and "Field required" in llama.value.message
    assert is_validation_error(500, llama.value.response.json())
    with pytest.raises(openai.UnprocessableEntityError) as fastapi:
        client.chat.completions.create(model="m", messages=USER_HI)
    assert fastapi.value.response.json()["detail"][0]["loc"] == ["body", "n"]
    assert is_validation_error(422, fastapi.value.response.json())


def test_azure_v1_routes_need_no_api_version(server: OpenAITestServer) -> None:
    with openai.OpenAI(base_url=f"{server.azure_endpoint}/openai/v1/", api_key="k", max_retries=0) as sdk:
        answer = sdk.chat.completions.create(model="my-deployment", messages=USER_HI)
        vectors = sdk.embeddings.create(model="my-embedding", input=["a"])
    assert answer.model == "my-deployment" and answer.choices[0].message.content == "echo: hello world"
    assert len(vectors.data) == 1
    assert [r.path for r in server.requests] == ["/openai/v1/chat/completions", "/openai/v1/embeddings"]
    assert all("api-version" not in r.query and r.deployment is None for r in server.requests)


def test_keep_requests_bounds_the_record_but_not_the_count() -> None:
    with OpenAITestServer(keep_requests=2) as srv:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
        for i in range(5):
            body = json.dumps({"model": "m", "messages": [{"role": "user", "content": f"n{i}"}]})
            conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            conn.getresponse().read()
        conn.close()
        assert srv.request_count == 5
        assert [r.body["messages"][0]["content"] for r in srv.requests] == ["n3", "n4"]
        srv.reset()
        assert srv.request_count == 0 and srv.requests == []
    with pytest.raises(ValueError, match="keep_requests"):
        OpenAITestServer(keep_requests=-1)
