"""Route computation: for every switch, the canonical table entries of the course's ECMP program.

Pure: a Topology in, SwitchPrograms out. Every host's /24 is routed over all shortest paths
(ECMP wherever a switch has several next hops on them); the VIP (/32) is routed toward the
nearest load-balancer hosts the same way, so at their ToR it becomes an ECMP group over them.

Tables and actions (names and widths as in p4src/ecmp.p4):
- ipv4_lpm (lpm hdr.ipv4.dstAddr): set_nhop(dstAddr: 48, port: 9) | ecmp_group(ecmp_group_id:
  14, num_nhops: 16) | drop (the default);
- ecmp_group_to_nhop (exact meta.ecmp_group_id, exact meta.ecmp_hash): set_nhop | drop.
Group ids count from 1 per switch, one group per distinct set of next hops; group members are
ordered by egress port, so index i of a group is its i-th lowest port.

Source guard (BCP 38 at the edge), table src_guard (exact standard_metadata.ingress_port, lpm
hdr.ipv4.srcAddr): src_allow | src_deny (drop, counted per port in the counter src_denied);
the default src_allow lets everything from a switch port through. For each host port of a ToR:
the host's own address/32 and, for a host that sends from the VIP (a backend's DSR replies,
a load balancer's ICMP fragmentation-needed and haproxy mode's replies), the VIP/32 are
allowed; 0.0.0.0/0 from that port is denied. So a host can no longer forge another's address
(a client posing as a load balancer to a backend's agent).
"""

from __future__ import annotations

import ipaddress
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from controller.topology import Interface, Topology, TopologyError

IPV4_LPM = "ipv4_lpm"
ECMP_GROUP_TO_NHOP = "ecmp_group_to_nhop"
SET_NHOP = "set_nhop"
ECMP_GROUP = "ecmp_group"
DROP = "drop"
SRC_GUARD = "src_guard"
SRC_ALLOW = "src_allow"
SRC_DENY = "src_deny"
SRC_DENIED_COUNTER = "src_denied"  # indexed by ingress port
MAX_GROUP_ID = (1 << 14) - 1  # ecmp_group_id is bit<14>


@dataclass(frozen=True)
class TableEntry:
    table: str
    action: str
    match: tuple[str, ...]
    params: tuple[str, ...]

    def cli(self) -> str:
        """simple_switch_CLI syntax: "table_add ipv4_lpm ecmp_group 20.0.0.1/32 => 1 2"."""
        return " ".join(["table_add", self.table, self.action, *self.match, "=>", *self.params])


@dataclass(frozen=True)
class DefaultAction:
    table: str
    action: str
    params: tuple[str, ...] = ()

    def cli(self) -> str:
        """simple_switch_CLI syntax: "table_set_default ipv4_lpm drop"."""
        return " ".join(["table_set_default", self.table, self.action, *self.params])


@dataclass(frozen=True)
class SwitchProgram:
    switch: str
    defaults: tuple[DefaultAction, ...]
    entries: tuple[TableEntry, ...]

    def cli_lines(self) -> list[str]:
        return [d.cli() for d in self.defaults] + [e.cli() for e in self.entries]


DEFAULTS = (
    DefaultAction(IPV4_LPM, DROP),
    DefaultAction(ECMP_GROUP_TO_NHOP, DROP),
    DefaultAction(SRC_GUARD, SRC_ALLOW),
)


def switch_distances(topo: Topology, target: str) -> dict[str, int]:
    """Hops from each switch to `target` over switch-switch links (BFS); unreachable: absent."""
    dist = {target: 0}
    todo = deque([target])
    while todo:
        s = todo.popleft()
        for iface in topo.switch_neighbors(s):
            if iface.peer not in dist:
                dist[iface.peer] = dist[s] + 1
                todo.append(iface.peer)
    return dist


