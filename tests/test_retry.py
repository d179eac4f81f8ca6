"""RetryPolicy: tenacity pieces, unset fields merged over the configuration, the deadline."""

from __future__ import annotations

import pytest

import llmutils
from llmutils import ConfigError, OpenAIClient, RetriesExhaustedError, RetryPolicy
from llmutils._retry import POLICY_DEFAULTS, UNSET
from llmutils.testing import Fault, OpenAITestServer

HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture
def waits() -> list[float]:
    return []


def failing_client(server: OpenAITestServer, policy: RetryPolicy) -> OpenAIClient:
    server.script(*[Fault.server_error()] * 10)
    return OpenAIClient(base_url=server.base_url, api_key="k", retry=policy)


def test_an_injected_policy_overrides_only_the_fields_it_sets(server: OpenAITestServer, waits: list[float]) -> None:
    llmutils.force_default_value("MAX_ATTEMPTS", 2)
    llmutils.force_default_value("WAITING_TIME", 0.5)
    with failing_client(server, RetryPolicy(jitter=0, sleep=waits.append)) as client, pytest.raises(RetriesExhaustedError) as info:
        client.send_message(HELLO)
    assert info.value.attempts == 2 and server.request_count == 2  # MAX_ATTEMPTS=2 from the config, not 5
    assert waits == [0.5]  # WAITING_TIME from the config, jitter from the policy


def test_a_field_the_policy_sets_wins_over_the_configuration(server: OpenAITestServer, waits: list[float]) -> None:
    llmutils.force_default_value("MAX_ATTEMPTS", 2)
    with failing_client(server, RetryPolicy(max_attempts=3, waiting_time=0.25, jitter=0, sleep=waits.append)) as client:
        with pytest.raises(RetriesExhaustedError):
            client.send_message(HELLO)
    assert server.request_count == 3 and waits == [0.25, 0.5]


def test_the_calls_arguments_win_over_the_policy(server: OpenAITestServer, waits: list[float]) -> None:
    with failing_client(server, RetryPolicy(max_attempts=4, jitter=0, waiting_time=0, sleep=waits.append)) as client:
        with pytest.raises(RetriesExhaustedError):
            client.send_message(HELLO, max_attempts=1)
    assert server.request_count == 1


def test_total_timeout_none_given_explicitly_turns_the_configured_bound_off(server: OpenAITestServer) -> None:
    llmutils.force_default_value("TOTAL_TIMEOUT", 0.2)
    server.script(Fault.slow(0.5))
    with OpenAIClient(base_url=server.base_url, api_key="k", retry=RetryPolicy(total_timeout=None)) as client:
        assert client.send_message(HELLO)["content"] == "echo: hello"
    server.script(Fault.slow(0.5))
    with OpenAIClient(base_url=server.base_url, api_key="k", retry=RetryPolicy(jitter=0)) as client:
        with pytest.raises(llmutils.TotalTimeoutError):
            client.send_message(HELLO)


def test_unset_fields_are_unset_until_resolved() -> None:
    policy = RetryPolicy(jitter=0)
    assert policy.max_attempts is UNSET and not UNSET and repr(UNSET) == "UNSET"
    assert policy.given() == {"jitter": 0}
    resolved = policy.resolved()
    assert resolved.max_attempts == POLICY_DEFAULTS["max_attempts"] and resolved.jitter == 0


def test_a_policy_on_its_own_uses_the_defaults(waits: list[float]) -> None:
    calls = []

    def attempt(deadline: object) -> str:
        calls.append(1)
        raise llmutils.NonTerminalError("boom")

    with pytest.raises(RetriesExhaustedError, match="5 attempt"):
        RetryPolicy(jitter=0, sleep=waits.append).call(attempt)
    assert len(calls) == 5 and waits == [1.0, 2.0, 4.0, 8.0]


