"""Shared pytest fixtures: a clean environment for every test and one local OpenAI test server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmutils.testing import OpenAITestServer

_ENV_PREFIXES = ("OPENAI_", "AZURE_", "LLMUTILS_", "TIKTOKEN_")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Drop OPENAI_*, AZURE_*, LLMUTILS_*, TIKTOKEN_* vars and chdir to tmp_path: no stray key or ./config.ini."""
    for name in list(os.environ):
        if name.startswith(_ENV_PREFIXES) or name.upper().endswith("_PROXY"):  # proxies would catch 127.0.0.1
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def _server_session() -> Iterator[OpenAITestServer]:
    """Start one OpenAITestServer for the whole session (starting one per test is wasted time)."""
    with OpenAITestServer() as srv:
        yield srv


@pytest.fixture
def server(_server_session: OpenAITestServer) -> OpenAITestServer:
    """The session's test server, with recorded requests, faults, chat_handler and latency reset."""
    _server_session.reset()
    _server_session.chat_handler = None
    _server_session.responses_handler = None
    _server_session.latency = 0.0
    _server_session.stream_interval = 0.0
    return _server_session


@pytest.fixture(autouse=True)
def _reset_llmutils() -> Iterator[None]:
    """Forget forced values and re-register fresh default clients after each test."""
    yield
    from llmutils import _config, _registry, _tokens

    _config.reset_forced_values()
    _registry._register_defaults()
    _tokens._reset_for_tests()
