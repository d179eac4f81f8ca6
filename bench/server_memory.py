"""Benchmark: the test server's memory (RSS) as it serves many requests (does it stay flat?).

Run::

    python bench/server_memory.py                 # 60,000 chat requests, RSS every 10,000
    python bench/server_memory.py --requests 6000 --keep-requests 0

It starts ``python -m llmutils.testing`` in a subprocess (as bench/peers.py does), sends chat
requests over 4 keep-alive connections (stdlib ``http.client``, so the client is cheap) and prints
the server's resident memory (``VmRSS`` from ``/proc``, so Linux only) before and along the way,
with the growth per request. It asserts nothing.
"""

from __future__ import annotations

import argparse
import http.client
import json
import platform
import re
import subprocess
import sys
import threading
from pathlib import Path

__all__ = ["main"]


def rss_kib(pid: int) -> int:
    """Resident set size of process ``pid`` in KiB."""
    match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    if match is None:
        raise RuntimeError("no VmRSS in /proc: this benchmark needs Linux")
    return int(match.group(1))


def send(port: int, start: int, count: int) -> None:
    """``count`` chat requests over one keep-alive connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for i in range(start, start + count):
        body = json.dumps({"model": "gpt-4.1-mini", "messages": [{"role": "user", "content": f"memory probe {i}"}]})
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json", "Authorization": "Bearer k"})
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}")
    conn.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=60_000, help="requests in all (default 60,000)")
    parser.add_argument("--step", type=int, default=10_000, help="print RSS every this many requests")
    parser.add_argument("--keep-requests", type=int, default=None,
                        help="pass --keep-requests to the server (default: the server's own default)")
    args = parser.parse_args(argv)
    command = [sys.executable, "-m", "llmutils.testing", "--port", "0"]
    if args.keep_requests is not None:
        command += ["--keep-requests", str(args.keep_requests)]
    print(f"bench/server_memory.py on Python {platform.python_version()}; server: {' '.join(command[1:])}")
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        match = re.search(r"serving at http://[^:]+:(\d+)", proc.stdout.readline())
        if match is None:
            raise RuntimeError("the test server did not start")
        port = int(match.group(1))
        send(port, 0, 100)  # warm: imports, first allocations
        base = rss_kib(proc.pid)
        print(f"   after {100:>7,} requests: RSS {base / 1024:7.1f} MiB")
        done = 100
        while done < args.requests:
            step = min(args.step, args.requests - done)
            threads = [threading.Thread(target=send, args=(port, done + k * (step // 4), step // 4)) for k in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            done += 4 * (step // 4)
            rss = rss_kib(proc.pid)
            print(f"   after {done:>7,} requests: RSS {rss / 1024:7.1f} MiB  "
                  f"(+{(rss - base) * 1024 / (done - 100):,.0f} bytes per request since the first 100)")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    main()
