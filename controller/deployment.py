"""The deployment: which topology, the VIP, which hosts balance and which serve.

All roles are configuration (`controller/deployment.json`); paths inside the file resolve
relative to the file itself, except `www_root`, which is relative to the repository root.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import check_mss
from controller.exporter.config import DEFAULT_PORT, check_port
from controller.topology import Topology, TopologyError, load_topology
from fastpath.config import BFD_INTERVAL_MS, BFD_MULTIPLIER, check_hash_seed, check_workers
from l4lb import cfgfile
from l4lb.errors import ConfigError
from l4lb.healthcfg import HealthConfig

DEFAULT_HEALTH = HealthConfig()
REPO_ROOT: Path = Path(__file__).resolve().parent.parent
DEFAULT_DEPLOYMENT: Path = Path(__file__).resolve().parent / "deployment.json"


class DeploymentError(ValueError):
    """A deployment file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class BgpSettings:
    """The `bgp` object of the deployment file (every key optional): how the LB hosts announce
    the VIP to their ToR (controller/bgp.py)."""

    tor_asn: int = 65000
    """AS number of the ToR switches the load balancers peer with."""
    lb_asn: int = 65001
    """AS number of every load-balancer host (eBGP to its ToR)."""
    bfd_interval_ms: int = 100
    """BFD transmit and receive interval, on the BGP sessions and on each LB's announcement."""
    bfd_multiplier: int = 3
    """BFD detect multiplier: a silent peer is down after multiplier x interval."""

    @property
    def detect_ms(self) -> int:
        return self.bfd_interval_ms * self.bfd_multiplier


_BGP_LIMITS = {
    "tor_asn": (1, 4294967294),
    "lb_asn": (1, 4294967294),
    "bfd_interval_ms": BFD_INTERVAL_MS,  # the LB's own rule (fastpath.config.check_bfd)
    "bfd_multiplier": BFD_MULTIPLIER,
}


def parse_bgp(data: object, source: str) -> BgpSettings:
    """The `bgp` object: each key an integer within its range; the message names the field."""
    if data is None:
        return BgpSettings()
    if not isinstance(data, dict):
        raise DeploymentError(f"{source}: bgp must be an object")
    unknown = sorted(set(data) - set(_BGP_LIMITS))
    if unknown:
        raise DeploymentError(
            f"{source}: bgp: unknown key(s) {unknown} (known: {', '.join(_BGP_LIMITS)})"
        )
    values: dict[str, int] = {}
    for key, (low, high) in _BGP_LIMITS.items():
        if key not in data:
            continue
        v = data[key]
        if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
            raise DeploymentError(f"{source}: bgp.{key} must be an integer in {low}..{high}")
        values[key] = v
    settings = BgpSettings(**values)
    if settings.tor_asn == settings.lb_asn:
        raise DeploymentError(
            f"{source}: bgp.lb_asn and bgp.tor_asn are both {settings.lb_asn}: the sessions "
            "are eBGP, so the LBs need an AS of their own"
        )
    return settings


