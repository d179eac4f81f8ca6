"""Benchmark: llmutils beside its peers (dspy, langchain-openai, litellm, the raw openai SDK), one run.

Run (the peers come from the ``bench`` extra, never from the test extra)::

    python3 -m venv .venv-bench && .venv-bench/bin/pip install -q -e '.[bench]'
    .venv-bench/bin/python bench/peers.py            # about 3 minutes on 2 cores; --quick for less
    .venv-bench/bin/python bench/peers.py --measures cpu,rps --peers llmutils,dspy.LM   # a subset

Every peer talks to the same local OpenAI-wire test server (``python -m llmutils.testing``, in a
subprocess so its CPU is not the client's) and is measured in interleaved rounds (round 1: every
peer, round 2: every peer, ..., each round starting with the next peer), so drift on a shared
machine hits all of them alike. Printed per
measure: the median over rounds and the inter-quartile range (IQR), and the versions measured.
It asserts nothing. Measures:

1. cache hit, warm: one repeated ``send_message``-like call served from each library's own
   cache (llmutils' SQLite file; dspy's disk + memory cache, its default; langchain's
   ``SQLiteCache``; litellm's disk cache, or its in-memory one where it has no disk cache), beside the
   floor: a raw ``sqlite3`` SELECT of llmutils' stored row from the same file;
2. client CPU per uncached request: process CPU time (all threads) per sequential request with the
   cache off, unique prompts, against a server with no latency, timed from an idle process until
   it is idle again (so one library's background work is charged to it, not to the next one);
3. throughput: requests/s of 32 threads, cache off, unique prompts, against 50 ms of server latency;
4. import time: ``python -c "import X"`` minus ``python -c pass``, in fresh processes.

A peer that cannot be imported is skipped with a line saying why.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from _server import serve_subprocess  # bench/ is the script's folder, first on sys.path

__all__ = ["main"]

MODEL = "gpt-4.1-mini"
KEY = "bench-key"


def prompt(tag: str, i: int) -> list[dict[str, str]]:
    """A unique one-message prompt, so no cache or single-flight can merge requests."""
    return [{"role": "user", "content": f"peer benchmark {tag} prompt number {i}"}]


@contextmanager
def serve(latency: float) -> Iterator[str]:
    """Run ``python -m llmutils.testing`` in a subprocess with ``latency``; yield its base URL without ``/v1``."""
    with serve_subprocess(latency) as (url, _pid):
        yield re.sub(r"/v1/?$", "", url.rstrip("/"))


class Peer:
    """One library under test: how to make a cached caller, an uncached caller, and what to import."""

    name = ""
    module = ""
    dists: tuple[str, ...] = ()

    def __init__(self, base_url: str, workdir: Path) -> None:
        self.base_url = base_url
        self.workdir = workdir / self.name.replace(" ", "_")
        self.workdir.mkdir(parents=True, exist_ok=True)

    @property
    def label(self) -> str:
        """The name shown for the cache-hit figure (says so where the peer's cache is not on disk)."""
        return getattr(self, "hit_label", self.name)

    def cached(self) -> Callable[[], Any]:
        """A zero-argument call that is served from the library's cache after its first run."""
        raise NotImplementedError

    def uncached(self, base_url: str) -> Callable[[list[dict[str, str]]], Any]:
        """A call sending ``messages`` to ``base_url`` with every cache off."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the peer opened."""


class LLMUtils(Peer):
    name, module, dists = "llmutils", "llmutils", ("llmutils", "openai")

    def cached(self) -> Callable[[], Any]:
        import llmutils

        self.cache_file = self.workdir / "cache.sqlite"
        self.hit_client = llmutils.OpenAIClient(
            base_url=self.base_url + "/v1", api_key=KEY, model=MODEL, cache_api_calls=True, cache_file_name=self.cache_file
        )
        hello = prompt("hit", 0)
        return lambda: self.hit_client.send_message(hello)

    def uncached(self, base_url: str) -> Callable[[list[dict[str, str]]], Any]:
        import llmutils

        client = llmutils.OpenAIClient(base_url=base_url + "/v1", api_key=KEY, model=MODEL, max_concurrent_calls=None)
        self._clients = [*getattr(self, "_clients", []), client]
        return lambda messages: client.send_message(messages)

    def close(self) -> None:
        for client in [getattr(self, "hit_client", None), *getattr(self, "_clients", [])]:
            if client is not None:
                client.close()


class RawSDK(Peer):
    name, module, dists = "openai SDK (raw create)", "openai", ("openai",)

    def cached(self) -> Callable[[], Any]:
        raise NotImplementedError("the SDK has no cache")

    def uncached(self, base_url: str) -> Callable[[list[dict[str, str]]], Any]:
        import openai

        sdk = openai.OpenAI(base_url=base_url + "/v1", api_key=KEY, max_retries=0)
        return lambda messages: sdk.chat.completions.create(model=MODEL, messages=messages)  # type: ignore[arg-type]


class DSPy(Peer):
    name, module, dists = "dspy.LM", "dspy", ("dspy",)

    def cached(self) -> Callable[[], Any]:
        import dspy

        dspy.configure_cache(enable_disk_cache=True, enable_memory_cache=True, disk_cache_dir=str(self.workdir / "dspy"))
        lm = dspy.LM(f"openai/{MODEL}", api_base=self.base_url + "/v1", api_key=KEY, cache=True, num_retries=0)
        hello = prompt("hit", 0)
        return lambda: lm(messages=hello)

    def uncached(self, base_url: str) -> Callable[[list[dict[str, str]]], Any]:
        import dspy

        lm = dspy.LM(f"openai/{MODEL}", api_base=base_url + "/v1", api_key=KEY, cache=False, num_retries=0)
        return lambda messages: lm(messages=messages)


class LangChain(Peer):
    name, module, dists = "langchain-openai", "langchain_openai", ("langchain-openai", "langchain-community")

    def cached(self) -> Callable[[], Any]:
        from langchain_community.cache import SQLiteCache
        from langchain_openai import ChatOpenAI

        chat = ChatOpenAI(
            model=MODEL, base_url=self.base_url + "/v1", api_key=KEY, max_retries=0,  # type: ignore[arg-type]
            cache=SQLiteCache(database_path=str(self.workdir / "langchain.sqlite")),
        )
        hello = prompt("hit", 0)
        return lambda: chat.invoke(hello)

    def uncached(self, base_url: str) -> Callable[[list[dict[str, str]]], Any]:
        from langchain_openai import ChatOpenAI

        chat = ChatOpenAI(model=MODEL, base_url=base_url + "/v1", api_key=KEY, max_retries=0, cache=False)  # type: ignore[arg-type]
        return lambda messages: chat.invoke(messages)


class LiteLLM(Peer):
    name, module, dists = "litellm.completion", "litellm", ("litellm",)

    def cached(self) -> Callable[[], Any]:
        import litellm

        try:
            litellm.cache = litellm.Cache(type="disk", disk_cache_dir=str(self.workdir / "litellm"))
        except ValueError:  # newer litellm has no disk cache: its in-memory one, named as such below
            litellm.cache = litellm.Cache(type="local")
            self.hit_label = "litellm.completion (in-memory cache)"
        hello = prompt("hit", 0)
        return lambda: litellm.completion(
            model=f"openai/{MODEL}", api_base=self.base_url + "/v1", api_key=KEY, messages=hello, caching=True
        )

    def uncached(self, base_url: str) -> Callable[[list[dict[str, str]]], Any]:
        import litellm

        return lambda messages: litellm.completion(
            model=f"openai/{MODEL}", api_base=base_url + "/v1", api_key=KEY, messages=messages, caching=False
        )


PEERS: tuple[type[Peer], ...] = (LLMUtils, DSPy, LangChain, LiteLLM, RawSDK)


def version(peer: type[Peer]) -> str:
    """The installed versions of the peer's distributions."""
    found = []
    for dist in peer.dists:
        try:
            found.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{dist} (not installed)")
    return ", ".join(found)


def available(peers: tuple[type[Peer], ...]) -> list[type[Peer]]:
    """The peers that import here; print why each other one is skipped."""
    usable = []
    for peer in peers:
        try:
            __import__(peer.module)
        except Exception as exc:  # any import failure means "skip this peer"
            print(f"   skipped {peer.name}: cannot import {peer.module} ({type(exc).__name__}: {exc}); "
                  f"install the bench extra: pip install -e '.[bench]'")
            continue
        usable.append(peer)
    return usable


def floor_select(cache_file: Path) -> Callable[[], Any]:
    """A raw SELECT of the one row in llmutils' cache file (found by looking, not by private names)."""
    conn = sqlite3.connect(cache_file, isolation_level=None, check_same_thread=False)
    for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
        columns = {row[1] for row in conn.execute(f'PRAGMA table_info("{table}")')}
        if {"key", "value"} <= columns:
            rows = conn.execute(f'SELECT key FROM "{table}"').fetchall()
            if len(rows) == 1:
                sql = f'SELECT value FROM "{table}" WHERE key = ?'
                key = rows[0][0]
                return lambda: conn.execute(sql, (key,)).fetchone()
    raise RuntimeError(f"no single-row key/value table in {cache_file}")


def rotated(items: list[Any], r: int) -> list[Any]:
    """``items`` starting at position ``r`` (mod len): each round starts with another peer, so
    what runs first (after the previous round's threads) is not always the same library."""
    if not items:
        return items
    k = r % len(items)
    return items[k:] + items[:k]


def per_call(fn: Callable[[], Any], n: int, clock: Callable[[], float] = time.perf_counter) -> float:
    """Median seconds of ``n`` calls of ``fn`` (after a short warm-up)."""
    for _ in range(min(20, n)):
        fn()
    samples = []
    for _ in range(n):
        t0 = clock()
        fn()
        samples.append(clock() - t0)
    return statistics.median(samples)


def settle(window: float = 0.05, limit: float = 5.0) -> None:
    """Wait (at most ``limit`` s) until this process is idle: its threads used under 10 % of a CPU
    over ``window``. A library's background threads (litellm's logging worker, say) then finish
    the work a peer's requests gave them before the next peer is timed."""
    end = time.perf_counter() + limit
    while time.perf_counter() < end:
        c0 = time.process_time()
        time.sleep(window)
        if time.process_time() - c0 < window * 0.1:
            return


def cpu_per_request(call: Callable[[list[dict[str, str]]], Any], tag: str, n: int) -> float:
    """Process CPU seconds per sequential request (all threads of this process), the background
    work the requests caused included: timed from an idle process until it is idle again."""
    for i in range(5):
        call(prompt(f"{tag}-warm", i))
    settle()
    t0 = time.process_time()
    for i in range(n):
        call(prompt(tag, i))
    settle()
    return (time.process_time() - t0) / n


def threads_throughput(call: Callable[[list[dict[str, str]]], Any], tag: str, n: int, workers: int = 32) -> float:
    """Requests per second of ``workers`` threads sending ``n`` unique requests."""
    errors = []

    def one(i: int) -> None:
        try:
            call(prompt(tag, i))
        except Exception as exc:  # counted, and shown below
            errors.append(exc)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(workers)))  # warm: one connection per thread
        settle()  # no other library's background work left to compete with these threads
        t0 = time.perf_counter()
        list(pool.map(one, range(workers, workers + n)))
        elapsed = time.perf_counter() - t0
    if errors:
        print(f"   ({len(errors)} errors in {tag}; first: {errors[0]!r:.200})")
    return n / elapsed