@pytest.mark.parametrize(
    "kwargs",
    [{"max_attempts": 0}, {"max_attempts": 2.5}, {"max_attempts": True}, {"waiting_time": -1}, {"total_timeout": 0}, {"sleep": 3}],
)
def test_bad_policy_fields_are_config_errors(kwargs: dict) -> None:
    name = next(iter(kwargs))
    with pytest.raises(ConfigError, match=name):
        RetryPolicy(**kwargs)


def test_max_attempts_zero_in_the_configuration_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMUTILS_MAX_ATTEMPTS", "0")
    with pytest.raises(ConfigError, match=r"MAX_ATTEMPTS.*>= 1"):
        llmutils.MockClient().send_message(HELLO)
    with pytest.raises(ConfigError, match="MAX_ATTEMPTS"):
        llmutils.force_default_value("MAX_ATTEMPTS", 0)


def test_log_messages_carry_no_llmutils_prefix(
    server: OpenAITestServer, waits: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    """The logger is named "llmutils" already: "WARNING:llmutils:attempt 1 failed", not "...:llmutils: attempt"."""
    import logging

    caplog.set_level(logging.DEBUG, logger="llmutils")
    with failing_client(server, RetryPolicy(max_attempts=2, jitter=0, sleep=waits.append)) as client:
        with pytest.raises(RetriesExhaustedError):
            client.send_message(HELLO)
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert messages and messages[0].startswith("attempt 1 failed (HTTP 500 from ")
    assert not [m for m in messages if m.startswith("llmutils")], messages


def test_library_log_calls_carry_no_llmutils_prefix() -> None:
    """No log call in the library starts its message with "llmutils: " (the logger's name says it)."""
    import pathlib
    import re

    root = pathlib.Path(llmutils.__file__).parent
    call = re.compile(r"""(?:logger\.\w+\(|warning = \()\s*(?:logging\.\w+,\s*)?f?["']llmutils: """)
    found = [str(p.relative_to(root)) for p in root.rglob("*.py") if call.search(p.read_text(encoding="utf-8"))]
    assert found == []


def test_a_stopped_scope_ends_the_backoff_sleep_at_once() -> None:
    """A call in a RetryScope sleeping its backoff (60 s, time.sleep) gives up as soon as the scope stops."""
    import threading
    import time

    from llmutils._exceptions import NonTerminalError
    from llmutils._retry import RetryScope, retry_scope

    failures: list[BaseException] = []
    failed_once = threading.Event()
    scope = RetryScope(on_failure=lambda exc: (failures.append(exc), failed_once.set()))
    outcome: list[BaseException] = []

    def attempt(deadline: object) -> None:
        raise NonTerminalError("connection error", request_id="req_1")

    def call() -> None:
        with retry_scope(scope):
            try:
                RetryPolicy(max_attempts=5, waiting_time=60, jitter=0).call(attempt)
            except BaseException as exc:  # handed to the test thread
                outcome.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    assert failed_once.wait(5)
    started = time.monotonic()
    scope.stop("the endpoint is down")
    thread.join(10)
    assert not thread.is_alive() and time.monotonic() - started < 5  # not the 60 s backoff
    [error] = outcome
    assert isinstance(error, RetriesExhaustedError) and error.attempts == 1 and len(failures) == 1
    assert "not retried because the batch stopped early: the endpoint is down" in str(error)
    assert error.request_id == "req_1" and isinstance(error.__cause__, NonTerminalError)


def test_a_call_in_a_stopped_scope_is_not_attempted() -> None:
    from llmutils import NotAttemptedError
    from llmutils._retry import RetryScope, retry_scope

    calls: list[object] = []
    scope = RetryScope()
    scope.stop("why")
    with retry_scope(scope), pytest.raises(NotAttemptedError, match="the batch stopped early: why") as caught:
        RetryPolicy(max_attempts=3).call(calls.append)
    assert calls == [] and caught.value.reason == "why"
    assert RetryPolicy(max_attempts=3).call(lambda deadline: "outside the scope") == "outside the scope"