@dataclass(frozen=True)
class Deployment:
    topology: Topology
    vip: str
    """The virtual IP clients connect to, "20.0.0.1"."""
    vip_ports: tuple[int, ...]
    """TCP/UDP ports served on the VIP."""
    load_balancers: tuple[str, ...]
    """Hosts running the load balancer; the fabric splits VIP traffic between them."""
    backends: tuple[tuple[str, int], ...]
    """(host name, Maglev weight), in the file's order."""
    hash_seed: int
    """Seed of the 5-tuple hash, shared by every load-balancer instance."""
    server_mss: int
    """MSS the servers advertise, leaving room for the 20-byte IP-in-IP header."""
    www_root: Path
    """Files the backend web servers serve."""
    mtu: int = 1500
    """The fabric's MTU (the veth default): server_mss + 60 must fit in it."""
    health: HealthConfig | None = DEFAULT_HEALTH
    """Health checks of every backend (l4lb.healthcfg; the file's `health` object over the
    defaults), rendered into every LB's and agent's configuration; None (`"health": null`):
    none, every backend counts as healthy."""
    metrics_port: int = DEFAULT_PORT
    """TCP port of every LB's and agent's Prometheus exporter, on its host's own address."""
    source: str = "<deployment>"
    """Where it came from, for messages."""
    path: Path | None = None
    """The file it was read from, if it was read from one."""
    bgp: BgpSettings = BgpSettings()
    """AS numbers and BFD timers of the VIP announcements."""
    lb_workers: int = 1
    """Forwarding processes per load balancer (LbConfig.workers; fastpath.workers)."""
    conn: tuple[tuple[str, int | float], ...] = ()
    """The connection-table keys the file gives (CONN_KEYS: LbConfig's fields of the same
    names), rendered into every LB's configuration; the others keep the LB's defaults."""

    def backend_ips(self) -> tuple[tuple[str, int], ...]:
        """(backend IP, weight), in the file's order."""
        return tuple((self.topology.host_ip(h), w) for h, w in self.backends)

    def vip_sources(self) -> tuple[str, ...]:
        """Hosts that send packets from the VIP: the backends (DSR replies) and the load
        balancers (ICMP fragmentation-needed; haproxy mode's replies). The fabric's source
        guard lets the VIP through from these hosts only (controller.routes.source_guard)."""
        return (*self.load_balancers, *(h for h, _ in self.backends))

    def clients(self) -> list[str]:
        """Hosts that are neither load balancers nor backends, natural order."""
        busy = set(self.load_balancers) | {h for h, _ in self.backends}
        return [h for h in self.topology.hosts() if h not in busy]


CONN_KEYS = (
    "conn_capacity",
    "conn_idle_timeout",
    "conn_half_open_capacity",
    "conn_half_open_timeout",
    "conn_insert_rate",
)
"""Optional keys of the connection table (fastpath.config.LbConfig's fields, checked by its
rule, fastpath.config.check_conn, as the LB configurations are rendered): capacity, timeouts,
and the SYN flood's insert cap."""

KEYS = frozenset(
    {
        *CONN_KEYS,
        "topology",
        "vip",
        "vip_ports",
        "load_balancers",
        "backends",
        "hash_seed",
        "server_mss",
        "www_root",
        "mtu",
        "health",
        "bgp",
        "metrics_port",
        "lb_workers",
    }
)
"""Every key a deployment file may have: any other is a typo, refused with its name."""


