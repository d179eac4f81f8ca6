"""Benchmark: outgrowing one process — batch throughput on 2 processes, and one rate limit shared by 4.

Run: ``.venv/bin/python bench/scale.py`` (about 1.5 minutes; ``--quick`` for a short run). Prints
figures and the command line that produced them; asserts nothing. Parts:

1. requests/s of ``llmutils.batch`` (cache off, unique prompts, ``--workers`` threads per process)
   in this process, and on a ``ProcessPoolExecutor(2)`` (what ``llmutils batch --processes 2``
   uses), against llmutils' test server in a subprocess with ``--latency`` (50 ms). The pool is
   started and warmed before it is timed; rounds are interleaved, the median and the spread are
   printed. On a machine where one process is bound by client CPU (the GIL), two processes can
   reach up to twice the rate when two cores are free; the load average is printed because other
   busy processes show up directly in the figures.
2. 4 processes, each an ``OpenAIClient(rpm=600, rate_limit_url=<a redis-server of its own>)``
   with 4 threads sending as fast as the limiter lets them for ``--rpm-seconds`` (20 s): the
   aggregate rate over the run less its first and last second, against the target of 600 rpm
   (without the shared limit it would be 2,400).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context
from typing import Any

import openai
from _server import serve_subprocess  # bench/ is the script's folder, first on sys.path

import llmutils

__all__ = ["main"]

MODEL = "gpt-4.1-mini"


# -- servers ---------------------------------------------------------------------------------------


@contextmanager
def serve(latency: float) -> Iterator[tuple[str, int]]:
    """Run llmutils' test server in a subprocess with ``latency``; yield its base URL and pid."""
    with serve_subprocess(latency) as found:
        yield found


@contextmanager
def redis_server(url: str | None) -> Iterator[str]:
    """Yield ``url``, or start a redis-server of our own on a free port and yield its URL."""
    if url:
        yield url
        return
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not on PATH: apt-get install redis-server, or pass --redis-url")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", folder],
            stdout=subprocess.DEVNULL,
        )
        try:
            for _ in range(200):
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.5) as c:
                        c.sendall(b"PING\r\n")
                        if c.recv(16).startswith(b"+PONG"):
                            break
                except OSError:
                    time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(10)


# -- part 1: one process vs two ------------------------------------------------------------------


def prompts(tag: str, n: int) -> list[list[dict[str, str]]]:
    """``n`` unique one-message prompts, so no cache or single-flight merges requests."""
    return [[{"role": "user", "content": f"scale benchmark {tag} prompt {i}"}] for i in range(n)]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc; NaN elsewhere)."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_batch(
    client: llmutils.OpenAIClient, tag: str, n: int, workers: int, executor: Any, server_pid: int
) -> tuple[float, int, float]:
    """requests/s, failures, and the server's CPU use (1.0 = one core) of one ``batch`` run."""
    cpu = cpu_seconds(server_pid)
    start = time.perf_counter()
    results = llmutils.batch(prompts(tag, n), client=client, workers=workers, executor=executor)
    elapsed = time.perf_counter() - start
    failed = sum(not r.ok for r in results)
    return (n - failed) / elapsed, failed, (cpu_seconds(server_pid) - cpu) / elapsed


def throughput(base_url: str, server_pid: int, args: argparse.Namespace) -> dict[str, list[float]]:
    """Interleaved rounds of 1 process and 2 processes; every round's requests/s and server CPU use."""
    client = llmutils.OpenAIClient(base_url=base_url, api_key="bench", model=MODEL, cache_api_calls=False)
    rates: dict[str, list[float]] = {"1 process": [], "2 processes": [], "server 1": [], "server 2": []}
    failures = 0
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        run_batch(client, "warm-1", args.workers * 2, args.workers, None, server_pid)
        run_batch(
            client, "warm-2", args.workers * 4, args.workers, pool, server_pid
        )  # start both workers, open connections
        for r in range(args.rounds):
            for name, executor, server in (("1 process", None, "server 1"), ("2 processes", pool, "server 2")):
                rate, failed, busy = run_batch(client, f"{name}-{r}", args.requests, args.workers, executor, server_pid)
                rates[name].append(rate)
                rates[server].append(busy)
                failures += failed
    if failures:
        print(f"warning: {failures} requests failed in part 1", flush=True)
    return rates


