"""Benchmark: llmutils request throughput, cache replay and rate limiting, measured in one run.

Run: ``.venv/bin/python bench/throughput.py`` (about 2 minutes on 2 cores; ``--quick`` for a
short run). Prints figures only; it asserts nothing. The model is llmutils' own OpenAI-wire test
server (``python -m llmutils.testing``) started in a subprocess by default, so the server does not
share a GIL with the client threads being measured (``--server inprocess`` to compare). Parts:

1. requests/s of ``OpenAIClient.send_message`` (cache off, unique prompts) with 1 worker and with
   32 workers of a ``ThreadPoolExecutor``, against 50 ms of server latency;
2. the raw ``openai.OpenAI(max_retries=0).chat.completions.create`` in the same thread pool, and an
   ``openai.AsyncOpenAI`` baseline (``asyncio.gather`` bounded by a ``Semaphore(32)``), all sending
   the same request body; each is measured ``--rounds`` times (default 5), interleaved, and the
   median round is reported with the inter-quartile range (``llmutils.batch`` once, for information).
   With the openai SDK's CPU cost per request, the 32-thread figures are bounded by one core of
   client CPU (the GIL), not by the server latency;
   another busy process on the machine shows up directly in them, so the load average is printed;
3. llmutils' own CPU cost per call (a MockClient with the cache off: no SDK, no network);
4. a replay of cached items: a ``MockClient`` with the cache on writes the entries, then a
   ``MockClient(cache_mode="replay")`` serves every ``send_message`` from the file (replay never
   generates an answer; the hit path is the same code for every client class), 1 and 8 threads;
5. the client-side rate limiter: 32 threads through ``OpenAIClient(rpm=600)`` against a server
   with no latency for ``--rpm-seconds``, achieved rpm and its deviation from the limit.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import openai
from _server import serve_subprocess  # bench/ is the script's folder, first on sys.path

import llmutils
from llmutils.testing import OpenAITestServer

__all__ = ["main"]

MODEL = "gpt-4.1-mini"
# The body llmutils sends by default (config DEFAULTS); the raw and async baselines send the same.
SAMPLING = {"temperature": 1.0, "top_p": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0, "max_tokens": 1024}


def messages(tag: str, i: int) -> list[dict[str, str]]:
    """A unique one-message prompt, so no cache or single-flight can merge requests."""
    return [{"role": "user", "content": f"benchmark {tag} prompt number {i}"}]


# -- the server ----------------------------------------------------------------------------------


@contextmanager
def serve(latency: float, mode: str) -> Iterator[str]:
    """Run an OpenAITestServer with ``latency`` (in a subprocess unless ``mode`` is inprocess); yield its base URL."""
    if mode == "inprocess":
        with OpenAITestServer(latency=latency) as srv:
            yield srv.base_url
        return
    with serve_subprocess(latency) as (url, _pid):
        yield url


# -- part 1 and 2: request throughput ------------------------------------------------------------


class Figure(NamedTuple):
    """One timed run: requests/s, failed requests, and this process's CPU ms per request."""

    rate: float
    failed: int
    cpu_ms: float


class Rounds(NamedTuple):
    """The figures of one way of sending over every round: medians, and the spread of the rate."""

    rate: float
    failed: int
    cpu_ms: float
    q1: float
    q3: float

    @classmethod
    def of(cls, figures: list[Figure]) -> Rounds:
        rates = sorted(f.rate for f in figures)
        q1, _, q3 = statistics.quantiles(rates, n=4) if len(rates) >= 2 else (rates[0], 0.0, rates[0])
        return cls(statistics.median(rates), sum(f.failed for f in figures), statistics.median(f.cpu_ms for f in figures), q1, q3)

    @property
    def iqr(self) -> str:
        return f"IQR {self.q1:,.0f}-{self.q3:,.0f}"


@contextmanager
def timed(n: int, out: list[Figure], failed: Callable[[], int]) -> Iterator[None]:
    """Time the block (wall and process CPU, all threads) and append its Figure to ``out``."""
    cpu, start = time.process_time(), time.perf_counter()
    yield
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    bad = failed()
    out.append(Figure((n - bad) / elapsed, bad, cpu / n * 1000))


