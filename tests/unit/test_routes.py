"""Route computation on the fat tree, checked by walking the computed entries themselves."""

from __future__ import annotations

import ipaddress
from collections import Counter

import pytest

from controller.routes import (
    ECMP_GROUP,
    ECMP_GROUP_TO_NHOP,
    IPV4_LPM,
    SET_NHOP,
    SwitchProgram,
    TableEntry,
    compute_routes,
)
from controller.topology import Topology, TopologyError, load_topology

VIP = "20.0.0.1"
LBS = ("h1", "h2")


@pytest.fixture(scope="module")
def topo() -> Topology:
    return load_topology()


@pytest.fixture(scope="module")
def programs(topo: Topology) -> dict[str, SwitchProgram]:
    return compute_routes(topo, VIP, LBS)


def pod(switch: str) -> int:
    """Pod of a ToR or aggregation switch: t1,t2,a1,a2 are pod 0, ..."""
    return (int(switch[1:]) - 1) // 2


def lpm(program: SwitchProgram, dst: str) -> TableEntry | None:
    """The ipv4_lpm entry bmv2 would pick for `dst` (longest matching prefix)."""
    best: tuple[int, TableEntry] | None = None
    for e in program.entries:
        if e.table != IPV4_LPM:
            continue
        net = ipaddress.ip_network(e.match[0])
        if ipaddress.ip_address(dst) in net and (best is None or net.prefixlen > best[0]):
            best = (net.prefixlen, e)
    return best[1] if best else None


def hops_of(program: SwitchProgram, entry: TableEntry) -> list[tuple[str, int]]:
    """Every (MAC, port) the entry can send to: itself, or each member of its group."""
    if entry.action == SET_NHOP:
        return [(entry.params[0], int(entry.params[1]))]
    assert entry.action == ECMP_GROUP
    gid, n = entry.params
    members = {
        int(e.match[1]): (e.params[0], int(e.params[1]))
        for e in program.entries
        if e.table == ECMP_GROUP_TO_NHOP and e.match[0] == gid
    }
    # every hash value 0..n-1 must have a member, and nothing beyond
    assert sorted(members) == list(range(int(n))), f"{program.switch}: group {gid} incomplete"
    return [members[i] for i in range(int(n))]


def walk(topo, programs, start: str, dst: str) -> list[tuple[list[str], str]]:
    """Every path a packet to `dst` can take from switch `start`: (nodes visited, host reached).

    Follows the entries only; the MAC written must be the MAC of the port's peer interface.
    Fails on a loop, a miss, or more than 5 links.
    """
    done: list[tuple[list[str], str]] = []

    def step(path: list[str]) -> None:
        sw = path[-1]
        entry = lpm(programs[sw], dst)
        assert entry is not None, f"{sw} has no route to {dst}"
        for mac, port in hops_of(programs[sw], entry):
            iface = topo.node(sw).interfaces[port]
            peer = topo.peer(iface)
            assert peer.mac == mac, f"{sw} port {port}: MAC {mac} is not the peer's {peer.mac}"
            assert peer.node not in path, f"loop: {[*path, peer.node]} toward {dst}"
            assert len(path) <= 5, f"over 5 links: {[*path, peer.node]}"
            if topo.node(peer.node).kind == "host":
                done.append((path, peer.node))
            else:
                step([*path, peer.node])

    step([start])
    return done


def test_every_switch_routes_every_host_prefix(topo, programs):
    for sw, program in programs.items():
        prefixes = [e.match[0] for e in program.entries if e.table == IPV4_LPM]
        expected = [f"{VIP}/32"] + [
            str(ipaddress.ip_interface(topo.host_interface(h).ip).network) for h in topo.hosts()
        ]
        assert prefixes == expected, sw
        assert [d.cli() for d in program.defaults] == [
            "table_set_default ipv4_lpm drop",
            "table_set_default ecmp_group_to_nhop drop",
            "table_set_default src_guard src_allow",  # switch ports pass (test_src_guard.py)
        ]


def test_all_paths_reach_the_host_without_loops_in_5_links(topo, programs):
    for sw in topo.switches():
        for host in topo.hosts():
            paths = walk(topo, programs, sw, topo.host_ip(host))
            assert {h for _, h in paths} == {host}
            # shortest paths only: all of the same length
            assert len({len(p) for p, _ in paths}) == 1


@pytest.mark.parametrize(
    ("src", "host", "n_paths", "links"),
    [
        ("t1", "h2", 1, 1),  # same ToR
        ("t1", "h3", 2, 3),  # same pod: up to either aggregation switch
        ("t1", "h16", 4, 5),  # other pod: 2 aggregation x 2 cores
        ("a1", "h16", 2, 4),
        ("c1", "h16", 1, 3),
    ],
)
def test_number_of_equal_cost_paths(topo, programs, src, host, n_paths, links):
    paths = walk(topo, programs, src, topo.host_ip(host))
    assert len(paths) == n_paths
    assert {len(p) for p, _ in paths} == {links}


