"""One client's share of a wget round, run inside the client's network namespace.

`python bench/wget_worker.py --client h16 --round 1 --concurrency 2 --spool DIR URL...` runs
`wget -qO DIR/<file>` for each URL (at most --concurrency at a time), and prints one JSON line per
download (see bench/wget_summary.py for the fields) as soon as it ends, so the driver can show
progress. Standard library only: it starts fast, once per client per round, instead of one
namespace entry per request.

The timed window is the download alone: wget writes into the spool (tmpfs, owned and removed by
the driver), and the sha256 is taken after wget exits. Hashing in a pipe as the bytes arrive made
the client, not the path, the bottleneck of a 10 MB download: its receive window then reopened
only as fast as Python hashed, and each window update had to cross the load balancer first
(10 x 10 MB from h16: 19.8 ms through the VIP vs 15.4 ms direct with the pipe; 15.0 vs 15.3
ms with wget writing to /dev/null).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CHUNK = 1 << 16


_names = itertools.count()


def fetch(url: str, timeout: float, spool: Path) -> dict:
    target = spool / f"{os.getpid()}-{next(_names)}"
    err = ""
    t0 = time.time()
    try:
        proc = subprocess.Popen(
            ["wget", "-q", "-O", str(target), "--tries=1", f"--timeout={timeout:g}",
             "--no-proxy", url],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except OSError as exc:
        return {"url": url, "t0": t0, "t1": time.time(), "bytes": 0, "sha256": "", "rc": -1,
                "error": f"cannot run wget: {exc}"}  # fmt: skip
    # wget's own --timeout bounds each read; this bounds the whole download as well.
    try:
        rc = proc.wait(timeout=timeout * 3)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
        err = "wget did not exit"
    t1 = time.time()
    n, digest = _hash_and_remove(target)
    return {"url": url, "t0": t0, "t1": t1, "bytes": n, "sha256": digest, "rc": rc,
            "error": err}  # fmt: skip


def _hash_and_remove(path: Path) -> tuple[int, str]:
    """Size and sha256 of what wget wrote (0 and the empty string if it wrote nothing)."""
    h = hashlib.sha256()
    n = 0
    try:
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
                n += len(chunk)
    except FileNotFoundError:
        return 0, ""
    finally:
        path.unlink(missing_ok=True)
    return n, h.hexdigest()


def fetch_python(url: str, timeout: float) -> dict:
    """The same download without a process per request: one TCP connection, HTTP/1.0 GET, read
    to EOF. Shows what the path and the LB can do once wget's process start is out of the way."""
    t0 = time.time()
    chunks: list[bytes] = []
    rc, err = 0, ""
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
            chunks.append(body)
            while chunk := s.recv(CHUNK):
                chunks.append(chunk)
    except OSError as exc:
        rc, err = 4, f"network failure: {exc}"  # 4: wget's network failure
    t1 = time.time()  # the check below is not download time (as for wget)
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return {"url": url, "t0": t0, "t1": t1, "bytes": sum(map(len, chunks)),
            "sha256": h.hexdigest(), "rc": rc, "error": err}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="one client's share of a wget round")
    ap.add_argument("--client", required=True)
    ap.add_argument("--round", type=int, required=True)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--tool", choices=("wget", "python"), default="wget")
    ap.add_argument("--start-at", type=float, default=0.0,
                    help="wall-clock time to begin at, so all clients start together")  # fmt: skip
    ap.add_argument("--spool", type=Path, help="directory wget writes into (tmpfs; the driver "
                    "creates and removes it); required with --tool wget")  # fmt: skip
    ap.add_argument("urls", nargs="+")
    args = ap.parse_args(argv)
    if args.tool == "wget" and (args.spool is None or not args.spool.is_dir()):
        ap.error(f"--spool: {args.spool} is not a directory")
    lock = threading.Lock()

    def one(url: str) -> None:
        if args.tool == "wget":
            rec = fetch(url, args.timeout, args.spool)
        else:
            rec = fetch_python(url, args.timeout)
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
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C reached the whole process group; the driver says so
        sys.exit(130)