# -- part 2: one limit, four processes ------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import json, sys, threading, time
    import llmutils

    args = json.loads(sys.argv[1])
    client = llmutils.OpenAIClient(
        base_url=args["base_url"], api_key="bench", model=args["model"], cache_api_calls=False,
        rpm=args["rpm"], rate_limit_url=args["redis_url"], rate_limit_name=args["name"],
    )
    client.send_message([{"role": "user", "content": "warm up"}])  # connect before the start
    print("ready", flush=True)
    start = json.loads(sys.stdin.readline())["start"]
    stamps, failed = [], [0]

    def run(t):
        i = 0
        while time.time() < start + args["seconds"]:
            try:
                client.send_message([{"role": "user", "content": f"p{t}-{i}"}])
                stamps.append(time.time())
            except llmutils.LLMUtilsError:
                failed[0] += 1
            i += 1

    time.sleep(max(0.0, start - time.time()))
    threads = [threading.Thread(target=run, args=(t,)) for t in range(args["threads"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"stamps": stamps, "failed": failed[0]}), flush=True)
    """
)


def shared_rate(base_url: str, redis_url: str, args: argparse.Namespace) -> dict[str, float]:
    """Aggregate rpm of ``--rpm-processes`` processes under one shared limit of ``--rpm``."""
    spec = {
        "base_url": base_url,
        "redis_url": redis_url,
        "name": f"bench-{os.getpid()}-{time.time():.0f}",
        "model": MODEL,
        "rpm": args.rpm,
        "threads": 4,
        "seconds": args.rpm_seconds,
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, json.dumps(spec)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for _ in range(args.rpm_processes)
    ]
    for proc in procs:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("a limited process did not start")
    start = time.time() + 0.5
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write(json.dumps({"start": start}) + "\n")
        proc.stdin.flush()
    stamps: list[float] = []
    failed = 0
    per_process = []
    for proc in procs:
        out, _ = proc.communicate(timeout=args.rpm_seconds + 60)
        data = json.loads(out.splitlines()[-1])
        stamps += data["stamps"]
        per_process.append(len(data["stamps"]))
        failed += data["failed"]
    lo, hi = start + 1.0, start + args.rpm_seconds - 1.0
    inside = sum(lo <= t < hi for t in stamps)
    achieved = inside / (hi - lo) * 60.0
    return {
        "achieved": achieved,
        "deviation": (achieved / args.rpm - 1.0) * 100.0,
        "failed": failed,
        "min_share": min(per_process) / max(1, sum(per_process)) * 100.0,
        "max_share": max(per_process) / max(1, sum(per_process)) * 100.0,
    }


# -- report ----------------------------------------------------------------------------------------


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):,.1f} (min {min(values):,.1f}, max {max(values):,.1f})"


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run both parts, print the figures and the command."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (about 25 s)")
    parser.add_argument("--requests", type=int, default=2000, help="requests per timed batch")
    parser.add_argument("--workers", type=int, default=32, help="threads per process")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median and spread printed)")
    parser.add_argument("--latency", type=float, default=0.05, help="server latency, seconds")
    parser.add_argument("--rpm", type=float, default=600.0, help="the shared limit")
    parser.add_argument("--rpm-processes", type=int, default=4)
    parser.add_argument("--rpm-seconds", type=float, default=20.0)
    parser.add_argument("--redis-url", default=None, help="default: start a redis-server of our own")
    parser.add_argument("--part", choices=("all", "processes", "rate"), default="all", help="run one part only")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.rounds, args.rpm_seconds = 500, 1, 6.0
    command = shlex.join([os.path.relpath(sys.executable), "bench/scale.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"command: {command}")
    print(
        f"llmutils {llmutils.__version__}, openai {openai.__version__}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs; load average before: {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    started = time.perf_counter()
    if args.part in ("all", "processes"):
        with serve(args.latency) as (url, pid):
            rates = throughput(url, pid, args)
        one, two = rates["1 process"], rates["2 processes"]
        ratio = statistics.median(two) / statistics.median(one)
        print()
        print(
            f"batch, {args.requests} requests, {args.workers} threads per process, "
            f"{args.latency * 1000:g} ms latency (requests/s):"
        )
        print(f"  1 process                       {spread(one)}")
        print(f"  2 processes (--processes 2)     {spread(two)}")
        print(f"  ratio 2 / 1                     {ratio:.2f}x")
        print(
            f"  the test server's CPU use (1.00 = one core; it is one Python process): "
            f"{statistics.median(rates['server 1']):.2f} with 1 process, "
            f"{statistics.median(rates['server 2']):.2f} with 2"
        )
    if args.part in ("all", "rate"):
        with serve(0.0) as (url, _pid), redis_server(args.redis_url) as redis_url:
            shared = shared_rate(url, redis_url, args)
        print()
        print(
            f"shared limit {args.rpm:g} rpm, {args.rpm_processes} processes x 4 threads, {args.rpm_seconds:g} s: "
            f"{shared['achieved']:,.1f} rpm ({shared['deviation']:+.2f}%, target within 5%: "
            f"{'met' if abs(shared['deviation']) <= 5 else 'MISSED'}); without sharing: "
            f"{args.rpm * args.rpm_processes:,.0f} rpm"
        )
        print(
            f"  share of requests per process: {shared['min_share']:.1f}% .. {shared['max_share']:.1f}% "
            f"(fair: {100 / args.rpm_processes:.1f}%); failed: {shared['failed']:.0f}"
        )
    print(f"total time {time.perf_counter() - started:.0f} s; load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
