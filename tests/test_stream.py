"""Streaming: the pure SSE decoder and assemblers, and the test server's streams and stream faults."""

from __future__ import annotations

import json
from typing import Any

import pytest

from llmutils import (
    ContentFilterError,
    InvalidRequestError,
    NonTerminalError,
    QuotaExceededError,
    RateLimitError,
    StreamInterruptedError,
)
from llmutils._apis.stream import (
    ChatStreamAssembler,
    ResponsesStreamAssembler,
    ServerSentEvent,
    SSEDecoder,
    responses_message,
    split_text,
    stream_error,
)

# -- SSE decoder -------------------------------------------------------------------------------

WIRE = (
    b": keep-alive comment\n\n"
    b"event: response.created\ndata: {\"a\": 1}\n\n"
    b"data: line one\r\ndata: line two\r\n\r\n"
    b"id: 7\rdata: \xc3\xa9t\xc3\xa9\r\r"
    b"data: [DONE]\n\n"
)
EXPECTED = [
    ServerSentEvent("response.created", '{"a": 1}'),
    ServerSentEvent(None, "line one\nline two"),
    ServerSentEvent(None, "été", "7"),
    ServerSentEvent(None, "[DONE]", "7"),
]


def decode_in(chunks: list[bytes]) -> list[ServerSentEvent]:
    decoder = SSEDecoder()
    return list(decoder.iter_events(chunks))


def test_sse_decoder_whole_stream() -> None:
    assert decode_in([WIRE]) == EXPECTED


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 13])
def test_sse_decoder_any_chunk_boundaries(size: int) -> None:
    """Lines, CRLF pairs, events and UTF-8 characters split anywhere decode the same."""
    chunks = [WIRE[i : i + size] for i in range(0, len(WIRE), size)]
    assert decode_in(chunks) == EXPECTED


def test_sse_decoder_crlf_split_between_chunks_is_one_line_end() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: x\r") == []
    assert decoder.feed(b"\n\r") == [ServerSentEvent(None, "x")]  # LF of the CRLF, then CR: blank line
    assert decoder.feed(b"\ndata: y\n\n") == [ServerSentEvent(None, "y")]  # that CR's LF is not another line
    assert decoder.finish() == []


def test_sse_decoder_unterminated_last_event_is_kept_at_finish() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: {\"x\": 1}") == []
    assert decoder.finish() == [ServerSentEvent(None, '{"x": 1}')]


def test_done_and_json() -> None:
    assert ServerSentEvent(None, "[DONE]").is_done
    assert ServerSentEvent(None, '{"a": [1]}').json() == {"a": [1]}
    with pytest.raises(NonTerminalError, match="not JSON"):
        ServerSentEvent(None, "{oops").json()


# -- chat chunks -------------------------------------------------------------------------------


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, index: int = 0, **extra: Any) -> ServerSentEvent:
    body: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m", **extra}
    if delta is not None or finish is not None:
        body["choices"] = [{"index": index, "delta": delta or {}, "logprobs": None, "finish_reason": finish}]
    return ServerSentEvent(None, json.dumps(body))


