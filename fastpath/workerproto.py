"""What the supervisor and its workers say to each other (fastpath.workers), and how the
workers' counters add up. Pure: no sockets, no processes.

One JSON object per line each way over a socket pair per worker:

    supervisor -> worker  {"seq": N, "op": "backends", "backends": [[ip, weight], ...],
                           "down": [ip, ...]}        Balancer.set_backends
                          {"seq": N, "op": "next_hop", "mac": "aa:bb:cc:dd:ee:ff"}
                          {"seq": N, "op": "stats"}  -> the worker's WorkerStats as a dict
                          {"seq": N, "op": "flow", "flow": [src, sport, dst, dport, proto]}
                                                     Balancer.flow: where its table has it
    worker -> supervisor  {"seq": N, "ok": true, "result": ...} or {"seq": N, "ok": false,
                           "error": "why"}; first, unasked, {"seq": 0, "ok": true,
                           "result": {"ready": true, "pid", "cpu", "group"}} once it forwards

Summing (`merge`) is generic over the stats dataclasses rendered as dicts: integers add, dicts
add key by key (drops by reason, frames per backend), anything else is taken from the first
worker. So a counter added to CoreStats or IoStats later sums without a change here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from fastpath.balancer import Balancer
from fastpath.counters import Counters
from fastpath.stats import CoreStats, FlowStats, IoStats

MAX_LINE = 1 << 22
"""Longest line accepted (a stats reply with 64 backends is a few KiB)."""


class ProtocolError(Exception):
    """A line from the other end that is not one of the messages above (a bug, not input)."""


def encode(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


class LineReader:
    """Bytes in as they arrive, whole JSON objects out."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> Iterator[dict[str, Any]]:
        self._buf += data
        while True:
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > MAX_LINE:
                    raise ProtocolError(f"line over {MAX_LINE} bytes")
                return
            line = bytes(self._buf[:end])
            del self._buf[: end + 1]
            try:
                msg = json.loads(line)
            except ValueError as exc:
                raise ProtocolError(f"not JSON: {exc}: {line[:80]!r}") from None
            if not isinstance(msg, dict) or not isinstance(msg.get("seq"), int):
                raise ProtocolError(f"not an object with an integer seq: {line[:80]!r}")
            yield msg


def merge(values: Sequence[Any]) -> Any:
    """The sum of the workers' `values` (one per worker, alike in shape; see the module
    docstring). Booleans are not counters: taken from the first, as strings are."""
    if not values:
        raise ValueError("merge of nothing")
    first = values[0]
    if isinstance(first, int) and not isinstance(first, bool):
        return sum(values)
    if isinstance(first, dict):
        keys: dict[str, None] = {}
        for v in values:
            keys.update(dict.fromkeys(v))
        return {k: merge([v[k] for v in values if k in v]) for k in keys}
    return first


@dataclass
class BackendCounts:
    """One backend's counts in one worker (summed over its backend ids)."""

    packets: int = 0
    bytes: int = 0
    connections: int = 0
    active_flows: int = 0


@dataclass
class WorkerStats:
    """What a worker answers to `stats`: its own counters (the supervisor sums them)."""

    worker: int
    """Its index, 0..N-1."""
    pid: int
    cpu: int | None
    """The CPU it is pinned to."""
    core: CoreStats
    io: IoStats
    kernel_drops: int
    """Frames the kernel could not put in its ring, since start."""
    tracked_flows: int
    """Flows in its connection table."""
    per_backend: dict[str, BackendCounts] = field(default_factory=dict)
    """Counts per backend IP (backends that left the set included)."""
    flows: FlowStats = field(default_factory=FlowStats)
    """Its connection table's flow counters (summed: insert_rate is then the LB's cap, one
    per worker added up)."""

    @classmethod
    def of(
        cls, worker: int, pid: int, cpu: int | None, b: Balancer, io: IoStats, kernel_drops: int
    ) -> WorkerStats:
        c = b.counters
        packets, nbytes = c.per_backend(c.forwarded), c.per_backend(c.forwarded_bytes)
        conns = c.per_backend(c.connections)
        per = {
            ip: BackendCounts(packets[ip], nbytes[ip], conns[ip], b.tracked(ip)) for ip in packets
        }
        return cls(
            worker, pid, cpu, CoreStats.of(c), io, kernel_drops, len(b.conntrack), per,
            FlowStats.of(b.conntrack),
        )  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def counters_of(per_backend: dict[str, dict[str, int]]) -> Counters:
    """A Counters with one id per backend holding the summed per-backend counts (what
    fastpath.backends.Backends reads from its core)."""
    c = Counters()
    for ip, counts in per_backend.items():
        bid = c.new_backend(ip)
        c.forwarded[bid] = counts.get("packets", 0)
        c.forwarded_bytes[bid] = counts.get("bytes", 0)
        c.connections[bid] = counts.get("connections", 0)
    return c