def test_vip_reaches_only_the_lbs_from_everywhere(topo, programs):
    for sw in topo.switches():
        paths = walk(topo, programs, sw, VIP)
        assert {h for _, h in paths} == set(LBS), sw
        # routed like h1/h2: the same set of paths up to t1 as toward h1
        to_t1 = {tuple(p) for p, _ in walk(topo, programs, sw, topo.host_ip("h1"))}
        assert {tuple(p) for p, _ in paths} == to_t1


def test_t1_vip_entry_is_an_ecmp_group_over_h1_and_h2(topo, programs):
    t1 = programs["t1"]
    entry = lpm(t1, VIP)
    assert entry is not None and entry.match == (f"{VIP}/32",)
    assert entry.action == ECMP_GROUP and entry.params[1] == "2"
    members = hops_of(t1, entry)
    expected = [
        (topo.host_interface(h).mac, topo.gateway(h).port) for h in LBS
    ]  # h1: 00:00:0a:01:01:02 on port 1, h2: 00:00:0a:01:02:02 on port 2
    assert members == expected
    assert members == [("00:00:0a:01:01:02", 1), ("00:00:0a:01:02:02", 2)]


def group_size(program: SwitchProgram, dst: str) -> int:
    entry = lpm(program, dst)
    assert entry is not None
    return 1 if entry.action == SET_NHOP else int(entry.params[1])


def test_ecmp_group_sizes(topo, programs):
    for host in topo.hosts():
        dst = topo.host_ip(host)
        tor = topo.gateway(host).node
        for sw in topo.switches():
            size = group_size(programs[sw], dst)
            if sw == tor or sw.startswith("c"):
                want = 1  # delivered, or a core going down to the pod
            elif sw.startswith("t"):
                want = 2  # a ToR to any other ToR: both aggregation up-links
            elif pod(sw) == pod(tor):
                want = 1  # an aggregation switch down to its own ToR
            else:
                want = 2  # an aggregation switch to another pod: its two cores
            assert size == want, f"{sw} -> {host}: {size} next hops, expected {want}"


def test_group_ids_are_per_distinct_next_hop_set(programs):
    for sw, program in programs.items():
        members: dict[str, list[tuple[str, ...]]] = {}
        for e in program.entries:
            if e.table == ECMP_GROUP_TO_NHOP:
                members.setdefault(e.match[0], []).append(e.params)
        ids = sorted(members, key=int)
        assert ids == [str(i) for i in range(1, len(ids) + 1)], sw
        sets = [tuple(v) for v in members.values()]
        assert len(set(sets)) == len(sets), f"{sw}: two groups with the same members"
        used = Counter(e.params[0] for e in program.entries if e.action == ECMP_GROUP)
        assert set(used) == set(members), f"{sw}: unused or missing groups"
    # t1 has two groups: h1/h2 for the VIP (group 1) and the two up-links for everything else
    assert len({e.match[0] for e in programs["t1"].entries if e.table == ECMP_GROUP_TO_NHOP}) == 2


def test_cli_syntax(programs):
    lines = programs["t1"].cli_lines()
    assert "table_add ipv4_lpm ecmp_group 20.0.0.1/32 => 1 2" in lines
    assert "table_add ipv4_lpm set_nhop 10.1.1.0/24 => 00:00:0a:01:01:02 1" in lines
    assert "table_add ecmp_group_to_nhop set_nhop 1 1 => 00:00:0a:01:02:02 2" in lines


def test_other_lb_hosts_move_the_vip(topo):
    progs = compute_routes(topo, "20.0.0.9", ("h3", "h16"))
    for sw in topo.switches():
        assert {h for _, h in walk(topo, progs, sw, "20.0.0.9")} <= {"h3", "h16"}
    # each ToR of an LB delivers to its own LB only; elsewhere the nearest one wins
    assert {h for _, h in walk(topo, progs, "t2", "20.0.0.9")} == {"h3"}
    assert {h for _, h in walk(topo, progs, "t8", "20.0.0.9")} == {"h16"}
    assert {h for _, h in walk(topo, progs, "t1", "20.0.0.9")} == {"h3"}
    # a core is as near to both: traffic may go either way
    assert {h for _, h in walk(topo, progs, "c1", "20.0.0.9")} == {"h3", "h16"}


@pytest.mark.parametrize(
    ("vip", "lbs", "message"),
    [
        ("20.0.0.300", LBS, "not an IPv4 address"),
        (VIP, ("h1", "h99"), "load-balancer 'h99' is not a host"),
        (VIP, ("t1",), "load-balancer 't1' is not a host"),
        (VIP, (), "no load-balancer hosts"),
    ],
)
def test_bad_route_inputs(topo, vip, lbs, message):
    with pytest.raises(TopologyError, match=message):
        compute_routes(topo, vip, lbs)


def test_disconnected_switch_is_an_error(tmp_path):
    import json

    from controller.topology import DEFAULT_TOPOLOGY

    data = json.loads(DEFAULT_TOPOLOGY.read_text())
    data["topology"]["switches"]["c9"] = {"device_id": 30}
    path = tmp_path / "island.json"
    path.write_text(json.dumps(data))
    with pytest.raises(TopologyError, match="switch 'c9' cannot reach"):
        compute_routes(load_topology(path))
