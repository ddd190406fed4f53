"""The linux driver and the node configuration, as pure functions: programs in, `ip` argv out.

The strongest check replays the generated commands as a forwarding table per switch (longest
prefix, every multipath nexthop, the neighbour entry's MAC) and walks the fat tree with it.
"""

from __future__ import annotations

import ipaddress
from collections import Counter

import pytest

from controller import nodeconfig
from controller.drivers.linux import DriverError, batch_text, program_commands
from controller.routes import DefaultAction, SwitchProgram, TableEntry, compute_routes
from controller.topology import Topology, load_topology

VIP = "20.0.0.1"
LBS = ("h1", "h2")
H1_MAC, H2_MAC = "00:00:0a:01:01:02", "00:00:0a:01:02:02"


@pytest.fixture(scope="module")
def topo() -> Topology:
    return load_topology()


@pytest.fixture(scope="module")
def commands(topo: Topology) -> dict[str, list[list[str]]]:
    programs = compute_routes(topo, VIP, LBS)
    return {sw: program_commands(p, topo) for sw, p in programs.items()}


def cmd(text: str) -> list[str]:
    return text.split(" ")


def fib(cmds: list[list[str]]) -> dict[ipaddress.IPv4Network, list[tuple[str, str]]]:
    """Parse `ip route replace` commands into prefix -> [(gateway, dev)]; [] for blackhole."""
    out: dict[ipaddress.IPv4Network, list[tuple[str, str]]] = {}
    for c in cmds:
        if c[1] != "route":
            continue
        assert c[:3] == ["ip", "route", "replace"]
        if c[3] == "blackhole":
            out[ipaddress.IPv4Network("0.0.0.0/0" if c[4] == "default" else c[4])] = []
            continue
        words = c[4:]
        hops = [(words[i + 1], words[i + 3]) for i, w in enumerate(words) if w == "via"]
        assert all(words[i + 2] == "dev" for i, w in enumerate(words) if w == "via")
        assert words.count("onlink") == len(hops)
        out[ipaddress.IPv4Network(c[3])] = hops
    return out


def neighbours(cmds: list[list[str]]) -> dict[tuple[str, str], str]:
    out = {}
    for c in cmds:
        if c[1] == "neigh":
            assert c[2] == "replace" and c[-2:] == ["nud", "permanent"]
            out[(c[3], c[7])] = c[5]
    return out


def lookup(
    table: dict[ipaddress.IPv4Network, list[tuple[str, str]]], dst: str
) -> list[tuple[str, str]]:
    ip = ipaddress.IPv4Address(dst)
    best = max((p for p in table if ip in p), key=lambda p: p.prefixlen)
    return table[best]


def walk(
    topo: Topology, commands: dict[str, list[list[str]]], start: str, dst: str
) -> set[tuple[str, ...]]:
    """Every path (node names) a packet to dst can take from switch `start`, following every
    nexthop; the frame goes to the MAC of the neighbour entry, which must be the peer's."""
    paths: set[tuple[str, ...]] = set()

    def step(path: tuple[str, ...]) -> None:
        sw = path[-1]
        assert len(path) <= 6, f"too long or looping: {path}"
        hops = lookup(fib(commands[sw]), dst)
        assert hops, f"{sw} drops {dst}"
        for gw, dev in hops:
            iface = next(i for i in topo.node(sw).interfaces.values() if i.name == dev)
            peer = topo.peer(iface)
            assert peer.ip is not None and peer.ip.split("/")[0] == gw
            assert neighbours(commands[sw])[(gw, dev)] == peer.mac
            assert peer.node not in path, f"loop: {path} -> {peer.node}"
            if topo.node(peer.node).kind == "host":
                paths.add((*path, peer.node))
            else:
                step((*path, peer.node))

    step((start,))
    return paths


def test_t1_commands_exact(topo: Topology, commands: dict[str, list[list[str]]]) -> None:
    t1 = commands["t1"]
    assert ["ip", "route", "replace", "blackhole", "default"] in t1
    assert cmd("ip route replace 10.1.1.0/24 via 10.1.1.2 dev t1-eth1 onlink") in t1
    assert [
        *("ip", "route", "replace", "20.0.0.1/32"),
        *("nexthop", "via", "10.1.1.2", "dev", "t1-eth1", "weight", "1", "onlink"),
        *("nexthop", "via", "10.1.2.2", "dev", "t1-eth2", "weight", "1", "onlink"),
    ] in t1
    assert neighbours(t1) == {
        ("10.1.1.2", "t1-eth1"): H1_MAC,
        ("10.1.2.2", "t1-eth2"): H2_MAC,
        ("20.1.9.2", "t1-eth3"): topo.node("a1").interfaces[1].mac,
        ("20.1.10.2", "t1-eth4"): topo.node("a2").interfaces[1].mac,
    }
    # neighbours before routes, so no route ever points at a MAC-less gateway
    kinds = [c[1] for c in t1]
    assert kinds == sorted(kinds, key=lambda k: k != "neigh")


