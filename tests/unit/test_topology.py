"""The fat-tree file loads with p4-utils l3 addressing; malformed files are refused by name."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest

from controller.topology import DEFAULT_TOPOLOGY, TopologyError, load_topology

TORS = [f"t{i}" for i in range(1, 9)]
AGGS = [f"a{i}" for i in range(1, 9)]
CORES = [f"c{i}" for i in range(1, 5)]


@pytest.fixture(scope="module")
def topo():
    return load_topology()


def test_nodes_and_order(topo):
    assert topo.hosts() == [f"h{i}" for i in range(1, 17)]
    assert topo.switches() == TORS + AGGS + CORES
    assert [topo.node(s).device_id for s in topo.switches()] == list(range(1, 21))


@pytest.mark.parametrize(
    ("host", "ip", "mac", "tor", "port"),
    [
        ("h1", "10.1.1.2", "00:00:0a:01:01:02", "t1", 1),
        ("h2", "10.1.2.2", "00:00:0a:01:02:02", "t1", 2),
        ("h3", "10.2.3.2", "00:00:0a:02:03:02", "t2", 1),
        ("h7", "10.4.7.2", "00:00:0a:04:07:02", "t4", 1),
        ("h11", "10.6.11.2", "00:00:0a:06:0b:02", "t6", 1),
        ("h15", "10.8.15.2", "00:00:0a:08:0f:02", "t8", 1),
        ("h16", "10.8.16.2", "00:00:0a:08:10:02", "t8", 2),
    ],
)
def test_host_addressing_is_p4utils_l3(topo, host, ip, mac, tor, port):
    iface = topo.host_interface(host)
    assert (iface.name, iface.port, iface.mac, iface.ip) == (f"{host}-eth0", 0, mac, f"{ip}/24")
    assert topo.host_ip(host) == ip
    gw = topo.gateway(host)
    net = ip.rsplit(".", 1)[0]
    assert (gw.node, gw.port, gw.name) == (tor, port, f"{tor}-eth{port}")
    # the ToR port: 00:01 + the host IP's octets, address .1 of the host's /24
    assert gw.mac == "00:01" + mac[5:]
    assert gw.ip == f"{net}.1/24"
    assert topo.peer(gw) == iface


def test_switch_ports_follow_link_order(topo):
    t1 = topo.node("t1").interfaces
    assert [(p, i.peer) for p, i in t1.items()] == [(1, "h1"), (2, "h2"), (3, "a1"), (4, "a2")]
    a1 = topo.node("a1").interfaces
    assert [(p, i.peer) for p, i in a1.items()] == [(1, "t1"), (2, "t2"), (3, "c1"), (4, "c2")]
    a2 = topo.node("a2").interfaces
    assert [i.peer for i in a2.values()] == ["t1", "t2", "c3", "c4"]
    c1 = topo.node("c1").interfaces
    assert [i.peer for i in c1.values()] == ["a1", "a3", "a5", "a7"]


def test_switch_links_addressed_20_id1_id2(topo):
    t1_a1 = topo.node("t1").interfaces[3]
    assert (t1_a1.ip, t1_a1.mac) == ("20.1.9.1/24", "00:02:14:01:09:01")
    a1_t1 = topo.peer(t1_a1)
    assert (a1_t1.node, a1_t1.port, a1_t1.ip, a1_t1.mac) == (
        "a1",
        1,
        "20.1.9.2/24",
        "00:02:14:01:09:02",
    )
    c4_a8 = topo.node("c4").interfaces[4]
    assert (c4_a8.peer, c4_a8.ip) == ("a8", "20.16.20.2/24")


def test_every_link_is_symmetric_and_addresses_unique(topo):
    macs, ips = [], []
    for node in topo.nodes.values():
        for port, iface in node.interfaces.items():
            assert iface.port == port and iface.node == node.name
            back = topo.peer(iface)
            assert (back.peer, back.peer_port) == (node.name, port)
            macs.append(iface.mac)
            ips.append(iface.ip)
    assert len(macs) == 2 * 48 == len(set(macs))
    assert len(set(ips)) == len(ips)
    assert len(topo.links()) == 48
    first = topo.links()[0]
    assert (first[0].name, first[1].name) == ("h1-eth0", "t1-eth1")


def test_unknown_names_are_topology_errors(topo):
    with pytest.raises(TopologyError, match="unknown node 'h99'"):
        topo.host_ip("h99")
    with pytest.raises(TopologyError, match="'t1' is a switch"):
        topo.host_ip("t1")


# --- malformed files: each edit of the good file, and the words the error must contain ---


def _fattree() -> dict[str, Any]:
    return json.loads(DEFAULT_TOPOLOGY.read_text())


def _links(d: dict[str, Any]) -> list[list[Any]]:
    links: list[list[Any]] = d["topology"]["links"]
    return links


def _link_index(d: dict[str, Any], ends: list[str]) -> int:
    """Index of the link between these two nodes (its options, if any, not compared)."""
    return next(i for i, ln in enumerate(_links(d)) if ln[:2] == ends)


def _swap_link(d: dict[str, Any], old: list[str], new: list[Any]) -> None:
    _links(d)[_link_index(d, old)] = new


def _del(d: dict[str, Any], *path: str) -> None:
    for key in path[:-1]:
        d = d[key]
    del d[path[-1]]


MALFORMED = [
    ("top level list", lambda d: [d], "top level must be an object"),
    ("missing p4_src", lambda d: _del(d, "p4_src"), "missing key 'p4_src'"),
    ("missing topology", lambda d: _del(d, "topology"), "missing key 'topology'"),
    ("missing links", lambda d: _del(d, "topology", "links"), "missing key 'links'"),
    ("missing switches", lambda d: _del(d, "topology", "switches"), "missing key 'switches'"),
    (
        "missing device_id",
        lambda d: _del(d, "topology", "switches", "a3", "device_id"),
        "switch 'a3': missing key 'device_id'",
    ),
    (
        "device_id as string",
        lambda d: d["topology"]["switches"]["t1"].update(device_id="1"),
        "'device_id' must be int, not str",
    ),
    (
        "device_id as bool",
        lambda d: d["topology"]["switches"]["t1"].update(device_id=True),
        "'device_id' must be int, not bool",
    ),
    (
        "device_id out of range",
        lambda d: d["topology"]["switches"]["t1"].update(device_id=254),
        "device_id 254 not in 1..253",
    ),
    (
        "duplicate device_id",
        lambda d: d["topology"]["switches"]["c4"].update(device_id=1),
        "duplicate device_id 1 .'t1' and 'c4'.",
    ),
    ("links not a list", lambda d: d["topology"].update(links={}), "'links' must be list"),
    ("cli not bool", lambda d: d.update(cli="yes"), "'cli' must be bool"),
    (
        "strategy l2",
        lambda d: d["topology"].update(assignment_strategy="l2"),
        "assignment_strategy 'l2' unsupported",
    ),
    (
        "unknown node in link",
        lambda d: _swap_link(d, ["t3", "a4"], ["t3", "a9"]),
        r'link \d+ \["t3", "a9"\]: unknown node \'a9\'',
    ),
    (
        "duplicate link",
        lambda d: _links(d).append(["t1", "a1"]),
        "duplicate link t1-a1 .same as link 16.",
    ),
    (
        "duplicate link reversed",
        lambda d: _links(d).append(["a1", "t1"]),
        "duplicate link a1-t1 .same as link 16.",
    ),
    (
        "duplicate port",
        lambda d: _swap_link(d, ["t1", "a2"], ["t1", "a2", {"port1": 1}]),
        "duplicate port 1 on 't1'",
    ),
    (
        "unsupported link option",
        lambda d: _swap_link(d, ["t1", "a2"], ["t1", "a2", {"delay": "1ms"}]),
        r"unsupported link option\(s\) \['delay'\]",
    ),
    ("link of three names", lambda d: _links(d).append(["t1", "a1", "c1"]), "options must be"),
    ("link not a pair", lambda d: _links(d).append(["t1"]), r"must be \[node1, node2\]"),
    ("self link", lambda d: _links(d).append(["c1", "c1"]), "links 'c1' to itself"),
    ("host to host", lambda d: _links(d).append(["h1", "h3"]), "links two hosts"),
    (
        "host on two switches",
        lambda d: _links(d).append(["h5", "t4"]),
        "host 'h5' must be linked to exactly one switch, not 2",
    ),
    (
        "host on no switch",
        lambda d: _links(d).__delitem__(_link_index(d, ["h16", "t8"])),
        "host 'h16' must be linked to exactly one switch, not 0",
    ),
    (
        "host not named hN",
        lambda d: d["topology"]["hosts"].update(web={}),
        "host 'web' must be named hN",
    ),
    (
        "name both host and switch",
        lambda d: d["topology"]["switches"].update(h1={"device_id": 30}),
        "'h1' is both a host and a switch",
    ),
    (
        "interface name too long",
        lambda d: (
            d["topology"]["switches"].update(aggregation9={"device_id": 30}),
            _links(d).append(["aggregation9", "c1"]),
        ),
        "interface name aggregation9-eth1 longer than 15",
    ),
]


@pytest.mark.parametrize(
    ("edit", "message"), [(e, m) for _, e, m in MALFORMED], ids=[n for n, _, _ in MALFORMED]
)
def test_malformed_topology_rejected_with_reason(tmp_path: Path, edit, message):
    data = copy.deepcopy(_fattree())
    out = edit(data)
    if isinstance(out, list):  # the edit replaced the document
        data = out
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(TopologyError, match=message) as info:
        load_topology(path)
    assert str(path) in str(info.value)  # the message names the file


def test_bad_json_names_line(tmp_path: Path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "p4_src": "x",\n  "topology": {,\n}')
    with pytest.raises(TopologyError, match=re.escape(f"{path}: bad JSON at line 3")):
        load_topology(path)


def test_missing_file(tmp_path: Path):
    with pytest.raises(TopologyError, match="cannot read"):
        load_topology(tmp_path / "nope.json")


def test_explicit_ports_are_kept(tmp_path: Path):
    data = _fattree()
    _swap_link(data, ["t1", "a2"], ["t1", "a2", {"port1": 7, "port2": 9}])
    path = tmp_path / "ports.json"
    path.write_text(json.dumps(data))
    t = load_topology(path)
    assert sorted(t.node("t1").interfaces) == [1, 2, 3, 7]
    assert t.node("t1").interfaces[7].peer_port == 9
    assert t.node("a2").interfaces[9].name == "a2-eth9"
