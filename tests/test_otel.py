"""OpenTelemetry GenAI spans: one CLIENT span per call, recorded with the SDK's in-memory exporter."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmutils import RateLimitError
from llmutils._otel import CAPTURE_CONTENT_ENV, call_span, current_call_span

trace = pytest.importorskip("opentelemetry.trace", reason="opentelemetry-api is not installed (extra 'otel')")
sdk_trace = pytest.importorskip("opentelemetry.sdk.trace", reason="opentelemetry-sdk is not installed (extra 'test')")
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

_EXPORTER = InMemorySpanExporter()


def _install_exporter() -> None:
    """Send every span of the process's (SDK) tracer provider to the in-memory exporter, once."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, sdk_trace.TracerProvider):
        trace.set_tracer_provider(sdk_trace.TracerProvider())
        provider = trace.get_tracer_provider()
    if not getattr(provider, "_llmutils_test_exporter", False):
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        provider._llmutils_test_exporter = True  # type: ignore[attr-defined]


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    monkeypatch.delenv(CAPTURE_CONTENT_ENV, raising=False)
    _install_exporter()
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


RESPONSE = {
    "id": "chatcmpl-1",
    "model": "gpt-4.1-mini-2025-04-14",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "7"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13},
}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A prime?"}]


def test_one_client_span_with_the_genai_attributes(spans: InMemorySpanExporter) -> None:
    with call_span(
        "chat", "gpt-4.1-mini", server_address="api.openai.com", server_port=443,
        params={"temperature": 0.2, "max_tokens": 50, "top_p": None}, messages=MESSAGES,
    ) as span:
        assert current_call_span() is span
        span.finish(RESPONSE, cached=False)
    assert current_call_span() is None
    (finished,) = spans.get_finished_spans()
    assert finished.name == "chat gpt-4.1-mini"
    assert finished.kind == trace.SpanKind.CLIENT
    attrs = dict(finished.attributes or {})
    assert attrs == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4.1-mini",
        "gen_ai.request.temperature": 0.2,
        "gen_ai.request.max_tokens": 50,
        "server.address": "api.openai.com",
        "server.port": 443,
        "gen_ai.response.model": "gpt-4.1-mini-2025-04-14",
        "gen_ai.response.id": "chatcmpl-1",
        "gen_ai.response.finish_reasons": ("stop",),
        "gen_ai.usage.input_tokens": 12,
        "gen_ai.usage.output_tokens": 1,
        "llmutils.cache.hit": False,
        "llmutils.attempts": 1,
    }
    assert finished.status.status_code == trace.StatusCode.UNSET


def test_retries_are_events_and_a_failure_sets_error_type(spans: InMemorySpanExporter) -> None:
    error = RateLimitError("429 from the server")
    with pytest.raises(RateLimitError):
        with call_span("chat", "gpt-4o") as span:
            span.retry(1, error, 0.5)
            span.retry(2, error, 1.0)
            raise error
    (finished,) = spans.get_finished_spans()
    retries = [e for e in finished.events if e.name == "llmutils.retry"]
    assert [dict(e.attributes or {}) for e in retries] == [
        {"llmutils.attempt": 1, "error.type": "llmutils.RateLimitError", "llmutils.wait_seconds": 0.5},
        {"llmutils.attempt": 2, "error.type": "llmutils.RateLimitError", "llmutils.wait_seconds": 1.0},
    ]
    assert finished.attributes["error.type"] == "llmutils.RateLimitError"
    assert finished.attributes["llmutils.attempts"] == 3
    assert finished.status.status_code == trace.StatusCode.ERROR
    assert any(e.name == "exception" for e in finished.events)


def test_a_cache_hit_is_marked(spans: InMemorySpanExporter) -> None:
    with call_span("embeddings", "text-embedding-3-small") as span:
        span.finish({"model": "text-embedding-3-small", "data": [], "usage": {"prompt_tokens": 3}}, cached=True)
    (finished,) = spans.get_finished_spans()
    assert finished.name == "embeddings text-embedding-3-small"
    assert finished.attributes["llmutils.cache.hit"] is True
    assert finished.attributes["llmutils.attempts"] == 0
    assert finished.attributes["gen_ai.usage.input_tokens"] == 3