def in_pool(call: Callable[[int], Any], n: int, workers: int) -> Figure:
    """Run ``call(i)`` for i < n on a ThreadPoolExecutor."""

    def one(i: int) -> bool:
        try:
            call(i)
            return True
        except Exception:
            return False

    out: list[Figure] = []
    ok = [0]
    with ThreadPoolExecutor(workers) as pool, timed(n, out, lambda: n - ok[0]):
        ok[0] = sum(pool.map(one, range(n)))
    return out[0]


def llmutils_client(base_url: str, **kwargs: Any) -> llmutils.OpenAIClient:
    return llmutils.OpenAIClient(base_url=base_url, api_key="bench", model=MODEL, cache_api_calls=False, **kwargs)


def run_llmutils(client: llmutils.OpenAIClient, tag: str, n: int, workers: int) -> Figure:
    return in_pool(lambda i: client.send_message(messages(tag, i))["content"], n, workers)


def run_raw(sdk: openai.OpenAI, tag: str, n: int, workers: int) -> Figure:
    create = sdk.chat.completions.create
    return in_pool(lambda i: create(model=MODEL, messages=messages(tag, i), **SAMPLING).choices[0].message.content, n, workers)


def run_batch(client: llmutils.OpenAIClient, tag: str, n: int, workers: int) -> Figure:
    items = [messages(tag, i) for i in range(n)]
    out: list[Figure] = []
    results: list[llmutils.BatchResult] = []
    with timed(n, out, lambda: sum(not r.ok for r in results)):
        results = llmutils.batch(items, client=client, workers=workers)
    return out[0]


def run_async(base_url: str, tag: str, n: int, concurrency: int, warmup: int) -> Figure:
    """AsyncOpenAI with asyncio.gather bounded by a Semaphore(concurrency); one fresh event loop."""

    async def go() -> Figure:
        sdk = openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0)
        limit = asyncio.Semaphore(concurrency)

        async def one(i: int, prefix: str) -> bool:
            async with limit:
                try:
                    answer = await sdk.chat.completions.create(model=MODEL, messages=messages(prefix, i), **SAMPLING)
                    answer.choices[0].message.content  # noqa: B018 - read the answer, as a caller does
                    return True
                except Exception:
                    return False

        out: list[Figure] = []
        ok = 0
        try:
            await asyncio.gather(*(one(i, f"{tag}-warm") for i in range(warmup)))  # open the connections
            with timed(n, out, lambda: n - ok):
                ok = sum(await asyncio.gather(*(one(i, tag) for i in range(n))))
        finally:
            await sdk.close()
        return out[0]

    return asyncio.run(go())


def throughput(base_url: str, args: argparse.Namespace) -> dict[str, Rounds]:
    """Parts 1 and 2: requests/s of each way of sending over interleaved rounds (median, IQR)."""
    workers = 32
    client = llmutils_client(base_url)
    sdk = openai.OpenAI(base_url=base_url, api_key="bench", max_retries=0)
    figures: dict[str, list[Figure]] = {}

    def keep(name: str, figure: Figure) -> None:
        figures.setdefault(name, []).append(figure)

    def warm(r: int) -> None:
        # 32 open keep-alive connections in each pool before it is timed: idle connections expire
        # after 5 s, and 32 connects at once overflow the test server's listen backlog (5), which
        # costs SYN retransmits of 1 s; steady state is what is measured. Errors are ignored here.
        run_llmutils(client, f"warm{r}", 2 * workers, workers)
        run_raw(sdk, f"warm{r}", 2 * workers, workers)

    try:
        warm(-1)
        for r in range(args.rounds):
            keep("llmutils 1 worker", run_llmutils(client, f"one{r}", args.single, 1))
            warm(r)
            keep("llmutils 32 threads", run_llmutils(client, f"t{r}", args.requests, workers))
            keep("raw SDK 32 threads", run_raw(sdk, f"r{r}", args.requests, workers))
            keep("AsyncOpenAI 32 tasks", run_async(base_url, f"a{r}", args.requests, workers, 2 * workers))
        warm(args.rounds)
        keep("llmutils.batch 32", run_batch(client, "batch", args.requests, workers))  # once: informative
    finally:
        client.close()
        sdk.close()
    return {name: Rounds.of(found) for name, found in figures.items()}


def own_overhead(calls: int = 5000) -> float:
    """Microseconds of CPU per ``send_message`` of a MockClient, cache off: llmutils' own cost per call
    (settings, retry policy, limiter, usage, result) without the SDK or any network."""
    client = llmutils.MockClient(cache_api_calls=False, model=MODEL)
    prompt = messages("overhead", 0)
    for _ in range(500):
        client.send_message(prompt)
    rounds = []
    for _ in range(5):
        cpu = time.process_time()
        for _ in range(calls):
            client.send_message(prompt)
        rounds.append((time.process_time() - cpu) / calls * 1e6)
    return statistics.median(rounds)


