"""How p4run numbers a topology file, written from p4-utils' and mininet's code (not ours).

nsg-ethz/p4-utils `p4utils/mininetlib/network_API.py`, `NetworkAPI.auto_assignment()`:
- thrift ports: `for node, info in self.nodes(sort=True, withInfo=True)`: every P4 switch
  without a `thrift_port` gets `auto_thrift_port(base=9090)`, the lowest port >= 9090 that no
  switch has (`next_element(self.thrift_ports() | self.grpc_ports(), minimum=base)`);
- ports: `for node1, node2, key, info in self.links(sort=True, withKeys=True, withInfo=True)`:
  an end without `port1`/`port2` gets `auto_port_num(node, base)` (base 0 for hosts, 1 for
  switches): the lowest number >= base not among the node's ports in `node_ports()`, which
  holds every port set so far, pinned ones of links not yet visited included.
mininet `mininet/topo.py`: `nodes(sort=True)` sorts with `natural` (digits compared as
numbers), `links(sort=True)` with `naturalSeq((node1, node2, key))`; `mininet/util.py`:
`natural(text) = [int(s) if s.isdigit() else s for s in re.split(r'(\\d+)', str(text))]`.
"""

from __future__ import annotations

import re
from typing import Any


def natural(text: str) -> list[Any]:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", text)]


def _lowest_free(taken: set[int], base: int) -> int:
    n = base
    while n in taken:
        n += 1
    return n


def thrift_ports(data: dict[str, Any]) -> dict[str, int]:
    """Switch name -> the thrift port p4run gives it."""
    switches = data["topology"]["switches"]
    nodes = sorted([*data["topology"]["hosts"], *switches], key=natural)
    ports = {s: o["thrift_port"] for s, o in switches.items() if "thrift_port" in o}
    for node in nodes:
        if node in switches and node not in ports:
            ports[node] = _lowest_free(set(ports.values()), 9090)
    return ports


def port_numbers(data: dict[str, Any]) -> dict[tuple[str, str], int]:
    """(node, neighbour) -> the port number of node's interface toward neighbour."""
    hosts = data["topology"]["hosts"]
    links = [(ln[0], ln[1], ln[2] if len(ln) == 3 else {}) for ln in data["topology"]["links"]]
    ports: dict[tuple[str, str], int] = {}
    for a, b, opts in links:  # node_ports(): what is set before the walk
        if "port1" in opts:
            ports[(a, b)] = opts["port1"]
        if "port2" in opts:
            ports[(b, a)] = opts["port2"]
    for a, b, _ in sorted(links, key=lambda ln: [natural(ln[0]), natural(ln[1]), natural("0")]):
        for node, peer in ((a, b), (b, a)):
            if (node, peer) not in ports:
                taken = {p for (n, _), p in ports.items() if n == node}
                ports[(node, peer)] = _lowest_free(taken, 0 if node in hosts else 1)
    return ports