def test_prompts_and_answers_only_with_content_capture(
    spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    with call_span("chat", "gpt-4o", messages=MESSAGES) as span:
        span.finish(RESPONSE)
    (plain,) = spans.get_finished_spans()
    assert not any("messages" in key for key in plain.attributes or {})
    assert "A prime?" not in json.dumps(dict(plain.attributes or {}))

    spans.clear()
    monkeypatch.setenv(CAPTURE_CONTENT_ENV, "true")
    with call_span("chat", "gpt-4o", messages=MESSAGES) as span:
        span.finish(RESPONSE)
    (captured,) = spans.get_finished_spans()
    assert json.loads(captured.attributes["gen_ai.input.messages"]) == [
        {"role": "system", "parts": [{"type": "text", "content": "Be brief."}]},
        {"role": "user", "parts": [{"type": "text", "content": "A prime?"}]},
    ]
    assert json.loads(captured.attributes["gen_ai.output.messages"]) == [
        {"role": "assistant", "parts": [{"type": "text", "content": "7"}], "finish_reason": "stop"}
    ]


def test_without_opentelemetry_it_is_a_no_op_and_never_imported() -> None:
    script = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'opentelemetry' or name.startswith('opentelemetry.'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import llmutils\n"
        "from llmutils._otel import call_span\n"
        "with call_span('chat', 'gpt-4o') as span:\n"
        "    span.retry(1, None, 0.1)\n"
        "    span.finish({'model': 'gpt-4o'})\n"
        "from llmutils._otel import start_stream_span\n"
        "stream_span = start_stream_span('chat', 'gpt-4o')\n"
        "with stream_span.opening():\n"
        "    stream_span.finish({'model': 'gpt-4o'})\n"
        "stream_span.end()\n"
        "assert not stream_span.recording\n"
        "print(span.recording, llmutils.MockClient().send_message([{'role': 'user', 'content': 'hi'}])['content'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "echo:", "hi"]
    # Installed, it still loads only on a call, not with the package.
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, llmutils; print(any(m.startswith('opentelemetry') for m in sys.modules))"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.stdout.strip() == "False", proc.stderr
    # Installed without an SDK tracer provider: no span is created for a call or a stream.
    script = (
        "from llmutils._otel import call_span, start_stream_span\n"
        "with call_span('chat', 'gpt-4o') as span:\n"
        "    pass\n"
        "stream_span = start_stream_span('chat', 'gpt-4o')\n"
        "print(span.recording, stream_span.recording)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["False", "False"], proc.stderr


# -- through a client, against the local OpenAI-wire server -----------------------------------------


def test_a_client_call_makes_one_span_with_retries_and_cache_hits(
    spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    from llmutils import InvalidRequestError, OpenAIClient, RetryPolicy
    from llmutils.testing import Fault, OpenAITestServer

    waits: list[float] = []
    with OpenAITestServer() as server, OpenAIClient(
        base_url=server.base_url, api_key="test", model="gpt-4.1-mini", cache_api_calls=True,
        cache_file_name=str(tmp_path / "cache.sqlite"), retry=RetryPolicy(sleep=waits.append, jitter=0),
    ) as client:
        server.script(Fault.server_error(), Fault.rate_limit(retry_after=0.01))
        messages = [{"role": "user", "content": "hi"}]
        client.send_message(messages, temperature=0)
        client.send_message(messages, temperature=0)  # from the cache
        server.script(Fault.bad_request())
        with pytest.raises(InvalidRequestError):
            client.send_message([{"role": "user", "content": "bad"}], temperature=0)
        client.get_embedding("some text")
        port = server.port
    first, hit, failed, embedding = spans.get_finished_spans()

    assert first.name == "chat gpt-4.1-mini" and first.kind == trace.SpanKind.CLIENT
    assert first.attributes["gen_ai.provider.name"] == "openai"
    assert first.attributes["server.address"] == "127.0.0.1"
    assert first.attributes["server.port"] == port
    assert first.attributes["gen_ai.request.temperature"] == 0
    assert first.attributes["gen_ai.response.model"] == "gpt-4.1-mini"
    assert first.attributes["gen_ai.usage.input_tokens"] > 0
    assert first.attributes["gen_ai.usage.output_tokens"] > 0
    assert first.attributes["llmutils.cache.hit"] is False
    assert first.attributes["llmutils.attempts"] == 3
    assert [e.attributes["error.type"] for e in first.events if e.name == "llmutils.retry"] == [
        "llmutils.NonTerminalError", "llmutils.RateLimitError",
    ]
    assert waits[1] == pytest.approx(0.01)

    assert hit.attributes["llmutils.cache.hit"] is True
    assert hit.attributes["llmutils.attempts"] == 0

    assert failed.attributes["error.type"] == "llmutils.InvalidRequestError"
    assert failed.attributes["llmutils.attempts"] == 1
    assert failed.status.status_code == trace.StatusCode.ERROR

    assert embedding.name == "embeddings text-embedding-3-small"
    assert embedding.attributes["gen_ai.operation.name"] == "embeddings"


def test_an_azure_call_names_its_provider(spans: InMemorySpanExporter) -> None:
    from llmutils import AzureClient
    from llmutils.testing import OpenAITestServer

    with OpenAITestServer() as server, AzureClient(
        azure_endpoint=server.azure_endpoint, api_key="test", model="my-deployment"
    ) as client:
        client.send_message([{"role": "user", "content": "hi"}])
    (span,) = spans.get_finished_spans()
    assert span.name == "chat my-deployment"
    assert span.attributes["gen_ai.provider.name"] == "azure.ai.openai"
    assert span.attributes["server.address"] == "127.0.0.1"


def test_a_responses_call_is_a_chat_span_and_its_content_is_captured(
    spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llmutils import OpenAIClient
    from llmutils.testing import OpenAITestServer

    monkeypatch.setenv(CAPTURE_CONTENT_ENV, "true")
    with OpenAITestServer() as server, OpenAIClient(base_url=server.base_url, api_key="test") as client:
        answer = client.create_response(model="gpt-4.1-mini", instructions="Be brief.", input="hi")
    (span,) = spans.get_finished_spans()
    assert span.name == "chat gpt-4.1-mini"
    assert span.attributes["gen_ai.usage.input_tokens"] == answer["usage"]["input_tokens"]
    assert json.loads(span.attributes["gen_ai.input.messages"]) == [
        {"role": "system", "parts": [{"type": "text", "content": "Be brief."}]},
        {"role": "user", "parts": [{"type": "text", "content": "hi"}]},
    ]
    (said,) = json.loads(span.attributes["gen_ai.output.messages"])
    assert said["role"] == "assistant" and said["finish_reason"] == "stop"
    assert said["parts"][0]["content"] == answer["output"][0]["content"][0]["text"]


# -- client.stream_message: a span started with the stream, ended with it, never current -----------


@pytest.fixture
def streaming(tmp_path: Path) -> Iterator[tuple[Any, Any]]:
    """A local server and a cached client with recorded (not slept) retry waits."""
    from llmutils import OpenAIClient, RetryPolicy
    from llmutils.testing import OpenAITestServer

    with OpenAITestServer() as server, OpenAIClient(
        base_url=server.base_url, api_key="test", model="gpt-4.1-mini", cache_api_calls=True,
        cache_file_name=str(tmp_path / "cache.sqlite"), retry=RetryPolicy(sleep=lambda s: None, jitter=0),
    ) as client:
        yield server, client


LONG = [{"role": "user", "content": "one two three four five six seven eight nine ten"}]


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_a_completed_stream_is_one_span_ended_with_the_stream(
    spans: InMemorySpanExporter, streaming: tuple[Any, Any], api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llmutils.testing import Fault

    server, client = streaming
    monkeypatch.setenv(CAPTURE_CONTENT_ENV, "true")
    server.script(Fault.server_error(503))
    stream = client.stream_message(LONG, temperature=0, api=api)
    assert current_call_span() is None and not trace.get_current_span().get_span_context().is_valid
    assert spans.get_finished_spans() == ()  # started, not ended: the answer is still coming
    seen = []
    for _ in stream:  # the caller's code between deltas: no llmutils span is current
        seen.append(trace.get_current_span().get_span_context().is_valid or current_call_span() is not None)
    assert len(seen) > 2 and not any(seen)
    (span,) = spans.get_finished_spans()  # ended when the loop ended, before close()
    stream.close()
    assert len(spans.get_finished_spans()) == 1
    assert span.name == "chat gpt-4.1-mini" and span.kind == trace.SpanKind.CLIENT
    attrs = dict(span.attributes or {})
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == "gpt-4.1-mini"
    assert attrs["gen_ai.request.temperature"] == 0
    assert attrs["gen_ai.response.model"] == "gpt-4.1-mini"
    assert attrs["server.address"] == "127.0.0.1" and attrs["server.port"] == server.port
    assert attrs["gen_ai.usage.input_tokens"] == stream.usage.get("prompt_tokens", stream.usage.get("input_tokens"))
    assert attrs["gen_ai.usage.output_tokens"] > 0
    assert attrs["llmutils.cache.hit"] is False and attrs["llmutils.attempts"] == 2
    assert attrs["llmutils.stream.completed"] is True
    assert "error.type" not in attrs and span.status.status_code == trace.StatusCode.UNSET
    retries = [e.attributes["error.type"] for e in span.events if e.name == "llmutils.retry"]
    assert retries == ["llmutils.NonTerminalError"]
    (said,) = json.loads(attrs["gen_ai.output.messages"])
    assert said["parts"] == [{"type": "text", "content": stream.text}]
    assert json.loads(attrs["gen_ai.input.messages"])[-1]["parts"][0]["content"] == LONG[0]["content"]


def test_a_stream_left_by_break_or_never_read_ends_without_an_error(
    spans: InMemorySpanExporter, streaming: tuple[Any, Any]
) -> None:
    _, client = streaming
    with client.stream_message(LONG) as stream:
        for _ in stream:
            break
    (left,) = spans.get_finished_spans()
    assert left.attributes["llmutils.stream.completed"] is False
    assert left.attributes["llmutils.attempts"] == 1
    assert "error.type" not in left.attributes and left.status.status_code == trace.StatusCode.UNSET
    assert "gen_ai.usage.output_tokens" not in left.attributes

    spans.clear()
    unread = client.stream_message(LONG)
    assert spans.get_finished_spans() == ()
    del unread  # garbage-collected unclosed: the finalizer ends it
    (abandoned,) = spans.get_finished_spans()
    assert abandoned.attributes["llmutils.stream.completed"] is False
    assert client.cache_stats().writes == 0


def test_a_stream_dropped_mid_way_records_stream_interrupted(
    spans: InMemorySpanExporter, streaming: tuple[Any, Any]
) -> None:
    from llmutils import StreamInterruptedError
    from llmutils.testing import Fault

    server, client = streaming
    server.script(Fault.drop_stream(after=3))
    with pytest.raises(StreamInterruptedError):
        with client.stream_message(LONG) as stream:
            for _ in stream:
                pass
    (span,) = spans.get_finished_spans()
    assert span.attributes["error.type"] == "llmutils.StreamInterruptedError"
    assert span.attributes["llmutils.attempts"] == 1  # never retried after content
    assert span.attributes["llmutils.stream.completed"] is False
    assert span.status.status_code == trace.StatusCode.ERROR
    assert any(e.name == "exception" for e in span.events)


def test_a_stream_that_fails_before_content_ends_its_span_at_the_call(
    spans: InMemorySpanExporter, streaming: tuple[Any, Any]
) -> None:
    from llmutils import InvalidRequestError
    from llmutils.testing import Fault

    server, client = streaming
    server.script(Fault.bad_request())
    with pytest.raises(InvalidRequestError):
        client.stream_message(LONG)
    (span,) = spans.get_finished_spans()
    assert span.attributes["error.type"] == "llmutils.InvalidRequestError"
    assert span.status.status_code == trace.StatusCode.ERROR
    assert current_call_span() is None and not trace.get_current_span().get_span_context().is_valid


def test_a_replayed_stream_is_a_cache_hit_span(spans: InMemorySpanExporter, streaming: tuple[Any, Any]) -> None:
    server, client = streaming
    first = client.send_message(LONG)
    spans.clear()
    with client.stream_message(LONG) as stream:
        pieces = list(stream)
        (span,) = spans.get_finished_spans()  # ended with the replay's last piece
    assert len(spans.get_finished_spans()) == 1  # close() after the end does not end it again
    assert stream.cached and len(pieces) > 1 and stream.message == first
    assert span.name == "chat gpt-4.1-mini"
    assert span.attributes["llmutils.cache.hit"] is True and span.attributes["llmutils.attempts"] == 0
    assert span.attributes["llmutils.stream.completed"] is True
    assert span.attributes["gen_ai.usage.input_tokens"] > 0
    assert server.request_count == 1
