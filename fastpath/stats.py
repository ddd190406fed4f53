"""The load balancer's stats schema: every field once, typed, with what it means. The JSON line
on stdout and the stats file (l4lb.statsfile; default /run/l4lb/lb-IFACE.json) render
`LbStats.as_dict()`; whatever reports counters next (a control channel, an exporter) renders
the same object."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from fastpath.conntrack import ConnTable, FlowEvent
from fastpath.counters import Counters, DropReason


@dataclass
class CoreStats:
    """The packet core's verdicts: every frame is counted once, forwarded or in one drop."""

    frames: int
    """Frames seen: forwarded + every drop (frag_needed included)."""
    forwarded: int
    """Frames sent IP-in-IP to a backend."""
    icmp_frag_needed_sent: int
    """ICMP frag-needed replies sent to senders (the same count as drops.frag_needed)."""
    drops: dict[str, int]
    """Frames not forwarded, by reason (fastpath.counters.DropReason, in lower case)."""
    backends: dict[str, int]
    """Frames forwarded per backend IP (backends that left the set included)."""

    @classmethod
    def of(cls, c: Counters) -> CoreStats:
        return cls(
            frames=c.total,
            forwarded=sum(c.forwarded),
            icmp_frag_needed_sent=c.drops[DropReason.FRAG_NEEDED],
            drops={r.name.lower(): c.drops[r] for r in DropReason},
            backends=c.per_backend(c.forwarded),
        )


@dataclass
class FlowStats:
    """The connection table's flows and its SYN flood defence (fastpath.conntrack)."""

    established: int = 0
    """Established flows tracked now (the same count as tracked_flows)."""
    half_open: int = 0
    """Half-open flows tracked now (a bare SYN seen, nothing else yet)."""
    new_flows: int = 0
    """New flows inserted (half-open, non-SYN misses, UDP/ICMP), since start."""
    nonsyn_miss: int = 0
    """TCP packets not a bare SYN of a flow not tracked (another LB's flow, or this LB's
    before a restart): forwarded by the lookup table, tracked as established (under the cap)."""
    flood_bypass: int = 0
    """New flows over the insert cap: forwarded by the lookup table, not tracked."""
    evictions: int = 0
    """Half-open flows dropped without being promoted (for room, or aged out)."""
    promoted: int = 0
    """Half-open flows promoted to established by a packet not a bare SYN."""
    insert_rate: int = 0
    """The cap: most new flows inserted per second (0: no cap)."""
    rotations: int = 0
    """Generation changes of the established flows (by time or for room), since start: one
    per conn_idle_timeout when nothing fills them; SYNs never cause one."""

    @classmethod
    def of(cls, ct: ConnTable) -> FlowStats:
        e = ct.events
        return cls(
            established=len(ct),
            half_open=ct.half_open,
            new_flows=e[FlowEvent.NEW],
            nonsyn_miss=e[FlowEvent.NONSYN_MISS],
            flood_bypass=e[FlowEvent.FLOOD_BYPASS],
            evictions=e[FlowEvent.EVICTIONS],
            promoted=e[FlowEvent.PROMOTED],
            insert_rate=ct.insert_rate,
            rotations=ct.rotations,
        )


@dataclass
class BackendStats:
    """One backend of the set now (fastpath.backends): configuration, health, effect, counts."""

    ip: str
    name: str | None
    """Its host name, when the LB knows it."""
    weight: int
    """Configured weight (0: drained)."""
    admin: str
    """Administrative state: up or down."""
    health: str
    """up, down, or unknown (no verdict yet)."""
    health_since: float
    """Unix time of the last health change (of joining the set while unknown)."""
    health_for_s: float
    """Seconds in that health state."""
    check_failures: int
    """Health checks reported failed since it joined the set."""
    last_reason: str
    """The last health check's reason."""
    state: str
    """What it does now: active, draining, admin_down, unhealthy, or fail_open (health down,
    used because no backend is healthy)."""
    slots: int
    """Lookup-table slots it owns: its share of new flows is slots / table.size."""
    active_flows: int
    """Established flows tracked to it in the connection table now (a flow stays tracked
    until it idles out: conn_idle_timeout, at most twice that); half-open ones not counted."""
    connections: int
    """Flows the connection table started tracking to it (new connections), since start."""
    packets: int
    """Frames forwarded to it since start."""
    bytes: int
    """Bytes of the inner IPv4 packets forwarded to it (their total length), since start."""
    pps: float
    """Frames per second forwarded to it, over the last stats interval."""
    bps: float
    """Inner bytes per second forwarded to it, over the last stats interval."""


