"""Benchmark: what streaming costs, against llmutils' own test server on 127.0.0.1.

Run: ``.venv/bin/python bench/stream_bench.py`` (about 30 s; ``--rounds`` to change). Prints
figures only; it asserts nothing. Each part is measured ``--rounds`` times, interleaved, and the
median round is printed with the inter-quartile range:

1. a live call, cache off, an answer of ``--words`` words: ``send_message`` (whole answer) against
   ``stream_message`` (time to the first delta, and to the end), the raw SDK's
   ``chat.completions.create(stream=True)`` as the baseline;
2. a cache hit: ``send_message`` against ``stream_message`` replaying the stored answer in pieces.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import openai

import llmutils
from llmutils.testing import OpenAITestServer

__all__ = ["main"]


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def _report(name: str, rounds: list[float], unit: str = "ms") -> None:
    q1, median, q3 = _quartiles(rounds)
    print(f"  {name:<52} median {median:8.3f} {unit}   IQR {q1:.3f}-{q3:.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=40, help="calls per round")
    parser.add_argument("--words", type=int, default=200, help="words in each answer")
    args = parser.parse_args(argv)
    print(f"python {platform.python_version()}, openai {openai.__version__}, llmutils {llmutils.__version__}, "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    answer = " ".join(f"word{i}" for i in range(args.words))
    with OpenAITestServer() as server, tempfile.TemporaryDirectory() as tmp:
        server.chat_handler = lambda body: answer
        live = llmutils.OpenAIClient(base_url=server.base_url, api_key="bench", cache_api_calls=False)
        cached = llmutils.OpenAIClient(base_url=server.base_url, api_key="bench", cache_api_calls=True,
                                       cache_file_name=Path(tmp) / "bench.sqlite")
        raw = openai.OpenAI(base_url=server.base_url, api_key="bench", max_retries=0)
        ask = [{"role": "user", "content": "tell me"}]
        cached.send_message(ask)  # the entry every hit below reads

        first_delta: list[float] = []

        def send_live() -> None:
            live.send_message(ask)

        def stream_live() -> None:
            started = time.perf_counter()
            with live.stream_message(ask) as stream:
                for i, _ in enumerate(stream):
                    if i == 0:
                        first_delta.append(time.perf_counter() - started)

        def raw_stream() -> None:
            for _ in raw.chat.completions.create(model="gpt-4.1-mini", messages=ask, stream=True):  # type: ignore[arg-type]
                pass

        def send_hit() -> None:
            cached.send_message(ask)

        def stream_hit() -> None:
            with cached.stream_message(ask) as stream:
                for _ in stream:
                    pass

        parts: dict[str, Callable[[], None]] = {
            "live send_message (whole answer)": send_live,
            "live stream_message (to the last delta)": stream_live,
            "raw SDK create(stream=True) (to the last chunk)": raw_stream,
            "cache hit send_message": send_hit,
            "cache hit stream_message (replayed in pieces)": stream_hit,
        }
        results: dict[str, list[float]] = {name: [] for name in parts}
        first_rounds: list[float] = []
        for _ in range(args.rounds):
            for name, call in parts.items():
                first_delta.clear()
                started = time.perf_counter()
                for _ in range(args.calls):
                    call()
                results[name].append((time.perf_counter() - started) / args.calls * 1000)
                if first_delta:
                    first_rounds.append(statistics.median(first_delta) * 1000)
        print(f"{args.calls} calls x {args.rounds} rounds, an answer of {args.words} words "
              f"({len(answer)} characters, {args.words} chunks when streamed live):")
        for name, rounds in results.items():
            _report(name + " per call", rounds)
        _report("live stream_message: time to the first delta", first_rounds)
        for client in (live, cached):
            client.close()
        raw.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