def _need(data: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in data:
        raise DeploymentError(f"{where}: missing key {key!r}")
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DeploymentError(f"{where}: key {key!r} must be {kind.__name__}")
    return value


def parse_deployment(
    data: object,
    topology: Topology,
    base: Path,
    source: str = "<deployment>",
    path: Path | None = None,
) -> Deployment:
    """Validate decoded JSON against the topology. `base` resolves `www_root`."""
    if not isinstance(data, dict):
        raise DeploymentError(f"{source}: top level must be an object")
    unknown = sorted(set(data) - KEYS)
    if unknown:
        raise DeploymentError(
            f"{source}: unknown key(s) {', '.join(map(repr, unknown))} "
            f"(known: {', '.join(sorted(KEYS))})"
        )
    vip = _need(data, "vip", str, source)
    try:
        ipaddress.IPv4Address(vip)
    except ValueError:
        raise DeploymentError(f"{source}: vip {vip!r} is not an IPv4 address") from None
    hosts = set(topology.hosts())
    if vip in {topology.host_ip(h) for h in hosts}:
        raise DeploymentError(f"{source}: vip {vip} is a host's address")
    ports = _need(data, "vip_ports", list, source)
    if not ports or not all(
        isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= 65535 for p in ports
    ):
        raise DeploymentError(f"{source}: vip_ports must be a non-empty list of ports 1..65535")
    lbs = _need(data, "load_balancers", list, source)
    backends = _need(data, "backends", dict, source)
    if not lbs:
        raise DeploymentError(f"{source}: load_balancers is empty")
    if not backends:
        raise DeploymentError(f"{source}: backends is empty")
    for h in [*lbs, *backends]:
        if h not in hosts:
            raise DeploymentError(f"{source}: {h!r} is not a host of {topology.source}")
    if len(set(lbs)) != len(lbs):
        raise DeploymentError(f"{source}: load_balancers lists a host twice")
    both = set(lbs) & set(backends)
    if both:
        raise DeploymentError(f"{source}: {sorted(both)} both load balancer and backend")
    for h, w in backends.items():
        if not isinstance(w, int) or isinstance(w, bool) or w < 0:
            raise DeploymentError(f"{source}: backend {h!r} weight must be an integer >= 0")
    if not any(backends.values()):
        raise DeploymentError(f"{source}: every backend weight is 0")
    seed = _need(data, "hash_seed", int, source)
    mss = _need(data, "server_mss", int, source)
    mtu = data.get("mtu", 1500)
    if isinstance(mtu, bool) or not isinstance(mtu, int) or not 576 <= mtu <= 65535:
        raise DeploymentError(f"{source}: mtu must be an integer 576..65535, not {mtu!r}")
    metrics_port = data.get("metrics_port", DEFAULT_PORT)
    lb_workers = data.get("lb_workers", 1)
    conn = tuple((k, data[k]) for k in CONN_KEYS if k in data)
    try:  # the data planes' own rules (one definition each), on the deployment's values
        check_workers(lb_workers, "lb_workers")
        check_hash_seed(seed)
        check_mss(mss, mtu)
        check_port("metrics_port", metrics_port)
    except ConfigError as exc:
        raise DeploymentError(f"{source}: {exc}") from None
    www = _need(data, "www_root", str, source)
    health_data = data.get("health", {})
    try:
        health = (
            None
            if health_data is None
            else cfgfile.from_dict(HealthConfig, health_data, f"{source}: health")
        )
    except ConfigError as exc:
        raise DeploymentError(str(exc)) from None
    bgp = parse_bgp(data.get("bgp"), source)
    dep = Deployment(
        topology=topology,
        vip=vip,
        vip_ports=tuple(ports),
        load_balancers=tuple(lbs),
        backends=tuple(backends.items()),
        hash_seed=seed,
        server_mss=mss,
        www_root=(base / www).resolve(),
        mtu=mtu,
        health=health,
        metrics_port=metrics_port,
        source=source,
        path=path,
        bgp=bgp,
        lb_workers=lb_workers,
        conn=conn,
    )
    from controller import render  # render imports this module

    try:  # every process's configuration must build: the rest of the data planes' rules
        for host in dep.load_balancers:
            render.lb_config(dep, host)
        for host, _ in dep.backends:
            render.agent_config(dep, host)
    except ConfigError as exc:
        raise DeploymentError(f"{source}: {exc}") from None
    return dep


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON objects keep the last of two equal keys: here a repeated key (two entries for one
    backend, say) is an error, named."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DeploymentError(f"{key!r} listed twice")
        out[key] = value
    return out


def with_topology(dep: Deployment, topology: Topology) -> Deployment:
    """The same deployment over another topology (`--topo`), checked again."""
    data = {
        "vip": dep.vip,
        "vip_ports": list(dep.vip_ports),
        "load_balancers": list(dep.load_balancers),
        "backends": dict(dep.backends),
        "hash_seed": dep.hash_seed,
        "server_mss": dep.server_mss,
        "www_root": str(dep.www_root),
        "mtu": dep.mtu,
        "health": cfgfile.to_dict(dep.health) if dep.health is not None else None,
        "bgp": {
            "tor_asn": dep.bgp.tor_asn,
            "lb_asn": dep.bgp.lb_asn,
            "bfd_interval_ms": dep.bgp.bfd_interval_ms,
            "bfd_multiplier": dep.bgp.bfd_multiplier,
        },
        "metrics_port": dep.metrics_port,
        **dict(dep.conn),
    }
    return parse_deployment(data, topology, Path("/"), f"{dep.source} over {topology.source}")


def load_deployment(path: str | Path | None = None) -> Deployment:
    """Read the deployment file and the topology it names."""
    p = Path(path) if path is not None else DEFAULT_DEPLOYMENT
    try:
        data = json.loads(p.read_text(), object_pairs_hook=_no_duplicate_keys)
    except DeploymentError as e:
        raise DeploymentError(f"{p}: {e}") from None
    except OSError as e:
        raise DeploymentError(f"{p}: cannot read: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise DeploymentError(f"{p}: bad JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise DeploymentError(f"{p}: top level must be an object")
    topo_name = _need(data, "topology", str, str(p))
    try:
        topology = load_topology(p.parent / topo_name)
    except TopologyError as e:
        raise DeploymentError(f"{p}: topology: {e}") from None
    return parse_deployment(data, topology, REPO_ROOT, str(p), p.resolve())
