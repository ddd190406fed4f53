"""The p4 driver against a fake of what p4run runs, and the entries against p4src/ecmp.p4.

The fake switches sit at the thrift ports p4run gives them (tests/unit/p4utils_numbering.py,
written from p4-utils' code), so a driver that assumes another numbering programs the wrong
switch here as it did on real bmv2.
"""

from __future__ import annotations

import copy
import inspect
import json
import random
import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from fake_p4utils import FakeNetwork, FakeSwitch, RecordingThriftAPI
from p4utils_numbering import port_numbers, thrift_ports

from controller.__main__ import main
from controller.drivers.p4 import P4DriverError, program_all, program_switch, thrift_port
from controller.routes import (
    ECMP_GROUP,
    ECMP_GROUP_TO_NHOP,
    IPV4_LPM,
    SET_NHOP,
    SRC_ALLOW,
    SRC_GUARD,
    compute_routes,
)
from controller.topology import DEFAULT_TOPOLOGY, TopologyError, load_topology, parse_topology

ROOT = Path(__file__).resolve().parents[2]
GOLDEN_T1 = ROOT / "tests" / "fixtures" / "p4_calls_t1.txt"
P4_SOURCE = ROOT / "p4src" / "ecmp.p4"


@pytest.fixture(scope="module")
def topo():
    return load_topology()


@pytest.fixture(scope="module")
def programs(topo):
    return compute_routes(topo)


def shipped() -> dict[str, Any]:
    return json.loads(DEFAULT_TOPOLOGY.read_text())


def unpinned(data: dict[str, Any]) -> dict[str, Any]:
    """The same topology with no port or thrift port pinned (the file before the fix)."""
    d = copy.deepcopy(data)
    d["topology"]["links"] = [ln[:2] for ln in d["topology"]["links"]]
    for opts in d["topology"]["switches"].values():
        opts.pop("thrift_port", None)
    return d


def reordered(data: dict[str, Any], seed: int = 7) -> dict[str, Any]:
    """Links, hosts and switches shuffled, each link's ends swapped at random."""
    d = copy.deepcopy(data)
    rng = random.Random(seed)
    links = d["topology"]["links"]
    rng.shuffle(links)
    for i, ln in enumerate(links):
        if rng.random() < 0.5:
            opts = ln[2] if len(ln) == 3 else {}
            swapped = {"port1": opts["port2"], "port2": opts["port1"]} if opts else {}
            links[i] = [ln[1], ln[0], *([swapped] if swapped else [])]
    for key in ("hosts", "switches"):
        items = list(d["topology"][key].items())
        rng.shuffle(items)
        d["topology"][key] = dict(items)
    return d


def network_for(data: dict[str, Any]) -> FakeNetwork:
    """The switches p4run starts for this file: device ids from it, thrift ports by p4-utils."""
    ports = thrift_ports(data)
    sws = data["topology"]["switches"]
    return FakeNetwork([FakeSwitch(s, o["device_id"], ports[s]) for s, o in sws.items()])


def controller_ports(data: dict[str, Any]) -> dict[tuple[str, str], int]:
    t = parse_topology(data)
    return {(n, i.peer): p for n, node in t.nodes.items() for p, i in node.interfaces.items()}


def golden_lines(path: Path) -> list[str]:
    return [ln for ln in path.read_text().splitlines() if ln and not ln.startswith("#")]


# --- numbering: the controller's is p4run's ---


def test_the_model_gives_what_real_bmv2_showed_for_the_unpinned_file():
    # Seen on p4run with the old file (issue 12): thrift a1..a8 = 9090..9097, c1..c4 =
    # 9098..9101, t1..t8 = 9102..9109; a1-eth1 -> c1, a1-eth2 -> c2, a1-eth3 -> t1, a1-eth4 -> t2.
    old = unpinned(shipped())
    tp = thrift_ports(old)
    assert [tp[f"a{i}"] for i in range(1, 9)] == list(range(9090, 9098))
    assert [tp[f"c{i}"] for i in range(1, 5)] == list(range(9098, 9102))
    assert [tp[f"t{i}"] for i in range(1, 9)] == list(range(9102, 9110))
    ports = port_numbers(old)
    assert [ports[("a1", p)] for p in ("c1", "c2", "t1", "t2")] == [1, 2, 3, 4]
    assert [ports[("t1", p)] for p in ("h1", "h2", "a1", "a2")] == [1, 2, 3, 4]


