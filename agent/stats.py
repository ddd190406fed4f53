"""The agent's stats schema: every field once, typed, with what it means. The JSON lines on
stdout and the stats file (l4lb.statsfile; default /run/l4lb/agent-IFACE.json) render
`AgentStats.as_dict()`; whatever reports counters next renders the same object."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from agent.counters import DecapCounters, DecapDrop


@dataclass
class AgentStats:
    """One snapshot of a running `agent.decap`."""

    event: str
    """"stats" (periodic) or "exit" (the last one, which the stats file keeps)."""
    iface: str
    """The fabric interface the tunnels arrive on."""
    time: float
    """Unix time of the snapshot."""
    uptime: float
    """Seconds since start."""
    frames: int
    """Frames seen: delivered + every drop (each frame counted exactly once)."""
    delivered: int
    """Inner packets handed to the local stack."""
    dropped: int
    """Frames not delivered (the sum of drops)."""
    partial_checksums: int
    """Delivered packets whose TCP/UDP checksum the client's offload left partial, handed
    over as CHECKSUM_PARTIAL (agent.core.Decapsulator.vnet_header_into)."""
    drops: dict[str, int]
    """Frames not delivered, by reason (agent.counters.DecapDrop, in lower case)."""
    ring_drops: int
    """Frames the kernel could not put in the ring because it was full."""
    last_spoofed_source: str | None
    """The latest outer source that was not an allowed load balancer, if any."""

    @classmethod
    def of(
        cls,
        c: DecapCounters,
        event: str,
        iface: str,
        time: float,
        uptime: float,
        ring_drops: int,
        last_spoofed_source: str | None,
    ) -> AgentStats:
        return cls(
            event=event,
            iface=iface,
            time=time,
            uptime=uptime,
            frames=c.total,
            delivered=c.delivered,
            dropped=sum(c.drops),
            partial_checksums=c.partial_checksums,
            drops={r.name.lower(): c.drops[r] for r in DecapDrop},
            ring_drops=ring_drops,
            last_spoofed_source=last_spoofed_source,
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
