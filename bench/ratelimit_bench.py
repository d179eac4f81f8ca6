"""Benchmark: how closely RateLimiter holds its requests-per-minute target with the real clock.

Run: ``.venv/bin/python bench/ratelimit_bench.py --seconds 20`` (32 threads, 600 rpm by
default). Prints figures only; it asserts nothing.
"""

from __future__ import annotations

import argparse
import itertools
import threading
import time

from llmutils._exceptions import RateLimitError
from llmutils._ratelimit import RateLimiter

__all__ = ["main"]


def run(rpm: float, threads: int, seconds: float) -> list[float]:
    """Let ``threads`` threads acquire from one limiter for ``seconds``; return the grant times."""
    limiter = RateLimiter(rpm=rpm)
    stamps: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(threads + 1)
    t0 = 0.0

    def worker() -> None:
        start.wait()
        while True:
            left = t0 + seconds - time.monotonic()
            if left <= 0:
                return
            try:
                limiter.acquire(timeout=left)
            except RateLimitError:
                return
            now = time.monotonic()
            if now < t0 + seconds:
                with lock:
                    stamps.append(now - t0)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    t0 = time.monotonic()
    start.wait()
    for thread in pool:
        thread.join()
    return sorted(stamps)


def max_in_window(stamps: list[float], window: float) -> int:
    """The largest number of grants inside any sliding window of ``window`` seconds."""
    best, lo = 0, 0
    for hi, t in enumerate(stamps):
        while t - stamps[lo] >= window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def main() -> None:
    """Parse arguments, run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rpm", type=float, default=600.0)
    parser.add_argument("--threads", type=int, default=32)
    args = parser.parse_args()

    stamps = run(args.rpm, args.threads, args.seconds)
    achieved = len(stamps) / args.seconds * 60.0
    error = (achieved - args.rpm) / args.rpm * 100.0
    per_second = args.rpm / 60.0
    print(f"threads={args.threads} seconds={args.seconds:g} target={args.rpm:g} rpm")
    print(f"granted={len(stamps)} achieved={achieved:.1f} rpm error={error:+.2f}%")
    if len(stamps) > 1:
        gaps = [b - a for a, b in itertools.pairwise(stamps)]
        steady = (len(stamps) - 1) / (stamps[-1] - stamps[0]) * 60.0
        print(f"steady rate (first to last grant)={steady:.1f} rpm")
        print(f"gap between grants: min={min(gaps) * 1000:.1f} ms mean={sum(gaps) / len(gaps) * 1000:.1f} ms "
              f"max={max(gaps) * 1000:.1f} ms (target {60000 / args.rpm:.1f} ms)")
    for window in (1.0, 10.0):
        if window <= args.seconds:
            print(f"max grants in any {window:g} s window={max_in_window(stamps, window)} "
                  f"(budget {per_second * window:g})")


if __name__ == "__main__":
    main()