@pytest.mark.parametrize("variant", ["shipped", "reordered", "unpinned", "unpinned-reordered"])
def test_controller_numbers_ports_and_thrift_ports_as_p4run(variant):
    data = shipped()
    if variant.startswith("unpinned"):
        data = unpinned(data)
    if variant.endswith("reordered"):
        data = reordered(data)
    assert controller_ports(data) == port_numbers(data)
    t = parse_topology(data)
    assert {s: thrift_port(t, s) for s in t.switches()} == thrift_ports(data)


def test_shipped_file_pins_every_number_and_keeps_the_course_numbering(topo):
    assert topo.unpinned == ()
    topo.require_pinned()
    assert thrift_port(topo, "t1") == 9090 and thrift_port(topo, "c4") == 9109
    assert topo.gateway("h1").name == "t1-eth1" and topo.gateway("h2").name == "t1-eth2"
    a1 = topo.node("a1").interfaces
    assert [a1[p].peer for p in (1, 2, 3, 4)] == ["t1", "t2", "c1", "c2"]
    # a reordered copy means the same network
    again = parse_topology(reordered(shipped()))
    assert controller_ports(reordered(shipped())) == controller_ports(shipped())
    assert {s: thrift_port(again, s) for s in again.switches()} == {
        s: thrift_port(topo, s) for s in topo.switches()
    }


def test_p4_driver_refuses_a_file_with_numbers_left_to_p4utils():
    data = shipped()
    data["topology"]["links"][16] = data["topology"]["links"][16][:2]  # ["t1", "a1"]
    del data["topology"]["switches"]["c2"]["thrift_port"]
    t = parse_topology(data, "mine.json")
    assert t.unpinned == (
        "link [t1, a1]: port1 (t1)",
        "link [t1, a1]: port2 (a1)",
        "c2: thrift_port",
    )
    net = network_for(data)
    with pytest.raises(TopologyError, match=r"mine.json: the p4 driver needs every switch port"
                       r".*3 are not: link \[t1, a1\]: port1 \(t1\)"):  # fmt: skip
        program_all(t, compute_routes(t), net.factory)
    assert net.made == []  # refused before connecting to anything


def test_thrift_port_of_a_host_is_an_error(topo):
    with pytest.raises(TopologyError, match="'h1' is not a switch"):
        thrift_port(topo, "h1")


# --- programming ---


def test_t1_calls_match_golden_list(topo, programs):
    net = network_for(shipped())
    api = net.factory("t1", thrift_port(topo, "t1"))
    added = program_switch(api, programs["t1"])
    assert api.call_lines() == golden_lines(GOLDEN_T1)
    assert added == len(programs["t1"].entries) == 27  # 21 routes, 6 source-guard entries


def test_every_switch_gets_its_own_program_and_a_rerun_gives_the_same(topo, programs):
    net = network_for(shipped())
    for _ in range(2):  # p4-program run twice: same tables, no DUPLICATE_ENTRY
        added = program_all(topo, programs, net.factory)
        assert added == {s: len(programs[s].entries) for s in topo.switches()}
        for sw in topo.switches():
            fake = net.switch(sw)
            assert fake.device_id == topo.node(sw).device_id
            got = {(t, k, a, json.dumps(p)) for t, es in fake.entries.items()
                   for k, (a, p) in es.items()}  # fmt: skip
            want = {(e.table, json.dumps(list(e.match)), e.action, json.dumps(list(e.params)))
                    for e in programs[sw].entries}  # fmt: skip
            assert got == want
            assert fake.defaults == {
                IPV4_LPM: ("drop", []),
                ECMP_GROUP_TO_NHOP: ("drop", []),
                SRC_GUARD: (SRC_ALLOW, []),
            }


def test_the_old_file_order_numbering_is_caught_before_writing(topo, programs):
    # The controller believes t1 is on 9090 (file order) but p4run put a1 there.
    net = network_for(unpinned(shipped()))
    with pytest.raises(P4DriverError, match="t1: thrift port 9090 answers as device 9, not 1"):
        program_all(topo, programs, net.factory)
    assert all(not es for s in net.by_port.values() for es in s.entries.values())


