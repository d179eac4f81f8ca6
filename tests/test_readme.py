"""Every code block of README.md and of the docs (docs/*.rst) runs, as written, offline.

How each block runs (in a fresh temporary directory, one block per test):

- ``python`` blocks: each in a fresh process, so no block leans on another's names or state: a
  child forked from a runner process that has already imported llmutils and the openai SDK (that
  import costs seconds on a busy machine; the child starts with nothing else), with the block's
  environment and working directory, run as ``__main__``. Without ``os.fork``: ``python -c BLOCK``.
- ``bash`` blocks: ``bash -euo pipefail -c BLOCK`` with the installed ``llmutils`` command first on
  ``PATH``; every command must succeed.
- ``ini`` blocks: written to ``config.ini`` and read as the configuration (``LLMUTILS_CONFIG``);
  every key must be valid and the registered client for its ``API_TYPE`` must build.
- ``json`` / ``jsonl`` blocks (data shown, e.g. an output line) must parse; ``text`` blocks are
  output, not code, and are not run.

"Offline" is real: the environment points the OpenAI and Azure settings at a local
:class:`llmutils.testing.OpenAITestServer` (``OPENAI_BASE_URL``, ``OPENAI_API_KEY``,
``AZURE_OPENAI_ENDPOINT``, ``AZURE_OPENAI_API_KEY``), so ``OpenAIClient()`` and ``AzureClient()``
talk the real wire format to 127.0.0.1; nothing else reaches the network. The working directory
holds what the blocks name: a copy of ``examples/`` and ``templates/``, ``article.txt``,
``prompt.txt`` and an old-style pickle cache (``openai_api_cache.pickle`` and ``old.pickle``).

A block that must not run is preceded by an HTML comment on the line before its fence, which the
rendered README does not show, saying why::

    <!-- not run: needs a Redis server -->

Keep those few: a block that can run offline, runs.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from llmutils.testing import OpenAITestServer

ROOT = Path(__file__).resolve().parent.parent
NOT_RUN = re.compile(r"<!--\s*not run:\s*(?P<why>.+?)\s*-->")
RUN_LANGUAGES = {"python", "bash", "sh", "shell", "console", "ini", "json", "jsonl"}
BLOCK_TIMEOUT = 120.0


@dataclass(frozen=True)
class Block:
    """One code block: where it is, its language, its text (dedented), and why it is not run (if so)."""

    source: str
    line: int
    language: str
    code: str
    not_run: str | None

    @property
    def id(self) -> str:
        return f"{self.source}:{self.line}"


def markdown_blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, dedented by their fence's indentation (as rendered)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = re.match(r"^(?P<indent>\s*)(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)", lines[i])
        if not match:
            i += 1
            continue
        indent, fence = len(match["indent"]), match["fence"]
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        i += 1
        before = lines[start - 1] if start > 0 else ""
        why = NOT_RUN.search(before)
        blocks.append(
            Block(path.name, start + 1, match["lang"].lower(), "\n".join(body) + "\n", why["why"] if why else None)
        )
    return blocks


def rst_blocks(path: Path) -> list[Block]:
    """The ``.. code-block:: LANG`` blocks of a reST file (literal ``::`` blocks are shown, not run)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    for i, line in enumerate(lines):
        match = re.match(r"^(?P<indent>\s*)\.\. code-block::\s*(?P<lang>\S+)", line)
        if not match:
            continue
        j = i + 1
        while j < len(lines) and (not lines[j].strip() or lines[j].lstrip().startswith(":")):
            if lines[j].strip():
                j += 1
                continue
            break
        body: list[str] = []
        j += 1 if j < len(lines) and not lines[j].strip() else 0
        while j < len(lines) and (not lines[j].strip() or lines[j].startswith(match["indent"] + " ")):
            body.append(lines[j])
            j += 1
        code = "\n".join(body).rstrip() + "\n"
        width = min((len(x) - len(x.lstrip()) for x in body if x.strip()), default=0)
        code = "\n".join(x[width:] for x in code.splitlines()) + "\n"
        before = lines[i - 1] if i > 0 else ""
        why = re.search(r"not run:\s*(.+)", before) if before.strip().startswith("..") else None
        blocks.append(Block(f"docs/{path.name}", i + 1, match["lang"].lower(), code, why[1] if why else None))
    return blocks


def all_blocks() -> list[Block]:
    blocks = markdown_blocks(ROOT / "README.md")
    docs = ROOT / "docs"
    if docs.is_dir():
        for page in sorted(docs.glob("*.rst")):
            blocks += rst_blocks(page)
    return blocks


BLOCKS = all_blocks()


