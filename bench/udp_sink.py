"""A UDP socket bound to the VIP that never reads: the benchmark's stand-in for a server.

    python -m bench.udp_sink --bind 20.0.0.1 --port 9 [--duration S]

Datagrams the agent delivers reach it and are dropped at its full receive buffer (counted by
the kernel as Udp InErrors / RcvbufErrors). Why not leave the port closed: a datagram to a
closed port makes the kernel try an ICMP port-unreachable (a route lookup and the ICMP rate
limiter for every datagram). That cost more than the decapsulation being measured and ran on
the generator's core: the agent phase then measured the kernel's ICMP path (about 260,000
datagrams/s offered and delivered, the generator core full) instead of the agent (about
390,000/s with this socket bound, the same generator). A server is listening in real use too.
Stops at SIGTERM/SIGINT or after --duration.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import sys
import time
from collections.abc import Sequence

IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="A bound UDP socket that never reads.")
    p.add_argument("--bind", required=True, help="address (it may appear later: IP_FREEBIND)")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--duration", type=float, default=3600.0, help="stop after S seconds")
    args = p.parse_args(argv)
    if not 0 < args.port < 65536:
        p.error(f"--port must be 1..65535, not {args.port}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        # The agent adds the VIP after this may start; the smallest buffer fills at once.
        sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        try:
            sock.bind((args.bind, args.port))
        except OSError as exc:
            print(f"udp_sink: cannot bind {args.bind}:{args.port}: {exc}", file=sys.stderr)
            return 1
        print(f"udp_sink: bound {args.bind}:{args.port}", file=sys.stderr, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            time.sleep(args.duration)
    return 0


if __name__ == "__main__":
    sys.exit(main())