def test_a_refused_entry_is_an_error_naming_switch_and_entry(topo, programs):
    net = network_for(shipped())
    net.switch("t1").entries[IPV4_LPM]['["10.2.3.0/24"]'] = ("drop", [])  # a stale entry
    net.switch("t1").clear_works = False
    api = net.factory("t1", 9090)
    with pytest.raises(P4DriverError, match=r"t1: refused `table_add ipv4_lpm ecmp_group 10\.2\.3"):
        program_switch(api, programs["t1"])


def test_entry_counts_are_read_back(topo, programs):
    net = network_for(shipped())
    fake = net.switch("t1")
    fake.entries[ECMP_GROUP_TO_NHOP]['["9", "9"]'] = ("drop", [])  # left by someone else
    fake.clear_works = False  # a clear that did nothing, silently (it returns None anyway)
    with pytest.raises(P4DriverError, match="t1: table ecmp_group_to_nhop holds 5 entries"
                       " after programming, not 4"):  # fmt: skip
        program_switch(net.factory("t1", 9090), programs["t1"])


def test_programs_for_unknown_switches_are_refused(topo, programs):
    bad = {"t1": programs["t1"], "zz": programs["t1"]}
    with pytest.raises(TopologyError, match=r"unknown switches \['zz'\]"):
        program_all(topo, bad, network_for(shipped()).factory)


def fake_p4utils_module(monkeypatch, net: FakeNetwork) -> None:
    """Make `from p4utils.utils.sswitch_thrift_API import SimpleSwitchThriftAPI` give the fake."""
    mod = types.ModuleType("p4utils.utils.sswitch_thrift_API")

    def api(thrift_port, thrift_ip="localhost", json_path=None):
        return RecordingThriftAPI(thrift_port, thrift_ip, json_path, network=net)

    mod.SimpleSwitchThriftAPI = api  # type: ignore[attr-defined]
    for name in ("p4utils", "p4utils.utils"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "p4utils.utils.sswitch_thrift_API", mod)


def test_p4_program_command_programs_every_switch(monkeypatch, capsys):
    net = network_for(shipped())
    fake_p4utils_module(monkeypatch, net)
    assert main(["p4-program"]) == 0
    assert main(["p4-program"]) == 0  # rerunnable
    out = capsys.readouterr().out
    assert "t1: 27 entries" in out and "c4: 17 entries" in out


def test_p4_program_command_unreachable_switch_exits_1_with_the_drivers_message(
    monkeypatch, capsys
):
    net = network_for(shipped())
    del net.by_port[9095]  # t6 is not running
    fake_p4utils_module(monkeypatch, net)
    assert main(["p4-program"]) == 1
    err = capsys.readouterr().err
    assert "t6: cannot connect to thrift port 9095: no switch listens there" in err


def test_factory_needs_p4utils_and_says_so(monkeypatch):
    from controller.drivers import p4

    monkeypatch.setitem(sys.modules, "p4utils", None)  # import fails even where installed
    with pytest.raises(P4DriverError, match="needs p4-utils"):
        p4.thrift_api_factory("t1", 9090)


def test_fake_has_the_p4utils_signatures():
    # as in p4utils/utils/thrift_API.py (ThriftAPI, base of SimpleSwitchThriftAPI)
    params = {
        "table_add": ["self", "table_name", "action_name", "match_keys", "action_params", "prio"],
        "table_set_default": ["self", "table_name", "action_name", "action_params"],
        "table_clear": ["self", "table_name"],
        "table_num_entries": ["self", "table_name"],
    }
    for method, names in params.items():
        assert list(inspect.signature(getattr(RecordingThriftAPI, method)).parameters) == names
    # sswitch_thrift_API.SimpleSwitchThriftAPI.__init__(self, thrift_port, thrift_ip, json_path)
    init = list(inspect.signature(RecordingThriftAPI.__init__).parameters)
    assert init[:4] == ["self", "thrift_port", "thrift_ip", "json_path"]


# --- the P4 program declares what the driver sends (it cannot be compiled here) ---


def p4_text() -> str:
    return re.sub(r"/\*.*?\*/|//[^\n]*", "", P4_SOURCE.read_text(), flags=re.S)


def typedefs(src: str) -> dict[str, int]:
    return {m[2]: int(m[1]) for m in re.finditer(r"typedef\s+bit<(\d+)>\s+(\w+)\s*;", src)}


def width(src: str, type_name: str) -> int:
    m = re.fullmatch(r"bit<(\d+)>", type_name)
    return int(m[1]) if m else typedefs(src)[type_name]