# -- part 3: cache replay ------------------------------------------------------------------------


def replay(items: int, threads: int, folder: Path) -> dict[str, float]:
    """Fill a cache with ``items`` answers (MockClient, 8 threads), then replay them; items/s."""
    path = folder / "replay.sqlite"
    prompts = [messages("replay", i) for i in range(items)]
    figures: dict[str, float] = {}
    with llmutils.MockClient(cache_api_calls=True, cache_file_name=path, model=MODEL) as writer:
        start = time.perf_counter()
        results = llmutils.batch(prompts, client=writer, workers=8)
        figures["fill"] = items / (time.perf_counter() - start)
        assert all(r.ok for r in results)
    for n_threads in (1, threads):
        with llmutils.MockClient(cache_api_calls=True, cache_file_name=path, cache_mode="replay", model=MODEL) as reader:
            reader.send_message(prompts[0])  # open the file outside the timing
            chunks = [prompts[t::n_threads] for t in range(n_threads)]
            errors: list[BaseException] = []

            def read(chunk: list[list[dict[str, str]]], errors: list[BaseException]) -> None:
                try:
                    for prompt in chunk:
                        reader.send_message(prompt)
                except BaseException as exc:  # reported below
                    errors.append(exc)

            pool = [threading.Thread(target=read, args=(chunk, errors)) for chunk in chunks]
            start = time.perf_counter()
            for thread in pool:
                thread.start()
            for thread in pool:
                thread.join()
            elapsed = time.perf_counter() - start
            if errors:
                raise errors[0]
            stats = reader.cache_stats()
            if stats.hits != items + 1 or reader.calls:
                raise RuntimeError(f"replay was not all hits: {stats}, generated {reader.calls}")
            figures[f"{n_threads} thread"] = items / elapsed
    return figures


# -- part 4: the rate limiter --------------------------------------------------------------------


def rate_limited(base_url: str, rpm: float, threads: int, seconds: float) -> dict[str, float]:
    """``threads`` threads send through one client with ``rpm`` for ``seconds``; what got through."""
    client = llmutils_client(base_url, rpm=rpm)
    client.send_message(messages("rpm-warm", 0))  # SDK ready; this takes the first slot
    stamps: list[float] = []
    failures: list[BaseException] = []
    stopped = [0]
    lock = threading.Lock()
    begin = threading.Barrier(threads + 1)
    t0 = 0.0

    def worker(w: int) -> None:
        begin.wait()
        i = 0
        while (left := t0 + seconds - time.monotonic()) > 0:
            i += 1
            try:
                client.send_message(messages(f"rpm-{w}", i), total_timeout=left)
            except llmutils.TotalTimeoutError:
                with lock:
                    stopped[0] += 1  # queued for a slot past the end of the window: expected
                return
            except llmutils.LLMUtilsError as exc:
                with lock:
                    failures.append(exc)
                continue
            done = time.monotonic() - t0
            if done <= seconds:
                with lock:
                    stamps.append(done)

    pool = [threading.Thread(target=worker, args=(w,)) for w in range(threads)]
    for thread in pool:
        thread.start()
    t0 = time.monotonic()
    begin.wait()
    for thread in pool:
        thread.join()
    client.close()
    stamps.sort()
    best10 = 0
    lo = 0
    for hi, t in enumerate(stamps):
        while t - stamps[lo] >= 10.0:
            lo += 1
        best10 = max(best10, hi - lo + 1)
    achieved = len(stamps) / seconds * 60.0
    return {
        "achieved": achieved,
        "deviation": (achieved - rpm) / rpm * 100.0,
        "completed": len(stamps),
        "failed": len(failures),
        "stopped": stopped[0],
        "max10": best10,
    }


# -- report --------------------------------------------------------------------------------------


