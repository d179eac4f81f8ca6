"""The benchmarks' server: llmutils' OpenAI-wire test server in a subprocess (so its CPU is not the
client's), shared by ``peers.py``, ``scale.py`` and ``throughput.py``."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["serve_subprocess"]


@contextmanager
def serve_subprocess(latency: float) -> Iterator[tuple[str, int]]:
    """Run ``python -m llmutils.testing`` with ``latency`` seconds per answer; yield its base URL
    (ending in ``/v1``) and its pid. Stopped with SIGINT on exit (killed if it does not stop)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmutils.testing", "--port", "0", "--latency", str(latency)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"serving at (\S+)", line)
        if match is None:
            raise RuntimeError(f"the test server did not start: {line!r}")
        yield match.group(1), proc.pid
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