def test_the_extractor_finds_the_blocks() -> None:
    readme = [b for b in BLOCKS if b.source == "README.md"]
    assert len(readme) >= 10
    assert all(b.language for b in readme), [b.id for b in readme if not b.language]
    skipped = [b for b in BLOCKS if b.not_run]
    assert len(skipped) <= max(8, len(BLOCKS) // 5), [f"{b.id}: {b.not_run}" for b in skipped]


@pytest.fixture(scope="module")
def server() -> Iterator[OpenAITestServer]:
    with OpenAITestServer() as srv:
        yield srv


def _workdir(tmp_path: Path) -> Path:
    """A working directory with the files the blocks name."""
    shutil.copytree(ROOT / "examples", tmp_path / "examples", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "templates", tmp_path / "templates")
    (tmp_path / "article.txt").write_text(
        "The city council voted on Tuesday to extend the tram line to the airport by 2028.\n", encoding="utf-8"
    )
    (tmp_path / "prompt.txt").write_text("Summarize the article in one sentence.\n", encoding="utf-8")
    old = {"old-key": {"choices": [{"message": {"role": "assistant", "content": "an old answer"}}]}}
    for name in ("openai_api_cache.pickle", "old.pickle"):
        (tmp_path / name).write_bytes(pickle.dumps(old))
    return tmp_path


def _environment(server: OpenAITestServer, workdir: Path) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("OPENAI_", "AZURE_", "LLMUTILS_", "OTEL_")) and k not in ("PYTHONPATH",)
    }
    env.update(
        OPENAI_BASE_URL=server.base_url,
        OPENAI_API_KEY="test",
        AZURE_OPENAI_ENDPOINT=server.azure_endpoint,
        AZURE_OPENAI_API_KEY="test",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        HOME=str(workdir),
        PYTHONDONTWRITEBYTECODE="1",
    )
    return env


# The runner: imports llmutils and the SDK once, then for each request (one JSON line on stdin:
# code, cwd, env, output files) forks a child that runs the block and exits; answers the exit code.
_RUNNER = r"""
import atexit, json, os, sys, traceback
import llmutils, openai  # noqa: F401 - warm imports shared by every child
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.environ.clear()
            os.environ.update(job["env"])
            os.chdir(job["cwd"])
            out = os.open(job["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            err = os.open(job["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(out, 1)
            os.dup2(err, 2)
            sys.stdin = open(os.devnull)
            try:
                exec(compile(job["code"], "<block>", "exec"), {"__name__": "__main__"})
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:
                traceback.print_exc()
            atexit._run_exitfuncs()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class _Runner:
    """The warm runner process (see ``_RUNNER``), started on first use and stopped at the end."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[str] | None = None

    def run(self, code: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        if self._proc is None:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _RUNNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                env=env, cwd=cwd,
            )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        out, err = cwd / ".block.stdout", cwd / ".block.stderr"
        job = {"code": code, "cwd": str(cwd), "env": env, "stdout": str(out), "stderr": str(err)}
        self._proc.stdin.write(json.dumps(job) + "\n")
        self._proc.stdin.flush()
        answer = self._proc.stdout.readline()
        if not answer:
            raise RuntimeError("the block runner died")
        returncode = json.loads(answer)["code"]
        return subprocess.CompletedProcess(
            ["<block>"], returncode, out.read_text(encoding="utf-8", errors="replace"),
            err.read_text(encoding="utf-8", errors="replace"),
        )

    def close(self) -> None:
        if self._proc is not None:
            assert self._proc.stdin is not None and self._proc.stdout is not None
            self._proc.stdin.close()
            self._proc.wait(timeout=BLOCK_TIMEOUT)
            self._proc.stdout.close()
            self._proc = None


@pytest.fixture(scope="module")
def runner() -> Iterator[_Runner | None]:
    if not hasattr(os, "fork"):
        yield None
        return
    warm = _Runner()
    yield warm
    warm.close()


def _run(
    block: Block, server: OpenAITestServer, workdir: Path, runner: _Runner | None = None
) -> subprocess.CompletedProcess[str]:
    env = _environment(server, workdir)
    if block.language == "python" and runner is not None:
        return runner.run(block.code, workdir, env)
    if block.language == "python":
        argv = [sys.executable, "-c", block.code]
    elif block.language == "ini":
        (workdir / "config.ini").write_text(block.code, encoding="utf-8")
        env["LLMUTILS_CONFIG"] = str(workdir / "config.ini")
        argv = [sys.executable, "-c", "import llmutils; print(llmutils.client().settings())"]
    else:
        argv = ["bash", "-euo", "pipefail", "-c", block.code]
    return subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT)


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_block_runs(block: Block, server: OpenAITestServer, runner: _Runner | None, tmp_path: Path) -> None:
    if block.not_run:
        pytest.skip(f"not run: {block.not_run}")
    if block.language == "text":
        pytest.skip("output, not code")
    if block.language in ("json", "jsonl"):
        texts = [block.code] if block.language == "json" else [x for x in block.code.splitlines() if x.strip()]
        for text in texts:
            json.loads(text)
        return
    if block.language not in RUN_LANGUAGES:
        pytest.fail(f"{block.id}: a block in {block.language or 'no language'!r}; say which, or mark it not run")
    proc = _run(block, server, _workdir(tmp_path), runner)
    assert proc.returncode == 0, (
        f"{block.id} ({block.language}) failed with exit code {proc.returncode}\n"
        f"--- code ---\n{block.code}--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}"
    )
