"""The LB's resident memory with N tracked flows: a process that holds the packet core (what the
`fastpath.lb` process holds), fed N distinct TCP ACKs to the VIP (each a new established flow)
through `Balancer.process`, then reads its own VmRSS. One JSON line out:

    python -m bench.conntrack_rss --flows 1000000
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from l4lb.checksum import checksum
from l4lb.wire import ETH, ETH_P_IP, IPV4, TCP, parse_mac

CSUM_AT = ETH.size + 10  # IPv4 checksum offset in the frame
SRC_AT = ETH.size + 12  # IPv4 source address offset
SPORT_AT = ETH.size + IPV4.size  # TCP source port offset
U32 = struct.Struct("!I")
U16 = struct.Struct("!H")
BACKENDS = (("10.2.3.2", 1), ("10.4.7.2", 1), ("10.6.11.2", 1), ("10.8.15.2", 1))


def vm_rss_kib(pid: str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/status")


def syn_template(vip: str, dport: int) -> bytearray:
    eth = ETH.pack(parse_mac("02:00:00:00:00:01"), parse_mac("02:00:00:00:00:02"), ETH_P_IP)
    ip = IPV4.pack(0x45, 0, 40, 0, 0x4000, 64, 6, 0, bytes(4), socket.inet_aton(vip))
    # An ACK: tracked as established at once (a non-SYN miss); a bare SYN would be half-open,
    # a table of its own and its own bound (fastpath.conntrack).
    tcp = TCP.pack(0, dport, 1, 0, 5 << 4, 0x10, 64240, 0, 0)
    return bytearray(eth + ip + tcp)


def fill(flows: int, vip: str = "20.0.0.1", dport: int = 80) -> dict[str, object]:
    # Imported here so --help works without the package on the path.
    from fastpath.balancer import Balancer
    from fastpath.config import BalancerConfig
    from fastpath.stats import CoreStats

    rss_start = vm_rss_kib()
    cfg = BalancerConfig(
        vips=((vip, dport),),
        backends=BACKENDS,
        local_ip="10.1.1.2",
        local_mac=parse_mac("00:00:0a:01:01:02"),
        next_hop_mac=parse_mac("00:01:0a:01:01:02"),
        conn_insert_rate=0,  # no cap: every flow fed at the same `now` is tracked
    )
    balancer = Balancer(cfg)
    rss_empty = vm_rss_kib()
    frame = syn_template(vip, dport)
    view = memoryview(frame)
    out = memoryview(bytearray(cfg.mtu + 64))
    pack_u32, pack_u16 = U32.pack_into, U16.pack_into
    ip_hdr = slice(ETH.size, ETH.size + IPV4.size)
    base = 0x0B000000  # clients 11.0.0.0/8: 60,000 ports per address
    sent = 0
    now = time.monotonic()
    started = now
    for i in range(flows):
        pack_u32(frame, SRC_AT, base + i // 60000)
        pack_u16(frame, SPORT_AT, 1024 + i % 60000)
        pack_u16(frame, CSUM_AT, 0)
        pack_u16(frame, CSUM_AT, checksum(bytes(frame[ip_hdr])))
        if balancer.process(view, out, now):
            sent += 1
    elapsed = time.monotonic() - started
    counters = asdict(CoreStats.of(balancer.counters))
    return {
        "flows": flows,
        "forwarded": sent,
        "tracked": len(balancer.conntrack),
        "rss_mb": round(vm_rss_kib() / 1024, 1),
        "rss_mb_empty_balancer": round(rss_empty / 1024, 1),
        "rss_mb_interpreter": round(rss_start / 1024, 1),
        "fill_s": round(elapsed, 2),
        "counters": counters,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="VmRSS of the packet core with N tracked flows.")
    p.add_argument("--flows", type=int, required=True)
    args = p.parse_args(argv)
    if not 1 <= args.flows <= 10_000_000:
        p.error(f"--flows must be 1..10000000, not {args.flows}")
    print(json.dumps(fill(args.flows), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