def import_time(module: str, rounds: int) -> list[float]:
    """Seconds to import ``module`` in a fresh interpreter, net of an empty interpreter, per round."""
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}

    def run(code: str) -> float:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True)
        return time.perf_counter() - t0

    out = []
    for _ in range(rounds):
        out.append(run(f"import {module}") - run("pass"))
    return out


def measure(out: dict[str, list[float]], calls: dict[str, Any], name: str, what: str, run: Callable[[], float]) -> None:
    """Append one round's figure of ``name`` to ``out``; a peer that fails is dropped from this measure."""
    try:
        out.setdefault(name, []).append(run())
    except Exception as exc:  # a failing peer is reported and skipped, not fatal
        print(f"   dropped {name} from the {what} measure: {type(exc).__name__}: {str(exc)[:200]}")
        calls.pop(name, None)
        out.pop(name, None)


def summary(values: list[float], scale: float, unit: str) -> str:
    """``median (IQR low-high) unit`` of ``values`` times ``scale``."""
    scaled = sorted(v * scale for v in values)
    if len(scaled) >= 4:
        q = statistics.quantiles(scaled, n=4)
        iqr = f"IQR {q[0]:.1f}-{q[2]:.1f}"
    else:
        iqr = f"range {scaled[0]:.1f}-{scaled[-1]:.1f}"
    return f"{statistics.median(scaled):9.1f} {unit}  ({iqr})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per measure (default 5)")
    parser.add_argument("--hits", type=int, default=2000, help="cache hits timed per round and peer")
    parser.add_argument("--requests", type=int, default=200, help="uncached sequential requests per round and peer")
    parser.add_argument("--threaded", type=int, default=640, help="requests per round and peer for the 32-thread measure")
    parser.add_argument("--quick", action="store_true", help="3 rounds, fewer calls: a smoke run")
    parser.add_argument("--measures", default="hit,cpu,rps,import",
                        help="comma-separated subset of hit,cpu,rps,import to run (default: all)")
    parser.add_argument("--peers", default="", help="comma-separated peer names to run (default: all), e.g. llmutils,dspy.LM")
    args = parser.parse_args(argv)
    wanted = set(args.measures.split(","))
    if args.quick:
        args.rounds, args.hits, args.requests, args.threaded = 3, 300, 40, 160
    warnings.simplefilter("ignore")  # peers' own deprecation notices
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm: no price-map download
    for var in [v for v in os.environ if v.endswith(("_PROXY", "_proxy"))]:
        del os.environ[var]  # a proxy would catch 127.0.0.1

    print(f"bench/peers.py on Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    chosen = [p for p in PEERS if not args.peers or p.name in args.peers.split(",")]
    peers = available(tuple(chosen))
    for peer in peers:
        print(f"   {peer.name}: {version(peer)}")
    if LLMUtils in peers:
        import llmutils

        print(f"   llmutils imported from {Path(llmutils.__file__).parent}")

    hits: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    rps: dict[str, list[float]] = {}
    imports: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp, serve(0.0) as fast_url, serve(0.05) as slow_url:
        made = [peer(fast_url, Path(tmp)) for peer in peers]
        hit_calls: dict[str, Callable[[], Any]] = {}
        floor: Callable[[], Any] | None = None
        for p in made if "hit" in wanted else []:
            try:
                hit_calls[p.label] = p.cached()
                hit_calls[p.label]()  # the one miss: stores the entry every later call hits
            except NotImplementedError:
                continue
            except Exception as exc:  # a peer whose cache cannot be set up is skipped
                print(f"   no cache-hit figure for {p.name}: {type(exc).__name__}: {exc}")
                continue
            if isinstance(p, LLMUtils):
                floor = floor_select(p.cache_file)
        cpu_calls = {p.name: p.uncached(fast_url) for p in made} if "cpu" in wanted else {}
        rps_calls = {p.name: p.uncached(slow_url) for p in made} if "rps" in wanted else {}
        for r in range(args.rounds):
            print(f"   round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
            if floor is not None:
                hits.setdefault("floor: raw sqlite3 SELECT of the row", []).append(per_call(floor, args.hits))
            for name, call in rotated(list(hit_calls.items()), r):
                measure(hits, hit_calls, name, "cache hit", lambda call=call: per_call(call, args.hits))
            for name, call in rotated(list(cpu_calls.items()), r):
                measure(cpu, cpu_calls, name, "CPU", lambda call=call, r=r: cpu_per_request(call, f"cpu{r}", args.requests))
            for name, call in rotated(list(rps_calls.items()), r):
                measure(rps, rps_calls, name, "throughput", lambda call=call, r=r: threads_throughput(call, f"rps{r}", args.threaded))
        for p in made:
            p.close()
    for peer in peers if "import" in wanted else []:
        imports[peer.name] = import_time(peer.module, args.rounds)

    print(f"\n1. cache hit, warm (median of {args.hits} calls per round; {args.rounds} rounds)")
    base = statistics.median(hits.get("floor: raw sqlite3 SELECT of the row", [float("nan")]))
    for name, values in hits.items():
        print(f"   {name:<40} {summary(values, 1e6, 'µs')}   x{statistics.median(values) / base:6.1f} floor")
    print(f"\n2. client CPU per uncached request ({args.requests} sequential requests per round)")
    for name, values in cpu.items():
        print(f"   {name:<40} {summary(values, 1e3, 'ms')}")
    print(f"\n3. 32 threads, 50 ms server latency ({args.threaded} requests per round; ideal 640 req/s)")
    for name, values in rps.items():
        print(f"   {name:<40} {summary(values, 1.0, 'req/s')}")
    print(f"\n4. import time, net of `python -c pass` ({args.rounds} fresh processes each)")
    for name, values in imports.items():
        print(f"   {name:<40} {summary(values, 1e3, 'ms')}")
    print()
    if "llmutils" in cpu and "dspy.LM" in cpu:
        ours, theirs = statistics.median(cpu["llmutils"]), statistics.median(cpu["dspy.LM"])
        print(f"   llmutils CPU per request / dspy.LM's: {ours / theirs:.2f} (target <= 1.00)")
    if "llmutils" in rps and "dspy.LM" in rps:
        ours, theirs = statistics.median(rps["llmutils"]), statistics.median(rps["dspy.LM"])
        print(f"   llmutils 32-thread throughput / dspy.LM's: {ours / theirs:.2f} (target >= 1.00)")
    if "llmutils" in hits:
        print(f"   llmutils cache hit / raw SELECT: {statistics.median(hits['llmutils']) / base:.1f}x (target <= 6x)")


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
