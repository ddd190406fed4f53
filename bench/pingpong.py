"""One request at a time over UDP: the latency probe of the benchmark.

    python -m bench.pingpong serve --bind 20.0.0.1 --port 7777 [--duration S]
    python -m bench.pingpong client --server 20.0.0.1 --port 7777 --count 2000

The client sends a request, waits for its echo, then sends the next; it prints one JSON line:
requests/s, answered, lost (no echo within --timeout), and latency percentiles in microseconds.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import time
from collections.abc import Sequence

SEQ = struct.Struct("!Q")  # request payload: a sequence number, padded to --size bytes


def serve(bind: str, port: int, duration: float) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # The VIP may appear a moment after this starts (the agent adds it): bind it anyway.
    sock.setsockopt(socket.IPPROTO_IP, getattr(socket, "IP_FREEBIND", 15), 1)
    sock.bind((bind, port))
    sock.settimeout(0.5)
    print(f"pingpong: serving {bind}:{port}", file=sys.stderr, flush=True)
    deadline = time.monotonic() + duration if duration > 0 else float("inf")
    answered = 0
    try:
        while time.monotonic() < deadline:
            try:
                data, peer = sock.recvfrom(2048)
            except TimeoutError:
                continue
            sock.sendto(data, peer)
            answered += 1
    except KeyboardInterrupt:
        pass
    print(json.dumps({"pingpong_server": {"answered": answered}}), file=sys.stderr, flush=True)
    return 0


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[i]


def client(server: str, port: int, count: int, size: int, timeout: float) -> dict[str, float]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((server, port))
    sock.settimeout(timeout)
    pad = bytes(max(0, size - SEQ.size))
    rtts: list[float] = []
    lost = refused = 0
    clock = time.perf_counter
    started = clock()
    for seq in range(count):
        request = SEQ.pack(seq) + pad
        t0 = clock()
        sock.send(request)
        while True:  # skip late echoes of earlier, timed-out requests
            try:
                reply = sock.recv(2048)
            except TimeoutError:
                lost += 1
                break
            except OSError:  # an ICMP error (port/host unreachable) reached the socket
                refused += 1
                break
            if reply[: SEQ.size] == request[: SEQ.size]:
                rtts.append(clock() - t0)
                break
    elapsed = clock() - started
    rtts.sort()
    us = 1e6
    return {
        "count": count,
        "answered": len(rtts),
        "lost": lost,
        "refused": refused,
        "elapsed_s": round(elapsed, 4),
        # Requests/s of answered requests: what one-at-a-time traffic gets through.
        "rps": len(rtts) / elapsed if elapsed > 0 else 0.0,
        "p50_us": (percentile(rtts, 0.50) or 0.0) * us,
        "p99_us": (percentile(rtts, 0.99) or 0.0) * us,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="UDP ping-pong, one request at a time.")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--bind", default="0.0.0.0")
    s.add_argument("--port", type=int, default=7777)
    s.add_argument("--duration", type=float, default=0.0, help="stop after S seconds (0: never)")
    c = sub.add_parser("client")
    c.add_argument("--server", required=True)
    c.add_argument("--port", type=int, default=7777)
    c.add_argument("--count", type=int, default=2000)
    c.add_argument("--size", type=int, default=32, help="request bytes (>= 8)")
    c.add_argument("--timeout", type=float, default=0.2, help="seconds to wait for an echo")
    args = p.parse_args(argv)
    if not 0 < args.port < 65536:
        p.error(f"--port must be 1..65535, not {args.port}")
    if args.cmd == "serve":
        return serve(args.bind, args.port, args.duration)
    if args.count < 1 or args.size < SEQ.size:
        p.error("--count must be >= 1 and --size >= 8")
    print(json.dumps(client(args.server, args.port, args.count, args.size, args.timeout)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