def test_every_switch_reaches_every_host_by_all_paths(
    topo: Topology, commands: dict[str, list[list[str]]]
) -> None:
    for sw in topo.switches():
        for h in topo.hosts():
            paths = walk(topo, commands, sw, topo.host_ip(h))
            assert paths and all(p[-1] == h for p in paths), (sw, h, paths)


def test_ecmp_widths(topo: Topology, commands: dict[str, list[list[str]]]) -> None:
    # a ToR to another pod: its 2 up-links; an aggregation switch to another pod: 2 cores
    assert len(lookup(fib(commands["t1"]), "10.8.16.2")) == 2
    assert len(lookup(fib(commands["a1"]), "10.8.16.2")) == 2
    assert len(lookup(fib(commands["c1"]), "10.8.16.2")) == 1
    # a host's own ToR: one hop, the host
    assert lookup(fib(commands["t8"]), "10.8.16.2") == [("10.8.16.2", "t8-eth2")]
    # from t8, 4 distinct paths to h1 (2 aggregation x 2 cores)
    assert len(walk(topo, commands, "t8", "10.1.1.2")) == 4


def test_vip_reaches_only_the_load_balancers(
    topo: Topology, commands: dict[str, list[list[str]]]
) -> None:
    ends: Counter[str] = Counter()
    for sw in topo.switches():
        for path in walk(topo, commands, sw, VIP):
            ends[path[-1]] += 1
            assert "t1" in path
    assert set(ends) == set(LBS)
    assert ends["h1"] == ends["h2"]  # split evenly at t1 on every path


def program(*entries: TableEntry, defaults: tuple[DefaultAction, ...] = ()) -> SwitchProgram:
    return SwitchProgram("t1", defaults, entries)


def lpm(prefix: str, action: str, *params: str) -> TableEntry:
    return TableEntry("ipv4_lpm", action, (prefix,), params)


def bucket(group: str, index: int, mac: str, port: int) -> TableEntry:
    return TableEntry("ecmp_group_to_nhop", "set_nhop", (group, str(index)), (mac, str(port)))


def test_repeated_buckets_become_weights(topo: Topology) -> None:
    cmds = program_commands(
        program(
            lpm("20.0.0.1/32", "ecmp_group", "1", "3"),
            bucket("1", 0, H1_MAC, 1),
            bucket("1", 1, H2_MAC, 2),
            bucket("1", 2, H1_MAC, 1),
        ),
        topo,
    )
    assert cmds[-1] == [
        *("ip", "route", "replace", "20.0.0.1/32"),
        *("nexthop", "via", "10.1.1.2", "dev", "t1-eth1", "weight", "2", "onlink"),
        *("nexthop", "via", "10.1.2.2", "dev", "t1-eth2", "weight", "1", "onlink"),
    ]


def test_one_distinct_bucket_is_a_plain_route(topo: Topology) -> None:
    cmds = program_commands(
        program(
            lpm("20.0.0.1/32", "ecmp_group", "7", "2"),
            bucket("7", 0, H2_MAC, 2),
            bucket("7", 1, H2_MAC, 2),
        ),
        topo,
    )
    assert cmds == [
        cmd(f"ip neigh replace 10.1.2.2 lladdr {H2_MAC} dev t1-eth2 nud permanent"),
        ["ip", "route", "replace", "20.0.0.1/32", "via", "10.1.2.2", "dev", "t1-eth2", "onlink"],
    ]


def test_drop_entries_are_blackholes(topo: Topology) -> None:
    cmds = program_commands(
        program(
            lpm("10.9.0.0/16", "drop"),
            defaults=(
                DefaultAction("ipv4_lpm", "drop"),
                DefaultAction("ecmp_group_to_nhop", "drop"),
            ),
        ),
        topo,
    )
    assert cmds == [
        ["ip", "route", "replace", "blackhole", "default"],
        ["ip", "route", "replace", "blackhole", "10.9.0.0/16"],
    ]


