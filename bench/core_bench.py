"""Per-packet cost of the packet core (fastpath.Balancer.process), no I/O.

Replays 64-byte TCP frames over 1,000 flows to a VIP through `process` and `process_batch`,
with the lookup table and the connection table in use: first the SYNs (connection table
misses, entries inserted), then data packets (hits). Prints CPU ns/packet per phase
(thread CPU time, so load from other processes on a shared machine inflates it less than
wall time would; cache and SMT sibling contention still do).
Usage: .venv/bin/python -m bench.core_bench [--flows N] [--rounds R]
"""

from __future__ import annotations

import argparse
import json
import struct
import time

from fastpath.balancer import Balancer
from fastpath.config import BalancerConfig, parse_mac
from fastpath.packet import checksum

# CPU time of this thread: other processes on the machine (this one is shared) do not count.
_clock = time.thread_time_ns

VIP = bytes([20, 0, 0, 1])
CFG = BalancerConfig(
    vips=(("20.0.0.1", 80),),
    backends=(("10.2.3.2", 1), ("10.4.7.2", 1), ("10.6.11.2", 1), ("10.8.15.2", 1)),
    local_ip="10.1.1.2",
    local_mac=bytes.fromhex("00000a010102"),
    next_hop_mac=bytes.fromhex("00010a010102"),
)


def tcp_frame(i: int, flags: int) -> bytes:
    """A 64-byte Ethernet frame: IPv4 (DF) + TCP from client 10.9.x.y:port to VIP:80."""
    src = bytes([10, 9, (i >> 8) & 255, i & 255])
    tcp = struct.pack("!HHIIBBHHH", 1024 + i % 50000, 80, i, 0, 5 << 4, flags, 64240, 0, 0)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 20, i & 0xFFFF, 0x4000, 64, 6,
                               0, src, VIP))  # fmt: skip
    ip[10:12] = checksum(ip).to_bytes(2, "big")
    eth = bytes.fromhex("00010a01010200000a0101020800")
    return (eth + bytes(ip) + tcp).ljust(64, b"\0")


def run(bal: Balancer, frames: list[memoryview], out: memoryview, rounds: int) -> float:
    process = bal.process
    best = float("inf")
    for _ in range(rounds):
        t0 = _clock()
        for f in frames:
            process(f, out, 1.0)
        best = min(best, (_clock() - t0) / len(frames))
    return best


def run_batch(bal: Balancer, frames: list[memoryview], rounds: int, batch: int = 64) -> float:
    outs = [memoryview(bytearray(CFG.mtu + 34)) for _ in range(batch)]
    lens = [0] * batch
    chunks = [frames[i : i + batch] for i in range(0, len(frames), batch)]
    best = float("inf")
    for _ in range(rounds):
        t0 = _clock()
        for chunk in chunks:
            bal.process_batch(chunk, outs, lens, len(chunk), 1.0)
        best = min(best, (_clock() - t0) / len(frames))
    return best


def golden_mix(rounds: int) -> float:
    """The golden fixture table's default cases (every drop reason, ICMP, fragments, MTU
    boundary), replayed as batches: the cost of the general path mixed with the fast one."""
    from tests.fixtures import cases

    kw = dict(cases.CONFIGS["default"])
    kw["local_mac"] = parse_mac(str(kw["local_mac"]))
    kw["next_hop_mac"] = parse_mac(str(kw["next_hop_mac"]))
    bal = Balancer(BalancerConfig(**kw))  # type: ignore[arg-type]
    frames = [memoryview(c.frame) for c in cases.load("default")] * 16
    return run_batch(bal, frames, rounds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flows", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    syn = [memoryview(tcp_frame(i, 0x02)) for i in range(args.flows)]
    data = [memoryview(tcp_frame(i, 0x18)) for i in range(args.flows)]
    out = memoryview(bytearray(CFG.mtu + 34))
    results = {}
    # SYN: each round on a fresh balancer, so every SYN misses the connection table.
    syn_ns = []
    for _ in range(args.rounds):
        syn_ns.append(run(Balancer(CFG), syn, out, 1))
    results["syn_ns"] = round(min(syn_ns), 1)
    bal = Balancer(CFG)
    run(bal, syn, out, 1)
    results["data_ns"] = round(run(bal, data, out, args.rounds), 1)
    results["data_batch64_ns"] = round(run_batch(bal, data, args.rounds), 1)
    assert len(bal.conntrack) == args.flows, "every flow should be tracked"
    c = bal.counters.as_dict()
    assert c["forwarded"] == c["frames"], c
    results["flows"] = args.flows
    results["tracked"] = len(bal.conntrack)
    results["golden_mix_ns"] = round(golden_mix(args.rounds), 1)
    print(f"SYN (conntrack miss+insert): {results['syn_ns']} ns/packet")
    print(f"data (conntrack hit):        {results['data_ns']} ns/packet")
    print(f"data via process_batch(64):  {results['data_batch64_ns']} ns/packet")
    print(f"golden table (every path):   {results['golden_mix_ns']} ns/frame")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