@dataclass
class TableStats:
    """The lookup table (fastpath.lookup_table.RendezvousTable)."""

    size: int
    """Slots."""
    digest: str
    """xxh64 of every slot's backend address: equal on every LB with the same set."""
    changes: int = 0
    """Changes applied since start (not counting the first build)."""
    last_build_ms: float = 0.0
    """Time the last change took the packet loop (table update and templates)."""
    last_slots_moved: int = 0
    """Slots that changed backend in the last change."""


@dataclass
class IoStats:
    """What the I/O edge saw (fastpath.forward)."""

    rx_frames: int = 0
    """Frames taken from the ring."""
    rx_truncated: int = 0
    """Frames longer than a ring slot (cut by the kernel) that the core dropped for it."""
    rx_csum_completed: int = 0
    """Frames whose TCP/UDP checksum a local sender's offload left partial, completed before
    forwarding (l4lb.checksum.complete_l4_checksum)."""
    tx_frames: int = 0
    """Frames handed to the kernel by sendmmsg."""
    tx_errors: int = 0
    """Frames sendmmsg refused (e.g. ENOBUFS): lost, counted."""
    batches: int = 0
    """Non-empty receive batches (rx_frames / batches is the mean batch size)."""
    wakeups: int = 0
    """poll() calls on an empty ring."""
    socket_errors: int = 0
    """Errors the ring's socket reported, each read and cleared (ENETDOWN: IFACE went down)."""
    ring_resyncs: int = 0
    """Times the receive loop moved to where the kernel's ring continues (l4lb.rxloop)."""
    ring_waiting: int = 0
    """Ring slots holding a frame not yet taken, when the snapshot was made (counted then, not
    per packet). Above 0 while rx_frames stands still, the loop waits on a slot the kernel is
    not filling: the ring's and the loop's positions disagree (bench/synflood's `stall`)."""


@dataclass
class AnnounceStats:
    """The VIP announcement this LB holds (fastpath.announce), as seen from here: BIRD on the
    host has the last word (`controller lb list` asks it too)."""

    tun: str
    """The TUN device whose far end is BIRD's next hop for the VIP."""
    wanted: bool
    """Announcing is in force (False once withdrawn: SIGTERM)."""
    announced: bool
    """The BFD session to BIRD is Up: its static VIP route, and so the VIP, is valid."""
    since: float
    """Unix time the BFD session entered its state."""
    bfd_state: str
    """Our BFD session: ADMIN_DOWN, DOWN, INIT or UP."""
    peer_state: str | None
    """The state in BIRD's last BFD packet (None: nothing heard)."""
    withdraw_confirmed: bool
    """Withdrawn, and BIRD has said its session is Down."""
    sent: int
    """BFD packets sent."""
    received: int
    """BFD packets taken (not discarded)."""
    discarded: dict[str, int]
    """Packets read from the TUN and dropped, by reason (fastpath.bfd.Discard, lower case)."""
    tx_gap_max_ms: float
    """The longest time between two BFD packets sent while Up: BIRD withdraws us once it
    exceeds multiplier x interval (300 ms by default), so this is how close the loop came."""
    send_errors: int
    """BFD packets the TUN refused."""


@dataclass
class DrainStats:
    """How the graceful stop went (in the LB's stats from the signal on)."""

    phase: str
    """running, withdrawing, draining or done."""
    began: float
    """Unix time of the signal."""
    announced: bool
    """The announcement was up at the signal (else the stop is immediate)."""
    confirmed_ms: float | None
    """When BIRD acknowledged the withdraw, after the signal (None: not (yet), or timed out)."""
    last_frame_ms: float | None
    """The last VIP frame seen, after the signal (None: none came)."""
    frames: int
    """VIP frames handled from the signal on."""
    stopped_ms: float | None
    """When the loop was told to stop, after the signal."""
    reason: str
    """Why it stopped: quiet, cap, not_announced (or empty while it goes on)."""


