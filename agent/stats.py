"""The agent's stats schema: every field once, typed, with what it means. The JSON lines on
stdout and the stats file (l4lb.statsfile; default /run/l4lb/agent-IFACE.json) render
`AgentStats.as_dict()`; whatever reports counters next renders the same object."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from agent.counters import DecapCounters, DecapDrop


@dataclass
class HealthStats:
    """The agent's health checks of its server (agent.health, agent.healthsvc)."""

    verdict: str
    """"up", "down" or "unknown" (no check finished yet): what every LB is told."""
    since: float
    """Unix time of the verdict's last change."""
    suppressed: bool
    """Held down by dampening (a flapping server), whatever its checks say now."""
    penalty: float
    """The flap penalty now (each up->down adds 1; halves every half_life)."""
    changes: int
    """Verdict changes since start."""
    checks: int
    """HTTP checks finished."""
    check_failures: int
    """HTTP checks failed."""
    last_check: str
    """The last check's outcome."""
    probes: int
    """LB probes answered: tunnelled UDP to VIP:port, inside `delivered` but not client
    traffic (client packets = delivered - probes)."""
    malformed: dict[str, int]
    """Datagrams to VIP:port ignored, by reason (l4lb.healthwire.BadMessage; zeros left out)."""
    pushes: int
    """Replies pushed unasked to LBs on a verdict change."""
    socket_errors: int
    """Replies the socket refused and errors it reported (lost, counted)."""
    lbs: list[str]
    """The LBs (address:port) that probed lately: the ones a change is pushed to."""
    instance: str
    """This agent start's id (hex), as its replies carry it."""


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
    ring_resyncs: int = 0
    """Times the receive loop moved to where the kernel's ring continues (l4lb.rxloop)."""
    health: HealthStats | None = None
    """The health checks (None when the agent runs without them)."""

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
        health: HealthStats | None = None,
        ring_resyncs: int = 0,
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
            ring_resyncs=ring_resyncs,
            health=health,
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
