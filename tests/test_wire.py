"""Speaking the real wire (issue 10): send only what is set, the SDK's retry rules, errors that carry
what the server said, terminal answers, reasoning efforts and Azure's v1 API; against OpenAITestServer."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

import llmutils
from llmutils import (
    DEFAULTS,
    AzureClient,
    ConfigError,
    InvalidRequestError,
    LLMUtilsError,
    NonTerminalError,
    OpenAIClient,
    QuotaExceededError,
    RateLimitError,
    RetriesExhaustedError,
    RetryPolicy,
    force_default_value,
    override_defaults,
)
from llmutils.testing import Fault, OpenAITestServer

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
def waits() -> list[float]:
    return []


@pytest.fixture
def oai(server: OpenAITestServer, waits: list[float]) -> Iterator[OpenAIClient]:
    policy = RetryPolicy(max_attempts=3, waiting_time=0.5, jitter=0, sleep=waits.append)
    with OpenAIClient(base_url=server.base_url, api_key="k", model="gpt-4.1-mini", retry=policy) as client:
        yield client


def _body(server: OpenAITestServer, index: int = -1) -> dict:
    return server.requests[index].body


# -- send only what is set -------------------------------------------------------------------------


def test_a_plain_call_sends_model_and_messages_only(oai: OpenAIClient, server: OpenAITestServer) -> None:
    oai.send_message(HI)
    assert _body(server) == {"model": "gpt-4.1-mini", "messages": HI}


def test_sampling_keys_default_to_unset() -> None:
    for key in ("TEMPERATURE", "TOP_P", "FREQ_PENALTY", "PRESENCE_PENALTY", "MAX_TOKENS", "MAX_COMPLETION_TOKENS", "REASONING_EFFORT"):
        assert DEFAULTS[key] is None, key


def test_a_value_set_anywhere_is_sent(oai: OpenAIClient, server: OpenAITestServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "config.ini").write_text("[OpenAI]\nFREQ_PENALTY = 0.25\nMAX_TOKENS = 300\n")  # the old module's keys
    monkeypatch.setenv("LLMUTILS_TOP_P", "0.9")
    force_default_value("PRESENCE_PENALTY", 0.1)
    with override_defaults(temperature=0.2):
        oai.send_message(HI, stop="END")
    assert _body(server) == {
        "model": "gpt-4.1-mini",
        "messages": HI,
        "temperature": 0.2,
        "top_p": 0.9,
        "frequency_penalty": 0.25,
        "presence_penalty": 0.1,
        "max_tokens": 300,
        "stop": "END",
    }


def test_none_turns_a_configured_value_off(oai: OpenAIClient, server: OpenAITestServer) -> None:
    force_default_value("TEMPERATURE", 0.7)
    force_default_value("MAX_TOKENS", 100)
    with override_defaults(temperature=None):
        oai.send_message(HI)
    assert "temperature" not in _body(server) and _body(server)["max_tokens"] == 100
    oai.send_message(HI, max_tokens=None)
    assert _body(server)["temperature"] == 0.7 and "max_tokens" not in _body(server)
    oai.send_message(HI)
    assert (_body(server)["temperature"], _body(server)["max_tokens"]) == (0.7, 100)


# -- the SDK's retry rules -------------------------------------------------------------------------


def test_max_wait_defaults_to_the_sdks_backoff_cap() -> None:
    assert DEFAULTS["MAX_WAIT"] == 8.0


def test_a_server_wait_is_honoured_in_full_up_to_120_s(oai: OpenAIClient, server: OpenAITestServer, waits: list[float]) -> None:
    server.script(Fault.rate_limit(retry_after=90), Fault.rate_limit(retry_after=120))
    assert oai.send_message(HI)["content"] == "echo: hi"
    assert waits == [90.0, 120.0]  # not cut to MAX_WAIT (8 s): that caps only our own backoff


def test_a_server_wait_over_120_s_fails_at_once_with_the_wait(oai: OpenAIClient, server: OpenAITestServer, waits: list[float]) -> None:
    server.script(Fault.rate_limit(retry_after=300))
    with pytest.raises(RateLimitError, match=r"300 s") as caught:
        oai.send_message(HI)
    assert waits == [] and server.request_count == 1
    assert caught.value.attempts == 1 and caught.value.retry_after == 300.0


@pytest.mark.parametrize(
    "fault",
    [
        Fault.rate_limit(retry_after=0),
        Fault.rate_limit(retry_after=-5),
        Fault.status(429, headers={"Retry-After": "nan"}),
        Fault.status(429, headers={"Retry-After": "inf"}),
        Fault.retry_after_date(-60),
    ],
    ids=["zero", "negative", "nan", "inf", "past-date"],
)
def test_a_useless_server_wait_gets_the_normal_backoff(
    oai: OpenAIClient, server: OpenAITestServer, waits: list[float], fault: Fault
) -> None:
    server.script(fault)
    oai.send_message(HI)
    assert waits == [0.5]


def test_retry_after_in_ms_seconds_and_http_date(oai: OpenAIClient, server: OpenAITestServer, waits: list[float]) -> None:
    server.script(Fault.rate_limit(retry_after_ms=1500), Fault.retry_after_date(30))
    oai.send_message(HI)
    assert waits[0] == 1.5 and waits[1] == pytest.approx(30, abs=2)


def test_litellm_forwarded_retry_after(oai: OpenAIClient, server: OpenAITestServer, waits: list[float]) -> None:
    server.script(Fault.litellm_rate_limit(retry_after=7), Fault.litellm_rate_limit(retry_after_ms=2500))
    oai.send_message(HI)
    assert waits == [7.0, 2.5]


def test_a_429_without_retry_after_waits_for_the_rate_limit_reset(oai: OpenAIClient, server: OpenAITestServer, waits: list[float]) -> None:
    server.script(Fault.rate_limit(reset_requests="2s"), Fault.rate_limit(reset_tokens="12ms"))
    oai.send_message(HI)
    assert waits == [2.0, pytest.approx(0.012)]


def test_x_should_retry_false_stops_retries(oai: OpenAIClient, server: OpenAITestServer, waits: list[float]) -> None:
    server.script(Fault.server_error(503, should_retry=False))
    with pytest.raises(NonTerminalError) as caught:
        oai.send_message(HI)
    assert server.request_count == 1 and waits == [] and caught.value.attempts == 1
    assert "x-should-retry" in str(caught.value)


def test_x_should_retry_true_retries_even_a_400(oai: OpenAIClient, server: OpenAITestServer, waits: list[float]) -> None:
    server.script(Fault.bad_request("try again").with_headers({"x-should-retry": "true"}))
    assert oai.send_message(HI)["content"] == "echo: hi"
    assert server.request_count == 2 and waits == [0.5]


@pytest.mark.parametrize("fault", [Fault.insufficient_quota(), Fault.litellm_quota()], ids=["openai", "litellm-rewrite"])
def test_an_exhausted_quota_is_not_retried(oai: OpenAIClient, server: OpenAITestServer, waits: list[float], fault: Fault) -> None:
    server.script(fault, fault, fault)
    with pytest.raises(QuotaExceededError, match="exceeded your current quota"):
        oai.send_message(HI)
    assert server.request_count == 1 and waits == []


def test_a_validation_error_in_a_500_is_not_retried(oai: OpenAIClient, server: OpenAITestServer, waits: list[float]) -> None:
    server.script(Fault.validation_error(500), Fault.validation_error(500))
    with pytest.raises(InvalidRequestError, match="Field required") as caught:
        oai.send_message(HI)
    assert server.request_count == 1 and waits == [] and caught.value.status_code == 500


# -- errors carry what the server said ------------------------------------------------------------


def test_errors_carry_code_type_param_request_id_and_headers(oai: OpenAIClient, server: OpenAITestServer) -> None:
    server.script(Fault.bad_request("This model's maximum context length is 8192 tokens.", code="context_length_exceeded"))
    with pytest.raises(InvalidRequestError) as caught:
        oai.send_message(HI)
    error = caught.value
    assert (error.status_code, error.code, error.type, error.param) == (400, "context_length_exceeded", "invalid_request_error", None)
    assert error.request_id == server.requests[-1].request_id
    assert error.headers["x-request-id"] == error.request_id


def test_request_id_falls_back_to_litellm_and_apim_headers(oai: OpenAIClient, server: OpenAITestServer) -> None:
    server.script(Fault.bad_request().with_headers({"x-request-id": None, "apim-request-id": "apim-7"}))
    with pytest.raises(InvalidRequestError) as azure:
        oai.send_message(HI)
    assert azure.value.request_id == "apim-7"
    server.script(Fault.litellm_quota())
    with pytest.raises(QuotaExceededError) as litellm:
        oai.send_message(HI)
    assert litellm.value.request_id == litellm.value.headers["x-litellm-call-id"]
    assert (litellm.value.code, litellm.value.type) == ("429", "throttling_error")


def test_retries_exhausted_carries_the_last_errors_fields(oai: OpenAIClient, server: OpenAITestServer) -> None:
    server.script(*[Fault.server_error(502)] * 3)
    with pytest.raises(RetriesExhaustedError) as caught:
        oai.send_message(HI)
    error = caught.value
    assert error.status_code == 502 and error.type == "server_error" and error.attempts == 3
    assert error.request_id == server.requests[-1].request_id and "x-request-id" in error.headers


def _carries_the_answer(error: LLMUtilsError, server: OpenAITestServer, status: int = 200) -> None:
    assert error.status_code == status
    assert error.request_id is not None and error.request_id == server.requests[-1].request_id
    assert error.headers["x-request-id"] == error.request_id and "content-type" in error.headers


def test_a_200_with_no_choices_carries_the_answer(oai: OpenAIClient, server: OpenAITestServer) -> None:
    server.script(*[Fault.status(200, {"id": "c", "object": "chat.completion", "choices": []})] * 3)
    with pytest.raises(RetriesExhaustedError, match="no choices") as caught:
        oai.send_message(HI)
    _carries_the_answer(caught.value, server)
    assert isinstance(caught.value.__cause__, NonTerminalError)
    _carries_the_answer(caught.value.__cause__, server)


def test_a_failed_responses_answer_carries_the_answer(oai: OpenAIClient, server: OpenAITestServer) -> None:
    server.script(Fault.response_failed("invalid_prompt", "Invalid prompt."))
    with pytest.raises(InvalidRequestError, match="Invalid prompt") as caught:
        oai.create_response(input="hi")
    _carries_the_answer(caught.value, server)
    assert caught.value.code == "invalid_prompt"


def test_fewer_embeddings_than_inputs_carries_the_answer(oai: OpenAIClient, server: OpenAITestServer) -> None:
    server.script(Fault.fewer_embeddings(1).with_headers({"x-request-id": None, "x-litellm-call-id": "call-9"}))
    with pytest.raises(llmutils.MalformedResponseError) as caught:
        oai.get_embeddings(["a", "b"])
    error = caught.value
    assert (error.status_code, error.request_id, error.headers["x-litellm-call-id"]) == (200, "call-9", "call-9")


def test_a_200_that_is_not_json_carries_the_answer(oai: OpenAIClient, server: OpenAITestServer) -> None:
    server.script(*[Fault.not_json()] * 3)
    with pytest.raises(RetriesExhaustedError) as caught:
        oai.send_message(HI)
    _carries_the_answer(caught.value, server)


def test_a_stream_error_event_carries_the_answer(oai: OpenAIClient, server: OpenAITestServer) -> None:
    server.script(Fault.stream_error(0, "Too long.", code="context_length_exceeded"))
    with pytest.raises(InvalidRequestError, match="Too long") as caught:
        "".join(oai.stream_message(HI))
    _carries_the_answer(caught.value, server)


def test_a_stream_cut_after_content_carries_the_answer(oai: OpenAIClient, server: OpenAITestServer) -> None:
    server.script(Fault.drop_stream(3))
    with pytest.raises(llmutils.StreamInterruptedError) as caught:
        "".join(oai.stream_message([{"role": "user", "content": "one two three four five six seven"}]))
    _carries_the_answer(caught.value, server)


def test_an_error_not_made_from_an_http_answer_has_empty_fields() -> None:
    error = LLMUtilsError("boom")
    assert (error.status_code, error.code, error.type, error.param, error.request_id) == (None,) * 5
    assert error.headers == {}


# -- terminal means terminal -----------------------------------------------------------------------


def test_a_wrong_embedding_count_raises_at_once(oai: OpenAIClient, server: OpenAITestServer, waits: list[float]) -> None:
    server.script(Fault.fewer_embeddings(1))
    with pytest.raises(llmutils.MalformedResponseError, match=r"3 inputs.*1 embedding") as caught:
        oai.get_embeddings(["a", "b", "c"])
    assert server.request_count == 1 and waits == [] and caught.value.attempts == 1


@pytest.mark.parametrize(
    "vector", [[1, "a"], [0.5, None], [True, 0.1], [[0.1], 0.2], "AAAA"], ids=["str", "null", "bool", "nested", "text"]
)
def test_an_embedding_that_is_not_numbers_raises_at_once_and_is_not_cached(
    server: OpenAITestServer, waits: list[float], tmp_path: Path, vector: object
) -> None:
    data = [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]},
            {"object": "embedding", "index": 1, "embedding": vector}]
    body = {"object": "list", "model": "text-embedding-3-small", "data": data,
            "usage": {"prompt_tokens": 2, "total_tokens": 2}}
    policy = RetryPolicy(max_attempts=3, jitter=0, sleep=waits.append)
    with OpenAIClient(base_url=server.base_url, api_key="k", retry=policy, cache_api_calls=True,
                      cache_file_name=tmp_path / "c.sqlite") as client:
        for _ in range(2):  # the second call is sent again: nothing was cached
            server.script(Fault.status(200, body))
            with pytest.raises(llmutils.MalformedResponseError, match=r"embedding 1 .*not a (list of )?num") as caught:
                client.get_embeddings(["a", "b"])
            assert caught.value.attempts == 1 and caught.value.status_code == 200
        assert server.request_count == 2 and waits == []
        assert client.get_embeddings(["a", "b"])[1] and server.request_count == 3


def test_fewer_choices_than_n_returns_what_came_with_one_warning(
    oai: OpenAIClient, server: OpenAITestServer, caplog: pytest.LogCaptureFixture
) -> None:
    server.script(Fault.fewer_choices(1))
    with caplog.at_level(logging.WARNING, logger="llmutils"):
        answer = oai.send_message(HI, n=2)
    assert answer == [{"role": "assistant", "content": "echo: hi"}]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and server.base_url in warnings[0]
    assert "1 choice" in warnings[0] and "n=2" in warnings[0]
    assert oai.last_call is not None and oai.last_call.warnings == (warnings[0],)
    assert server.request_count == 1
    oai.send_message(HI, n=2)
    assert oai.last_call.warnings == ()


# -- reasoning models and aliases -----------------------------------------------------------------


@pytest.mark.parametrize("effort", ["none", "minimal", "low", "medium", "high", "xhigh", "max"])
def test_reasoning_effort_values(effort: str) -> None:
    with override_defaults(reasoning_effort=effort) as values:
        assert values["REASONING_EFFORT"] == effort


def test_an_unknown_reasoning_effort_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="REASONING_EFFORT"):
        force_default_value("REASONING_EFFORT", "extreme")


def test_effort_none_sends_the_sampling_parameters_the_user_set(oai: OpenAIClient, server: OpenAITestServer) -> None:
    oai.send_message(HI, model="gpt-5.1", temperature=0.2, reasoning_effort="none")
    assert _body(server) == {"model": "gpt-5.1", "messages": HI, "temperature": 0.2, "reasoning_effort": "none"}
    oai.send_message(HI, model="gpt-5.1", temperature=0.2, reasoning_effort="low")
    assert _body(server) == {"model": "gpt-5.1", "messages": HI, "reasoning_effort": "low"}


def test_model_aliases_work_for_any_client(oai: OpenAIClient, server: OpenAITestServer) -> None:
    with override_defaults(model_aliases="reasoner=o3-mini"):
        oai.send_message(HI, model="reasoner", max_tokens=50, top_p=0.5)
    assert _body(server) == {"model": "reasoner", "messages": HI, "max_completion_tokens": 50}


# -- Azure's v1 API --------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "V1", " v1 "])
def test_azure_v1_with_a_key(server: OpenAITestServer, version: str) -> None:
    endpoint = server.azure_endpoint
    with AzureClient(azure_endpoint=endpoint, api_key="k", api_version=version, model="my-deployment") as client:
        assert client.send_message(HI)["content"] == "echo: hi"
        client.get_embedding("x", model="my-embedding")
    chat, embedding = server.requests
    assert (chat.path, embedding.path) == ("/openai/v1/chat/completions", "/openai/v1/embeddings")
    assert chat.query == {} and chat.body["model"] == "my-deployment"
    assert chat.headers.get("api-key") == "k" or chat.headers.get("authorization") == "Bearer k"


def test_azure_v1_from_the_environment_with_an_entra_token_provider(server: OpenAITestServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", server.azure_endpoint)
    monkeypatch.setenv("OPENAI_API_VERSION", "V1")  # any case, as "v1"
    tokens = iter(["token-1", "token-2"])
    with AzureClient(azure_ad_token_provider=lambda: next(tokens), model="dep") as client:
        client.send_message(HI)
    request = server.requests[-1]
    assert request.path == "/openai/v1/chat/completions" and "api-version" not in request.query
    assert request.headers["authorization"] == "Bearer token-1"


def test_azure_ad_scope_is_a_setting() -> None:
    assert DEFAULTS["AZURE_AD_SCOPE"] == "https://cognitiveservices.azure.com/.default"
    with override_defaults(azure_ad_scope="https://ai.azure.com/.default") as values:
        assert values["AZURE_AD_SCOPE"] == "https://ai.azure.com/.default"


@pytest.mark.parametrize(
    "fault",
    [
        Fault.server_error(503, should_retry=False),
        Fault.rate_limit(retry_after=300),
        Fault.rate_limit(retry_after_ms=121_000),
        Fault.retry_after_date(600),
        Fault.bad_request(),
        Fault.status(404),
    ],
    ids=["x-should-retry-false", "retry-after-300", "retry-after-ms-121000", "http-date-600", "400", "404"],
)
def test_what_the_sdk_does_not_retry_is_not_retried(server: OpenAITestServer, waits: list[float], fault: Fault) -> None:
    """The raw SDK (max_retries=2) and llmutils against the same answer: one request each."""
    import openai

    server.script(fault)
    with openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=2) as sdk:
        with pytest.raises(openai.APIStatusError):
            sdk.chat.completions.create(model="m", messages=HI)
    assert server.request_count == 1
    server.reset()
    server.script(fault)
    policy = RetryPolicy(max_attempts=3, jitter=0, sleep=waits.append)
    with OpenAIClient(base_url=server.base_url, api_key="k", retry=policy) as client:
        with pytest.raises(LLMUtilsError) as caught:
            client.send_message(HI)
    assert server.request_count == 1 and waits == [] and caught.value.retryable is False


# -- a None is never sent as null ------------------------------------------------------------------


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_none_in_more_is_not_sent_as_null(oai: OpenAIClient, server: OpenAITestServer, api: str) -> None:
    """``tools=None`` etc. mean "not given", on both APIs: no ``"tools": null`` reaches the server."""
    oai.send_message(HI, api=api, seed=None, response_format=None, tools=None, tool_choice=None, user=None,
                     reasoning_effort=None, max_completion_tokens=None)
    body = _body(server)
    assert None not in body.values(), body
    assert set(body) == ({"model", "messages"} if api == "chat" else {"model", "input"})


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_none_in_the_call_turns_configured_reasoning_settings_off(
    oai: OpenAIClient, server: OpenAITestServer, api: str
) -> None:
    force_default_value("REASONING_EFFORT", "low")
    force_default_value("MAX_COMPLETION_TOKENS", 500)
    oai.send_message(HI, model="o3-mini", api=api)
    assert len(_body(server)) == 4  # model, messages/input, the budget and the effort
    oai.send_message(HI, model="o3-mini", api=api, reasoning_effort=None, max_completion_tokens=None)
    assert set(_body(server)) == ({"model", "messages"} if api == "chat" else {"model", "input"})


def test_none_in_embedding_arguments_is_not_sent(oai: OpenAIClient, server: OpenAITestServer) -> None:
    oai.get_embedding("x", dimensions=None, encoding_format=None, user=None)
    assert _body(server) == {"model": "text-embedding-3-small", "input": ["x"], "encoding_format": "float"}


def test_azure_ad_scope_reaches_the_entra_token_provider(
    server: OpenAITestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a key or a token provider, DefaultAzureCredential is asked for a token of AZURE_AD_SCOPE."""
    import sys
    import types

    scopes: list[str] = []
    identity = types.ModuleType("azure.identity")

    class DefaultAzureCredential:  # the one piece of azure-identity llmutils uses, recorded
        pass

    def get_bearer_token_provider(credential: object, scope: str) -> object:
        assert isinstance(credential, DefaultAzureCredential)
        scopes.append(scope)
        return lambda: "entra-token"

    identity.DefaultAzureCredential = DefaultAzureCredential  # type: ignore[attr-defined]
    identity.get_bearer_token_provider = get_bearer_token_provider  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "azure", types.ModuleType("azure"))
    monkeypatch.setitem(sys.modules, "azure.identity", identity)
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", server.azure_endpoint)
    monkeypatch.setenv("LLMUTILS_AZURE_AD_SCOPE", "https://ai.azure.com/.default")
    with AzureClient(model="dep", api_version="v1") as client:
        client.send_message(HI)
    assert scopes == ["https://ai.azure.com/.default"]
    assert server.requests[-1].headers["authorization"] == "Bearer entra-token"
