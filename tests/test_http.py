"""What an HTTP answer says (llmutils._http): each rule checked against openai-python's own functions."""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Mapping

import httpx2
import openai
import pytest
from openai._models import FinalRequestOptions

from llmutils._http import (
    SDK_INITIAL_RETRY_DELAY,
    SDK_MAX_RETRY_AFTER,
    SDK_MAX_RETRY_DELAY,
    HttpErrorInfo,
    error_fields,
    is_quota_exhausted,
    is_validation_error,
    parse_duration,
    parse_retry_after,
    rate_limit_reset,
    request_id_from,
    retry_decision,
    server_retry_after,
    should_retry,
    usable_wait,
)


@pytest.fixture(scope="module")
def sdk() -> openai.OpenAI:
    """An SDK client whose private retry helpers are the reference (it never sends anything)."""
    client = openai.OpenAI(api_key="test", base_url="http://127.0.0.1:9/v1", max_retries=2)
    yield client
    client.close()


def _http_date(offset: float) -> str:
    return email.utils.formatdate(time.time() + offset, usegmt=True)


# Header sets covering every branch of the SDK's _parse_retry_after_header.
RETRY_AFTER_CASES: list[dict[str, str]] = [
    {},
    {"retry-after-ms": "1500"},
    {"Retry-After-Ms": "250"},
    {"retry-after": "2"},
    {"Retry-After": "2.5"},
    {"retry-after": "90"},
    {"retry-after": "120"},
    {"retry-after": "121"},
    {"retry-after": "0"},
    {"retry-after": "-3"},
    {"retry-after": "nan"},
    {"retry-after": "inf"},
    {"retry-after": "Infinity"},
    {"retry-after": "-inf"},
    {"retry-after": "1e400"},
    {"retry-after-ms": "1e400"},
    {"retry-after": "soon"},
    {"retry-after-ms": "abc", "retry-after": "3"},
    {"retry-after-ms": "0", "retry-after": "5"},
    {"retry-after-ms": "200000"},
]


def _same(ours: float | None, theirs: float | None, tolerance: float = 0.0) -> bool:
    if ours is None or theirs is None:
        return ours is None and theirs is None
    if math.isnan(ours) or math.isnan(theirs):
        return math.isnan(ours) and math.isnan(theirs)
    if math.isinf(ours) or math.isinf(theirs):
        return ours == theirs
    return abs(ours - theirs) <= tolerance


@pytest.mark.parametrize("headers", RETRY_AFTER_CASES, ids=lambda h: repr(h) or "none")
def test_parse_retry_after_matches_the_sdk(sdk: openai.OpenAI, headers: dict[str, str]) -> None:
    ours = parse_retry_after(headers)
    theirs = sdk._parse_retry_after_header(httpx2.Headers(headers))
    assert _same(ours, theirs), (ours, theirs)


@pytest.mark.parametrize("offset", [30.0, 100.0, 300.0, -30.0])
def test_http_date_retry_after_matches_the_sdk(sdk: openai.OpenAI, offset: float) -> None:
    headers = {"retry-after": _http_date(offset)}
    ours = parse_retry_after(headers)
    theirs = sdk._parse_retry_after_header(httpx2.Headers(headers))
    assert ours is not None and theirs is not None
    assert abs(ours - theirs) < 2.0  # both read the clock; one second of date resolution
    assert abs(ours - offset) < 2.0


def _sdk_wait(sdk: openai.OpenAI, headers: Mapping[str, str]) -> float:
    options = FinalRequestOptions(method="post", url="/chat/completions")
    return sdk._calculate_retry_timeout(2, options, httpx2.Headers(dict(headers)))


@pytest.mark.parametrize("headers", RETRY_AFTER_CASES, ids=lambda h: repr(h) or "none")
def test_usable_wait_is_what_the_sdk_waits(sdk: openai.OpenAI, headers: dict[str, str]) -> None:
    """A usable wait is waited exactly; anything else gets the SDK's own backoff (<= 8 s), never 0."""
    ours = usable_wait(parse_retry_after(headers))
    theirs = _sdk_wait(sdk, headers)
    if ours is not None:
        assert theirs == ours
    else:
        assert 0.75 * SDK_INITIAL_RETRY_DELAY <= theirs <= SDK_MAX_RETRY_DELAY


def test_past_and_zero_waits_back_off_instead_of_retrying_at_once(sdk: openai.OpenAI) -> None:
    for headers in ({"retry-after": "0"}, {"retry-after": _http_date(-60)}, {"retry-after": "nan"}, {"retry-after": "inf"}):
        assert usable_wait(parse_retry_after(headers)) is None
        assert _sdk_wait(sdk, headers) > 0


