"""Load and validate a p4-utils style topology file, addressed as p4-utils' `l3` strategy does.

The file is the one `p4run --config` reads (keys `p4_src`, `topology.assignment_strategy`,
`topology.links`, `topology.hosts`, `topology.switches`); only the `l3` strategy is accepted.
Numbering, as nsg-ethz/p4-utils `p4utils/mininetlib/network_API.py` (`NetworkAPI.l3`) and
`p4utils/utils/helper.py` (`ip_address_to_mac`) do it:

- ports: a link's `port1`/`port2` options pin them (the shipped fat tree pins every one); an
  unpinned port gets what p4-utils' `NetworkAPI.auto_assignment()` would give it: links taken in
  mininet's natural order of (node1, node2) (`Topo.links(sort=True)`: `["a1", "c1"]` before
  `["t1", "a1"]`), each end the lowest port not yet used on its node (hosts from 0, switches
  from 1), pinned ports of later links included;
- thrift ports: a switch's `thrift_port` option pins it (the shipped file pins 9089 + device_id);
  an unpinned one gets p4-utils' rule: switches in natural name order (a1..a8, c1..c4, t1..t8),
  each the lowest free port from 9090. Older p4-utils (`p4run.py`'s AppRunner) numbered thrift
  ports in file order instead, which is why the p4 driver requires every number pinned
  (`require_pinned`): pinned, the file's numbers are the switches' numbers under any p4-utils;
- host hN on the switch with device id S: `10.S.N.2/24`; its gateway, the switch port,
  `10.S.N.1/24`;
  host MAC `00:00` + the hex octets of the host IP, switch port MAC `00:01` + the same octets;
- switch-switch link [A, B]: A gets `20.<id A>.<id B>.1/24`, B gets `20.<id A>.<id B>.2/24`.

p4-utils leaves switch-switch MACs to mininet (random). Ours are deterministic, in the same
style: `00:02` + the hex octets of the interface's 20.x.y.z address, so `t1-eth3` (20.1.9.1) is
`00:02:14:01:09:01`. Unique because the addresses are.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

DEFAULT_TOPOLOGY: Path = Path(__file__).resolve().parent / "topologies" / "fattree.json"

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_HOST_NAME = re.compile(r"^h([0-9]+)$")
_MAX_IFNAME = 15  # Linux IFNAMSIZ - 1
_MAX_ID = 253  # p4-utils asserts ids and host numbers < 254 (they become address octets)
_LINK_OPTIONS = frozenset({"port1", "port2"})
_SWITCH_OPTIONS = frozenset({"device_id", "thrift_port"})
THRIFT_BASE_PORT = 9090  # p4-utils' NetworkAPI.auto_thrift_port(base=9090)


class TopologyError(ValueError):
    """A topology file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class Interface:
    """One end of a link."""

    node: str
    port: int
    name: str  # "t1-eth1"; a host's is "<host>-eth0"
    mac: str
    ip: str | None  # with prefix length, "10.1.1.1/24"
    peer: str
    peer_port: int


@dataclass(frozen=True)
class Node:
    name: str
    kind: Literal["host", "switch"]
    device_id: int | None  # switches only
    interfaces: Mapping[int, Interface]  # by port number
    thrift_port: int | None = None  # switches only: pinned in the file, or p4-utils' rule


