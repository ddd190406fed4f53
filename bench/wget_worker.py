"""One client's share of a wget round, run inside the client's network namespace.

`python bench/wget_worker.py --client h16 --round 1 --concurrency 2 URL...` runs `wget -qO-` for
each URL (at most --concurrency at a time), hashes what arrives as it arrives (nothing touches the
disk), and prints one JSON line per download (see bench/wget_summary.py for the fields) as soon
as it ends, so the driver can show progress. Standard library only: it starts fast, once per
client per round, instead of one namespace entry per request.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

CHUNK = 1 << 16


def fetch(url: str, timeout: float) -> dict:
    t0 = time.time()
    h = hashlib.sha256()
    n = 0
    err = ""
    try:
        proc = subprocess.Popen(
            ["wget", "-q", "-O", "-", "--tries=1", f"--timeout={timeout:g}", "--no-proxy", url],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
    except OSError as exc:
        return {"url": url, "t0": t0, "t1": time.time(), "bytes": 0, "sha256": "", "rc": -1,
                "error": f"cannot run wget: {exc}"}  # fmt: skip
    assert proc.stdout is not None
    while chunk := proc.stdout.read1(CHUNK):  # type: ignore[attr-defined]
        h.update(chunk)
        n += len(chunk)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
        err = "wget did not exit"
    t1 = time.time()
    return {"url": url, "t0": t0, "t1": t1, "bytes": n, "sha256": h.hexdigest(), "rc": rc,
            "error": err}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="one client's share of a wget round")
    ap.add_argument("--client", required=True)
    ap.add_argument("--round", type=int, required=True)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("urls", nargs="+")
    args = ap.parse_args(argv)
    lock = threading.Lock()

    def one(url: str) -> None:
        rec = fetch(url, args.timeout)
        rec.update(client=args.client, round=args.round)
        with lock:
            sys.stdout.write(json.dumps(rec) + "\n")
            sys.stdout.flush()

    with ThreadPoolExecutor(max_workers=max(1, args.concurrency)) as pool:
        list(pool.map(one, args.urls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