def test_chat_assembler_text_in_order_and_usage() -> None:
    assembler = ChatStreamAssembler()
    events = [
        ServerSentEvent(None, json.dumps({"id": "x", "choices": [], "prompt_filter_results": []})),  # Azure's first chunk
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Hel"}),
        chunk({"content": "lo"}),
        chunk({"content": " there"}),
        chunk({}, finish="stop"),
        ServerSentEvent(None, json.dumps({"id": "chatcmpl-1", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})),
        ServerSentEvent(None, "[DONE]"),
    ]
    deltas = [assembler.feed(e) for e in events]
    assert [d for d in deltas if d] == ["Hel", "lo", " there"]
    assert assembler.done and assembler.started
    completion = assembler.completion()
    assert completion["object"] == "chat.completion"
    assert completion["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "Hello there", "refusal": None}, "logprobs": None, "finish_reason": "stop"}
    ]
    assert completion["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert completion["id"] == "x" and completion["model"] == "m"


def test_chat_assembler_tool_calls_from_fragments() -> None:
    assembler = ChatStreamAssembler()
    fragments = [
        {"role": "assistant", "content": None, "tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Paris"}'}}]},
        {"tool_calls": [{"index": 1, "id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
    ]
    for fragment in fragments:
        assert assembler.feed(chunk(fragment)) == ""
    assembler.feed(chunk({}, finish="tool_calls"))
    message = assembler.completion()["choices"][0]["message"]
    assert message["content"] is None
    assert message["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
    ]
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    assert assembler.started and assembler.text == ""


def test_chat_assembler_error_payload_raises_typed_error() -> None:
    assembler = ChatStreamAssembler()
    assembler.feed(chunk({"content": "part"}))
    event = ServerSentEvent(None, json.dumps({"error": {"message": "boom", "type": "server_error", "code": None}}))
    with pytest.raises(NonTerminalError, match="boom"):
        assembler.feed(event)
    assert assembler.text == "part" and not assembler.done


@pytest.mark.parametrize(
    ("payload", "kind"),
    [
        ({"message": "slow down", "type": "requests", "code": "rate_limit_exceeded"}, RateLimitError),
        ({"message": "no money", "type": "insufficient_quota", "code": "insufficient_quota"}, QuotaExceededError),
        ({"message": "filtered", "code": "content_filter"}, ContentFilterError),
        ({"message": "bad prompt", "code": "invalid_prompt"}, InvalidRequestError),
        ({"message": "oops", "code": "server_error"}, NonTerminalError),
        ({}, NonTerminalError),
    ],
)
def test_stream_error_classification(payload: dict[str, Any], kind: type) -> None:
    error = stream_error(payload)
    assert type(error) is kind
    assert not isinstance(error, StreamInterruptedError)


def test_stream_interrupted_error_is_non_terminal_and_carries_text() -> None:
    error = StreamInterruptedError("broke", partial_text="Hello")
    assert isinstance(error, NonTerminalError)
    assert error.partial_text == "Hello" and str(error) == "broke"


# -- Responses events --------------------------------------------------------------------------


def sse(kind: str, **data: Any) -> ServerSentEvent:
    return ServerSentEvent(kind, json.dumps({"type": kind, **data}))


def responses_events(final_output: bool = True) -> list[ServerSentEvent]:
    message_item = {"id": "msg_1", "type": "message", "status": "completed", "role": "assistant",
                    "content": [{"type": "output_text", "text": "Hi there", "annotations": []}]}
    call_item = {"id": "fc_1", "type": "function_call", "status": "completed", "call_id": "call_9", "name": "f", "arguments": '{"x": 1}'}
    final = {"id": "resp_1", "object": "response", "status": "completed", "model": "m",
             "output": [message_item, call_item] if final_output else [],
             "usage": {"input_tokens": 4, "output_tokens": 2, "total_tokens": 6}}
    return [
        sse("response.created", sequence_number=0, response={"id": "resp_1", "object": "response", "status": "in_progress", "output": []}),
        sse("response.output_item.added", sequence_number=1, output_index=0,
            item={"id": "msg_1", "type": "message", "status": "in_progress", "role": "assistant", "content": []}),
        sse("response.content_part.added", sequence_number=2, item_id="msg_1", output_index=0, content_index=0,
            part={"type": "output_text", "text": "", "annotations": []}),
        sse("response.output_text.delta", sequence_number=3, item_id="msg_1", output_index=0, content_index=0, delta="Hi"),
        sse("response.output_text.delta", sequence_number=4, item_id="msg_1", output_index=0, content_index=0, delta=" there"),
        sse("response.output_text.done", sequence_number=5, item_id="msg_1", output_index=0, content_index=0, text="Hi there"),
        sse("response.output_item.added", sequence_number=6, output_index=1,
            item={"id": "fc_1", "type": "function_call", "status": "in_progress", "call_id": "call_9", "name": "f", "arguments": ""}),
        sse("response.function_call_arguments.delta", sequence_number=7, item_id="fc_1", output_index=1, delta='{"x"'),
        sse("response.function_call_arguments.delta", sequence_number=8, item_id="fc_1", output_index=1, delta=": 1}"),
        sse("response.completed", sequence_number=9, response=final),
    ]


@pytest.mark.parametrize("final_output", [True, False])
def test_responses_assembler(final_output: bool) -> None:
    assembler = ResponsesStreamAssembler()
    deltas = [assembler.feed(e) for e in responses_events(final_output)]
    assert [d for d in deltas if d] == ["Hi", " there"]
    assert assembler.done and assembler.text == "Hi there"
    response = assembler.response()
    assert response["status"] == "completed"
    assert assembler.usage == {"input_tokens": 4, "output_tokens": 2, "total_tokens": 6}
    message = responses_message(response)
    assert message == {
        "role": "assistant",
        "content": "Hi there",
        "tool_calls": [{"id": "call_9", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}],
    }


def test_responses_assembler_failed_and_error_events() -> None:
    assembler = ResponsesStreamAssembler()
    assembler.feed(responses_events()[3])
    failed = sse("response.failed", sequence_number=4,
                 response={"status": "failed", "error": {"code": "server_error", "message": "model crashed"}})
    with pytest.raises(NonTerminalError, match="model crashed"):
        assembler.feed(failed)
    with pytest.raises(RateLimitError, match="too fast"):
        ResponsesStreamAssembler().feed(sse("error", sequence_number=0, code="rate_limit_exceeded", message="too fast", param=None))
    assert assembler.text == "Hi" and not assembler.done


def test_split_text_keeps_words_and_joins_back() -> None:
    text = "The quick brown fox jumps over the lazy dog, again and again; supercalifragilisticexpialidocious!"
    pieces = split_text(text, 16)
    assert "".join(pieces) == text
    assert len(pieces) > 3
    assert all(len(p) <= 16 for p in pieces)
    assert split_text("") == []


# -- the test server streams -------------------------------------------------------------------

import httpx2  # noqa: E402
import openai  # noqa: E402
from pydantic import TypeAdapter  # noqa: E402

from llmutils.testing import Fault, OpenAITestServer, _response_events  # noqa: E402

USER = [{"role": "user", "content": "the quick brown fox jumps"}]
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}]


@pytest.fixture
def sdk(server: OpenAITestServer) -> Any:
    client = openai.OpenAI(base_url=server.base_url, api_key="test", max_retries=0)
    yield client
    client.close()


def raw_stream(server: OpenAITestServer, body: dict[str, Any]) -> tuple[list[bytes], httpx2.Response]:
    """POST a streamed chat request and return its raw HTTP chunks."""
    with httpx2.Client(timeout=10) as http:
        with http.stream("POST", f"{server.base_url}/chat/completions", json=body) as response:
            return list(response.iter_raw()), response


def test_server_chat_stream_joins_to_the_whole_answer(server: OpenAITestServer, sdk: Any) -> None:
    whole = sdk.chat.completions.create(model="m", messages=USER)
    chunks = list(sdk.chat.completions.create(model="m", messages=USER, stream=True))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 3
    assert "".join(deltas) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)  # no usage chunk unless asked


def test_server_chat_stream_usage_chunk_when_asked(server: OpenAITestServer, sdk: Any) -> None:
    chunks = list(sdk.chat.completions.create(model="m", messages=USER, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_server_stream_options_without_stream_is_400(sdk: Any) -> None:
    with pytest.raises(openai.BadRequestError, match="stream_options"):
        sdk.chat.completions.create(model="m", messages=USER, stream_options={"include_usage": True})


def test_server_chat_stream_wire_format(server: OpenAITestServer) -> None:
    chunks, response = raw_stream(server, {"model": "m", "messages": USER, "stream": True})
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["transfer-encoding"] == "chunked"
    events = decode_in(chunks)
    assert events[-1].is_done
    assert all(e.json()["object"] == "chat.completion.chunk" for e in events[:-1])


def test_server_tool_call_stream_assembles_to_the_whole_answer(server: OpenAITestServer, sdk: Any) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "call it"}], "tools": TOOLS}
    server.chat_handler = lambda b: {**whole_completion(b), "id": "x"}
    chunks, _ = raw_stream(server, {**body, "stream": True})
    assembler = ChatStreamAssembler()
    for event in decode_in(chunks):
        assembler.feed(event)
    server.chat_handler = None
    message = assembler.completion()["choices"][0]["message"]
    assert message["tool_calls"] == WHOLE_CALLS
    assert assembler.completion()["choices"][0]["finish_reason"] == "tool_calls"