@dataclass(frozen=True)
class Topology:
    nodes: Mapping[str, Node]
    p4_src: str  # as written in the file (p4run resolves it from its working directory)
    source: str = "<topology>"  # file name, for messages
    link_order: tuple[tuple[str, int, str, int], ...] = ()  # (node1, port1, node2, port2)
    unpinned: tuple[str, ...] = ()
    """Switch numbers the file leaves to the loader ("t1: thrift_port", "link [t1, a1]: port1
    (t1)"); the p4 driver refuses to program while any is left (`require_pinned`)."""

    def node(self, name: str) -> Node:
        try:
            return self.nodes[name]
        except KeyError:
            raise TopologyError(f"{self.source}: unknown node {name!r}") from None

    def hosts(self) -> list[str]:
        """Host names in natural order (h1, h2, ..., h16)."""
        return sorted((n for n, v in self.nodes.items() if v.kind == "host"), key=natural_key)

    def switches(self) -> list[str]:
        """Switch names by device id (the file's order for the fat tree: t1..t8, a1..a8, c1..c4)."""
        sws = [v for v in self.nodes.values() if v.kind == "switch"]
        return [v.name for v in sorted(sws, key=lambda v: v.device_id or 0)]

    def _host(self, host: str) -> Node:
        node = self.node(host)
        if node.kind != "host":
            raise TopologyError(f"{self.source}: {host!r} is a switch, not a host")
        return node

    def host_interface(self, host: str) -> Interface:
        (iface,) = self._host(host).interfaces.values()
        return iface

    def host_ip(self, host: str) -> str:
        """The host's address without prefix length, "10.1.1.2"."""
        ip = self.host_interface(host).ip
        assert ip is not None  # every host interface is addressed at load time
        return ip.split("/")[0]

    def gateway(self, host: str) -> Interface:
        """The switch interface facing the host."""
        return self.peer(self.host_interface(host))

    def peer(self, iface: Interface) -> Interface:
        return self.nodes[iface.peer].interfaces[iface.peer_port]

    def links(self) -> list[tuple[Interface, Interface]]:
        """Links in file order, as (first end, second end)."""
        return [
            (self.nodes[a].interfaces[pa], self.nodes[b].interfaces[pb])
            for a, pa, b, pb in self.link_order
        ]

    def require_pinned(self) -> None:
        """Raise TopologyError unless every switch port and thrift port is pinned in the file:
        the p4 driver's rule, so that the numbers it uses are the ones p4run gives the
        switches whatever p4-utils version assigns the rest."""
        if self.unpinned:
            shown = "; ".join(self.unpinned[:6]) + ("; ..." if len(self.unpinned) > 6 else "")
            raise TopologyError(
                f"{self.source}: the p4 driver needs every switch port and thrift port pinned "
                f"(link option port1/port2, switch option thrift_port), so that p4run numbers "
                f"them as the controller does; {len(self.unpinned)} are not: {shown}"
            )

    def switch_neighbors(self, switch: str) -> list[Interface]:
        """The switch's interfaces that face other switches, by port."""
        node = self.node(switch)
        return [
            i for _, i in sorted(node.interfaces.items()) if self.nodes[i.peer].kind == "switch"
        ]


def natural_key(name: str) -> tuple[Any, ...]:
    """Sort key that puts h2 before h10."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def ip_to_mac(ip: str, prefix: int) -> str:
    """p4-utils' ip_address_to_mac(ip) % prefix: "00:%02x" then the four octets in hex."""
    octets = [int(o) for o in ip.split("/")[0].split(".")]
    return ":".join(f"{b:02x}" for b in [0, prefix, *octets])


