"""Clients fetching in a loop, run inside one client's namespace (bench.health_drill starts it).

`python bench/fetch_loop.py --url http://20.0.0.1/1k.bin --seconds 20 --threads 2 --pace 0.02`
runs `threads` loops, each: a new TCP connection, `GET`, the whole body, close; then `pace`
seconds of rest. It stops by itself after `seconds` (or on SIGTERM) and prints one JSON object:
requests, ok, per-second ok counts, and every failure with its start, end and error, so the
caller can tell failures in flight on a killed server (by time) from real ones. Standard
library only; bounded in time and count.
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import threading
import time
from types import FrameType
from urllib.parse import urlsplit

MAX_FAILURES_KEPT = 10_000


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pace", type=float, default=0.02, help="seconds between two requests")
    ap.add_argument("--timeout", type=float, default=3.0)
    ap.add_argument("--client", default="")
    args = ap.parse_args()
    parts = urlsplit(args.url)
    host, port, path = parts.hostname or "", parts.port or 80, parts.path or "/"
    stop = threading.Event()
    end = time.monotonic() + args.seconds

    def on_term(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    lock = threading.Lock()
    ok = 0
    requests = 0
    per_second: dict[int, int] = {}
    failures: list[dict[str, object]] = []

    def loop() -> None:
        nonlocal ok, requests
        while not stop.is_set() and time.monotonic() < end:
            t0 = time.time()
            err = ""
            try:
                conn = http.client.HTTPConnection(host, port, timeout=args.timeout)
                conn.request("GET", path, headers={"Connection": "close"})
                resp = conn.getresponse()
                resp.read()
                conn.close()
                if resp.status != 200:
                    err = f"HTTP {resp.status}"
            except (OSError, http.client.HTTPException) as exc:
                err = f"{type(exc).__name__}: {exc}"
            t1 = time.time()
            with lock:
                requests += 1
                if err:
                    if len(failures) < MAX_FAILURES_KEPT:
                        failures.append({"t0": round(t0, 4), "t1": round(t1, 4), "error": err})
                else:
                    ok += 1
                    per_second[int(t1)] = per_second.get(int(t1), 0) + 1
            stop.wait(args.pace)

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(args.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(args.seconds + args.timeout + 5)
    result = {
        "client": args.client,
        "requests": requests,
        "ok": ok,
        "failed": requests - ok,
        "failures": failures,
        "per_second": {str(k): v for k, v in sorted(per_second.items())},
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