@pytest.mark.parametrize(
    ("entries", "defaults", "reason"),
    [
        ((TableEntry("acl", "set_nhop", ("1.2.3.0/24",), (H1_MAC, "1")),), (), "unknown table"),
        ((lpm("10.0.0.0/8", "forward", H1_MAC, "1"),), (), "unsupported action 'forward'"),
        ((lpm("10.0.0.0/8", "set_nhop", H1_MAC, "9"),), (), "t1 has no port 9"),
        ((lpm("10.0.0.0/8", "set_nhop", H1_MAC, "x"),), (), "port 'x' is not a number"),
        ((lpm("10.0.0.0/8", "set_nhop", H1_MAC),), (), "set_nhop takes (dstAddr, port)"),
        ((lpm("10.0.0.1/8", "set_nhop", H1_MAC, "1"),), (), "bad prefix '10.0.0.1/8'"),
        (
            (lpm("1.0.0.0/8", "set_nhop", H1_MAC, "1"), lpm("2.0.0.0/8", "set_nhop", H2_MAC, "1")),
            (),
            "would get two MACs",
        ),
        (
            (lpm("20.0.0.1/32", "ecmp_group", "1", "2"), bucket("1", 0, H1_MAC, 1)),
            (),
            "group 1 lacks ecmp_group_to_nhop bucket(s) [1]",
        ),
        ((bucket("1", 0, H1_MAC, 1), bucket("1", 0, H2_MAC, 2)), (), "duplicate bucket 1 0"),
        ((), (DefaultAction("ipv4_lpm", "set_nhop", (H1_MAC, "1")),), "unsupported default"),
    ],
)
def test_bad_entries_are_refused_with_a_reason(
    topo: Topology,
    entries: tuple[TableEntry, ...],
    defaults: tuple[DefaultAction, ...],
    reason: str,
) -> None:
    with pytest.raises(DriverError) as err:
        program_commands(program(*entries, defaults=defaults), topo)
    assert reason in str(err.value)
    assert str(err.value).startswith("t1: ")  # names the switch and the entry


def test_batch_text() -> None:
    assert batch_text([["ip", "link", "set", "lo", "up"], ["ip", "route", "show"]]) == (
        "link set lo up\nroute show\n"
    )
    for bad in (["ls"], ["ip", "link", "set", "a b", "up"], ["ip", "route", "x#y"], []):
        with pytest.raises(DriverError):
            batch_text([bad])


def test_link_commands_create_every_pair_in_place(topo: Topology) -> None:
    pids = {n: 1000 + i for i, n in enumerate(topo.nodes)}
    cmds = nodeconfig.link_commands(topo, pids)
    assert len(cmds) == 48
    assert cmds[0] == [
        *("ip", "link", "add", "name", "h1-eth0", "netns", str(pids["h1"])),
        *("address", H1_MAC, "type", "veth", "peer", "name", "t1-eth1"),
        *("netns", str(pids["t1"]), "address", "00:01:0a:01:01:02"),
    ]
    names = [c[4] for c in cmds] + [c[13] for c in cmds]
    assert sorted(names) == sorted(
        i.name for n in topo.nodes.values() for i in n.interfaces.values()
    )
    batch_text(cmds)  # every word is safe for ip -batch


def test_host_configuration(topo: Topology) -> None:
    assert nodeconfig.node_commands(topo, "h16") == [
        ["ip", "link", "set", "lo", "up"],
        ["ip", "link", "set", "h16-eth0", "up"],
        ["ip", "addr", "replace", "10.8.16.2/24", "dev", "h16-eth0"],
        cmd("ip neigh replace 10.8.16.1 lladdr 00:01:0a:08:10:02 dev h16-eth0 nud permanent"),
        ["ip", "route", "replace", "default", "via", "10.8.16.1", "dev", "h16-eth0", "onlink"],
    ]
    assert nodeconfig.sysctls(topo, "h1")["net.ipv4.ip_forward"] == "0"  # a load balancer
    assert nodeconfig.sysctls(topo, "h1")["net.ipv4.conf.all.rp_filter"] == "0"


def test_switch_configuration(topo: Topology) -> None:
    cmds = nodeconfig.node_commands(topo, "a1")
    neigh = {(c[3], c[7]): c[5] for c in cmds if c[1] == "neigh"}
    assert len(neigh) == 4  # every neighbour, permanent
    for iface in topo.node("a1").interfaces.values():
        peer = topo.peer(iface)
        assert peer.ip is not None
        assert neigh[(peer.ip.split("/")[0], iface.name)] == peer.mac
        assert ["ip", "addr", "replace", iface.ip, "dev", iface.name] in cmds
    s = nodeconfig.sysctls(topo, "a1")
    assert s["net.ipv4.ip_forward"] == "1"
    assert s["net.ipv4.fib_multipath_hash_policy"] == "1"
    assert s["net.ipv4.conf.all.rp_filter"] == s["net.ipv4.conf.default.rp_filter"] == "0"
    assert nodeconfig.sysctl_argv({"a.b": "1"}) == ["sysctl", "-q", "-w", "a.b=1"]