def load_topology(path: str | Path | None = None) -> Topology:
    """Read and validate a topology file (default: the k=4 fat tree)."""
    p = Path(path) if path is not None else DEFAULT_TOPOLOGY
    try:
        text = p.read_text()
    except OSError as e:
        raise TopologyError(f"{p}: cannot read: {e.strerror or e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise TopologyError(f"{p}: bad JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    return parse_topology(data, str(p))


def _get(obj: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in obj:
        raise TopologyError(f"{where}: missing key {key!r}")
    value = obj[key]
    # bool is an int subclass; a device id of `true` is a type error, not 1
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TopologyError(
            f"{where}: key {key!r} must be {kind.__name__}, not {type(value).__name__}"
        )
    return value


def parse_topology(data: object, source: str = "<topology>") -> Topology:
    """Validate decoded JSON and compute ports and addresses. Pure."""
    if not isinstance(data, dict):
        raise TopologyError(f"{source}: top level must be an object, not {type(data).__name__}")
    p4_src = _get(data, "p4_src", str, source)
    for key in ("cli", "pcap_dump", "enable_log"):
        if key in data and not isinstance(data[key], bool):
            raise TopologyError(f"{source}: key {key!r} must be bool")
    topo = _get(data, "topology", dict, source)
    where = f"{source}: topology"
    strategy = _get(topo, "assignment_strategy", str, where)
    if strategy != "l3":
        raise TopologyError(f"{where}: assignment_strategy {strategy!r} unsupported (only 'l3')")
    links = _get(topo, "links", list, where)
    hosts = _get(topo, "hosts", dict, where)
    switches = _get(topo, "switches", dict, where)

    kinds: dict[str, Literal["host", "switch"]] = {}
    host_num: dict[str, int] = {}
    for name, opts in hosts.items():
        if not _NAME.match(name):
            raise TopologyError(f"{where}: bad host name {name!r}")
        m = _HOST_NAME.match(name)
        if not m or not 1 <= int(m.group(1)) <= _MAX_ID:
            # l3 derives the address from the number in the name
            raise TopologyError(f"{where}: host {name!r} must be named hN with N in 1..{_MAX_ID}")
        if not isinstance(opts, dict):
            raise TopologyError(f"{where}: host {name!r} options must be an object")
        kinds[name] = "host"
        host_num[name] = int(m.group(1))
    device_id: dict[str, int] = {}
    owner_of_id: dict[int, str] = {}
    thrift: dict[str, int] = {}  # pinned thrift ports
    for name, opts in switches.items():
        if not _NAME.match(name):
            raise TopologyError(f"{where}: bad switch name {name!r}")
        if name in kinds:
            raise TopologyError(f"{where}: {name!r} is both a host and a switch")
        if not isinstance(opts, dict):
            raise TopologyError(f"{where}: switch {name!r} options must be an object")
        sw = f"{where}: switch {name!r}"
        sid = _get(opts, "device_id", int, sw)
        if not 1 <= sid <= _MAX_ID:
            raise TopologyError(f"{sw} device_id {sid} not in 1..{_MAX_ID}")
        if sid in owner_of_id:
            raise TopologyError(
                f"{where}: duplicate device_id {sid} ({owner_of_id[sid]!r} and {name!r})"
            )
        if "thrift_port" in opts:
            tp = _get(opts, "thrift_port", int, sw)
            if not 1 <= tp <= 65535:
                raise TopologyError(f"{sw} thrift_port {tp} not in 1..65535")
            other = next((n for n, p in thrift.items() if p == tp), None)
            if other is not None:
                raise TopologyError(f"{where}: duplicate thrift_port {tp} ({other!r} and {name!r})")
            thrift[name] = tp
        kinds[name] = "switch"
        device_id[name] = sid
        owner_of_id[sid] = name

    # Links: check each, and collect the pinned ports of every node first (p4-utils'
    # auto_port_num skips a port pinned by any link, also a later one).
    used: dict[str, set[int]] = {n: set() for n in kinds}
    seen_pairs: dict[frozenset[str], int] = {}
    ends: list[tuple[str, str, list[int | None], str]] = []  # (node1, node2, ports, where)
    for i, link in enumerate(links):
        lw = f"{where}: link {i} {json.dumps(link)}"
        if not isinstance(link, list) or len(link) not in (2, 3):
            raise TopologyError(f"{lw}: must be [node1, node2] or [node1, node2, {{options}}]")
        a, b = link[0], link[1]
        opts = link[2] if len(link) == 3 else {}
        if not isinstance(a, str) or not isinstance(b, str):
            raise TopologyError(f"{lw}: node names must be strings")
        for n in (a, b):
            if n not in kinds:
                raise TopologyError(f"{lw}: unknown node {n!r}")
        if a == b:
            raise TopologyError(f"{lw}: links {a!r} to itself")
        if not isinstance(opts, dict):
            raise TopologyError(f"{lw}: options must be an object")
        extra = set(opts) - _LINK_OPTIONS
        if extra:
            raise TopologyError(f"{lw}: unsupported link option(s) {sorted(extra)}")
        pair = frozenset((a, b))
        if pair in seen_pairs:
            raise TopologyError(f"{lw}: duplicate link {a}-{b} (same as link {seen_pairs[pair]})")
        seen_pairs[pair] = i
        if kinds[a] == kinds[b] == "host":
            raise TopologyError(f"{lw}: links two hosts")
        ports: list[int | None] = []
        for n, key in ((a, "port1"), (b, "port2")):
            port = None
            if key in opts:
                port = _get(opts, key, int, lw)
                if port < 0 or (kinds[n] == "host" and port != 0):
                    raise TopologyError(f"{lw}: bad {key} {port} for {n!r}")
                if port in used[n]:
                    raise TopologyError(f"{lw}: duplicate port {port} on {n!r}")
                used[n].add(port)
            ports.append(port)
        ends.append((a, b, ports, lw))

    # Unpinned ports, as p4-utils' auto_assignment() numbers them: links in natural order of
    # (node1, node2), each free end the lowest port not used on its node.
    unpinned: list[str] = []
    for a, b, ports, _ in sorted(ends, key=lambda e: (natural_key(e[0]), natural_key(e[1]))):
        for k, n in enumerate((a, b)):
            if ports[k] is None:
                port = 0 if kinds[n] == "host" else 1
                while port in used[n]:
                    port += 1
                used[n].add(port)
                ports[k] = port
                if kinds[n] == "switch":
                    unpinned.append(f"link [{a}, {b}]: port{k + 1} ({n})")
    link_order: list[tuple[str, int, str, int]] = []
    for a, b, ports, lw in ends:
        pa, pb = ports
        assert pa is not None and pb is not None
        for n, port in ((a, pa), (b, pb)):
            if len(f"{n}-eth{port}") > _MAX_IFNAME:
                raise TopologyError(f"{lw}: interface name {n}-eth{port} longer than 15 chars")
        link_order.append((a, pa, b, pb))

    # Unpinned thrift ports, as NetworkAPI.auto_thrift_port(): switches in natural name order,
    # each the lowest port from 9090 that no switch has.
    taken = set(thrift.values())
    for name in sorted(device_id, key=natural_key):
        if name not in thrift:
            tp = THRIFT_BASE_PORT
            while tp in taken:
                tp += 1
            thrift[name] = tp
            taken.add(tp)
            unpinned.append(f"{name}: thrift_port")

    for h in host_num:
        peers = [b if a == h else a for a, _, b, _ in link_order if h in (a, b)]
        if len(peers) != 1:
            raise TopologyError(
                f"{where}: host {h!r} must be linked to exactly one switch, not {len(peers)}"
            )

    ifaces: dict[str, dict[int, Interface]] = {n: {} for n in kinds}

    def add(node: str, port: int, mac: str, ip: str | None, peer: str, peer_port: int) -> None:
        ifaces[node][port] = Interface(node, port, f"{node}-eth{port}", mac, ip, peer, peer_port)

    for a, pa, b, pb in link_order:
        if kinds[a] == "host" or kinds[b] == "host":
            (h, ph, s, ps) = (a, pa, b, pb) if kinds[a] == "host" else (b, pb, a, pa)
            net = f"10.{device_id[s]}.{host_num[h]}"
            add(h, ph, ip_to_mac(f"{net}.2", 0), f"{net}.2/24", s, ps)
            add(s, ps, ip_to_mac(f"{net}.2", 1), f"{net}.1/24", h, ph)
        else:
            net = f"20.{device_id[a]}.{device_id[b]}"
            add(a, pa, ip_to_mac(f"{net}.1", 2), f"{net}.1/24", b, pb)
            add(b, pb, ip_to_mac(f"{net}.2", 2), f"{net}.2/24", a, pa)

    nodes = {
        n: Node(
            n,
            k,
            device_id.get(n),
            MappingProxyType(dict(sorted(ifaces[n].items()))),
            thrift.get(n),
        )
        for n, k in kinds.items()
    }
    return Topology(MappingProxyType(nodes), p4_src, source, tuple(link_order), tuple(unpinned))