def action_params(src: str, action: str) -> list[tuple[str, int]]:
    m = re.search(rf"\baction\s+{action}\s*\(([^)]*)\)", src)
    assert m, f"action {action} not in {P4_SOURCE}"
    params = [p.split() for p in m[1].split(",") if p.strip()]
    return [(name, width(src, typ)) for typ, name in params]


def table_body(src: str, table: str) -> str:
    m = re.search(rf"\btable\s+{table}\s*\{{(.*?)\n    \}}", src, flags=re.S)
    assert m, f"table {table} not in {P4_SOURCE}"
    return m[1]


def table_keys(src: str, table: str) -> list[tuple[str, str]]:
    keys = re.search(r"key\s*=\s*\{(.*?)\}", table_body(src, table), flags=re.S)
    assert keys
    return re.findall(r"([\w.]+)\s*:\s*(\w+)\s*;", keys[1])


def table_actions(src: str, table: str) -> set[str]:
    acts = re.search(r"actions\s*=\s*\{(.*?)\}", table_body(src, table), flags=re.S)
    assert acts
    return set(re.findall(r"(\w+)\s*;", acts[1]))


def metadata_width(src: str, field: str) -> int:
    m = re.search(rf"struct\s+metadata\s*\{{[^}}]*?bit<(\d+)>\s+{field}\s*;", src, flags=re.S)
    assert m, f"meta.{field} not declared"
    return int(m[1])


def test_p4_tables_and_actions_are_the_drivers():
    src = p4_text()
    assert table_keys(src, IPV4_LPM) == [("hdr.ipv4.dstAddr", "lpm")]
    assert table_keys(src, ECMP_GROUP_TO_NHOP) == [
        ("meta.ecmp_group_id", "exact"),
        ("meta.ecmp_hash", "exact"),
    ]
    assert table_actions(src, IPV4_LPM) == {SET_NHOP, ECMP_GROUP, "drop"}
    assert table_actions(src, ECMP_GROUP_TO_NHOP) == {SET_NHOP, "drop"}
    assert action_params(src, SET_NHOP) == [("dstAddr", 48), ("port", 9)]
    assert action_params(src, ECMP_GROUP) == [("ecmp_group_id", 14), ("num_nhops", 16)]
    assert action_params(src, "drop") == []


def test_p4_hashes_the_5_tuple_with_crc16():
    src = p4_text()
    m = re.search(
        r"hash\s*\(\s*meta\.ecmp_hash\s*,\s*HashAlgorithm\.crc16\s*,[^{]*\{([^}]*)\}", src
    )
    assert m, "no crc16 hash into meta.ecmp_hash"
    fields = {f.strip() for f in m[1].split(",")}
    assert {"hdr.ipv4.srcAddr", "hdr.ipv4.dstAddr", "hdr.ipv4.protocol"} <= fields
    assert {"meta.l4_src", "meta.l4_dst"} <= fields
    assert "hdr.tcp.srcPort" in src and "hdr.udp.srcPort" in src
    assert re.search(r"hdr\.ipv4\.ttl\s*=\s*hdr\.ipv4\.ttl\s*-\s*1", src), "no TTL decrement"
    assert "update_checksum" in src and "HashAlgorithm.csum16" in src


def test_every_entry_fits_the_p4_widths(programs):
    src = p4_text()
    w_gid = metadata_width(src, "ecmp_group_id")
    w_hash = metadata_width(src, "ecmp_hash")
    (_, w_mac), (_, w_port) = action_params(src, SET_NHOP)
    (_, w_gid_param), (_, w_n) = action_params(src, ECMP_GROUP)
    assert w_gid == w_gid_param
    for program in programs.values():
        for e in program.entries:
            if e.action == SET_NHOP:
                mac, port = e.params
                assert int(mac.replace(":", ""), 16) < 1 << w_mac and len(mac) == 17
                assert 0 < int(port) < 1 << w_port
            elif e.action == ECMP_GROUP:
                gid, n = (int(x) for x in e.params)
                assert 0 < gid < 1 << w_gid and 1 < n < 1 << w_n
                # every hash value below n is a key of ecmp_group_to_nhop
                assert n <= 1 << w_hash
            if e.table == ECMP_GROUP_TO_NHOP:
                gid, idx = (int(x) for x in e.match)
                assert gid < 1 << w_gid and idx < 1 << w_hash