STATUSES = [200, 400, 401, 403, 404, 408, 409, 422, 429, 500, 502, 503, 504]
SHOULD_RETRY_HEADERS: list[dict[str, str]] = [
    {},
    {"x-should-retry": "true"},
    {"x-should-retry": "false"},
    {"X-Should-Retry": "true"},
    {"x-should-retry": "TRUE"},  # the SDK compares exactly: this says nothing
    {"retry-after": "300"},
    {"retry-after": "300", "x-should-retry": "true"},
    {"retry-after": "120", "x-should-retry": "false"},
    {"retry-after": "inf"},
    {"retry-after": "1e400"},
    {"retry-after-ms": "121000"},
    {"retry-after": _http_date(600)},
]


@pytest.mark.parametrize("status", STATUSES)
@pytest.mark.parametrize("headers", SHOULD_RETRY_HEADERS, ids=repr)
def test_should_retry_matches_the_sdk(sdk: openai.OpenAI, status: int, headers: dict[str, str]) -> None:
    response = httpx2.Response(status, headers=headers, request=httpx2.Request("POST", "http://127.0.0.1:9/v1/x"))
    assert should_retry(status, headers) is sdk._should_retry(response)


def test_a_wait_over_the_ceiling_is_refused_with_the_wait_in_the_decision() -> None:
    decision = retry_decision(429, {"Retry-After": "300"})
    assert decision.retry is False and decision.asked == 300.0 and decision.wait is None
    assert "300" in decision.reason and "120" in decision.reason
    assert SDK_MAX_RETRY_AFTER == 120.0


def test_x_should_retry_overrides_the_status() -> None:
    assert retry_decision(400, {"x-should-retry": "true"}).retry is True
    assert retry_decision(503, {"x-should-retry": "false"}).retry is False
    assert retry_decision(503, {"x-should-retry": "false"}).reason == "x-should-retry: false"


def test_litellm_forwarded_waits_are_read_when_the_plain_headers_are_absent() -> None:
    assert server_retry_after({"llm_provider-retry-after": "7"}) == 7.0
    assert server_retry_after({"llm_provider-retry-after-ms": "2500"}) == 2.5
    assert server_retry_after({"llm_provider-retry-after": _http_date(40)}) == pytest.approx(40, abs=2)
    # a plain header wins, even one that says "back off as usual"
    assert server_retry_after({"retry-after": "3", "llm_provider-retry-after": "9"}) == 3.0
    assert server_retry_after({"retry-after": "0", "llm_provider-retry-after": "9"}) == 0.0
    assert retry_decision(429, {"llm_provider-retry-after": "7"}).wait == 7.0
    refused = retry_decision(429, {"llm_provider-retry-after": "600"})
    assert refused.retry is False and refused.asked == 600.0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("6m0s", 360.0),
        ("12ms", 0.012),
        ("1.5s", 1.5),
        ("1h2m3s", 3723.0),
        ("20s", 20.0),
        ("0s", 0.0),
        ("250us", 0.00025),
        ("3", 3.0),
        ("0.5", 0.5),
        ("", None),
        ("soon", None),
        ("6m0", None),
        ("-1s", None),
        ("1x", None),
        ("s", None),
        ("nan", None),
        (None, None),
    ],
)
def test_parse_duration(text: str | None, seconds: float | None) -> None:
    result = parse_duration(text)
    if seconds is None:
        assert result is None
    else:
        assert result == pytest.approx(seconds)


def test_rate_limit_reset_picks_the_exhausted_limit() -> None:
    both = {"x-ratelimit-reset-requests": "1s", "x-ratelimit-reset-tokens": "6m0s"}
    assert rate_limit_reset(both) == 1.0  # neither says which: the sooner
    assert rate_limit_reset({**both, "x-ratelimit-remaining-tokens": "0", "x-ratelimit-remaining-requests": "5"}) == 360.0
    assert rate_limit_reset({**both, "x-ratelimit-remaining-requests": "0"}) == 1.0
    assert rate_limit_reset({"x-ratelimit-reset-tokens": "12ms"}) == pytest.approx(0.012)
    assert rate_limit_reset({"x-ratelimit-reset-tokens": "later"}) is None
    assert rate_limit_reset({}) is None


def test_a_429_without_retry_after_waits_for_the_rate_limit_reset() -> None:
    headers = {"x-ratelimit-reset-requests": "2s", "x-ratelimit-remaining-requests": "0"}
    assert retry_decision(429, headers).wait == 2.0
    # only for a 429, and only when no Retry-After header (plain or forwarded) was sent
    assert retry_decision(503, headers).wait is None
    assert retry_decision(429, {**headers, "retry-after": "0"}).wait is None
    assert retry_decision(429, {**headers, "llm_provider-retry-after": "5"}).wait == 5.0
    # a reset past the ceiling is a hint not taken (the SDK never reads it): our own backoff, still retried
    long = retry_decision(429, {"x-ratelimit-reset-tokens": "6m0s", "x-ratelimit-remaining-tokens": "0"})
    assert long.retry is True and long.wait is None


