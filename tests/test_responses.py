"""Tests for the Responses API: the pure mapping (llmutils._apis.responses) and the test server's
``POST /v1/responses``, driven through the real openai SDK."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest

import llmutils
from llmutils import (
    AzureClient,
    ContentFilterError,
    InvalidRequestError,
    LLMCall,
    MockClient,
    NonTerminalError,
    OpenAIClient,
    RateLimitError,
    RetryPolicy,
)
from llmutils._apis.responses import (
    check_response,
    finish_reason,
    input_as_messages,
    is_responses_model,
    normalize_usage,
    output_from_message,
    output_text,
    request_from_chat,
    to_chat_message,
)
from llmutils._config import DEFAULT_RESPONSES_MODELS
from llmutils.cli import main as cli_main
from llmutils.testing import Fault, OpenAITestServer

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def _message(text: str, *, status: str = "completed") -> dict[str, Any]:
    return {"type": "message", "role": "assistant", "status": status, "content": [{"type": "output_text", "text": text, "annotations": []}]}


def _response(*output: dict[str, Any], status: str = "completed", **extra: Any) -> dict[str, Any]:
    return {"id": "resp_1", "object": "response", "status": status, "output": list(output), **extra}


# -- request_from_chat ----------------------------------------------------------------------------


def test_messages_become_input_with_roles_and_first_system_as_instructions() -> None:
    body = request_from_chat({
        "model": "gpt-5",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "system", "content": "Later rule."},
            {"role": "developer", "content": "dev"},
            {"role": "user", "content": "again"},
        ],
    })
    assert body == {
        "model": "gpt-5",
        "instructions": "Be brief.",
        "input": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "system", "content": "Later rule."},
            {"role": "developer", "content": "dev"},
            {"role": "user", "content": "again"},
        ],
    }


def test_system_stays_in_input_when_instructions_given_or_not_text() -> None:
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    body = request_from_chat({"model": "m", "messages": messages, "instructions": "explicit"})
    assert body["instructions"] == "explicit"
    assert body["input"][0] == {"role": "system", "content": "S"}
    parts = [{"role": "system", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}, {"role": "user", "content": "U"}]
    assert request_from_chat({"model": "m", "messages": parts})["instructions"] == "ab"


def test_content_parts_are_mapped() -> None:
    body = request_from_chat({"model": "m", "messages": [
        {"role": "user", "content": [
            {"type": "text", "text": "look"},
            {"type": "image_url", "image_url": {"url": "https://x/img.png", "detail": "low"}},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA"}},
            {"type": "file", "file": {"file_id": "file-1"}},
            {"type": "input_text", "text": "already responses"},
        ]},
        {"role": "assistant", "content": [{"type": "text", "text": "seen"}]},
    ]})
    assert body["input"] == [
        {"role": "user", "content": [
            {"type": "input_text", "text": "look"},
            {"type": "input_image", "image_url": "https://x/img.png", "detail": "low"},
            {"type": "input_image", "image_url": "data:image/png;base64,AAA", "detail": "auto"},
            {"type": "input_file", "file_id": "file-1"},
            {"type": "input_text", "text": "already responses"},
        ]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "seen"}]},
    ]


def test_tool_call_turns_become_function_call_items() -> None:
    body = request_from_chat({"model": "m", "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"type": "item_reference", "id": "rs_9"},
    ]})
    assert body["input"] == [
        {"role": "user", "content": "weather?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        {"type": "item_reference", "id": "rs_9"},
    ]


def test_a_returned_message_can_be_sent_back() -> None:
    """The chat-shaped message send_message returns (with reasoning and refusal) goes back in as input."""
    returned = {"role": "assistant", "content": "yes", "reasoning": "thought", "refusal": None}
    body = request_from_chat({"model": "m", "messages": [{"role": "user", "content": "q"}, returned]})
    assert body["input"][1] == {"role": "assistant", "content": "yes"}
    refused = {"role": "assistant", "content": None, "refusal": "I can't help with that."}
    body = request_from_chat({"model": "m", "messages": [{"role": "user", "content": "q"}, refused]})
    assert body["input"][1] == {"role": "assistant", "content": "I can't help with that."}


def test_legacy_function_role_is_refused() -> None:
    with pytest.raises(InvalidRequestError, match=r"messages\[1\].*'function'"):
        request_from_chat({"model": "m", "messages": [{"role": "user", "content": "q"}, {"role": "function", "name": "f", "content": "1"}]})


@pytest.mark.parametrize(
    ("chat", "expected"),
    [
        ({"max_tokens": 100}, {"max_output_tokens": 100}),
        ({"max_completion_tokens": 200}, {"max_output_tokens": 200}),
        ({"max_tokens": 100, "max_completion_tokens": 200}, {"max_output_tokens": 200}),
        ({"max_tokens": 100, "max_output_tokens": 50}, {"max_output_tokens": 50}),
        ({"reasoning_effort": "low"}, {"reasoning": {"effort": "low"}}),
        ({"reasoning_effort": "low", "reasoning": {"summary": "auto"}}, {"reasoning": {"summary": "auto", "effort": "low"}}),
        ({"reasoning_effort": "low", "reasoning": {"effort": "high"}}, {"reasoning": {"effort": "high"}}),
        ({"response_format": {"type": "json_object"}}, {"text": {"format": {"type": "json_object"}}}),
        ({"response_format": {"type": "text"}}, {"text": {"format": {"type": "text"}}}),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "Person", "schema": {"type": "object"}, "strict": True}}},
            {"text": {"format": {"type": "json_schema", "name": "Person", "schema": {"type": "object"}, "strict": True}}},
        ),
        ({"verbosity": "low"}, {"text": {"verbosity": "low"}}),
        ({"seed": 7, "frequency_penalty": 0.5, "presence_penalty": 0.0, "stop": ["\n"], "n": 1}, {}),
        ({"temperature": 0.2, "top_p": 0.9}, {"temperature": 0.2, "top_p": 0.9}),
        ({"logprobs": True, "top_logprobs": 3}, {"include": ["message.output_text.logprobs"], "top_logprobs": 3}),
        ({"logprobs": False}, {}),
        (
            {"previous_response_id": "resp_1", "store": False, "include": ["reasoning.encrypted_content"], "prompt_cache_key": "k", "service_tier": "flex"},
            {"previous_response_id": "resp_1", "store": False, "include": ["reasoning.encrypted_content"], "prompt_cache_key": "k", "service_tier": "flex"},
        ),
        ({"parallel_tool_calls": False, "user": "u1", "metadata": {"a": "b"}}, {"parallel_tool_calls": False, "user": "u1", "metadata": {"a": "b"}}),
    ],
)
def test_parameter_mapping(chat: dict[str, Any], expected: dict[str, Any]) -> None:
    body = request_from_chat({"model": "m", "messages": [{"role": "user", "content": "q"}], **chat})
    assert body == {"model": "m", "input": [{"role": "user", "content": "q"}], **expected}


def test_tools_are_flattened_and_not_strict_unless_asked() -> None:
    strict = {"type": "function", "function": {"name": "s", "parameters": {"type": "object"}, "strict": True}}
    bare = {"type": "function", "function": {"name": "ping"}}
    builtin = {"type": "web_search"}
    body = request_from_chat({"model": "m", "messages": [{"role": "user", "content": "q"}], "tools": [WEATHER_TOOL, strict, bare, builtin]})
    assert body["tools"] == [
        {"type": "function", "name": "get_weather", "description": "Weather in a city",
         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}, "strict": False},
        {"type": "function", "name": "s", "parameters": {"type": "object"}, "strict": True},
        {"type": "function", "name": "ping", "parameters": {"type": "object", "properties": {}}, "strict": False},
        {"type": "web_search"},
    ]


@pytest.mark.parametrize(
    ("chat", "expected"),
    [
        ("auto", "auto"),
        ("required", "required"),
        ("none", "none"),
        ({"type": "function", "function": {"name": "get_weather"}}, {"type": "function", "name": "get_weather"}),
        (
            {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [{"type": "function", "function": {"name": "a"}}]}},
            {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "a"}]},
        ),
        ({"type": "web_search"}, {"type": "web_search"}),
    ],
)
def test_tool_choice_mapping(chat: Any, expected: Any) -> None:
    body = request_from_chat({"model": "m", "messages": [{"role": "user", "content": "q"}], "tool_choice": chat})
    assert body["tool_choice"] == expected


@pytest.mark.parametrize("n", [2, 5])
def test_n_above_one_is_refused(n: int) -> None:
    with pytest.raises(InvalidRequestError, match="has no 'n'"):
        request_from_chat({"model": "m", "messages": [{"role": "user", "content": "q"}], "n": n})


def test_response_format_and_text_format_conflict() -> None:
    with pytest.raises(InvalidRequestError, match="response_format and text"):
        request_from_chat({"model": "m", "messages": [], "response_format": {"type": "json_object"}, "text": {"format": {"type": "text"}}})
    with pytest.raises(InvalidRequestError, match="response_format must be a dict"):
        request_from_chat({"model": "m", "messages": [], "response_format": "json"})


def test_request_from_chat_leaves_its_argument_alone() -> None:
    chat = {"model": "m", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}], "tools": [WEATHER_TOOL], "n": 1}
    before = json.loads(json.dumps(chat))
    request_from_chat(chat)
    assert chat == before


# -- reading answers --------------------------------------------------------------------------------


def test_text_answer() -> None:
    response = _response(_message("Hello "), _message("world"))
    assert to_chat_message(response) == {"role": "assistant", "content": "Hello world"}
    assert output_text(response) == "Hello world"
    assert finish_reason(response) == "stop"


def test_function_calls_in_the_chat_shape() -> None:
    response = _response(
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "function_call", "id": "fc_1", "call_id": "call_a", "name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"type": "function_call", "id": "fc_2", "call_id": "call_b", "name": "get_time", "arguments": ""},
    )
    assert to_chat_message(response) == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
        ],
    }
    assert finish_reason(response) == "tool_calls"


def test_refusal_and_reasoning_summary() -> None:
    refusal = _response({"type": "message", "role": "assistant", "content": [{"type": "refusal", "refusal": "I can't."}]})
    assert to_chat_message(refusal) == {"role": "assistant", "content": None, "refusal": "I can't."}
    reasoned = _response(
        {"type": "reasoning", "id": "rs", "summary": [{"type": "summary_text", "text": "Step one."}, {"type": "summary_text", "text": "Step two."}]},
        _message("42"),
    )
    assert to_chat_message(reasoned) == {"role": "assistant", "content": "42", "reasoning": "Step one.\n\nStep two."}


def test_stop_is_applied_when_reading() -> None:
    response = _response(_message("one\ntwo END three"))
    assert to_chat_message(response, stop=["END", "\n"])["content"] == "one"
    assert to_chat_message(response, stop="three")["content"] == "one\ntwo END "
    assert to_chat_message(response, stop=["absent"])["content"] == "one\ntwo END three"
    cut = _response(_message("a b STOP c"), status="incomplete", incomplete_details={"reason": "max_output_tokens"})
    assert finish_reason(cut) == "length"
    assert finish_reason(cut, stop="STOP") == "stop"


def test_incomplete_answers_keep_their_text() -> None:
    response = _response(_message("partial", status="incomplete"), status="incomplete", incomplete_details={"reason": "max_output_tokens"})
    check_response(response)
    assert to_chat_message(response) == {"role": "assistant", "content": "partial"}
    assert finish_reason(response) == "length"
    empty = _response({"type": "reasoning", "id": "rs", "summary": []}, status="incomplete", incomplete_details={"reason": "max_output_tokens"})
    assert to_chat_message(empty) == {"role": "assistant", "content": ""}


def test_content_filter_is_an_error() -> None:
    response = _response(_message("par"), status="incomplete", incomplete_details={"reason": "content_filter"})
    with pytest.raises(ContentFilterError, match="content filter"):
        check_response(response)


@pytest.mark.parametrize(
    ("code", "error"),
    [
        ("server_error", NonTerminalError),
        ("vector_store_timeout", NonTerminalError),
        ("rate_limit_exceeded", RateLimitError),
        ("bio_policy", ContentFilterError),
        ("image_content_policy_violation", ContentFilterError),
        ("invalid_prompt", InvalidRequestError),
        ("invalid_image_url", InvalidRequestError),
    ],
)
def test_failed_maps_to_the_error_tree(code: str, error: type[Exception]) -> None:
    response = _response(status="failed", error={"code": code, "message": "went wrong"})
    with pytest.raises(error, match=f"{code}.*went wrong") as info:
        check_response(response, message=False)
    assert info.value.code == code  # callers branch on exc.code, as for an HTTP error
    if error is InvalidRequestError:
        assert not isinstance(info.value, ContentFilterError)


def test_unfinished_responses() -> None:
    queued = _response(status="queued")
    check_response(queued, message=False)  # create_response returns it as is
    with pytest.raises(InvalidRequestError, match="queued.*create_response"):
        check_response(queued)
    with pytest.raises(NonTerminalError, match="no output"):
        check_response({"id": "resp_x", "status": "completed"})


def test_usage_of_both_apis() -> None:
    responses_usage = {
        "input_tokens": 100, "input_tokens_details": {"cached_tokens": 64},
        "output_tokens": 30, "output_tokens_details": {"reasoning_tokens": 20}, "total_tokens": 130,
    }
    flat = normalize_usage(responses_usage)
    assert flat == {**responses_usage, "prompt_tokens": 100, "completion_tokens": 30, "cached_tokens": 64, "reasoning_tokens": 20}
    chat_usage = {
        "prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
        "prompt_tokens_details": {"cached_tokens": 8, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 3},
    }
    assert normalize_usage(chat_usage) == {**chat_usage, "cached_tokens": 8, "reasoning_tokens": 3}
    assert normalize_usage({"prompt_tokens": 1, "completion_tokens": 2}) == {
        "prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3, "cached_tokens": 0, "reasoning_tokens": 0,
    }
    assert normalize_usage(None) is None
    flat["input_tokens_details"]["cached_tokens"] = 0
    assert responses_usage["input_tokens_details"]["cached_tokens"] == 64  # a copy, never shared


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("o3-pro", True), ("o3-pro-2025-06-10", True), ("o1-pro", True), ("gpt-5-pro", True), ("gpt-5.2-pro", True),
        ("gpt-5-codex", True), ("gpt-5.1-codex-mini", True), ("codex-mini-latest", True), ("GPT-5-Codex", True),
        ("o4-mini-deep-research", True), ("computer-use-preview", True),
        ("gpt-5", False), ("gpt-4o", False), ("o3", False), ("o3-mini", False), ("gpt-5-mini", False),
    ],
)
def test_responses_only_models(model: str, expected: bool) -> None:
    assert is_responses_model(model, DEFAULT_RESPONSES_MODELS) is expected


def test_responses_model_patterns() -> None:
    assert is_responses_model("my-deploy-1", ["my-deploy"])
    assert not is_responses_model("gpt-4o", ["", " "])


# -- the test server ---------------------------------------------------------------------------------


@pytest.fixture
def sdk(server: OpenAITestServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0) as c:
        yield c


def test_server_text_round_trip(sdk: openai.OpenAI, server: OpenAITestServer) -> None:
    answer = sdk.responses.create(model="gpt-5", input="hello there", instructions="Be nice")
    assert answer.status == "completed"
    assert answer.output_text == "echo: hello there"
    assert answer.usage is not None and answer.usage.input_tokens == 4 and answer.usage.output_tokens == 3
    assert server.requests[-1].path == "/v1/responses"
    assert to_chat_message(answer.model_dump()) == {"role": "assistant", "content": "echo: hello there"}


def test_server_mapped_chat_request_round_trip(sdk: openai.OpenAI) -> None:
    """A whole chat request, mapped, is accepted by the server (no chat-only field leaks)."""
    chat = {
        "model": "gpt-4.1", "temperature": 0.5, "top_p": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
        "max_tokens": 64, "stop": ["\n\n"], "seed": 1, "n": 1,
        "messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": [{"type": "text", "text": "call me"}]}],
        "tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    }
    raw = sdk.post("/responses", body=request_from_chat(chat), cast_to=object)
    message = to_chat_message(raw)
    assert message["content"] is None
    assert message["tool_calls"][0]["function"]["name"] == "get_weather"
    assert finish_reason(raw) == "tool_calls"


def test_server_rejects_chat_fields_like_the_real_api(sdk: openai.OpenAI) -> None:
    for extra in ({"n": 2}, {"messages": []}, {"max_tokens": 5}, {"response_format": {"type": "json_object"}}, {"seed": 1}):
        with pytest.raises(openai.BadRequestError, match="Unknown parameter") as info:
            sdk.responses.create(model="m", input="q", extra_body=extra)
        assert info.value.code == "unknown_parameter"
    with pytest.raises(openai.BadRequestError, match=r"tools\[0\].name"):
        sdk.responses.create(model="m", input="q", tools=[WEATHER_TOOL])  # type: ignore[list-item]
    with pytest.raises(openai.BadRequestError, match="max_output_tokens"):
        sdk.responses.create(model="m", input="q", max_output_tokens=5)
    with pytest.raises(openai.BadRequestError, match="text.format.name"):
        sdk.responses.create(model="m", input="q", text={"format": {"type": "json_schema", "schema": {}}})  # type: ignore[typeddict-item]
    with pytest.raises(openai.BadRequestError, match="not found"):
        sdk.responses.create(model="m", input="q", previous_response_id="resp_nope")


def test_server_function_call_then_output(sdk: openai.OpenAI) -> None:
    tools = request_from_chat({"model": "m", "tools": [WEATHER_TOOL]})["tools"]
    first = sdk.responses.create(model="m", input="call the weather", tools=tools)
    call = first.output[0]
    assert call.type == "function_call" and call.name == "get_weather" and call.arguments == "{}"
    second = sdk.responses.create(
        model="m", tools=tools, previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
    )
    assert second.output_text == "result: sunny"


def test_server_json_schema_and_reasoning(sdk: openai.OpenAI) -> None:
    answer = sdk.responses.create(
        model="gpt-5", input="q", reasoning={"effort": "low", "summary": "auto"},
        text={"format": {"type": "json_schema", "name": "Echo", "schema": {"type": "object"}}},
    )
    assert json.loads(answer.output_text) == {"echo": "q"}
    message = to_chat_message(answer.model_dump())
    assert message["reasoning"] == "Thinking about: q"
    assert answer.usage is not None and answer.usage.output_tokens_details.reasoning_tokens == 2
    no_summary = sdk.responses.create(model="gpt-5", input="q", reasoning={"effort": "low"})
    assert "reasoning" not in to_chat_message(no_summary.model_dump())


def test_server_reports_cached_input_on_a_repeat(sdk: openai.OpenAI) -> None:
    first = sdk.responses.create(model="m", input="same words here")
    second = sdk.responses.create(model="m", input="same words here")
    assert first.usage is not None and first.usage.input_tokens_details.cached_tokens == 0
    assert second.usage is not None and second.usage.input_tokens_details.cached_tokens == 3


def test_server_incomplete_at_max_output_tokens(sdk: openai.OpenAI) -> None:
    answer = sdk.responses.create(model="m", input=" ".join(["w"] * 30), max_output_tokens=16)
    assert answer.status == "incomplete"
    assert answer.incomplete_details is not None and answer.incomplete_details.reason == "max_output_tokens"
    raw = answer.model_dump()
    assert to_chat_message(raw)["content"] == "echo: " + " ".join(["w"] * 15)
    assert finish_reason(raw) == "length"


def test_server_scripted_states_and_faults(sdk: openai.OpenAI, server: OpenAITestServer) -> None:
    server.script(Fault.response_failed("server_error"), Fault.response_incomplete("content_filter", "par"), Fault.server_error())
    failed = sdk.responses.create(model="m", input="q")
    assert failed.status == "failed" and failed.error is not None and failed.error.code == "server_error"
    with pytest.raises(NonTerminalError):
        check_response(failed.model_dump())
    filtered = sdk.responses.create(model="m", input="q")
    with pytest.raises(ContentFilterError):
        check_response(filtered.model_dump())
    with pytest.raises(openai.InternalServerError):
        sdk.responses.create(model="m", input="q")
    assert sdk.responses.create(model="m", input="q").output_text == "echo: q"


def test_server_handler(sdk: openai.OpenAI, server: OpenAITestServer) -> None:
    server.responses_handler = lambda body: f"handled {body['model']}"
    assert sdk.responses.create(model="m", input="q").output_text == "handled m"
    server.responses_handler = lambda body: {"id": "resp_custom", "object": "response", "created_at": 0, "model": "x",
                                             "output": [], "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "status": "completed"}
    assert sdk.responses.create(model="m", input="q").id == "resp_custom"


def test_server_azure_v1_path(server: OpenAITestServer) -> None:
    with openai.OpenAI(base_url=f"{server.azure_endpoint}/openai/v1/", api_key="k", max_retries=0) as azure:
        answer = azure.responses.create(model="my-deployment", input="from azure")
    assert answer.output_text == "echo: from azure"
    assert answer.model == "my-deployment"
    assert server.requests[-1].path == "/openai/v1/responses"


def test_input_as_messages_for_token_counting() -> None:
    chat = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "out"},
    ]
    body = request_from_chat({"model": "m", "messages": chat})
    assert input_as_messages(body) == chat
    assert input_as_messages({"input": "hello", "instructions": None}) == [{"role": "user", "content": "hello"}]
    assert input_as_messages({"input": [{"type": "reasoning", "id": "rs", "summary": []}]}) == []


@pytest.mark.parametrize(
    "message",
    [
        {"role": "assistant", "content": "hi"},
        {"role": "assistant", "content": ""},
        {"role": "assistant", "content": None, "refusal": "no"},
        {"role": "assistant", "content": "42", "reasoning": "thought"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
    ],
)
def test_output_from_message_round_trips(message: dict[str, Any]) -> None:
    assert to_chat_message(_response(*output_from_message(message))) == message


# -- through the client, the real SDK's HTTP stack and the test server ---------------------------------

HI = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]


@pytest.fixture
def waits() -> list[float]:
    return []


@pytest.fixture
def client(server: OpenAITestServer, waits: list[float]) -> Iterator[OpenAIClient]:
    with OpenAIClient(base_url=server.base_url, api_key="k", api="responses", retry=RetryPolicy(sleep=waits.append)) as c:
        yield c


def test_send_message_over_responses(client: OpenAIClient, server: OpenAITestServer) -> None:
    answer = client.send_message(HI, temperature=0.2, max_tokens=100, seed=3, frequency_penalty=0.1)
    assert answer == {"role": "assistant", "content": "echo: hello there"}
    request = server.requests[-1]
    assert request.path == "/v1/responses"
    assert request.body == {
        "model": "gpt-4.1-mini", "instructions": "Be brief.", "input": [{"role": "user", "content": "hello there"}],
        "temperature": 0.2, "max_output_tokens": 100,
    }
    info = client.last_call
    assert info is not None and info.kind == "responses" and info.finish_reason == "stop" and not info.cached
    assert info.usage is not None and info.usage["prompt_tokens"] == 4 and info.usage["completion_tokens"] == 3


def test_function_call_comes_back_in_the_chat_shape_and_goes_on(client: OpenAIClient, server: OpenAITestServer) -> None:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "call the weather service"}]
    answer = client.send_message(messages, tools=[WEATHER_TOOL], tool_choice="auto")
    call_id = answer["tool_calls"][0]["id"]
    assert answer == {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}],
    }
    assert client.last_call is not None and client.last_call.finish_reason == "tool_calls"
    assert server.requests[-1].body["tools"][0] == {
        "type": "function", "name": "get_weather", "description": "Weather in a city",
        "parameters": WEATHER_TOOL["function"]["parameters"], "strict": False,
    }
    messages += [answer, {"role": "tool", "tool_call_id": call_id, "content": "sunny"}]
    assert client.send_message(messages, tools=[WEATHER_TOOL])["content"] == "result: sunny"
    assert server.requests[-1].body["input"][1:] == [
        {"type": "function_call", "call_id": call_id, "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": call_id, "output": "sunny"},
    ]


def test_responses_items_in_messages(client: OpenAIClient, server: OpenAITestServer) -> None:
    first = client.create_response(input="call it", tools=[{"type": "function", "name": "f", "parameters": {}, "strict": False}])
    item = {"type": "function_call_output", "call_id": first["output"][0]["call_id"], "output": "42"}
    answer = client.send_message([item], previous_response_id=first["id"])
    assert answer["content"] == "result: 42"
    with pytest.raises(InvalidRequestError, match=r"messages\[0\] has no 'role'"):
        client.send_message([item], api="chat")
    assert server.request_count == 2


def test_json_schema_and_llmcall_output_type(client: OpenAIClient, server: OpenAITestServer) -> None:
    schema = {"name": "Echo", "schema": {"type": "object", "properties": {"echo": {"type": "string"}}}, "strict": True}
    answer = client.send_message(HI, response_format={"type": "json_schema", "json_schema": schema})
    assert json.loads(answer["content"]) == {"echo": "hello there"}
    assert server.requests[-1].body["text"] == {"format": {"type": "json_schema", **schema}}
    call = LLMCall("system_default", "user_default", output_type=dict, client=client)
    assert call.call(prompt="hi") == {"echo": "hi"}
    assert server.requests[-1].body["text"]["format"]["type"] in ("json_object", "json_schema")
    assert server.requests[-1].path == "/v1/responses"


def test_reasoning_summary_and_usage(client: OpenAIClient) -> None:
    answer = client.send_message(HI, model="gpt-5", reasoning_effort="low", reasoning={"summary": "auto"})
    assert answer == {"role": "assistant", "content": "echo: hello there", "reasoning": "Thinking about: hello there"}
    info = client.last_call
    assert info is not None and info.usage is not None
    assert info.usage["reasoning_tokens"] == 3 and info.usage["completion_tokens"] == 6 and info.usage["cached_tokens"] == 0
    client.send_message(HI, model="gpt-5", reasoning_effort="low", reasoning={"summary": "auto"})  # cache off: sent again
    assert client.last_call is not None and client.last_call.usage is not None
    assert client.last_call.usage["cached_tokens"] == 4  # the server saw this input before
    totals = client.usage.totals()
    assert totals.requests == 2 and totals.prompt_tokens == 8 and totals.completion_tokens == 12
    if hasattr(totals, "reasoning_tokens"):  # ModelUsage's provider-side fields (llmutils._usage)
        assert totals.reasoning_tokens == 6


def test_cache_repeat_makes_no_request(server: OpenAITestServer, tmp_path: Any) -> None:
    with OpenAIClient(base_url=server.base_url, api_key="k", api="responses", cache_api_calls=True, cache_file_name=tmp_path / "c.sqlite") as c:
        first = c.send_message(HI)
        before = server.request_count
        assert c.send_message(HI) == first
        assert server.request_count == before == 1
        assert c.last_call is not None and c.last_call.cached and c.last_call.kind == "responses"
        raw = c.create_response(input="x", store=False, prompt_cache_key="a")
        assert c.create_response(input="x", store=False, prompt_cache_key="a") == raw
        c.create_response(input="x", store=False, prompt_cache_key="b")  # every sent parameter is in the key
        assert server.request_count == 3
        c.send_message(HI, api="chat")  # the same messages on chat are another request
        assert server.request_count == 4 and server.requests[-1].path == "/v1/chat/completions"
        assert c.usage.totals().cached_requests == 2


def test_responses_only_models_are_routed(server: OpenAITestServer) -> None:
    with OpenAIClient(base_url=server.base_url, api_key="k") as c:
        c.send_message(HI, model="o3-pro")
        c.send_message(HI, model="gpt-5.1-codex-mini")
        c.send_message(HI, model="gpt-4o")
        c.send_message(HI, model="o3-pro", api="chat")
        assert [r.path for r in server.requests] == ["/v1/responses", "/v1/responses", "/v1/chat/completions", "/v1/chat/completions"]
    with OpenAIClient(base_url=server.base_url, api_key="k", api="chat") as explicit:
        explicit.send_message(HI, model="o3-pro")
        assert server.requests[-1].path == "/v1/chat/completions"
    llmutils.force_default_value("MODEL_ALIASES", "prod=o3-pro")  # an Azure deployment of a Responses-only model
    with AzureClient(azure_endpoint=server.azure_endpoint, api_key="k", model="prod") as azure:
        azure.send_message(HI)
        assert server.requests[-1].path == "/openai/v1/responses"


def test_api_from_config_file_env_and_forced(server: OpenAITestServer, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    (tmp_path / "config.ini").write_text("[OpenAI]\nAPI = responses\nRESPONSES_MODELS = my-deploy\n")
    with OpenAIClient() as c:
        c.send_message(HI)
        assert server.requests[-1].path == "/v1/responses"
        monkeypatch.setenv("LLMUTILS_API", "chat")
        c.send_message(HI, model="my-deploy-1")
        assert server.requests[-1].path == "/v1/chat/completions"
        monkeypatch.delenv("LLMUTILS_API")
        (tmp_path / "config.ini").write_text("[OpenAI]\nRESPONSES_MODELS = my-deploy\n")
        c.send_message(HI, model="my-deploy-1")
        assert server.requests[-1].path == "/v1/responses"
        llmutils.force_default_value("API", "chat")
        c.send_message(HI, model="my-deploy-1")
        assert server.requests[-1].path == "/v1/chat/completions"


def test_n_above_one_and_bad_api_refused_before_sending(client: OpenAIClient, server: OpenAITestServer) -> None:
    with pytest.raises(InvalidRequestError, match="has no 'n'"):
        client.send_message(HI, n=2)
    with pytest.raises(InvalidRequestError, match="api must be"):
        client.send_message(HI, api="completions")
    with pytest.raises(InvalidRequestError, match="needs input"):
        client.create_response()
    with pytest.raises(InvalidRequestError, match="stream"):
        client.create_response(input="x", stream=True)
    assert server.request_count == 0
    with pytest.raises(llmutils.ConfigError, match="API"):
        OpenAIClient(api="completions")


def test_incomplete_answer_is_returned_with_its_reason(client: OpenAIClient) -> None:
    long = " ".join(["w"] * 30)
    answer = client.send_message([{"role": "user", "content": long}], max_tokens=16)
    assert answer == {"role": "assistant", "content": "echo: " + " ".join(["w"] * 15)}
    assert client.last_call is not None and client.last_call.finish_reason == "length"


def test_stop_is_emulated(client: OpenAIClient, server: OpenAITestServer) -> None:
    assert client.send_message([{"role": "user", "content": "one two"}], stop=[" two", "zzz"])["content"] == "echo: one"
    assert "stop" not in server.requests[-1].body


def test_failed_and_filtered_answers_map_to_the_error_tree(client: OpenAIClient, server: OpenAITestServer, waits: list[float]) -> None:
    server.script(Fault.response_failed("server_error"), Fault.rate_limit(retry_after=0.5))
    assert client.send_message(HI)["content"] == "echo: hello there"  # retried twice
    assert server.request_count == 3 and len(waits) == 2 and waits[1] == 0.5
    server.script(Fault.response_incomplete("content_filter", "partial"))
    with pytest.raises(ContentFilterError):
        client.send_message(HI)
    assert server.request_count == 4  # not retried
    server.script(Fault.response_failed("invalid_prompt", "flagged"))
    with pytest.raises(InvalidRequestError, match="flagged"):
        client.create_response(input="x")
    server.script(Fault.bad_request("nope"))
    with pytest.raises(InvalidRequestError, match="nope") as info:
        client.create_response(input="x")
    assert info.value.status_code == 400


def test_create_response_returns_the_raw_json(client: OpenAIClient, server: OpenAITestServer) -> None:
    first = client.create_response(model="gpt-5", input="hi", reasoning={"effort": "low", "summary": "auto"}, include=["reasoning.encrypted_content"], store=True)
    assert first["object"] == "response" and first["status"] == "completed"
    assert first["output"][0]["type"] == "reasoning"
    assert output_text(first) == "echo: hi"
    second = client.create_response(model="gpt-5", input="again", previous_response_id=first["id"], service_tier="flex")
    body = server.requests[-1].body
    assert body == {"model": "gpt-5", "input": "again", "previous_response_id": first["id"], "service_tier": "flex"}
    assert second["previous_response_id"] == first["id"]
    assert client.last_call is not None and client.last_call.kind == "responses"


def test_background_responses_are_not_cached(server: OpenAITestServer, tmp_path: Any) -> None:
    queued = {"id": "resp_bg", "object": "response", "created_at": 0, "model": "m", "status": "queued", "output": [],
              "parallel_tool_calls": True, "tool_choice": "auto", "tools": []}
    server.responses_handler = lambda body: queued
    with OpenAIClient(base_url=server.base_url, api_key="k", cache_api_calls=True, cache_file_name=tmp_path / "c.sqlite") as c:
        assert c.create_response(input="x", background=True)["status"] == "queued"
        assert c.create_response(input="x", background=True)["status"] == "queued"
        assert server.request_count == 2
        with pytest.raises(InvalidRequestError, match="queued"):
            c.send_message(HI, api="responses", background=True)


def test_azure_responses_use_the_v1_path(server: OpenAITestServer) -> None:
    with AzureClient(azure_endpoint=server.azure_endpoint, api_key="azure-key", model="my-deployment", api="responses") as c:
        assert c.send_message(HI)["content"] == "echo: hello there"
        c.send_message(HI, api="chat")
    responses, chat = server.requests
    assert responses.path == "/openai/v1/responses" and responses.query == {} and responses.body["model"] == "my-deployment"
    assert responses.headers["authorization"] == "Bearer azure-key"
    assert chat.path == "/openai/deployments/my-deployment/chat/completions" and chat.query["api-version"]
    with AzureClient(azure_endpoint=server.azure_endpoint, api_key="k", model="dep", api_version="v1") as v1:
        v1.send_message(HI)
        v1.send_message(HI, api="responses")
    assert [r.path for r in server.requests[-2:]] == ["/openai/v1/chat/completions", "/openai/v1/responses"]
    tokens = iter(["t1", "t2"])
    with AzureClient(azure_endpoint=server.azure_endpoint, azure_ad_token_provider=lambda: next(tokens), api="responses") as entra:
        entra.create_response(model="dep", input="x")
    assert server.requests[-1].headers["authorization"] == "Bearer t1"


def test_batch_map_calls_and_tpm(server: OpenAITestServer) -> None:
    with OpenAIClient(base_url=server.base_url, api_key="k", tpm=1_000_000) as c:
        results = llmutils.batch([{"prompt": "a"}, [{"role": "user", "content": "b"}]], client=c, user_template="user_default",
                                 workers=2, api="responses")
        assert [r.content for r in results] == ["echo: a", "echo: b"]
        assert all(r.tokens > 0 for r in results)
        call = LLMCall("system_default", "user_default", client=c, api="responses")
        mapped = llmutils.map_calls(lambda p: call.call(prompt=p), ["x", "y"], client=c, workers=2)
        assert [r.output for r in mapped] == ["echo: x", "echo: y"]
    assert {r.path for r in server.requests} == {"/v1/responses"}


def test_cli_chat_and_batch_with_api_responses(server: OpenAITestServer, tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["--base-url", server.base_url, "chat", "--api", "responses", "hi", "--max-tokens", "20"]) == 0
    assert capsys.readouterr().out == "echo: hi\n"
    assert server.requests[-1].path == "/v1/responses" and server.requests[-1].body["max_output_tokens"] == 20
    (tmp_path / "in.jsonl").write_text('{"prompt": "first"}\n')
    code = cli_main(["batch", "in.jsonl", "out.jsonl", "--base-url", server.base_url, "--api", "responses", "--no-progress", "--no-cache"])
    assert code == 0
    assert json.loads((tmp_path / "out.jsonl").read_text())["output"] == "echo: first"
    assert server.requests[-1].path == "/v1/responses"


def test_mock_client_answers_in_the_responses_shape() -> None:
    call = {"id": "call_9", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    mock = MockClient(api="responses", answers=[{"role": "assistant", "content": None, "tool_calls": [call]}])
    assert mock.send_message(HI) == {"role": "assistant", "content": None, "tool_calls": [call]}
    raw = mock.create_response(input="hi", text={"format": {"type": "json_object"}})
    assert raw["object"] == "response" and json.loads(output_text(raw)) == {"echo": "hi"}
    assert raw["usage"]["input_tokens"] > 0 and raw["usage"]["output_tokens_details"] == {"reasoning_tokens": 0}
    assert mock.send_message(HI) == {"role": "assistant", "content": "echo: hello there"}
    assert mock.calls == 3


def test_chat_usage_details_in_last_call(server: OpenAITestServer) -> None:
    server.chat_handler = lambda body: {
        "id": "c", "object": "chat.completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
                  "prompt_tokens_details": {"cached_tokens": 8}, "completion_tokens_details": {"reasoning_tokens": 2}},
    }
    with OpenAIClient(base_url=server.base_url, api_key="k") as c:
        c.send_message(HI)
    info = c.last_call
    assert info is not None and info.kind == "chat" and info.finish_reason == "length"
    assert info.usage is not None and info.usage["cached_tokens"] == 8 and info.usage["reasoning_tokens"] == 2
    totals = c.usage.totals()
    if hasattr(totals, "reasoning_tokens"):
        assert totals.reasoning_tokens == 2


def test_tpm_estimate_of_a_responses_body() -> None:
    body = request_from_chat({"model": "gpt-4o", "messages": HI, "max_tokens": 100})
    chat_estimate = OpenAIClient._estimate_tokens({"model": "gpt-4o", "messages": HI, "max_tokens": 100})
    assert OpenAIClient._estimate_tokens(body) == chat_estimate
    assert OpenAIClient._estimate_tokens({"model": "gpt-4o", "input": "hello there"}) > 0


def test_llmcall_with_a_pydantic_output_type(client: OpenAIClient, server: OpenAITestServer) -> None:
    pydantic = pytest.importorskip("pydantic")

    class Echo(pydantic.BaseModel):
        echo: str

    value = LLMCall("system_default", "user_default", output_type=Echo, client=client).call(prompt="hi")
    assert value == Echo(echo="hi")
    text_format = server.requests[-1].body["text"]["format"]
    assert text_format["type"] == "json_schema" and text_format["name"] and text_format["strict"] is True


def test_the_readme_section_runs() -> None:
    """Every Python block of the README's "Responses API" section runs as written, offline."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Responses API") : readme.index("\n## ", readme.index("## Responses API") + 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"max_tokens": 64}, {"max_output_tokens": 64}),
        ({"model": "gpt-5", "max_completion_tokens": 300, "reasoning_effort": "high"}, {"max_output_tokens": 300, "reasoning": {"effort": "high"}}),
        ({"response_format": {"type": "json_object"}}, {"text": {"format": {"type": "json_object"}}}),
        ({"verbosity": "low"}, {"text": {"verbosity": "low"}}),
        ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
         {"tool_choice": {"type": "function", "name": "get_weather"}}),
        ({"tools": [WEATHER_TOOL], "tool_choice": "required", "parallel_tool_calls": False}, {"tool_choice": "required", "parallel_tool_calls": False}),
        ({"seed": 1, "stop": "\n", "frequency_penalty": 0.5, "presence_penalty": 0.5, "n": 1}, {}),
        ({"logprobs": True, "top_logprobs": 2}, {"include": ["message.output_text.logprobs"], "top_logprobs": 2}),
        ({"store": False, "metadata": {"k": "v"}, "user": "u", "safety_identifier": "s", "prompt_cache_key": "p", "service_tier": "auto", "truncation": "auto"},
         {"store": False, "metadata": {"k": "v"}, "user": "u", "safety_identifier": "s", "prompt_cache_key": "p", "service_tier": "auto", "truncation": "auto"}),
    ],
)
def test_each_mapping_round_trips(client: OpenAIClient, server: OpenAITestServer, kwargs: dict[str, Any], expected: dict[str, Any]) -> None:
    """Through the client, the SDK's HTTP stack and the server (which refuses any chat-only field)."""
    answer = client.send_message(HI, **kwargs)
    assert answer["role"] == "assistant"
    body = server.requests[-1].body
    assert server.requests[-1].path == "/v1/responses"
    for name, value in expected.items():
        assert body[name] == value
    for chat_only in ("messages", "n", "max_tokens", "max_completion_tokens", "seed", "stop", "frequency_penalty",
                      "presence_penalty", "response_format", "reasoning_effort", "logprobs", "verbosity"):
        assert chat_only not in body


