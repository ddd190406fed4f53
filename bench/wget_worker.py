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
import socket
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


def fetch_python(url: str, timeout: float) -> dict:
    """The same download without a process per request: one TCP connection, HTTP/1.0 GET, read
    to EOF. Shows what the path and the LB can do once wget's process start is out of the way."""
    t0 = time.time()
    h = hashlib.sha256()
    n, rc, err = 0, 0, ""
    hostport, _, path = url.removeprefix("http://").partition("/")
    host, _, port = hostport.partition(":")
    try:
        with socket.create_connection((host, int(port or 80)), timeout=timeout) as s:
            s.sendall(f"GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = s.recv(CHUNK)
                if not chunk:
                    break
                head += chunk
            status, _, body = head.partition(b"\r\n\r\n")
            if not status.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")):
                rc = 8  # wget's "server issued an error response"
            h.update(body)
            n = len(body)
            while chunk := s.recv(CHUNK):
                h.update(chunk)
                n += len(chunk)
    except OSError as exc:
        rc, err = 4, f"network failure: {exc}"  # 4: wget's network failure
    return {"url": url, "t0": t0, "t1": time.time(), "bytes": n, "sha256": h.hexdigest(),
            "rc": rc, "error": err}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="one client's share of a wget round")
    ap.add_argument("--client", required=True)
    ap.add_argument("--round", type=int, required=True)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--tool", choices=("wget", "python"), default="wget")
    ap.add_argument("--start-at", type=float, default=0.0,
                    help="wall-clock time to begin at, so all clients start together")  # fmt: skip
    ap.add_argument("urls", nargs="+")
    args = ap.parse_args(argv)
    lock = threading.Lock()

    def one(url: str) -> None:
        rec = (fetch if args.tool == "wget" else fetch_python)(url, args.timeout)
        rec.update(client=args.client, round=args.round)
        with lock:
            sys.stdout.write(json.dumps(rec) + "\n")
            sys.stdout.flush()

    # A barrier without talking: every worker waits for the same instant, so the round's span
    # is load, not the time it took to start ten interpreters one after another.
    time.sleep(max(0.0, args.start_at - time.time()))
    with ThreadPoolExecutor(max_workers=max(1, args.concurrency)) as pool:
        list(pool.map(one, args.urls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
