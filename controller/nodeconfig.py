"""What each node of the emulated network needs besides its routes. Pure: Topology in, commands out.

- sysctls, set before the node has interfaces so the `default` values reach every new one:
  switches forward and hash L4 ports for multipath; hosts never forward (a load-balancer host
  that forwarded would send VIP packets back to its ToR until the TTL ran out); reverse-path
  filtering is off everywhere (DSR replies are asymmetric); IPv6 is off, so no router
  solicitations or DAD probes wander the fabric and show up in captures.
- links: one `ip -batch` in the root namespace creates every veth pair with both ends already
  in their nodes and with the topology's MACs.
- addresses and PERMANENT neighbour entries (hosts: their gateway; switches: every neighbour)
  and the host default route, so nothing waits for ARP.
"""

from __future__ import annotations

from collections.abc import Mapping

from controller.topology import Topology

Command = list[str]

SWITCH_SYSCTLS: dict[str, str] = {
    "net.ipv4.ip_forward": "1",
    "net.ipv4.fib_multipath_hash_policy": "1",  # L4: src, dst, proto, sport, dport
    "net.ipv4.conf.all.rp_filter": "0",
    "net.ipv4.conf.default.rp_filter": "0",
    "net.ipv6.conf.all.disable_ipv6": "1",
    "net.ipv6.conf.default.disable_ipv6": "1",
}
HOST_SYSCTLS: dict[str, str] = {
    "net.ipv4.ip_forward": "0",
    "net.ipv4.conf.all.rp_filter": "0",
    "net.ipv4.conf.default.rp_filter": "0",
    "net.ipv6.conf.all.disable_ipv6": "1",
    "net.ipv6.conf.default.disable_ipv6": "1",
}


def sysctls(topo: Topology, node: str) -> dict[str, str]:
    return dict(SWITCH_SYSCTLS if topo.node(node).kind == "switch" else HOST_SYSCTLS)


def sysctl_argv(settings: Mapping[str, str]) -> list[str]:
    return ["sysctl", "-q", "-w", *(f"{k}={v}" for k, v in settings.items())]


def link_commands(topo: Topology, pids: Mapping[str, int]) -> list[Command]:
    """`ip` commands, run in the root namespace, that create every link's veth pair."""
    out = []
    for a, b in topo.links():
        out.append(
            [
                *("ip", "link", "add", "name", a.name, "netns", str(pids[a.node]), "address"),
                *(a.mac, "type", "veth", "peer", "name", b.name, "netns", str(pids[b.node])),
                *("address", b.mac),
            ]
        )
    return out


def node_commands(topo: Topology, node: str) -> list[Command]:
    """`ip` commands, run in the node, for its interfaces, neighbours and default route."""
    n = topo.node(node)
    out: list[Command] = [["ip", "link", "set", "lo", "up"]]
    for _, iface in sorted(n.interfaces.items()):
        out.append(["ip", "link", "set", iface.name, "up"])
        if iface.ip is not None:
            out.append(["ip", "addr", "replace", iface.ip, "dev", iface.name])
        peer = topo.peer(iface)
        if peer.ip is not None:
            peer_ip = peer.ip.split("/")[0]
            out.append(
                [
                    *("ip", "neigh", "replace", peer_ip, "lladdr", peer.mac),
                    *("dev", iface.name, "nud", "permanent"),
                ]
            )
            if n.kind == "host":
                out.append(
                    [
                        "ip",
                        "route",
                        "replace",
                        "default",
                        "via",
                        peer_ip,
                        "dev",
                        iface.name,
                        "onlink",
                    ]
                )
    return out
