"""The llmutils command: the offline mock run and its cached re-run, every subcommand, errors, exit codes."""

from __future__ import annotations

import io
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import llmutils._tokens as tokens_module
from llmutils.cli import main
from llmutils.testing import Fault, OpenAITestServer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "prompts.jsonl"
REDIS_URL = os.environ.get("LLMUTILS_TEST_REDIS_URL")  # read at import: the autouse fixture clears LLMUTILS_*
_ENV_PREFIXES = ("OPENAI_", "AZURE_", "LLMUTILS_", "TIKTOKEN_")


def _env() -> dict[str, str]:
    """The environment of a fresh machine: no key, no base URL, no llmutils settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith(_ENV_PREFIXES)}


def _run(*args: str, cwd: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmutils", *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout
    )


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("llmutils: error: "), err
    assert "Traceback" not in err
    return lines[0]


# -- the README's main command, end to end, in a fresh process -------------------------------------


def test_readme_batch_offline_then_again_from_cache(tmp_path: Path) -> None:
    first = _run("batch", str(EXAMPLES), "out.jsonl", "--template", "summarize", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "running offline on the mock backend" in first.stderr
    assert "20/20" not in first.stderr and "\r" not in first.stderr  # stderr is a pipe here: no progress bar
    assert "20 items: 20 ok, 0 failed, 0 cached" in first.stderr
    records = _lines(tmp_path / "out.jsonl")
    assert [r["index"] for r in records] == list(range(20))
    assert all(r["cached"] is False and isinstance(r["output"], str) for r in records)
    assert records[0]["output"].startswith("echo: Summarize the following text in at most 25 words")
    assert (tmp_path / "llmutils_cache.sqlite").exists()

    second = _run("batch", str(EXAMPLES), "out.jsonl", "--template", "summarize", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "20 items: 20 ok, 0 failed, 20 cached, 0 tokens" in second.stderr
    again = _lines(tmp_path / "out.jsonl")
    assert all(r["cached"] is True for r in again)
    assert [r["output"] for r in again] == [r["output"] for r in records]


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process is POSIX")
def test_ctrl_c_stops_a_batch_at_once_and_says_how_to_resume(server: OpenAITestServer, tmp_path: Path) -> None:
    entered, release = threading.Event(), threading.Event()

    def hang(body: dict[str, Any]) -> str:
        entered.set()
        release.wait(20)
        return "too late"

    server.chat_handler = hang
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"prompt": str(i)}) + "\n" for i in range(5)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmutils", "--base-url", server.base_url, "batch", "in.jsonl", "out.jsonl", "-w", "2"],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert entered.wait(20), "the batch never reached the server"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
        assert time.monotonic() - t0 < 5  # did not wait for the hanging requests
    finally:
        release.set()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "interrupted; 0 of 5 results were written to out.jsonl" in err and "run the same command again to resume" in err
    assert "Traceback" not in err
    assert (tmp_path / "out.jsonl").read_text() == ""  # created (checked writable) before the first request


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process is POSIX")
def test_ctrl_c_keeps_every_answer_received_in_out(server: OpenAITestServer, tmp_path: Path) -> None:
    fourth, release = threading.Event(), threading.Event()

    def handler(body: dict[str, Any]) -> str:
        text = body["messages"][-1]["content"]
        if text == "4":
            fourth.set()
        if text in ("2", "4"):
            release.wait(20)  # in flight when Ctrl-C comes
        return f"answer {text}"

    server.chat_handler = handler
    _write_jsonl(tmp_path / "in.jsonl", [{"prompt": str(i)} for i in range(8)])
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmutils", "--base-url", server.base_url, "batch", "in.jsonl", "out.jsonl", "-w", "2"],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert fourth.wait(20), "item 4 never reached the server"  # so 0, 1 and 3 are answered
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    finally:
        release.set()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "interrupted; 3 of 8 results were written to out.jsonl" in err
    records = _lines(tmp_path / "out.jsonl")
    assert [(r["index"], r["output"]) for r in records] == [(0, "answer 0"), (1, "answer 1"), (3, "answer 3")]


# -- batch, in process ---------------------------------------------------------------------------


def test_batch_against_a_base_url_with_one_failed_item(
    server: OpenAITestServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "in.jsonl").write_text(
        '{"prompt": "first"}\n\n{"messages": [{"role": "user", "content": "second"}]}\n[{"role": "user", "content": "third"}]\n'
    )
    server.script(Fault.bad_request("scripted 400"))
    args = ["batch", "in.jsonl", "out.jsonl", "--base-url", server.base_url, "--model", "m-1"]
    args += ["-w", "1", "--no-progress", "--temperature", "0"]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 1
    assert "offline" not in err
    assert "3 items: 2 ok, 1 failed, 0 cached" in err and "first failure: item 0: InvalidRequestError" in err
    records = _lines(tmp_path / "out.jsonl")
    assert records[0]["error"]["type"] == "InvalidRequestError" and records[0]["error"]["status_code"] == 400
    assert "scripted 400" in records[0]["error"]["message"] and records[0]["input"] == {"prompt": "first"}
    second = {"messages": [{"role": "user", "content": "second"}]}
    assert records[1] == {"index": 1, "input": second, "output": "echo: second", "cached": False}
    assert records[2]["output"] == "echo: third"
    assert {r.body["model"] for r in server.requests} == {"m-1"}
    assert {r.body["temperature"] for r in server.requests} == {0}

    # Re-running sends only the item that failed: the others come from the cache.
    assert main(args) == 0
    assert server.request_count == 4
    assert [r["cached"] for r in _lines(tmp_path / "out.jsonl")] == [False, True, True]


def test_batch_no_cache_stdout_and_template_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "in.jsonl").write_text('{"text": "hello"}\n{"txet": "typo"}\n')
    code = main(["--api-type", "mock", "batch", "in.jsonl", "-", "--template", "summarize", "--no-cache", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 1
    records = [json.loads(line) for line in captured.out.splitlines()]
    assert "echo: Summarize" in records[0]["output"]
    assert records[1]["error"]["type"] == "TemplateError"
    assert not (tmp_path / "llmutils_cache.sqlite").exists()
    assert "offline" not in captured.err  # --api-type mock was explicit


def test_batch_input_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["batch", "missing.jsonl", "out.jsonl"]) == 1
    assert "cannot read missing.jsonl" in _one_error_line(capsys.readouterr().err)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{not json}\n')
    assert main(["batch", "bad.jsonl", "out.jsonl"]) == 1
    assert "bad.jsonl line 2 is not valid JSON" in _one_error_line(capsys.readouterr().err)
    (tmp_path / "deep.jsonl").write_text('{"prompt": "ok"}\n{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    assert main(["batch", "deep.jsonl", "out.jsonl"]) == 1
    assert "deep.jsonl line 2 is nested too deeply" in _one_error_line(capsys.readouterr().err)
    assert main(["batch", "bad.jsonl", "out.jsonl", "--workers", "0"]) == 2
    assert "llmutils: error: --workers: must be >= 1, got 0 (see 'llmutils batch --help')" == _one_error_line(capsys.readouterr().err)


# -- chat, render, tokens ------------------------------------------------------------------------


def test_chat_offline_from_args_and_stdin(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["chat", "hello", "there"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "echo: hello there\n"
    assert "running offline on the mock backend" in captured.err and "OPENAI_API_KEY" in captured.err
    monkeypatch.setattr(sys, "stdin", io.StringIO("from stdin\n"))
    assert main(["chat"]) == 0
    assert capsys.readouterr().out == "echo: from stdin\n"


def test_chat_with_a_template_and_vars(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["chat", "--template", "summarize", "--var", "text=A long story.", "--var", "max_words:=7"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("echo: Summarize the following text in at most 7 words") and "A long story." in out


def test_chat_against_a_base_url(server: OpenAITestServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--base-url", server.base_url, "chat", "hi", "--max-tokens", "5"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "echo: hi\n" and captured.err == ""
    assert server.request_count == 1 and server.requests[0].body["max_tokens"] == 5


def test_chat_with_the_base_url_from_the_environment(
    server: OpenAITestServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    assert main(["chat", "hi"]) == 0
    assert capsys.readouterr().out == "echo: hi\n" and server.request_count == 1


def test_auto_api_type_picks_azure_or_a_configured_type(
    server: OpenAITestServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "az-key")
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", server.azure_endpoint)
    assert main(["chat", "hi", "--model", "my-deployment"]) == 0
    assert capsys.readouterr().out == "echo: hi\n"
    assert server.requests[0].deployment == "my-deployment" and server.requests[0].headers["api-key"] == "az-key"
    monkeypatch.delenv("AZURE_OPENAI_API_KEY")
    monkeypatch.delenv("AZURE_OPENAI_ENDPOINT")
    monkeypatch.setenv("LLMUTILS_API_TYPE", "openai")  # configured: no silent fallback to mock
    assert main(["chat", "hi"]) == 1
    assert "No OpenAI API key found" in _one_error_line(capsys.readouterr().err)
    monkeypatch.delenv("LLMUTILS_API_TYPE")
    Path("config.ini").write_text("[OpenAI]\nAPI_TYPE = openai\n")  # configured in the file: the same
    assert main(["chat", "hi"]) == 1
    assert "No OpenAI API key found" in _one_error_line(capsys.readouterr().err)


def test_runtime_errors_are_one_line_and_verbose_shows_the_traceback(server: OpenAITestServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--api-type", "openai", "chat", "hi"]) == 1
    assert "No OpenAI API key found" in _one_error_line(capsys.readouterr().err)
    server.script(Fault.unauthorized())
    assert main(["chat", "hi", "--base-url", server.base_url]) == 1
    assert "Authentication failed" in _one_error_line(capsys.readouterr().err)
    assert main(["-v", "--api-type", "openai", "chat", "hi"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("llmutils: error: No OpenAI API key found")


def test_render_prints_messages_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["render", "--system-template", "system_default", "--template", "classify"]
    args += ["--var", "text=I love it", "--var", 'labels:=["positive", "negative"]']
    assert main(args) == 0
    messages = json.loads(capsys.readouterr().out)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert "positive, negative" in messages[1]["content"] and "I love it" in messages[1]["content"]
    assert main(["render", "--template", "no_such_template"]) == 1
    assert "no_such_template" in _one_error_line(capsys.readouterr().err)


def test_tokens_exact_and_estimate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    class WordEncoding:
        def encode_ordinary(self, text: str) -> list[str]:
            return text.split()

    monkeypatch.setattr(tokens_module, "_get_encoding", lambda name: WordEncoding())
    assert main(["tokens", "one two three", "four"]) == 0
    assert capsys.readouterr().out.startswith("4 tokens (exact; text, model gpt-4.1-mini")
    (tmp_path / "notes.txt").write_text("a b c", encoding="utf-8")
    assert main(["tokens", "--file", "notes.txt", "--model", "gpt-4o"]) == 0
    assert capsys.readouterr().out.startswith("3 tokens (exact; text, model gpt-4o, encoding o200k_base)")
    assert main(["tokens", "--template", "user_default", "--var", "prompt=x y"]) == 0
    assert capsys.readouterr().out.startswith("9 tokens (exact; 1 message,")  # "x y" 2 + "user" 1 + 3 per message + 3 priming

    monkeypatch.setattr(tokens_module, "_get_encoding", lambda name: None)
    assert main(["tokens", "hello world"]) == 0
    assert capsys.readouterr().out.startswith("~2 tokens (estimate: tiktoken could not load o200k_base")
    assert main(["tokens", "a", "--file", "notes.txt"]) == 2
    _one_error_line(capsys.readouterr().err)


# -- cache -----------------------------------------------------------------------------------------


def test_cache_stats_clear_vacuum(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cache", "stats"]) == 1
    assert "no cache file at" in _one_error_line(capsys.readouterr().err)
    (tmp_path / "in.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    assert main(["batch", "in.jsonl", "out.jsonl", "--no-progress", "--cache-file", "c.sqlite"]) == 0
    capsys.readouterr()
    assert main(["cache", "stats", "--cache-file", "c.sqlite"]) == 0
    out = capsys.readouterr().out
    assert "entries: 2" in out and str(tmp_path / "c.sqlite") in out
    assert main(["cache", "--cache-file", "c.sqlite", "clear"]) == 0
    assert capsys.readouterr().out.startswith("cleared 2 entries")
    assert main(["cache", "vacuum", "--cache-file", "c.sqlite"]) == 0
    assert capsys.readouterr().out.startswith("vacuumed")
    assert main(["cache"]) == 2


def test_cache_import_pickle_needs_trusted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = {"old-key": {"choices": [{"message": {"role": "assistant", "content": "hi"}}]}}
    (tmp_path / "old.pickle").write_bytes(pickle.dumps(old))
    assert main(["cache", "import-pickle", "old.pickle"]) == 1
    assert "--trusted" in _one_error_line(capsys.readouterr().err)
    assert main(["cache", "import-pickle", "old.pickle", "--trusted"]) == 0
    assert capsys.readouterr().out.startswith("imported 1 entries from old.pickle")
    assert main(["cache", "stats"]) == 0
    assert "entries: 1" in capsys.readouterr().out
    assert main(["cache", "import-pickle", "missing.pickle", "--trusted"]) == 1
    assert "cannot read missing.pickle" in _one_error_line(capsys.readouterr().err)


def test_cache_import_pickle_of_a_file_that_is_not_a_pickle(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a pickle at all\n")
    out = _run("cache", "import-pickle", "notes.txt", "--trusted", cwd=tmp_path)
    assert out.returncode == 1
    line = _one_error_line(out.stderr)
    assert "notes.txt is not a pickle file" in line


# -- help and usage errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        [], ["chat"], ["batch"], ["render"], ["tokens"],
        ["cache"], ["cache", "stats"], ["cache", "clear"], ["cache", "vacuum"], ["cache", "import-pickle"],
    ],
)
def test_help_everywhere(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: llmutils {' '.join(command)}".rstrip())
    assert "--verbose" in out


def test_batch_help_documents_the_cache_default_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    main(["batch", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "The cache is ON by default here" in out and "Exit code 0 when every item succeeded, 1 when any failed" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["nosuch"],
        ["batch"],
        ["batch", "in.jsonl"],
        ["--api-type", "nosuch", "chat", "x"],
        ["chat", "--var", "novalue"],
        ["chat", "--template", "user_default", "--var", "n:=not json"],
        ["chat", "x", "--var", "a=b"],
        ["render"],
        ["batch", "in", "out", "--workers", "many"],
    ],
)
def test_usage_errors_exit_2_with_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    _one_error_line(capsys.readouterr().err)


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: llmutils" in capsys.readouterr().err


def test_python_dash_m_help_in_a_fresh_process(tmp_path: Path) -> None:
    result = _run("--help", cwd=tmp_path)
    assert result.returncode == 0 and "batch" in result.stdout and "llmutils chat" in result.stdout


def test_render_accepts_any_variable_name(capsys: pytest.CaptureFixture[str]) -> None:
    from llmutils.cli import main

    assert main(["render", "--template", "user_default", "--var", "prompt=hi", "--var", "template_dirs=x"]) == 0
    assert "hi" in capsys.readouterr().out


# -- batch never loses work (issue 9, section 4) ------------------------------------------------------


def _write_jsonl(path: Path, lines: list[Any]) -> None:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")


def test_one_bad_item_fails_alone_and_the_rest_is_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "calc.j2").write_text("{{ prompt }}: {{ 100 / n + count }}\n", encoding="utf-8")
    (tmp_path / "in.jsonl").write_text(
        '{"prompt": "ok", "n": 4, "count": 1}\n'
        '{"prompt": "div", "n": 0, "count": 1}\n'  # ZeroDivisionError in the template
        '{"prompt": "type", "n": 4, "count": "x"}\n'  # TypeError in the template
        '"just a string"\n'  # not a mapping of variables
        '[1, 2]\n'  # a list that is not messages
        '{"prompt": "bad \\ud83d half", "n": 5, "count": 0}\n',  # a lone surrogate
        encoding="utf-8",
    )
    argv = ["--api-type", "mock", "batch", "in.jsonl", "out.jsonl", "--template", "calc", "--template-dir", "t", "--no-cache"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "6 items: 2 ok, 4 failed" in err
    records = _lines(tmp_path / "out.jsonl")
    assert [r["index"] for r in records] == list(range(6))
    assert records[0]["output"] == "echo: ok: 26.0"
    assert records[1]["error"]["type"] == "TemplateError"
    assert "'calc'" in records[1]["error"]["message"] and "variables 'n' (int), 'count' (int)" in records[1]["error"]["message"]
    assert "ZeroDivisionError" in records[1]["error"]["message"]
    assert records[2]["error"]["type"] == "TemplateError" and "'count' (str)" in records[2]["error"]["message"]
    assert "TypeError" in records[2]["error"]["message"]
    assert records[3]["error"]["type"] == "InvalidRequestError" and records[3]["input"] == "just a string"
    assert records[4]["error"]["type"] == "InvalidRequestError"
    assert records[5]["output"] == "echo: bad \ud83d half: 20.0"  # sent and written faithfully (escaped in the file)
    assert "\\ud83d" in (tmp_path / "out.jsonl").read_text(encoding="utf-8")


def test_a_surrogate_the_server_cannot_take_fails_that_item_only(
    server: OpenAITestServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "in.jsonl").write_text('{"prompt": "bad \\ud83d half"}\n{"prompt": "fine"}\n', encoding="utf-8")
    assert main(["--base-url", server.base_url, "batch", "in.jsonl", "out.jsonl", "--no-cache", "-w", "1"]) == 1
    assert "Traceback" not in capsys.readouterr().err
    first, second = _lines(tmp_path / "out.jsonl")
    assert first["error"]["type"] == "InvalidRequestError" and first["input"] == {"prompt": "bad \ud83d half"}
    assert second["output"] == "echo: fine" and server.request_count == 1


def test_fail_fast_after_the_first_authentication_error(
    server: OpenAITestServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(server, "api_key", "the-right-key")
    monkeypatch.setenv("OPENAI_API_KEY", "a-wrong-key")
    _write_jsonl(tmp_path / "in.jsonl", [{"prompt": str(i)} for i in range(20)])
    assert main(["--base-url", server.base_url, "batch", "in.jsonl", "out.jsonl", "-w", "1", "--no-cache"]) == 1
    err = capsys.readouterr().err
    assert server.request_count == 1  # not 20
    stop_lines = [line for line in err.splitlines() if "stopped early" in line]
    assert len(stop_lines) == 1 and "AuthenticationError" in stop_lines[0] and "19 of 20 items not attempted" in stop_lines[0]
    assert "a-wrong-key" not in err
    assert "20 items: 0 ok, 20 failed (19 not attempted)" in err
    records = _lines(tmp_path / "out.jsonl")
    assert records[0]["error"]["type"] == "AuthenticationError" and records[0]["error"]["status_code"] == 401
    assert {r["error"]["type"] for r in records[1:]} == {"NotAttemptedError"}
    assert [r["index"] for r in records] == list(range(20))


def _closed_port_url() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def test_fail_fast_after_n_connection_failures_in_a_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LLMUTILS_MAX_ATTEMPTS", "1")
    _write_jsonl(tmp_path / "in.jsonl", [{"prompt": str(i)} for i in range(20)])
    argv = ["--base-url", _closed_port_url(), "batch", "in.jsonl", "out.jsonl", "-w", "1", "--no-cache", "--max-connection-failures", "3"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "stopped early: 3 connection failures in a row" in err and "17 of 20 items not attempted" in err
    records = _lines(tmp_path / "out.jsonl")
    assert [r["error"]["type"] for r in records[:3]] == ["RetriesExhaustedError"] * 3
    assert {r["error"]["type"] for r in records[3:]} == {"NotAttemptedError"} and len(records) == 20


def test_a_dead_base_url_fails_the_batch_in_seconds_with_one_line_saying_why(tmp_path: Path) -> None:
    """The review's command, default retries and 8 workers: 33 s before each failed attempt counted
    and the items in flight left their backoff sleeps when the batch stopped."""
    started = time.monotonic()
    url = _closed_port_url()
    argv = ["--base-url", url, "batch", str(EXAMPLES), "o.jsonl", "--template", "summarize", "--no-cache"]
    done = _run(*argv, cwd=tmp_path)
    elapsed = time.monotonic() - started
    assert done.returncode == 1 and elapsed < 12, (elapsed, done.stderr)  # start-up plus one backoff wait at most
    records = _lines(tmp_path / "o.jsonl")
    assert len(records) == 20 and all("error" in r for r in records)
    types = {r["error"]["type"] for r in records}
    assert types <= {"RetriesExhaustedError", "NotAttemptedError"} and "NotAttemptedError" in types
    why = [line for line in done.stderr.splitlines() if line.startswith("llmutils: WARNING: batch stopped early")]
    assert len(why) == 1 and "5 connection failures in a row" in why[0] and "not attempted" in why[0]


def test_out_is_checked_before_the_first_request(server: OpenAITestServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}])
    (tmp_path / "a_directory").mkdir()
    for out in ("a_directory", "missing_dir/out.jsonl"):
        assert main(["--base-url", server.base_url, "batch", "in.jsonl", out]) == 1
        assert f"cannot write {out}" in _one_error_line(capsys.readouterr().err)
    assert server.request_count == 0


@pytest.mark.parametrize("out", ["in.jsonl", "./in.jsonl", "link.jsonl"])
def test_in_equal_to_out_is_a_usage_error(out: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}])
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "in.jsonl")
    assert main(["--api-type", "mock", "batch", "in.jsonl", out]) == 2
    assert "IN and OUT are the same file" in _one_error_line(capsys.readouterr().err)
    assert _lines(tmp_path / "in.jsonl") == [{"prompt": "a"}]


def test_out_keeps_its_permission_bits_and_a_new_one_follows_the_umask(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}])
    (tmp_path / "old.jsonl").write_text("previous run\n")
    os.chmod(tmp_path / "old.jsonl", 0o640)
    old_umask = os.umask(0o022)
    try:
        assert main(["--api-type", "mock", "batch", "in.jsonl", "old.jsonl", "--no-cache"]) == 0
        assert main(["--api-type", "mock", "batch", "in.jsonl", "new.jsonl", "--no-cache"]) == 0
    finally:
        os.umask(old_umask)
    assert (tmp_path / "old.jsonl").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "new.jsonl").stat().st_mode & 0o777 == 0o644  # not 0600
    assert _lines(tmp_path / "old.jsonl")[0]["output"] == "echo: a"


def test_a_template_that_does_not_exist_fails_before_any_request(
    server: OpenAITestServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "in.jsonl").write_text('{"messages": [{"role": "user", "content": "own message"}]}\n{"text": "x"}\n')
    assert main(["--base-url", server.base_url, "batch", "in.jsonl", "out.jsonl", "--template", "summarise"]) == 1
    assert "'summarise' not found" in _one_error_line(capsys.readouterr().err)
    assert server.request_count == 0 and not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--rpm", "-5", "--rpm: must be > 0, got -5"),
        ("--tpm", "0", "--tpm: must be > 0, got 0"),
        ("--rpm", "nan", "--rpm: must be a number > 0, got nan"),
        ("--workers", "many", "--workers: must be an integer >= 1, got 'many'"),
        ("-w", "-2", "--workers: must be >= 1, got -2"),
        ("--max-tokens", "0", "--max-tokens: must be >= 1, got 0"),
        ("--temperature", "-0.5", "--temperature: must be >= 0, got -0.5"),
        ("--max-connection-failures", "-1", "--max-connection-failures: must be >= 0, got -1"),
    ],
)
def test_flag_errors_name_the_flag_and_exit_2(
    flag: str, value: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["batch", "in.jsonl", "out.jsonl", flag, value]) == 2
    assert _one_error_line(capsys.readouterr().err) == f"llmutils: error: {expected} (see 'llmutils batch --help')"
    assert not (tmp_path / "out.jsonl").exists()


def test_results_are_written_as_they_complete_so_a_kill_loses_nothing_answered(server: OpenAITestServer, tmp_path: Path) -> None:
    release = threading.Event()

    def handler(body: dict[str, Any]) -> str:
        text = body["messages"][-1]["content"]
        if text == "10":
            release.wait(20)  # item 10 hangs: the process is killed while it is in flight
        return f"answer {text}"

    server.chat_handler = handler
    _write_jsonl(tmp_path / "in.jsonl", [{"prompt": str(i)} for i in range(20)])
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmutils", "--base-url", server.base_url, "batch", "in.jsonl", "out.jsonl", "-w", "1"],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    out = tmp_path / "out.jsonl"
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (out.exists() and out.read_text(encoding="utf-8").count("\n") >= 10):
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.02)  # polling a file another process writes; bounded by the deadline
        proc.kill()
        proc.communicate(timeout=10)
    finally:
        release.set()
        if proc.poll() is None:
            proc.kill()
    records = _lines(out)
    assert [r["output"] for r in records] == [f"answer {i}" for i in range(10)]


def _wait_for_line(stream: Any, marker: str, timeout: float = 20) -> list[str]:
    """Read lines from ``stream`` until one contains ``marker`` (in a thread, bounded by ``timeout``)."""
    seen: list[str] = []
    found = threading.Event()

    def read() -> None:
        for line in stream:
            seen.append(line)
            if marker in line:
                found.set()
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert found.wait(timeout), f"{marker!r} never appeared: {''.join(seen)[-2000:]}"
    return seen


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process is POSIX")
@pytest.mark.parametrize("marker", ["llmutils._exceptions", "jinja2.sandbox", "llmutils._clients", "llmutils.cli"])
def test_ctrl_c_while_the_command_is_still_importing_exits_130_quietly(marker: str, server: OpenAITestServer, tmp_path: Path) -> None:
    # -X importtime prints one line as each import finishes: a marker inside the first ~0.3 s.
    release = threading.Event()
    server.chat_handler = lambda body: "late" if release.wait(20) else "never"  # the batch cannot end first
    _write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}])
    proc = subprocess.Popen(
        [sys.executable, "-X", "importtime", "-m", "llmutils", "--base-url", server.base_url, "batch", "in.jsonl", "out.jsonl"],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        seen = _wait_for_line(proc.stderr, marker)
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=20)  # reads the rest of stderr while the child exits
    finally:
        release.set()
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    err = "".join(seen) + rest
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "llmutils: interrupted" in err


@pytest.mark.skipif(sys.platform == "win32", reason="a pseudo-terminal is POSIX")
def test_progress_bar_on_a_terminal_with_log_lines_printed_through_it(server: OpenAITestServer, tmp_path: Path) -> None:
    import fcntl
    import pty
    import struct
    import termios

    server.script(Fault.server_error(), Fault.server_error())  # two retry WARNINGs while the bar is drawn
    _write_jsonl(tmp_path / "in.jsonl", [{"prompt": str(i)} for i in range(20)])
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    env = {**_env(), "LLMUTILS_WAITING_TIME": "0.001"}
    argv = [sys.executable, "-m", "llmutils", "--base-url", server.base_url, "batch", "in.jsonl", "out.jsonl", "-w", "1"]
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    chunks = []
    try:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert proc.wait(timeout=30) == 0
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    err = b"".join(chunks).decode("utf-8", "replace")
    assert "20/20" in err  # the bar, on a terminal
    segments = [s for s in err.replace("\r", "\n").split("\n") if "WARNING" in s]
    assert len(segments) == 2 and all(s.startswith("llmutils: WARNING: attempt ") for s in segments), err  # not glued to the bar
    assert "llmutils: WARNING: llmutils:" not in err


def test_cache_commands_act_on_the_store_they_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    redis_url = _closed_port_url().replace("http://", "redis://").replace("/v1", "/0")
    monkeypatch.setenv("LLMUTILS_CACHE_URL", redis_url)  # configured: Redis (here: one that does not answer)
    _write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    assert main(["--api-type", "mock", "batch", "in.jsonl", "out.jsonl", "--cache-file", "f.sqlite"]) == 0
    err = capsys.readouterr().err
    assert "WARNING" not in err and (tmp_path / "f.sqlite").exists()  # the named file, Redis never tried
    assert main(["cache", "stats", "--cache-file", "f.sqlite"]) == 0
    out = capsys.readouterr().out
    assert "entries: 2" in out and str(tmp_path / "f.sqlite") in out
    assert main(["cache", "vacuum", "--cache-file", "f.sqlite"]) == 0
    assert capsys.readouterr().out.startswith(f"vacuumed {tmp_path / 'f.sqlite'}")
    assert main(["cache", "clear", "--cache-file", "f.sqlite"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"cleared 2 entries from {tmp_path / 'f.sqlite'}") and "WARNING" not in captured.err
    assert main(["cache", "clear", "--cache-file", "f.sqlite", "--cache-url", redis_url]) == 2
    assert "--cache-file and --cache-url name two caches" in _one_error_line(capsys.readouterr().err)


@pytest.mark.skipif(not REDIS_URL, reason="LLMUTILS_TEST_REDIS_URL is not set (.ci/run sets it)")
def test_cache_clear_of_a_named_file_leaves_the_configured_redis_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("redis")
    assert REDIS_URL is not None
    _write_jsonl(tmp_path / "in.jsonl", [{"prompt": "redis a"}, {"prompt": "redis b"}, {"prompt": "redis c"}])
    assert main(["--api-type", "mock", "batch", "in.jsonl", "out.jsonl", "--cache-url", REDIS_URL]) == 0
    assert main(["--api-type", "mock", "batch", "in.jsonl", "out.jsonl", "--cache-file", "f.sqlite"]) == 0
    monkeypatch.setenv("LLMUTILS_CACHE_URL", REDIS_URL)
    capsys.readouterr()
    try:
        assert main(["cache", "stats"]) == 0
        before = capsys.readouterr().out
        assert "entries: " in before
        assert main(["cache", "clear", "--cache-file", "f.sqlite"]) == 0
        assert capsys.readouterr().out.startswith(f"cleared 3 entries from {tmp_path / 'f.sqlite'}")
        assert main(["cache", "stats"]) == 0
        after = capsys.readouterr().out
        entries = [line for line in after.splitlines() if line.startswith("entries: ")]
        assert entries == [line for line in before.splitlines() if line.startswith("entries: ")] and entries != ["entries: 0"]
    finally:
        main(["cache", "clear", "--cache-url", REDIS_URL])
