"""Flows and configurations shared by the packet core's unit tests."""

from __future__ import annotations

import random

from fastpath.balancer import Balancer
from fastpath.config import BalancerConfig
from l4lb.checksum import checksum
from l4lb.wire import IPV4, TCP

FOUR = (("10.2.3.2", 1), ("10.4.7.2", 1), ("10.6.11.2", 1), ("10.8.15.2", 1))
FIFTH = ("10.8.16.2", 1)
SIZE = 65537


def cfg(backends=FOUR, local_ip="10.1.1.2", **kw) -> BalancerConfig:
    return BalancerConfig(
        vips=(("20.0.0.1", None),),
        backends=backends,
        local_ip=local_ip,
        local_mac=bytes.fromhex("00000a010102"),
        next_hop_mac=bytes.fromhex("00010a010102"),
        **kw,
    )


def tcp_frame(src: int, sport: int, dport: int = 80, flags: int = 0x10) -> bytes:
    """A TCP segment to VIP:dport; an ACK by default, so the flow is tracked as established
    at once (a bare SYN, flags 0x02, is tracked half-open: fastpath.conntrack)."""
    ip = bytearray(
        IPV4.pack(0x45, 0, 40, 0, 0x4000, 64, 6, 0, src.to_bytes(4, "big"), bytes([20, 0, 0, 1]))
    )
    ip[10:12] = checksum(ip).to_bytes(2, "big")
    tcp = TCP.pack(sport, dport, 0, 0, 0x50, flags, 1000, 0, 0)
    return bytes.fromhex("00000a01010200010a0101020800") + bytes(ip) + tcp


def random_flows(n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [tcp_frame(rng.getrandbits(32), rng.randrange(1, 65536)) for _ in range(n)]


def backends_of(bal: Balancer, frames: list[bytes]) -> list[str]:
    out = memoryview(bytearray(1600))
    result = []
    for f in frames:
        n = bal.process(memoryview(f), out, 1.0)
        assert n == len(f) + 20
        result.append(".".join(str(b) for b in out[30:34]))
    return result