def test_a_responses_cache_key_follows_the_documented_scheme(server: OpenAITestServer, tmp_path: Any) -> None:
    """README's key scheme: sha256 of canonical JSON of {"v": 1, "kind", "api", "endpoint", "params"}."""
    import hashlib
    import sqlite3

    path = tmp_path / "keys.sqlite"
    with OpenAIClient(base_url=server.base_url, api_key="k", api="responses", cache_file_name=str(path),
                      cache_api_calls=True) as client:
        client.send_message([{"role": "user", "content": "key scheme"}])
        sent = server.requests[-1].body
    doc = {"v": 1, "kind": "responses", "api": "openai", "endpoint": server.base_url, "params": sent}
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    with sqlite3.connect(path) as db:
        keys = [row[0] for row in db.execute("select key from responses")]
    assert keys == [hashlib.sha256(canonical.encode("utf-8")).hexdigest()]


def test_create_response_call_bounds_are_not_sent(server: OpenAITestServer) -> None:
    """timeout, total_timeout and max_attempts bound the call; the body holds only the Responses params."""
    with OpenAIClient(base_url=server.base_url, api_key="k") as client:
        client.create_response(input="bounds", timeout=5, total_timeout=10, max_attempts=2, store=False)
    assert server.requests[-1].body == {"model": client.settings()["MODEL"], "input": "bounds", "store": False}