@dataclass
class BackendHealthStats:
    """One backend's health as this LB sees it (fastpath.health)."""

    healthy: bool
    """What this LB applies: reachable and the agent's verdict not down."""
    reachable: bool
    """The agent answers probes through the tunnel (fall misses make it false)."""
    verdict: str
    """The agent's verdict on its server: "up", "down" (it believes "up" until told)."""
    suppressed: bool
    """The agent holds the server down for flapping (dampening)."""
    since: float
    """Unix time `healthy` last changed (or the LB started)."""
    reason: str
    """Why it is what it is (the last change's cause)."""
    agent_since: float | None
    """Unix time the agent's verdict last changed, as the agent says."""
    check_failures: int
    """The agent's failed HTTP checks since it started."""
    last_check: str
    """The agent's last check outcome."""
    probes: int
    """Probes sent (not client traffic: not in core.backends)."""
    replies: int
    missed: int
    """Probes not answered within the timeout."""
    late: int
    """Replies that came after their timeout (ignored)."""
    pushes: int
    """Verdicts the agent pushed on a change."""
    rtt_ms: float | None
    """The last probe's round trip."""
    agent_restarts: int
    """Changes of the agent's instance id seen."""
    table_changes: int
    """Health changes of this backend that changed the lookup table."""


@dataclass
class ProberStats:
    """The LB's health probing."""

    token: str
    """This LB's probe token (hex): replies must echo it."""
    backends: dict[str, BackendHealthStats]
    """Per backend IP."""
    malformed: dict[str, int]
    """Replies ignored, by reason (l4lb.healthwire.BadMessage; zeros left out)."""
    unknown_seq: int
    """Replies carrying this LB's token for no probe awaiting one (late, duplicated)."""
    socket_errors: int = 0
    """Probes the raw socket refused (counted as missed when their time runs out) and errors
    the reply socket reported."""


@dataclass
class LbStats:
    """One snapshot of a running `fastpath.lb`."""

    time: float
    """Unix time of the snapshot."""
    iface: str
    """The interface tapped and sent on."""
    pid: int
    """The process id."""
    uptime_s: float
    """Seconds since start."""
    final: bool
    """True in the snapshot written at exit (the stats file keeps it)."""
    rx_pps: int
    """Frames per second taken from the ring since the previous snapshot."""
    tx_pps: int
    """Frames per second sent since the previous snapshot."""
    core: CoreStats
    """The packet core's verdicts."""
    io: IoStats
    """Ring and send counters."""
    kernel_drops: int
    """Frames the kernel could not put in the ring because it was full."""
    tracked_flows: int
    """Established flows in the connection table (half-open ones: flows.half_open)."""
    next_hop_mac: str
    """Ethernet destination of the frames sent (learned and refreshed, or given)."""
    rps_cpus: str | None
    """The interface's RPS mask while the LB runs (hex), None when left alone."""
    nft_dropped: int | None
    """Frames the nftables ingress drop counted (final snapshot only; None before or without)."""
    backends: list[BackendStats] = field(default_factory=list)
    """The backend set, in its order."""
    fail_open: bool = False
    """No backend is healthy: the table ignores health (fastpath.backends)."""
    table: TableStats | None = None
    """The lookup table (None only in a snapshot made without one, in tests)."""
    health: ProberStats | None = None
    """Health probing of the backends (None when the LB runs without health checks)."""
    announce: AnnounceStats | None = None
    """The VIP announcement (None when the LB does not announce)."""
    drain: DrainStats | None = None
    """The graceful stop, from the first SIGTERM on (None before)."""
    workers: list[dict[str, Any]] | None = None
    """Each worker's own counters (fastpath.workerproto.WorkerStats: worker, pid, cpu, core,
    io, kernel_drops, tracked_flows, per_backend), whose sums are the fields above; None for
    a single-process LB (`--workers 1`)."""
    flows: FlowStats = field(default_factory=FlowStats)
    """The connection table's flow counters (new flows, SYN flood defence)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