def verdict(value: float, target: float) -> str:
    return "met" if value >= target else "MISSED"


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run every part, print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (about 25 s)")
    parser.add_argument("--requests", type=int, default=2000, help="requests per 32-worker run")
    parser.add_argument("--single", type=int, default=100, help="requests for the 1-worker run")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    parser.add_argument("--latency", type=float, default=0.05, help="server latency, seconds")
    parser.add_argument("--replay-items", type=int, default=10_000)
    parser.add_argument("--rpm", type=float, default=600.0)
    parser.add_argument("--rpm-seconds", type=float, default=30.0)
    parser.add_argument("--server", choices=("subprocess", "inprocess"), default="subprocess")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.single, args.rounds, args.replay_items, args.rpm_seconds = 500, 30, 3, 2000, 6.0

    print(
        f"llmutils {llmutils.__version__}, openai {openai.__version__}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs; server: {args.server}, latency {args.latency * 1000:g} ms; "
        f"load average before: {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    started = time.perf_counter()
    with serve(args.latency, args.server) as url:
        tp = throughput(url, args)
    overhead = own_overhead()
    with tempfile.TemporaryDirectory() as folder:
        rp = replay(args.replay_items, 8, Path(folder))
    with serve(0.0, args.server) as url:
        rl = rate_limited(url, args.rpm, 32, args.rpm_seconds)

    one, threads, raw, aio, bat = (
        tp[k] for k in ("llmutils 1 worker", "llmutils 32 threads", "raw SDK 32 threads", "AsyncOpenAI 32 tasks", "llmutils.batch 32")
    )
    n = args.requests

    def cpu(f: Rounds) -> str:
        return f"{f.cpu_ms:.2f}"

    rows = [
        (f"llmutils, 1 worker ({args.single} req)", f"{one.rate:,.1f} req/s ({one.iqr})", cpu(one), "", "", ""),
        (f"llmutils, 32 threads ({n} req)", f"{threads.rate:,.1f} req/s ({threads.iqr})", cpu(threads),
         f"{threads.rate / one.rate:.1f}x 1 worker", ">= 20x", verdict(threads.rate / one.rate, 20)),
        (f"raw openai.OpenAI, 32 threads ({n} req)", f"{raw.rate:,.1f} req/s ({raw.iqr})", cpu(raw), "", "", ""),
        ("  llmutils / raw SDK", "", "", f"{threads.rate / raw.rate:.3f}x", ">= 0.95x", verdict(threads.rate / raw.rate, 0.95)),
        (f"AsyncOpenAI, Semaphore(32) ({n} req)", f"{aio.rate:,.1f} req/s ({aio.iqr})", cpu(aio), "", "", ""),
        ("  llmutils threads / asyncio", "", "", f"{threads.rate / aio.rate:.3f}x", ">= 0.9x", verdict(threads.rate / aio.rate, 0.9)),
        (f"llmutils.batch(workers=32) ({n} req)", f"{bat.rate:,.1f} req/s", cpu(bat), f"{bat.rate / raw.rate:.3f}x raw", "", ""),
        ("llmutils' own cost per call (MockClient)", f"{overhead:.0f} us CPU", f"{overhead / 1000:.2f}", "", "", ""),
        (f"cache fill, MockClient 8 thr ({args.replay_items:,})", f"{rp['fill']:,.0f} items/s", "", "", "", ""),
        (f"cache replay, 1 thread ({args.replay_items:,})", f"{rp['1 thread']:,.0f} items/s", "", "", "", ""),
        (f"cache replay, 8 threads ({args.replay_items:,})", f"{rp['8 thread']:,.0f} items/s", "", "", "", ""),
        (
            f"rate limit {args.rpm:g} rpm, 32 thr, {args.rpm_seconds:g} s",
            f"{rl['achieved']:,.1f} rpm",
            "",
            f"{rl['deviation']:+.2f}%",
            "within 5%",
            "met" if abs(rl["deviation"]) <= 5 else "MISSED",
        ),
    ]
    header = ("measure", "value", "CPU ms/req", "ratio", "target", "")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print()
    print(line.format(*header).rstrip())
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line.format(*row).rstrip())
    failures = {name: f.failed for name, f in tp.items() if f.failed}
    print()
    print(
        f"medians of {args.rounds} interleaved round(s), rates with their inter-quartile range; "
        f"CPU ms/req is this process's CPU time (all threads; the server's is not counted in subprocess mode) per request; "
        f"failed requests: {failures or 'none'}"
    )
    print(
        f"rate limiter: {rl['completed']:.0f} completed in the window, {rl['failed']:.0f} failed, "
        f"{rl['stopped']:.0f} threads stopped by total_timeout at the end; max in any 10 s window "
        f"{rl['max10']:.0f} (budget {args.rpm / 6:g})"
    )
    print(f"total time {time.perf_counter() - started:.0f} s; load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
