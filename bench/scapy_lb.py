"""The course-style load balancer, kept as the benchmark's baseline: scapy `sniff(filter=...,
prn=...)` and `sendp(Ether() / IP(outer) / inner)`, as the course text writes it.

    python -m bench.scapy_lb IFACE --vip 20.0.0.1 --backend 10.2.3.2 --backend 10.4.7.2 \
        --next-hop-mac 00:01:0a:01:01:02 [--local-ip IP] [--persistent-socket] [--duration S]

Backend choice: a CRC-32 of the 5-tuple modulo the number of backends (the course asks for "a
hash of the five tuple"; no Maglev, no connection table). `sendp` opens and closes a socket per
packet, which is the course's speed; `--persistent-socket` sends through one `conf.L2socket`
instead, the fairest scapy baseline. Counters go to stderr as one JSON line at exit.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
import signal
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


def five_tuple_backend(
    backends: Sequence[str], src: str, dst: str, proto: int, sport: int, dport: int
) -> str:
    """The course's rule: any consistent hash of the 5-tuple picks the backend."""
    key = f"{src}|{dst}|{proto}|{sport}|{dport}".encode()
    return backends[zlib.crc32(key) % len(backends)]


def _ip(text: str) -> str:
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an IPv4 address: {text!r}") from exc


def _mac(text: str) -> str:
    if not MAC_RE.match(text):
        raise argparse.ArgumentTypeError(f"not a MAC address (aa:bb:cc:dd:ee:ff): {text!r}")
    return text.lower()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Course-style scapy load balancer (baseline).")
    p.add_argument("iface", help="interface to sniff on and send from")
    p.add_argument("--vip", type=_ip, default="20.0.0.1", help="virtual IP (20.0.0.1)")
    p.add_argument("--backend", type=_ip, action="append", required=True, help="backend IP")
    p.add_argument("--next-hop-mac", type=_mac, required=True, help="destination MAC to send to")
    p.add_argument("--local-ip", type=_ip, help="outer source address (the interface's)")
    p.add_argument(
        "--persistent-socket",
        action="store_true",
        help="send through one conf.L2socket instead of sendp per packet",
    )
    p.add_argument("--duration", type=float, default=0.0, help="stop after S seconds (0: never)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # scapy is imported only here: its import is slow and --help should not pay for it.
    from scapy.all import conf, get_if_addr, get_if_hwaddr, sendp, sniff
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.l2 import Ether

    try:
        my_mac = get_if_hwaddr(args.iface)
    except (OSError, ValueError) as exc:
        print(f"scapy_lb: no such interface {args.iface!r}: {exc}", file=sys.stderr)
        return 2
    local_ip = args.local_ip or get_if_addr(args.iface)
    backends: list[str] = args.backend
    counters: Counter[str] = Counter()
    sock = conf.L2socket(iface=args.iface) if args.persistent_socket else None

    def send(frame: Any) -> None:
        if sock is not None:
            sock.send(frame)
        else:
            sendp(frame, iface=args.iface, verbose=False)

    def handle(pkt: Any) -> None:
        try:
            if IP not in pkt or pkt[IP].dst != args.vip:
                counters["drop_not_vip"] += 1
                return
            ip = pkt[IP]
            l4 = ip.payload
            sport, dport = (l4.sport, l4.dport) if isinstance(l4, TCP | UDP) else (0, 0)
            backend = five_tuple_backend(backends, ip.src, ip.dst, ip.proto, sport, dport)
            send(Ether(src=my_mac, dst=args.next_hop_mac) / IP(src=local_ip, dst=backend) / ip)
            counters[f"to_{backend}"] += 1
            counters["forwarded"] += 1
        except Exception as exc:  # a baseline must not die on one odd packet: count it
            counters[f"error_{type(exc).__name__}"] += 1

    stop = _install_stop()
    started = time.monotonic()
    try:
        sniff(
            iface=args.iface,
            filter=f"ip dst host {args.vip}",
            prn=handle,
            store=False,
            timeout=args.duration or None,
            stop_filter=lambda _pkt: stop(),
            started_callback=lambda: print("scapy_lb: ready", file=sys.stderr, flush=True),
        )
    except KeyboardInterrupt:
        pass
    finally:
        if sock is not None:
            sock.close()
        stats = {"elapsed_s": round(time.monotonic() - started, 3), **counters}
        print(json.dumps({"scapy_lb": stats}, sort_keys=True), file=sys.stderr, flush=True)
    return 0


def _install_stop() -> Callable[[], bool]:
    """SIGTERM/SIGINT end the sniff loop cleanly (at the next packet, or by interrupting it)."""
    flag = {"stop": False}

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        flag["stop"] = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return lambda: flag["stop"]


if __name__ == "__main__":
    sys.exit(main())