WHOLE_CALLS = [
    {"id": "call_a", "type": "function", "function": {"name": "lookup", "arguments": '{"query": "weather in Paris"}'}},
    {"id": "call_b", "type": "function", "function": {"name": "lookup", "arguments": "{}"}},
]


def whole_completion(body: dict[str, Any]) -> dict[str, Any]:
    message = {"role": "assistant", "content": None, "tool_calls": WHOLE_CALLS}
    return {"id": "x", "object": "chat.completion", "created": 1, "model": body["model"],
            "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def test_server_drop_stream_after_k_events(server: OpenAITestServer, sdk: Any) -> None:
    server.script(Fault.drop_stream(after=3))
    received = []
    with pytest.raises(openai.APIConnectionError):
        for c in sdk.chat.completions.create(model="m", messages=USER, stream=True):
            received.append(c)
    assert len(received) == 3
    assert server.streams_closed_early == []  # the server dropped it; the client did not leave
    assert "".join(c.choices[0].delta.content or "" for c in sdk.chat.completions.create(model="m", messages=USER, stream=True))


def test_server_sees_a_client_that_closes_early(server: OpenAITestServer, sdk: Any) -> None:
    server.chat_handler = lambda body: "word " * 100
    server.script(Fault.stall_stream(after=3, seconds=30))
    stream = sdk.chat.completions.create(model="m", messages=USER, stream=True)
    iterator = iter(stream)
    next(iterator), next(iterator)
    assert server.streams_closed_early == []
    stream.close()
    assert server.wait_stream_closed_early(1, timeout=5)
    assert server.streams_closed_early == [server.requests[-1].request_id]


def test_server_complete_streams_are_not_closed_early(server: OpenAITestServer, sdk: Any) -> None:
    for _ in range(3):
        list(sdk.chat.completions.create(model="m", messages=USER, stream=True))
    assert not server.wait_stream_closed_early(1, timeout=0.2)


def test_server_stall_then_resume(server: OpenAITestServer, sdk: Any) -> None:
    server.script(Fault.stall_stream(after=2, seconds=0.2))
    text = "".join(c.choices[0].delta.content or "" for c in sdk.chat.completions.create(model="m", messages=USER, stream=True))
    assert text == "echo: the quick brown fox jumps"


def test_server_trickle_sends_one_byte_per_chunk(server: OpenAITestServer) -> None:
    server.script(Fault.trickle(10000))
    chunks, _ = raw_stream(server, {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True})
    assert len(chunks) > 100 and max(len(c) for c in chunks) < 8  # the client may merge a few
    assert "".join(ChatStreamAssembler().feed(e) for e in decode_in(chunks)) == "echo: hi"


def test_server_stream_interval_paces_events(server: OpenAITestServer) -> None:
    server.stream_interval = 0.01
    chunks, _ = raw_stream(server, {"model": "m", "messages": USER, "stream": True})
    assert len(decode_in(chunks)) == len(chunks)  # one event per read: they came apart


def test_response_events_are_what_the_sdk_parses_and_assemble_back() -> None:
    from openai.types.responses import ResponseStreamEvent

    final = {"id": "resp_1", "object": "response", "created_at": 1, "status": "completed", "model": "m",
             "output": [
                 {"id": "msg_1", "type": "message", "status": "completed", "role": "assistant",
                  "content": [{"type": "output_text", "text": "Hello from the stream", "annotations": []}]},
                 {"id": "fc_1", "type": "function_call", "status": "completed", "call_id": "call_1", "name": "f",
                  "arguments": '{"city": "Paris"}'},
             ],
             "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
             "usage": {"input_tokens": 3, "output_tokens": 4, "total_tokens": 7,
                       "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}}
    events = decode_in(_response_events(final))
    adapter: Any = TypeAdapter(ResponseStreamEvent)
    kinds = [adapter.validate_python(e.json()).type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert all(e.event == e.json()["type"] for e in events)
    assert [e.json()["sequence_number"] for e in events] == list(range(len(events)))
    assembler = ResponsesStreamAssembler()
    deltas = [d for d in (assembler.feed(e) for e in events) if d]
    assert len(deltas) > 2 and "".join(deltas) == "Hello from the stream"
    assert assembler.response() == final
    assert responses_message(assembler.response())["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'


# -- the stream object -------------------------------------------------------------------------

from llmutils._apis.stream import MessageStream  # noqa: E402


def test_message_stream_replay_in_pieces() -> None:
    message = {"role": "assistant", "content": "A long answer that arrives in several pieces of text."}
    stream = MessageStream.replay(message, {"total_tokens": 3})
    assert stream.message is None
    pieces = list(stream)
    assert len(pieces) > 2 and "".join(pieces) == message["content"] == stream.text
    assert stream.message == message and stream.usage == {"total_tokens": 3} and stream.cached
    assert "completed" in repr(stream)


def test_message_stream_break_closes_the_producer() -> None:
    closed: list[str] = []

    def produce() -> Any:
        try:
            yield from ["a", "b", "c"]
            return {"role": "assistant", "content": "abc"}, None
        finally:
            closed.append("producer")

    stream = MessageStream(produce(), on_close=lambda: closed.append("on_close"))
    for piece in stream:
        if piece == "a":
            break
    assert closed == ["producer", "on_close"]  # CPython drops the loop's iterator at once
    assert stream.message is None and stream.text == "a" and not stream.completed
    stream.close()
    assert closed == ["producer", "on_close"]  # idempotent


def test_message_stream_context_manager_closes_on_error() -> None:
    closed: list[bool] = []

    def produce() -> Any:
        yield "x"
        raise StreamInterruptedError("broke", partial_text="x")

    with pytest.raises(StreamInterruptedError) as info:
        with MessageStream(produce(), on_close=lambda: closed.append(True)) as stream:
            for _ in stream:
                pass
    assert info.value.partial_text == "x" and closed == [True]


# -- client.stream_message ---------------------------------------------------------------------

import time  # noqa: E402
from pathlib import Path  # noqa: E402

import llmutils  # noqa: E402
from llmutils import CacheMissError, OpenAIClient, RetryPolicy, TotalTimeoutError  # noqa: E402

LONG = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen"
ASK = [{"role": "user", "content": LONG}]


@pytest.fixture
def waits() -> list[float]:
    return []


def make_client(server: OpenAITestServer, tmp_path: Path, waits: list[float], **kwargs: Any) -> OpenAIClient:
    kwargs.setdefault("cache_api_calls", True)
    return OpenAIClient(
        base_url=server.base_url,
        api_key="test",
        cache_file_name=tmp_path / "stream-cache.sqlite",
        retry=RetryPolicy(max_attempts=3, waiting_time=0.0, sleep=waits.append),
        **kwargs,
    )


@pytest.fixture
def llm(server: OpenAITestServer, tmp_path: Path, waits: list[float]) -> Any:
    client = make_client(server, tmp_path, waits)
    yield client
    client.close()


def test_deltas_arrive_in_order_and_join_to_the_send_message_text(server: OpenAITestServer, llm: OpenAIClient) -> None:
    with llm.stream_message(ASK) as stream:
        deltas = list(stream)
    assert len(deltas) > 10
    assert "".join(deltas) == stream.text == stream.message["content"]
    sent = server.requests[-1].body
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    llm.set_api_cache(False)
    assert llm.send_message(ASK) == stream.message == {"role": "assistant", "content": "echo: " + LONG}
    assert stream.usage == {"prompt_tokens": 15, "completion_tokens": 16, "total_tokens": 31}
    assert not stream.cached


def test_a_completed_stream_is_a_cache_hit_for_both_calls(server: OpenAITestServer, llm: OpenAIClient) -> None:
    with llm.stream_message(ASK) as stream:
        text = "".join(stream)
    assert server.request_count == 1 and llm.last_call.cached is False
    assert llm.send_message(ASK) == stream.message
    assert llm.last_call.cached is True
    with llm.stream_message(ASK) as again:
        pieces = list(again)
    assert again.cached and len(pieces) > 2 and "".join(pieces) == text
    assert again.message == stream.message and again.usage == stream.usage
    assert server.request_count == 1  # 0 requests for both hits
    assert llm.usage.totals().cached_requests == 2 and llm.usage.totals().requests == 1


def test_a_send_message_answer_serves_stream_message(server: OpenAITestServer, llm: OpenAIClient) -> None:
    answer = llm.send_message(ASK, temperature=0)
    with llm.stream_message(ASK, temperature=0) as stream:
        pieces = list(stream)
    assert stream.cached and len(pieces) > 1 and stream.message == answer
    assert server.request_count == 1


def test_429_before_the_first_chunk_is_retried(server: OpenAITestServer, llm: OpenAIClient, waits: list[float]) -> None:
    server.script(Fault.rate_limit(retry_after=0.01), Fault.server_error(503))
    with llm.stream_message(ASK) as stream:
        assert "".join(stream) == "echo: " + LONG
    assert server.request_count == 3 and waits == [0.01, 0.0]


def test_a_drop_before_any_content_is_retried(server: OpenAITestServer, llm: OpenAIClient) -> None:
    server.script(Fault.drop_stream(after=1))  # the role chunk only: nothing was shown yet
    with llm.stream_message(ASK) as stream:
        assert "".join(stream) == "echo: " + LONG
    assert server.request_count == 2


def test_a_drop_after_3_chunks_raises_with_the_partial_text_and_caches_nothing(server: OpenAITestServer, llm: OpenAIClient) -> None:
    server.script(Fault.drop_stream(after=3))
    received = []
    with pytest.raises(StreamInterruptedError) as info:
        with llm.stream_message(ASK) as stream:
            for text in stream:
                received.append(text)
    assert received == ["echo: ", "one "]  # chunk 1 is the role, 2 and 3 carry text
    assert info.value.partial_text == "echo: one " == stream.text
    assert isinstance(info.value, llmutils.NonTerminalError)
    assert stream.message is None
    assert server.request_count == 1  # never retried
    assert llm.cache_stats().writes == 0
    llm.send_message(ASK)
    assert server.request_count == 2  # nothing was cached


def test_a_stall_ends_within_total_timeout(server: OpenAITestServer, llm: OpenAIClient) -> None:
    server.script(Fault.stall_stream(after=3, seconds=30))
    started = time.monotonic()
    with pytest.raises(StreamInterruptedError, match="total_timeout") as info:
        with llm.stream_message(ASK, timeout=20, total_timeout=1.0) as stream:
            for _ in stream:
                pass
    assert time.monotonic() - started < 1.5
    assert info.value.partial_text == "echo: one "
    assert llm.cache_stats().writes == 0


def test_a_trickle_ends_at_the_total_timeout(server: OpenAITestServer, llm: OpenAIClient) -> None:
    server.script(Fault.trickle(100))  # each gap is short, the whole takes far longer
    started = time.monotonic()
    with pytest.raises((StreamInterruptedError, TotalTimeoutError)):
        with llm.stream_message(ASK, timeout=5, total_timeout=0.8) as stream:
            for _ in stream:
                pass
    assert time.monotonic() - started < 1.3


def test_timeout_bounds_each_gap(server: OpenAITestServer, llm: OpenAIClient) -> None:
    server.script(Fault.stall_stream(after=3, seconds=30))
    started = time.monotonic()
    with pytest.raises(StreamInterruptedError, match="no data for 0.3s"):
        with llm.stream_message(ASK, timeout=0.3) as stream:
            list(stream)
    assert time.monotonic() - started < 2


def test_a_stall_before_content_is_retried_then_times_out(server: OpenAITestServer, llm: OpenAIClient) -> None:
    server.script(*[Fault.stall_stream(after=1, seconds=30)] * 5)
    started = time.monotonic()
    with pytest.raises(TotalTimeoutError):
        llm.stream_message(ASK, timeout=0.4, total_timeout=1.0, max_attempts=5)
    assert time.monotonic() - started < 1.5
    assert server.request_count >= 2


def test_breaking_out_closes_the_connection_and_caches_nothing(server: OpenAITestServer, llm: OpenAIClient) -> None:
    server.chat_handler = lambda body: "word " * 200
    server.stream_interval = 0.005
    for text in llm.stream_message(ASK):  # no `with`: the loop's break alone closes it
        break
    assert server.wait_stream_closed_early(1, timeout=5)
    assert llm.cache_stats().writes == 0
    with llm.stream_message(ASK) as stream:
        next(iter(stream))
    assert server.wait_stream_closed_early(2, timeout=5)
    assert llm.cache_stats().writes == 0 and server.request_count == 2


def test_tool_call_deltas_assemble_into_tool_calls(server: OpenAITestServer, llm: OpenAIClient) -> None:
    server.chat_handler = whole_completion
    with llm.stream_message([{"role": "user", "content": "weather?"}], tools=TOOLS) as stream:
        assert list(stream) == []
    assert stream.message == {"role": "assistant", "content": None, "tool_calls": WHOLE_CALLS}
    assert llm.send_message([{"role": "user", "content": "weather?"}], tools=TOOLS) == stream.message
    assert server.request_count == 1


def test_replay_mode_streams_hits_and_refuses_misses(server: OpenAITestServer, llm: OpenAIClient, tmp_path: Path) -> None:
    with llm.stream_message(ASK) as stream:
        list(stream)
    replay = make_client(server, tmp_path, [], cache_mode="replay")
    try:
        with replay.stream_message(ASK) as again:
            assert "".join(again) == stream.text
        with pytest.raises(CacheMissError):
            replay.stream_message([{"role": "user", "content": "never asked"}])
    finally:
        replay.close()
    assert server.request_count == 1


def test_send_message_stream_true_points_at_stream_message(llm: OpenAIClient, server: OpenAITestServer) -> None:
    with pytest.raises(InvalidRequestError, match="stream_message"):
        llm.send_message(ASK, stream=True)
    with pytest.raises(InvalidRequestError, match="n must be 1"):
        llm.stream_message(ASK, n=2)
    with pytest.raises(InvalidRequestError, match="messages"):
        llm.stream_message([])
    assert server.request_count == 0


def test_usage_and_the_concurrency_cap_apply(server: OpenAITestServer, tmp_path: Path, waits: list[float]) -> None:
    client = make_client(server, tmp_path, waits, cache_api_calls=False, max_concurrent_calls=1)
    try:
        server.chat_handler = lambda body: "word " * 50
        first = client.stream_message(ASK)  # holds the one call slot until it ends
        with pytest.raises(TotalTimeoutError, match="call slots"):
            client.send_message(ASK, total_timeout=0.2)
        with first:
            list(first)
        assert client.send_message(ASK)["content"].startswith("word")
        totals = client.usage.totals()
        assert totals.requests == 2 and totals.total_tokens == 2 * first.usage["total_tokens"]
    finally:
        client.close()


def test_mock_client_streams_offline() -> None:
    llmutils.force_api_type("mock")
    with llmutils.client().stream_message([{"role": "user", "content": LONG}]) as stream:
        pieces = list(stream)
    assert len(pieces) > 2 and stream.message == {"role": "assistant", "content": "echo: " + LONG}


# -- the CLI streams ---------------------------------------------------------------------------

import os  # noqa: E402
import select  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from llmutils.cli import main  # noqa: E402


def test_cli_chat_prints_the_same_text_streamed_or_not(server: OpenAITestServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--base-url", server.base_url, "chat", LONG]) == 0
    streamed = capsys.readouterr().out
    assert main(["--base-url", server.base_url, "chat", "--no-stream", LONG]) == 0
    assert capsys.readouterr().out == streamed == "echo: " + LONG + "\n"
    assert [r.body.get("stream") for r in server.requests] == [True, None]


def test_cli_chat_tool_calls_print_as_json_either_way(server: OpenAITestServer, capsys: pytest.CaptureFixture[str]) -> None:
    server.chat_handler = whole_completion
    outputs = []
    for flag in ("--stream", "--no-stream"):
        assert main(["--base-url", server.base_url, "chat", flag, "weather?"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and json.loads(outputs[0])["tool_calls"] == WHOLE_CALLS


def test_cli_chat_writes_text_before_the_answer_is_complete(server: OpenAITestServer, tmp_path: Path) -> None:
    server.script(Fault.stall_stream(after=4, seconds=2.0))  # "echo: one two " then a pause
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "LLMUTILS_", "AZURE_"))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmutils", "--base-url", server.base_url, "chat", LONG],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path, env=env,
    )
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + 30
    while b"two " not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            seen += os.read(proc.stdout.fileno(), 1024)
    assert seen == b"echo: one two "
    assert proc.poll() is None  # still waiting for the rest: this text came as it was generated
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert (seen + out).decode() == "echo: " + LONG + "\n"


def test_cli_chat_interrupted_stream_is_one_error_line(server: OpenAITestServer, capsys: pytest.CaptureFixture[str]) -> None:
    server.script(Fault.drop_stream(after=4))
    assert main(["--base-url", server.base_url, "chat", LONG]) == 1
    captured = capsys.readouterr()
    assert captured.out == "echo: one two \n"
    assert captured.err.startswith("llmutils: error: ") and "interrupted" in captured.err


def test_a_stream_dropped_without_iterating_frees_its_call_slot(server: OpenAITestServer, tmp_path: Path, waits: list[float]) -> None:
    client = make_client(server, tmp_path, waits, cache_api_calls=False, max_concurrent_calls=1)
    try:
        stream = client.stream_message(ASK)
        with pytest.raises(TotalTimeoutError, match="call slots"):
            client.send_message(ASK, total_timeout=0.2)
        del stream  # no reference cycle: freed at once, without gc.collect()
        assert client.send_message(ASK)["content"] == "echo: " + LONG
    finally:
        client.close()


def test_azure_streams_through_its_deployment_path(server: OpenAITestServer) -> None:
    client = llmutils.AzureClient(azure_endpoint=server.azure_endpoint, api_key="az", model="my-deployment", cache_api_calls=False)
    try:
        with client.stream_message(ASK) as stream:
            assert "".join(stream) == "echo: " + LONG
        assert server.requests[-1].deployment == "my-deployment" and server.requests[-1].body["stream"] is True
    finally:
        client.close()


def test_response_events_of_a_whole_response_assemble_back() -> None:
    from llmutils._apis.stream import response_events

    final = {"id": "r", "object": "response", "status": "completed", "model": "m",
             "output": [{"id": "msg", "type": "message", "role": "assistant",
                         "content": [{"type": "output_text", "text": LONG, "annotations": []}]},
                        {"id": "fc", "type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}],
             "usage": {"input_tokens": 1, "output_tokens": 2, "total_tokens": 3}}
    assembler = ResponsesStreamAssembler()
    deltas = [d for d in (assembler.feed(e) for e in decode_in(response_events(final))) if d]
    assert len(deltas) > 2 and "".join(deltas) == LONG
    assert assembler.done and assembler.response() == final


def test_an_error_event_after_content_raises_with_the_partial_text(server: OpenAITestServer, llm: OpenAIClient) -> None:
    server.script(Fault.stream_error(after=3, message="model overloaded"))
    with pytest.raises(StreamInterruptedError, match="model overloaded") as info:
        with llm.stream_message(ASK) as stream:
            list(stream)
    assert info.value.partial_text == "echo: one "
    assert isinstance(info.value.__cause__, llmutils.NonTerminalError)
    assert server.request_count == 1 and llm.cache_stats().writes == 0


def test_an_error_event_before_content_is_retried(server: OpenAITestServer, llm: OpenAIClient) -> None:
    server.script(Fault.stream_error(after=1))
    with llm.stream_message(ASK) as stream:
        assert "".join(stream) == "echo: " + LONG
    assert server.request_count == 2


def test_a_server_that_ignores_stream_true_still_streams(server: OpenAITestServer, llm: OpenAIClient) -> None:
    whole = {"id": "x", "object": "chat.completion", "created": 1, "model": "m",
             "choices": [{"index": 0, "message": {"role": "assistant", "content": LONG}, "finish_reason": "stop"}],
             "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}
    server.script(Fault.status(200, whole))
    with llm.stream_message(ASK) as stream:
        assert "".join(stream) == LONG
    assert stream.message == {"role": "assistant", "content": LONG} and stream.usage == whole["usage"]


# -- the Responses API streams -----------------------------------------------------------------


def test_responses_stream_joins_to_send_message_and_shares_its_cache_entry(server: OpenAITestServer, llm: OpenAIClient) -> None:
    with llm.stream_message(ASK, api="responses") as stream:
        deltas = list(stream)
    assert len(deltas) > 10 and "".join(deltas) == "echo: " + LONG
    sent = server.requests[-1]
    assert sent.path == "/v1/responses" and sent.body["stream"] is True and "stream_options" not in sent.body
    assert stream.usage["total_tokens"] == stream.usage["input_tokens"] + stream.usage["output_tokens"]
    assert llm.last_call.kind == "responses" and llm.last_call.finish_reason == "stop"
    assert llm.send_message(ASK, api="responses") == stream.message == {"role": "assistant", "content": "echo: " + LONG}
    with llm.stream_message(ASK, api="responses") as again:
        assert len(list(again)) > 1 and again.cached
    assert server.request_count == 1


def test_responses_function_call_deltas_assemble_into_tool_calls(server: OpenAITestServer, llm: OpenAIClient) -> None:
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}]
    ask = [{"role": "user", "content": "call lookup"}]
    with llm.stream_message(ask, tools=tools, api="responses") as stream:
        assert list(stream) == []
    llm.set_api_cache(False)
    whole = llm.send_message(ask, tools=tools, api="responses")
    assert server.request_count == 2
    number = server.requests[0].request_id.removeprefix("req_")  # the server names calls after the request
    assert stream.message == {**whole, "tool_calls": [{**whole["tool_calls"][0], "id": f"call_{number}"}]}
    assert stream.message["tool_calls"][0]["function"]["name"] == "lookup"


def test_responses_stream_interrupted_and_retried_like_chat(server: OpenAITestServer, llm: OpenAIClient) -> None:
    server.script(Fault.server_error(503), Fault.stream_error(after=6, message="overloaded"))
    received = []
    with pytest.raises(StreamInterruptedError, match="overloaded") as info:
        with llm.stream_message(ASK, api="responses") as stream:
            for text in stream:
                received.append(text)
    assert received and info.value.partial_text == "".join(received)
    assert server.request_count == 2 and llm.cache_stats().writes == 0
    server.script(Fault.drop_stream(after=6))
    with pytest.raises(StreamInterruptedError):
        with llm.stream_message(ASK, api="responses") as stream:
            list(stream)


def test_responses_stream_on_the_mock_client() -> None:
    client = llmutils.MockClient(api="responses")
    with client.stream_message([{"role": "user", "content": LONG}]) as stream:
        pieces = list(stream)
    assert len(pieces) > 2 and stream.message == {"role": "assistant", "content": "echo: " + LONG}


def test_a_body_held_open_after_the_end_event_does_not_hold_the_caller(server: OpenAITestServer, llm: OpenAIClient) -> None:
    server.script(Fault.stall_stream(after=1000, seconds=30))  # [DONE] sent, the body never ends
    started = time.monotonic()
    with llm.stream_message(ASK, timeout=20) as stream:
        assert "".join(stream) == "echo: " + LONG
    assert stream.completed and time.monotonic() - started < 3
    assert llm.cache_stats().writes == 1


class _Clock:
    """A monotonic clock that moves only when the limiter sleeps; the sleeps are recorded."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_rpm_and_tpm_apply_to_streams(server: OpenAITestServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmutils import RateLimiter, _clients

    clock = _Clock()
    monkeypatch.setattr(_clients, "RateLimiter", lambda **kw: RateLimiter(clock=clock, sleep=clock.sleep, **kw))
    with OpenAIClient(base_url=server.base_url, api_key="k", rpm=600) as client:
        for _ in range(3):
            with client.stream_message(ASK) as stream:
                list(stream)
    assert clock.sleeps == pytest.approx([0.1, 0.1])  # 600 rpm: one request every 0.1 s

    clock.sleeps.clear()
    monkeypatch.setattr(OpenAIClient, "_estimate_tokens", staticmethod(lambda params: 100))
    server.chat_handler = lambda body: {**whole_completion(body), "usage": {"prompt_tokens": 1, "completion_tokens": 249, "total_tokens": 250}}
    with OpenAIClient(base_url=server.base_url, api_key="k", tpm=6000) as client:
        for _ in range(2):
            with client.stream_message(ASK, tools=TOOLS) as stream:
                list(stream)
            assert stream.usage["total_tokens"] == 250
    # The first stream cost 250 tokens, not the 100 reserved: the next one waits for 250 tokens' worth.
    assert clock.sleeps == pytest.approx([2.5])
