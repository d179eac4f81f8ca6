"""Benchmark: what the SQLite cache store costs, measured in one run.

Run: ``.venv/bin/python bench/cache_bench.py`` (about a minute on 2 cores). Prints figures only;
it asserts nothing. Timings are taken in interleaved rounds (round 1: every candidate, round 2:
every candidate, ...; 7 by default, ``--rounds``); each figure is the median of the per-round
medians with their inter-quartile range (IQR), never the best round. Parts:

1. a cache hit: the store's ``get`` beside a raw ``sqlite3`` SELECT of the same row from the same
   file and a bare sqlitedict get, and a full ``send_message`` hit (median µs, ratio to the raw
   SELECT; target: the full hit within 6x); the in-memory tier (``CACHE_MEMORY_ITEMS``): its
   ``get`` and a full ``send_message`` hit served from it, beside a ``copy.deepcopy`` of the
   message (target: the tier's hit within 3x);
2. write cost per new entry with 1,000 vs 50,000 entries stored, beside the old whole-dict pickle;
3. 8 threads x 2,000 writes on one cache; 4 processes x 2,000 writes while 2 processes read;
4. cold open of a 50,000-entry file, and its size on disk;
5. the Redis backend: a hit (``RedisCache.get`` and a full ``send_message`` hit) beside a raw
   redis-py GET of the same key and ``SQLiteCache.get`` of the same entry; 4 processes x 2,000
   writes while 2 processes read (errors, lost entries). Uses ``--redis-url`` (keys go under a
   ``llmutils-bench:`` prefix, removed after), else starts ``redis-server`` on a free port, else
   says it skipped. ``--parts 5`` runs only this part.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import pickle
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

from sqlitedict import SqliteDict

import llmutils
from llmutils.cache import MemoryCache, SQLiteCache, make_key
from llmutils.cache.base import TABLE

__all__ = ["main", "part1_hit", "part2_writes", "part3_concurrency", "part4_cold_open", "part5_redis"]


def response(i: int) -> dict[str, Any]:
    """A chat completion shaped like the API's (about 700 bytes of JSON)."""
    return {
        "id": f"chatcmpl-{i:08d}",
        "object": "chat.completion",
        "created": 1_700_000_000 + i,
        "model": "gpt-4.1-mini-2025-04-14",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": f"Answer number {i}: " + "lorem ipsum " * 30, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 42, "completion_tokens": 96, "total_tokens": 138},
        "system_fingerprint": "fp_0123456789",
    }


def request(i: int) -> dict[str, Any]:
    """The key payload of request ``i``, as the client builds it."""
    return {"kind": "chat", "api": "openai", "params": {"model": "gpt-4.1-mini", "messages": [{"role": "user", "content": f"q{i}"}]}}


def fill(path: Path, start: int, count: int) -> list[str]:
    """Add ``count`` entries in one transaction, in the store's own format; return their keys."""
    with SQLiteCache(path) as cache:
        cache.set(make_key(request(start)), response(start))  # the store creates the file, schema, WAL
    now = time.time()
    rows = [
        (make_key(request(i)), json.dumps({"value": response(i), "created": now, "expires": None}, ensure_ascii=False, separators=(",", ":")))
        for i in range(start, start + count)
    ]
    with closing(sqlite3.connect(path)) as conn:
        with conn:
            conn.executemany(f'INSERT OR REPLACE INTO "{TABLE}" (key, value) VALUES (?, ?)', rows)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return [k for k, _ in rows]


ROUNDS = 7  # interleaved rounds per timing (--rounds)


