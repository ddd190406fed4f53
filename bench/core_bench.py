"""Per-packet cost of the packet core on its production path (Balancer.bind_ring over a FakeRing
laid out as the kernel's ring), no I/O.

Replays 64-byte TCP frames over 1,000 flows to a VIP, in batches of 64 ring slots, with the
lookup table and the connection table in use: first the SYNs (connection table misses,
entries inserted), then data packets (hits); then the golden fixture table (every path), and
the one-frame adapter `Balancer.process` for comparison. Prints CPU ns/frame per phase (thread
CPU time, so load from other processes on a shared machine inflates it less than wall time
would; cache and SMT sibling contention still do); the ring is refilled between rounds,
untimed, as the kernel refills it.
Usage: .venv/bin/python -m bench.core_bench [--flows N] [--rounds R]
"""

from __future__ import annotations

import argparse
import json
import time

from fastpath.balancer import Balancer
from fastpath.config import BalancerConfig
from fastpath.stats import CoreStats
from l4lb.checksum import checksum
from l4lb.ring import FakeRing
from l4lb.wire import IPV4, TCP, parse_mac

# CPU time of this thread: other processes on the machine (this one is shared) do not count.
_clock = time.thread_time_ns

VIP = bytes([20, 0, 0, 1])
CFG = BalancerConfig(
    vips=(("20.0.0.1", 80),),
    backends=(("10.2.3.2", 1), ("10.4.7.2", 1), ("10.6.11.2", 1), ("10.8.15.2", 1)),
    local_ip="10.1.1.2",
    local_mac=bytes.fromhex("00000a010102"),
    next_hop_mac=bytes.fromhex("00010a010102"),
    conn_insert_rate=0,  # no cap: --flows SYNs at one `now` are all inserts
)


def tcp_frame(i: int, flags: int) -> bytes:
    """A 64-byte Ethernet frame: IPv4 (DF) + TCP from client 10.9.x.y:port to VIP:80."""
    src = bytes([10, 9, (i >> 8) & 255, i & 255])
    tcp = TCP.pack(1024 + i % 50000, 80, i, 0, 5 << 4, flags, 64240, 0, 0)
    ip = bytearray(IPV4.pack(0x45, 0, 20 + 20, i & 0xFFFF, 0x4000, 64, 6, 0, src, VIP))
    ip[10:12] = checksum(ip).to_bytes(2, "big")
    eth = bytes.fromhex("00010a01010200000a0101020800")
    return (eth + bytes(ip) + tcp).ljust(64, b"\0")


def run(bal: Balancer, frames: list[bytes], rounds: int, batch: int = 64) -> float:
    """Best CPU ns per frame over `rounds` passes of `frames` through the ring path."""
    ring = FakeRing(len(frames))
    ring_batch = bal.bind_ring(ring.slots)
    unsent = ring.slots.unsent
    firsts = [(i, min(i + batch, len(frames))) for i in range(0, len(frames), batch)]
    best = float("inf")
    for _ in range(rounds):
        ring.load(frames)  # the kernel's part: frames and status words
        t0 = _clock()
        for first, end in firsts:
            ring_batch(first, end, 1.0)
            if unsent:
                unsent.clear()
        best = min(best, (_clock() - t0) / len(frames))
    return best


def run_one(bal: Balancer, frames: list[bytes], rounds: int) -> float:
    """The same through the one-frame adapter (a slot of its own per call)."""
    out = memoryview(bytearray(CFG.mtu + 34))
    process = bal.process
    best = float("inf")
    for _ in range(rounds):
        t0 = _clock()
        for f in frames:
            process(f, out, 1.0)
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
    frames = [c.frame for c in cases.load("default")] * 16
    return run(bal, frames, rounds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flows", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    syn = [tcp_frame(i, 0x02) for i in range(args.flows)]
    data = [tcp_frame(i, 0x18) for i in range(args.flows)]
    results = {}
    # SYN: each round on a fresh balancer, so every SYN misses the connection table.
    results["syn_ns"] = round(min(run(Balancer(CFG), syn, 1) for _ in range(args.rounds)), 1)
    bal = Balancer(CFG)
    run(bal, syn, 1)
    results["data_ns"] = round(run(bal, data, args.rounds), 1)
    results["data_one_frame_ns"] = round(run_one(bal, data, args.rounds), 1)
    assert len(bal.conntrack) == args.flows, "every flow should be tracked"
    c = CoreStats.of(bal.counters)
    assert c.forwarded == c.frames, c
    results["flows"] = args.flows
    results["tracked"] = len(bal.conntrack)
    results["golden_mix_ns"] = round(golden_mix(args.rounds), 1)
    print(f"SYN (miss + half-open insert), ring path: {results['syn_ns']} ns/frame")
    print(f"data (conntrack hit), ring path:        {results['data_ns']} ns/frame")
    print(f"golden table (every path), ring path:   {results['golden_mix_ns']} ns/frame")
    print(f"data, one frame per call (process):     {results['data_one_frame_ns']} ns/frame")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