def next_hops(
    topo: Topology, switch: str, dests: Sequence[str], dist: dict[str, dict[str, int]]
) -> list[Interface]:
    """The switch's egress interfaces on every shortest path to the nearest of `dests` (hosts).

    `dist[tor][s]` is switch s's distance to the ToR `tor`. Sorted by port.
    """
    cost: dict[str, int] = {}
    for h in dests:
        tor = topo.gateway(h).node
        if switch in dist[tor]:
            cost[h] = dist[tor][switch] + 1
    if not cost:
        raise TopologyError(f"{topo.source}: switch {switch!r} cannot reach {', '.join(dests)}")
    best = min(cost.values())
    out: dict[int, Interface] = {}
    for h, c in cost.items():
        if c != best:
            continue
        gw = topo.gateway(h)
        if gw.node == switch:
            out[gw.port] = gw
            continue
        d = dist[gw.node]
        for iface in topo.switch_neighbors(switch):
            if d.get(iface.peer) == d[switch] - 1:
                out[iface.port] = iface
    return [out[p] for p in sorted(out)]


def source_guard(
    topo: Topology, switch: str, vip: str, vip_sources: Sequence[str]
) -> list[TableEntry]:
    """src_guard entries of one switch: per host port, its host's address (and the VIP for the
    hosts in `vip_sources`) allowed, anything else denied; none on a switch without hosts."""
    out: list[TableEntry] = []
    for port, iface in sorted(topo.node(switch).interfaces.items()):
        peer = topo.nodes[iface.peer]
        if peer.kind != "host":
            continue
        allowed = [topo.host_ip(peer.name)] + ([vip] if peer.name in vip_sources else [])
        out += [TableEntry(SRC_GUARD, SRC_ALLOW, (str(port), f"{a}/32"), ()) for a in allowed]
        out.append(TableEntry(SRC_GUARD, SRC_DENY, (str(port), "0.0.0.0/0"), ()))
    return out


def compute_routes(
    topo: Topology,
    vip: str = "20.0.0.1",
    lb_hosts: Sequence[str] = ("h1", "h2"),
    vip_sources: Sequence[str] | None = None,
) -> dict[str, SwitchProgram]:
    """The table entries of every switch: each host's /24 and the VIP's /32, then the source
    guard of its host ports, by switch name. `vip_sources`: the hosts allowed to send from the
    VIP (default: the load balancers; a deployment adds its backends, Deployment.vip_sources)."""
    try:
        ipaddress.IPv4Address(vip)
    except ValueError:
        raise TopologyError(f"vip {vip!r} is not an IPv4 address") from None
    if not lb_hosts:
        raise TopologyError("no load-balancer hosts for the VIP")
    hosts = topo.hosts()
    for h in lb_hosts:
        if h not in hosts:
            raise TopologyError(f"{topo.source}: load-balancer {h!r} is not a host")
    tors = {topo.gateway(h).node for h in hosts}
    dist = {t: switch_distances(topo, t) for t in sorted(tors)}
    # the VIP first, so that where it is a group (at the LBs' ToR) it is group 1
    routes = [(f"{vip}/32", list(lb_hosts))]
    routes += [
        (str(ipaddress.ip_interface(topo.host_interface(h).ip or "").network), [h]) for h in hosts
    ]

    programs: dict[str, SwitchProgram] = {}
    for sw in topo.switches():
        groups: dict[tuple[tuple[int, str], ...], int] = {}
        lpm: list[TableEntry] = []
        for prefix, dests in routes:
            hops = tuple((i.port, topo.peer(i).mac) for i in next_hops(topo, sw, dests, dist))
            if len(hops) == 1:
                port, mac = hops[0]
                lpm.append(TableEntry(IPV4_LPM, SET_NHOP, (prefix,), (mac, str(port))))
                continue
            gid = groups.setdefault(hops, len(groups) + 1)
            if gid > MAX_GROUP_ID:
                raise TopologyError(
                    f"{topo.source}: switch {sw!r} needs over {MAX_GROUP_ID} groups"
                )
            lpm.append(TableEntry(IPV4_LPM, ECMP_GROUP, (prefix,), (str(gid), str(len(hops)))))
        members = [
            TableEntry(ECMP_GROUP_TO_NHOP, SET_NHOP, (str(gid), str(idx)), (mac, str(port)))
            for hops, gid in groups.items()
            for idx, (port, mac) in enumerate(hops)
        ]
        guard = source_guard(topo, sw, vip, lb_hosts if vip_sources is None else vip_sources)
        programs[sw] = SwitchProgram(sw, DEFAULTS, tuple(lpm + members + guard))
    return programs
