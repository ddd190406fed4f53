"""The load balancer's control request on single flows (served by l4lb.control):

    flow  src, sport, dst, dport, proto ("tcp" | "udp")
          -> {"state": "established" | "half_open" | "untracked", "backend", "table_backend"}

Read only: whether the connection table tracks a client's flow to a VIP, to which backend,
and what the lookup table would pick for it (fastpath.balancer.Balancer.flow). What the SYN
flood test asks: the downloads' flows are still tracked after a flood.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from l4lb.control import Command, CommandError, arg_int, arg_ipv4, only_args
from l4lb.wire import IPPROTO_TCP, IPPROTO_UDP

PROTOS = {"tcp": IPPROTO_TCP, "udp": IPPROTO_UDP}


FlowLookup = Callable[[str, int, str, int, int], dict[str, Any]]
"""(src, sport, dst, dport, proto) -> the reply: fastpath.balancer.Balancer.flow, or the
supervisor's over its workers (fastpath.workerpool.WorkerPool.flow)."""


def flow_commands(lookup: FlowLookup) -> dict[str, Command]:
    def flow(req: Mapping[str, Any]) -> dict[str, Any]:
        only_args(req, "src", "sport", "dst", "dport", "proto")
        src, dst = arg_ipv4(req, "src"), arg_ipv4(req, "dst")
        sport, dport = arg_int(req, "sport", 0, 65535), arg_int(req, "dport", 0, 65535)
        proto = req.get("proto", "tcp")
        if proto not in PROTOS:
            raise CommandError(f'argument \'proto\' must be "tcp" or "udp", not {proto!r}')
        return lookup(src, sport, dst, dport, PROTOS[proto])

    return {
        "flow": Command(
            flow, "where the connection table has a TCP/UDP flow (src, sport, dst, dport, proto)"
        )
    }
