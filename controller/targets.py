"""What the monitoring reaches, rendered from the deployment: every exporter (its host, kind,
address, port and the pin of its host's namespace) and the fabric's nodes and links.

controller.render writes it into `<state dir>/config/monitor.json` with the processes'
configurations; the scrape proxy (which namespace serves an address), Prometheus' scrape
configuration (controller.monitor) and the dashboard (what to draw and whom to ask) read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from controller import netstate
from l4lb import cfgfile

if TYPE_CHECKING:
    from controller.deployment import Deployment

FILE = "monitor.json"


@dataclass(frozen=True)
class Target:
    host: str
    kind: str
    """"lb" or "agent"."""
    addr: str
    port: int
    netns: str
    """The pinned network namespace of the host (controller.netstate.pin_netns)."""

    @property
    def address(self) -> str:
        return f"{self.addr}:{self.port}"


@dataclass(frozen=True)
class NodeInfo:
    name: str
    kind: str
    """"host" or "switch"."""
    role: str
    """Hosts: "lb", "backend" or "client"; switches: "tor", "agg" or "core" (by distance from
    the hosts)."""


@dataclass(frozen=True)
class Link:
    a: str
    a_if: str
    b: str
    b_if: str


@dataclass(frozen=True)
class MonitorConfig:
    vip: str
    targets: tuple[Target, ...]
    nodes: tuple[NodeInfo, ...]
    links: tuple[Link, ...]

    def target(self, address: str) -> Target | None:
        """The exporter at "ip:port", if it is one of ours."""
        return next((t for t in self.targets if t.address == address), None)


def path(state_dir: Path) -> Path:
    return state_dir / "config" / FILE


def switch_roles(dep: Deployment) -> dict[str, str]:
    """tor / agg / core by hops from the nearest host (1, 2, 3 and beyond)."""
    topo = dep.topology
    level = {h: 0 for h in topo.hosts()}
    frontier = list(level)
    while frontier:
        nxt = []
        for name in frontier:
            for iface in topo.node(name).interfaces.values():
                if iface.peer not in level:
                    level[iface.peer] = level[name] + 1
                    nxt.append(iface.peer)
        frontier = nxt
    names = {1: "tor", 2: "agg"}
    return {s: names.get(level.get(s, 3), "core") for s in topo.switches()}


def build(dep: Deployment, state_dir: Path = netstate.STATE_DIR) -> MonitorConfig:
    topo = dep.topology
    pins = state_dir / netstate.PIN_DIR
    targets = [
        Target(h, kind, topo.host_ip(h), dep.metrics_port, str(pins / h))
        for kind, hosts in (("lb", dep.load_balancers), ("agent", [h for h, _ in dep.backends]))
        for h in hosts
    ]
    roles = {h: "lb" for h in dep.load_balancers} | {h: "backend" for h, _ in dep.backends}
    nodes = [NodeInfo(h, "host", roles.get(h, "client")) for h in topo.hosts()]
    nodes += [NodeInfo(s, "switch", r) for s, r in switch_roles(dep).items()]
    links = [Link(a.node, a.name, b.node, b.name) for a, b in topo.links()]
    return MonitorConfig(dep.vip, tuple(targets), tuple(nodes), tuple(links))


def load(state_dir: Path = netstate.STATE_DIR) -> MonitorConfig:
    """The rendered file (ConfigError naming it when missing or malformed)."""
    return cfgfile.load(MonitorConfig, path(state_dir))