def test_request_id_order() -> None:
    assert request_id_from({"x-request-id": "req_1", "x-litellm-call-id": "c", "apim-request-id": "a"}) == "req_1"
    assert request_id_from({"X-LiteLLM-Call-Id": "call-2", "apim-request-id": "a"}) == "call-2"
    assert request_id_from({"apim-request-id": "apim-3"}) == "apim-3"
    assert request_id_from({"x-request-id": ""}) is None
    assert request_id_from(None) is None


def test_error_fields_read_like_the_sdk() -> None:
    body = {
        "error": {
            "message": "This model's maximum context length is 8192 tokens.",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    }
    info = error_fields(400, {"X-Request-Id": "req_9", "Retry-After": "1"}, body)
    assert info == HttpErrorInfo(
        status_code=400,
        message="This model's maximum context length is 8192 tokens.",
        code="context_length_exceeded",
        type="invalid_request_error",
        param="messages",
        request_id="req_9",
        headers={"x-request-id": "req_9", "retry-after": "1"},
    )
    request = httpx2.Request("POST", "http://127.0.0.1:9/v1/chat/completions")
    sdk_error = openai.BadRequestError("x", response=httpx2.Response(400, request=request), body=body["error"])
    assert (info.code, info.type, info.param) == (sdk_error.code, sdk_error.type, sdk_error.param)


def test_error_fields_of_other_shapes() -> None:
    litellm = error_fields(429, {"x-litellm-call-id": "call-1"}, {"error": {"message": "quota", "type": "throttling_error", "param": None, "code": "429"}})
    assert (litellm.code, litellm.type, litellm.request_id) == ("429", "throttling_error", "call-1")
    llama = error_fields(500, {}, {"error": {"code": 500, "message": "boom", "type": "server_error"}})
    assert llama.code == "500" and llama.message == "boom"
    fastapi = error_fields(422, {}, {"detail": [{"loc": ["body", "messages"], "msg": "Field required", "type": "missing"}]})
    assert fastapi.message == "body.messages: Field required" and fastapi.code is None
    text = error_fields(500, {}, b"Internal Server Error")
    assert text.message == "Internal Server Error" and text.type is None
    empty = error_fields(502, {}, None)
    assert empty.message == "HTTP 502 with no error message"


@pytest.mark.parametrize(
    ("body", "quota"),
    [
        ({"error": {"message": "You exceeded your current quota, please check your plan and billing details.", "type": "insufficient_quota", "code": "insufficient_quota"}}, True),
        # LiteLLM's rewrite: only the message is left
        ({"error": {"message": "litellm.RateLimitError: RateLimitError: OpenAIException - You exceeded your current quota, please check your plan and billing details.", "type": "throttling_error", "param": None, "code": "429"}}, True),
        ({"error": {"message": "Too many requests", "type": "insufficient_quota", "code": None}}, True),
        ({"error": {"message": "Rate limit reached for requests", "type": "requests", "code": "rate_limit_exceeded"}}, False),
        ({"error": {"message": "litellm.RateLimitError: mock rate limit", "type": "throttling_error", "code": "429"}}, False),
    ],
)
def test_quota_exhaustion_by_code_type_or_message(body: dict, quota: bool) -> None:
    assert is_quota_exhausted(error_fields(429, {}, body)) is quota


def test_validation_errors_in_a_5xx() -> None:
    llama_cpp_python = {
        "error": {
            "message": "[{'type': 'missing', 'loc': ('body', 'messages'), 'msg': 'Field required', 'input': {'model': 'x'}}]",
            "type": "internal_server_error",
            "param": None,
            "code": None,
        }
    }
    assert is_validation_error(500, llama_cpp_python) is True
    assert is_validation_error(500, {"detail": [{"loc": ["body", "n"], "msg": "Input should be a valid integer", "type": "int_parsing"}]})
    assert is_validation_error(500, {"error": {"message": "CUDA out of memory", "type": "internal_server_error"}}) is False
    assert is_validation_error(400, llama_cpp_python) is False  # a 4xx is terminal anyway; only the 500 shape is special
    assert is_validation_error(500, "Internal Server Error") is False


def test_litellm_forwarded_should_retry_and_reset_headers() -> None:
    assert retry_decision(503, {"llm_provider-x-should-retry": "false"}).retry is False
    assert retry_decision(503, {"x-should-retry": "true", "llm_provider-x-should-retry": "false"}).retry is True
    forwarded = {"llm_provider-x-ratelimit-reset-requests": "1s", "llm_provider-x-ratelimit-remaining-requests": "0"}
    assert rate_limit_reset(forwarded) == 1.0
    assert retry_decision(429, forwarded).wait == 1.0


def test_validation_error_in_the_error_object_the_sdk_took_out() -> None:
    inner = {"message": "[{'type': 'missing', 'loc': ('body', 'messages'), 'msg': 'Field required'}]", "type": "internal_server_error"}
    assert is_validation_error(500, inner) is True
