"""Security: a pickle planted in the cache file is never unpickled (sqlitedict CVE-2024-35515)."""

from __future__ import annotations

import logging
import os
import pickle
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

import llmutils
from llmutils.testing import OpenAITestServer


class _Payload:
    """Unpickling this creates the marker directory: the proof that someone unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.mkdir, (str(self.marker),))


def _plant(cache_file: Path, payload: bytes) -> list[str]:
    """Replace every stored value by ``payload`` and add a row of it; return the keys touched."""
    with sqlite3.connect(cache_file) as conn:
        keys = [row[0] for row in conn.execute("SELECT key FROM responses")]
        conn.execute("UPDATE responses SET value = ?", (payload,))
        conn.execute("INSERT INTO responses (key, value) VALUES (?, ?)", ("planted", payload))
    conn.close()
    return [*keys, "planted"]


def test_a_planted_pickle_is_never_unpickled(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Payload(marker))
    pickle.loads(payload)  # noqa: S301 - the payload works: unpickling it does create the marker
    assert marker.is_dir()
    marker.rmdir()

    cache_file = tmp_path / "cache.sqlite"
    messages = [{"role": "user", "content": "hi"}]
    with OpenAITestServer() as server:
        with llmutils.OpenAIClient(base_url=server.base_url, api_key="test", cache_file_name=str(cache_file),
                                   cache_api_calls=True) as client:
            assert client.send_message(messages)["content"] == "echo: hi"
        keys = _plant(cache_file, payload)
        assert len(keys) == 2

        with caplog.at_level(logging.WARNING, logger="llmutils"):
            # Every way llmutils reads the file: get, purge, the iteration of a copy, the CLI, a call.
            with llmutils.SQLiteCache(str(cache_file)) as cache:
                assert [cache.get(key) for key in keys] == [None, None]
                cache.purge_expired()
                with llmutils.SQLiteCache(str(tmp_path / "copy.sqlite")) as dest:
                    llmutils.copy_cache(cache, dest)
                    assert len(dest) == 0
            cli = subprocess.run(
                [sys.executable, "-m", "llmutils", "cache", "stats", "--cache-file", str(cache_file)],
                capture_output=True, text=True, timeout=60, cwd=tmp_path,
            )
            assert cli.returncode == 0, cli.stderr
            with llmutils.OpenAIClient(base_url=server.base_url, api_key="test", cache_file_name=str(cache_file),
                                       cache_api_calls=True) as client:
                assert client.send_message(messages)["content"] == "echo: hi"  # a miss: asked again
            assert server.request_count == 2
        assert any("not a valid cache value" in r.getMessage() for r in caplog.records)
    assert not marker.exists()


def test_the_library_logger_has_a_null_handler() -> None:
    """As the logging HOWTO asks of a library: no output unless the application configures logging."""
    handlers = logging.getLogger("llmutils").handlers
    assert any(isinstance(h, logging.NullHandler) for h in handlers)