def timed(candidates: list[tuple[str, Callable[[], Any]]], n: int, rounds: int | None = None, warmup: int = 50) -> list[list[float]]:
    """Per-round median seconds per call of each candidate, in interleaved rounds so drift hits all alike."""
    rounds = ROUNDS if rounds is None else rounds
    per_round: list[list[float]] = [[] for _ in candidates]
    clock = time.perf_counter
    for _ in range(rounds):
        for (_, fn), out in zip(candidates, per_round):
            for _ in range(warmup):
                fn()
            samples = []
            for _ in range(max(1, n // rounds)):
                t0 = clock()
                fn()
                samples.append(clock() - t0)
            out.append(statistics.median(samples))
    return per_round


def med(values: list[float]) -> float:
    """The median of per-round figures."""
    return statistics.median(values)


def spread(values: list[float], scale: float = 1e6, unit: str = "µs", digits: int = 1) -> str:
    """``median unit (IQR low-high)`` of per-round figures times ``scale``."""
    scaled = sorted(v * scale for v in values)
    if len(scaled) >= 4:
        q = statistics.quantiles(scaled, n=4)
        low, high = q[0], q[2]
    else:
        low, high = scaled[0], scaled[-1]
    return f"{statistics.median(scaled):8.{digits}f} {unit} (IQR {low:.{digits}f}-{high:.{digits}f})"


def part1_hit(workdir: Path, n: int = 5000) -> None:
    """Median cost of one cache hit, beside a raw SELECT of the same row."""
    print(f"1. cache hit (1,000 entries in the file; {n} calls per candidate over {ROUNDS} interleaved rounds)")
    path = workdir / "hit.sqlite"
    keys = fill(path, 0, 1000)
    key = keys[500]
    payload = request(500)
    raw = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    select = f'SELECT value FROM "{TABLE}" WHERE key = ?'
    bare = SqliteDict(str(path), tablename=TABLE, journal_mode="WAL", autocommit=True, decode=json.loads)
    bare_fast = SqliteDict(str(path), tablename=TABLE, journal_mode="WAL", autocommit=True, decode=json.loads, outer_stack=False)
    store = SQLiteCache(path)
    assert store.get(key) == response(500)
    client = llmutils.MockClient(cache_api_calls=True, cache_file_name=path)
    hello = [{"role": "user", "content": "hello from the benchmark"}]
    client.send_message(hello)  # the one miss: stores the entry every later call hits
    memory_path = workdir / "memory.sqlite"
    memory_client = llmutils.MockClient(cache_api_calls=True, cache_file_name=memory_path, cache_memory_items=10_000)
    memory_client.send_message(hello)
    tier = MemoryCache(SQLiteCache(path), 10_000)
    tier.set(key, response(500))
    message = response(500)["choices"][0]["message"]

    try:
        candidates: list[tuple[str, Callable[[], Any]]] = [
            ("raw sqlite3 SELECT (fetchone, no decode)", lambda: raw.execute(select, (key,)).fetchone()),
            ("raw sqlite3 SELECT + json.loads", lambda: json.loads(raw.execute(select, (key,)).fetchone()[0])),
            ("bare sqlitedict get (outer_stack=True)", lambda: bare[key]),
            ("bare sqlitedict get (outer_stack=False)", lambda: bare_fast[key]),
            ("SQLiteCache.get", lambda: store.get(key)),
            ("make_key + SQLiteCache.get", lambda: store.get(make_key(payload))),
            ("full send_message hit (MockClient, cache on)", lambda: client.send_message(hello)),
            ("copy.deepcopy of the message", lambda: copy.deepcopy(message)),
            ("memory tier: MemoryCache.get", lambda: tier.get(key)),
            ("full send_message hit from the memory tier", lambda: memory_client.send_message(hello)),
        ]
        per_round = timed(candidates, n)
        base = med(per_round[0])
        for (name, _), values in zip(candidates, per_round):
            print(f"   {name:<44} {spread(values)}   x{med(values) / base:5.1f} raw")
        deep = med(per_round[7])
        print(f"   full send_message hit / raw SELECT: {med(per_round[6]) / base:.1f}x (target <= 6x)")
        print(f"   memory tier get / deepcopy of the message: {med(per_round[8]) / deep:.1f}x (target <= 3x)")
        print(f"   full send_message memory-tier hit / deepcopy of the message: {med(per_round[9]) / deep:.1f}x")
        print(f"   send_message hits: {client.cache_stats().hits}, misses: {client.cache_stats().misses}; "
              f"memory tier: {memory_client.cache_stats().hits} hits, {tier.stats().hits} hits (get)")
        print(f"   replay run from cache imports openai: {_replay_imports_openai(workdir)}")
    finally:
        client.close()
        memory_client.close()
        tier.close()
        store.close()
        bare.close()
        bare_fast.close()
        raw.close()


def _replay_imports_openai(workdir: Path) -> bool:
    """Record one call with an OpenAIClient, replay it in a fresh process; was openai imported there?"""
    from llmutils.testing import OpenAITestServer

    path = workdir / "replay.sqlite"
    hello = [{"role": "user", "content": "replay me"}]
    with OpenAITestServer() as server:
        with llmutils.OpenAIClient(base_url=server.base_url, api_key="k", cache_api_calls=True, cache_file_name=path) as rec:
            rec.send_message(hello)
        code = (
            "import sys, llmutils\n"
            f"c = llmutils.OpenAIClient(base_url={server.base_url!r}, api_key='k', cache_api_calls=True, "
            f"cache_file_name={str(path)!r}, cache_mode='replay')\n"
            f"c.send_message({hello!r}); c.close()\n"
            "print('openai' in sys.modules)\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.strip() == "True"


def _old_pickle_write(cache: dict[str, Any], path: Path, key: str, value: Any) -> None:
    """What the replaced module did on every call: add the entry, rewrite the whole pickle."""
    cache[key] = value
    with open(path, "wb") as f:
        pickle.dump(cache, f)


def part2_writes(workdir: Path, sizes: tuple[int, int] = (1000, 50_000), writes: int = 500) -> Path:
    """Cost of one new entry with few vs many stored, ours vs the old whole-file pickle."""
    print(f"2. write cost per new entry ({writes} writes each over {ROUNDS} interleaved rounds; old pickle: median of a few)")
    paths = [workdir / f"w{size}.sqlite" for size in sizes]
    caches = []
    for size, path in zip(sizes, paths):
        fill(path, 0, size)
        cache = SQLiteCache(path)
        cache.set("warm", 1)  # start the writer thread outside the timing
        caches.append(cache)
    counter = iter(range(10**9, 10**10))

    def writer(cache: SQLiteCache) -> Callable[[], None]:
        def write() -> None:
            i = next(counter)
            cache.set(make_key(request(i)), response(i))

        return write

    try:
        per_round = timed([(str(size), writer(cache)) for size, cache in zip(sizes, caches)], writes, warmup=10)
        errors = [cache.stats().errors for cache in caches]
    finally:
        for cache in caches:
            cache.close()
    for size, values, err in zip(sizes, per_round, errors):
        print(f"   SQLiteCache.set with {size:>6,} stored: {spread(values, 1e3, 'ms/write', 3)}  (errors {err})")
    small, large = sizes
    print(f"   ratio {large:,} / {small:,}: {med(per_round[1]) / med(per_round[0]):.2f}  (target <= 1.5)")
    for size, reps in ((small, 20), (large, 3)):
        old = {f"old-{i}": json.loads(json.dumps(response(i))) for i in range(size)}
        target = workdir / f"old{size}.pickle"
        counter = iter(range(10**9, 10**10))
        [values] = timed([("old", lambda: _old_pickle_write(old, target, f"new-{next(counter)}", response(0)))], reps, rounds=1, warmup=1)
        print(f"   old whole-dict pickle with {size:>6,} stored: {med(values) * 1e3:7.1f} ms/write  (file {target.stat().st_size / 1e6:.1f} MB)")
        target.unlink()
        del old
    return paths[-1]


def _thread_round(path: Path, threads: int, per_thread: int) -> None:
    errors: list[BaseException] = []
    with SQLiteCache(path) as cache:

        def work(t: int) -> None:
            for i in range(per_thread):
                try:
                    cache.set(f"t{t}-{i}", response(i))
                except Exception as exc:
                    errors.append(exc)

        pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        t0 = time.perf_counter()
        for th in pool:
            th.start()
        for th in pool:
            th.join()
        wall = time.perf_counter() - t0
        swallowed = cache.stats().errors
    with closing(sqlite3.connect(path)) as conn:
        stored = conn.execute(f'SELECT COUNT(*) FROM "{TABLE}" WHERE key LIKE \'t%\'').fetchone()[0]
    total = threads * per_thread
    print(
        f"   {threads} threads x {per_thread:,} writes, one cache: errors raised {len(errors)}, "
        f"faults logged {swallowed}, lost {total - stored}, wall {wall:.2f} s ({wall / total * 1e6:.0f} µs/write)"
    )


def _proc_writer(path: str, wid: int, n: int, out: Any) -> None:
    raised = 0
    with SQLiteCache(path) as cache:
        for i in range(n):
            try:
                cache.set(f"p{wid}-{i}", response(i))
            except Exception:
                raised += 1
        out.put(("writer", raised, cache.stats().errors, n))


def _proc_reader(path: str, stop: Any, out: Any) -> None:
    raised = reads = 0
    with SQLiteCache(path) as cache:
        while not stop.is_set():
            try:
                cache.get(f"p{reads % 4}-{reads % 2000}")
            except Exception:
                raised += 1
            reads += 1
        stats = cache.stats()
        out.put(("reader", raised, stats.errors, reads, stats.hits))


def _process_round(path: Path, writers: int, per_writer: int, readers: int) -> None:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    stop = ctx.Event()
    rs = [ctx.Process(target=_proc_reader, args=(str(path), stop, out)) for _ in range(readers)]
    ws = [ctx.Process(target=_proc_writer, args=(str(path), w, per_writer, out)) for w in range(writers)]
    for p in rs:
        p.start()
    t0 = time.perf_counter()
    for p in ws:
        p.start()
    for p in ws:
        p.join()
    wall = time.perf_counter() - t0
    stop.set()
    for p in rs:
        p.join()
    results = [out.get(timeout=60) for _ in range(writers + readers)]
    raised = sum(r[1] for r in results)
    faults = sum(r[2] for r in results)
    reads = sum(r[3] for r in results if r[0] == "reader")
    with closing(sqlite3.connect(path)) as conn:
        stored = conn.execute(f'SELECT COUNT(*) FROM "{TABLE}" WHERE key LIKE \'p%\'').fetchone()[0]
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
    total = writers * per_writer
    print(
        f"   {writers} processes x {per_writer:,} writes + {readers} reading ({reads:,} reads): errors raised {raised}, "
        f"faults logged {faults}, lost {total - stored}, integrity {integrity}, wall {wall:.2f} s (incl. process start)"
    )


def part3_concurrency(workdir: Path) -> None:
    """Threads and processes writing one file at once: nothing raised, nothing lost."""
    print("3. concurrency (target: 0 errors, 0 lost)")
    _thread_round(workdir / "threads.sqlite", 8, 2000)
    _process_round(workdir / "procs.sqlite", 4, 2000, 2)


COLD = """
import sys, time
t0 = time.perf_counter()
from llmutils.cache import SQLiteCache
t1 = time.perf_counter()
cache = SQLiteCache(sys.argv[1])
hit = cache.get(sys.argv[2])
t2 = time.perf_counter()
cache.set("cold-write", 1)
t3 = time.perf_counter()
cache.close()
print((t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3, hit is not None)
"""


def part4_cold_open(path: Path) -> None:
    """Open a big file from a fresh process: first hit, first write, size on disk."""
    print("4. cold open")
    with closing(sqlite3.connect(path)) as conn:
        entries = conn.execute(f'SELECT COUNT(*) FROM "{TABLE}"').fetchone()[0]
        key = conn.execute(f'SELECT key FROM "{TABLE}" LIMIT 1 OFFSET ?', (entries // 2,)).fetchone()[0]
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size = sum(os.stat(f"{path}{s}").st_size for s in ("", "-wal") if os.path.exists(f"{path}{s}"))
    runs = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", COLD, str(path), key], capture_output=True, text=True, timeout=120, check=True)
        runs.append([float(x) for x in out.stdout.split()[:3]] + [out.stdout.split()[3] == "True"])
    imp, first_get, first_set = (statistics.median(r[i] for r in runs) for i in range(3))
    t0 = time.perf_counter()
    with SQLiteCache(path) as cache:
        hit = cache.get(key)
        t1 = time.perf_counter()
    assert hit is not None and all(r[3] for r in runs)
    print(
        f"   {entries:,} entries, {size / 1e6:.1f} MB on disk ({size / entries:.0f} B/entry); fresh process (median of 3): "
        f"import {imp:.1f} ms, open + first hit {first_get:.2f} ms, first write {first_set:.2f} ms; "
        f"in-process open + first hit {(t1 - t0) * 1e3:.2f} ms"
    )


# -- 5. Redis -------------------------------------------------------------------------------------

BENCH_PREFIX = "llmutils-bench:v1:"


def _redis_writer(url: str, wid: int, n: int, out: Any) -> None:
    from llmutils.cache import RedisCache

    raised = 0
    with RedisCache(url, prefix=BENCH_PREFIX) as cache:
        for i in range(n):
            try:
                cache.set(f"p{wid}-{i}", response(i))
            except Exception:
                raised += 1
        out.put(("writer", raised, cache.stats().errors, n))


def _redis_reader(url: str, stop: Any, out: Any) -> None:
    from llmutils.cache import RedisCache

    raised = reads = 0
    with RedisCache(url, prefix=BENCH_PREFIX) as cache:
        while not stop.is_set():
            try:
                cache.get(f"p{reads % 4}-{reads % 2000}")
            except Exception:
                raised += 1
            reads += 1
        out.put(("reader", raised, cache.stats().errors, reads))


def _start_redis(workdir: Path) -> tuple[str, subprocess.Popen[bytes]] | None:
    """A throwaway redis-server on a free port (no persistence), or None when there is none to start."""
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and proc.poll() is None:  # readiness: it answers PING
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    return f"redis://127.0.0.1:{port}/0", proc
        except OSError:
            time.sleep(0.01)
    proc.kill()
    proc.wait()
    return None


def part5_redis(workdir: Path, url: str | None = None, n: int = 5000) -> None:
    """The Redis backend: hit latency beside raw redis-py and SQLite; 4 processes writing at once."""
    try:
        import redis
    except ImportError:
        print("5. Redis: skipped (redis-py is not installed: pip install 'llmutils-openai[redis]')")
        return
    from llmutils.cache import RedisCache

    started = None
    if url is None:
        started = _start_redis(workdir)
        if started is None:
            print("5. Redis: skipped (no --redis-url and no redis-server on PATH)")
            return
        url = started[0]
    raw = redis.Redis.from_url(url)
    try:
        version = raw.info("server")["redis_version"]
        print(f"5. Redis {version} at {'a redis-server started here' if started else 'the given URL'} (median of {n} calls)")
        path = workdir / "redis-side.sqlite"
        keys = fill(path, 0, 1000)
        key = keys[500]
        with raw.pipeline(transaction=False) as pipe:
            now = time.time()
            for i, k in enumerate(keys):
                pipe.set(BENCH_PREFIX + k, json.dumps({"value": response(i), "created": now, "expires": None}, separators=(",", ":")))
            pipe.execute()
        store = RedisCache(url, prefix=BENCH_PREFIX)
        sqlite_store = SQLiteCache(path)
        hello = [{"role": "user", "content": "hello from the Redis benchmark"}]
        client = llmutils.MockClient(cache_api_calls=True, cache_url=url)
        client._cache(client.settings()).prefix = BENCH_PREFIX  # type: ignore[union-attr]  # removed after, like the rest
        client.send_message(hello)  # the one miss
        assert store.get(key) == response(500) == sqlite_store.get(key)
        try:
            candidates: list[tuple[str, Callable[[], Any]]] = [
                ("raw redis-py GET (no decode)", lambda: raw.get(BENCH_PREFIX + key)),
                ("raw redis-py GET + json.loads", lambda: json.loads(raw.get(BENCH_PREFIX + key))),
                ("RedisCache.get", lambda: store.get(key)),
                ("SQLiteCache.get (same entry)", lambda: sqlite_store.get(key)),
                ("full send_message hit (MockClient, Redis)", lambda: client.send_message(hello)),
            ]
            per_round = timed(candidates, n)
            base = med(per_round[0])
            for (name, _), values in zip(candidates, per_round):
                print(f"   {name:<44} {spread(values)}   x{med(values) / base:5.1f} raw GET")
            print(f"   RedisCache errors: {store.stats().errors}; send_message hits {client.cache_stats().hits}")
        finally:
            client.close()
            store.close()
            sqlite_store.close()
        _redis_process_round(url, raw, 4, 2000, 2)
    finally:
        for k in raw.scan_iter(match=BENCH_PREFIX + "*", count=1000):
            raw.unlink(k)
        raw.close()
        if started is not None:
            started[1].terminate()
            started[1].wait(10)


def _redis_process_round(url: str, raw: Any, writers: int, per_writer: int, readers: int) -> None:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    stop = ctx.Event()
    rs = [ctx.Process(target=_redis_reader, args=(url, stop, out)) for _ in range(readers)]
    ws = [ctx.Process(target=_redis_writer, args=(url, w, per_writer, out)) for w in range(writers)]
    for p in rs:
        p.start()
    t0 = time.perf_counter()
    for p in ws:
        p.start()
    for p in ws:
        p.join()
    wall = time.perf_counter() - t0
    stop.set()
    for p in rs:
        p.join()
    results = [out.get(timeout=60) for _ in range(writers + readers)]
    raised = sum(r[1] for r in results)
    faults = sum(r[2] for r in results)
    reads = sum(r[3] for r in results if r[0] == "reader")
    stored = sum(1 for _ in raw.scan_iter(match=BENCH_PREFIX + "p*", count=1000))
    total = writers * per_writer
    print(
        f"   {writers} processes x {per_writer:,} writes + {readers} reading ({reads:,} reads): errors raised {raised}, "
        f"faults logged {faults}, lost {total - stored}, wall {wall:.2f} s (incl. process start)"
    )


def main(argv: list[str] | None = None) -> None:
    """Run every part in a temporary directory and print the figures."""
    global ROUNDS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", type=int, default=50_000, help="entries in the big file (parts 2 and 4)")
    parser.add_argument("--redis-url", metavar="URL", help="a Redis for part 5 (default: start redis-server on a free port)")
    parser.add_argument("--parts", default="1,2,3,4,5", help="which parts to run, e.g. 5 or 1,5 (default: all)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per timing (default 7, at least 5)")
    args = parser.parse_args(argv)
    ROUNDS = max(5, args.rounds)
    parts = {int(p) for p in args.parts.split(",") if p.strip()}
    print(f"python {sys.version.split()[0]}, sqlite {sqlite3.sqlite_version}, {os.cpu_count()} cpus, "
          f"load average {os.getloadavg()[0]:.2f}; llmutils from {Path(llmutils.__file__).parent}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    with tempfile.TemporaryDirectory(prefix="llmutils-cache-bench-") as tmp:
        workdir = Path(tmp)
        t0 = time.perf_counter()
        if 1 in parts:
            part1_hit(workdir)
        if 2 in parts or 4 in parts:
            big = part2_writes(workdir, sizes=(1000, args.large))
        if 3 in parts:
            part3_concurrency(workdir)
        if 4 in parts:
            part4_cold_open(big)
        if 5 in parts:
            part5_redis(workdir, args.redis_url)
        print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
