"""The p4 driver against a recording fake of p4-utils, and the entries against p4src/ecmp.p4."""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

import pytest
from fake_p4utils import RecordingThriftAPI

from controller.drivers.p4 import P4DriverError, program_all, program_switch, thrift_port
from controller.routes import ECMP_GROUP, ECMP_GROUP_TO_NHOP, IPV4_LPM, SET_NHOP, compute_routes
from controller.topology import TopologyError, load_topology

ROOT = Path(__file__).resolve().parents[2]
GOLDEN_T1 = ROOT / "tests" / "fixtures" / "p4_calls_t1.txt"
P4_SOURCE = ROOT / "p4src" / "ecmp.p4"


@pytest.fixture(scope="module")
def topo():
    return load_topology()


@pytest.fixture(scope="module")
def programs(topo):
    return compute_routes(topo)


def golden_lines(path: Path) -> list[str]:
    return [ln for ln in path.read_text().splitlines() if ln and not ln.startswith("#")]


def test_t1_calls_match_golden_list(programs):
    api = RecordingThriftAPI(9090)
    added = program_switch(api, programs["t1"])
    assert api.call_lines() == golden_lines(GOLDEN_T1)
    assert added == len(golden_lines(GOLDEN_T1)) - 2  # minus the two table_set_default


def test_program_all_connects_each_switch_on_its_p4run_thrift_port(topo, programs):
    made: dict[str, RecordingThriftAPI] = {}

    def factory(switch: str, port: int) -> RecordingThriftAPI:
        made[switch] = RecordingThriftAPI(port)
        return made[switch]

    added = program_all(topo, programs, factory)
    assert list(made) == topo.switches()  # t1..t8, a1..a8, c1..c4
    assert {s: a.thrift_port for s, a in made.items()} == {
        s: 9090 + i for i, s in enumerate(topo.switches())
    }
    for sw, api in made.items():
        assert added[sw] == len(programs[sw].entries)
        assert api.call_lines()[:2] == [
            'table_set_default ["ipv4_lpm", "drop", []]',
            'table_set_default ["ecmp_group_to_nhop", "drop", []]',
        ]
        assert len(api.calls) == 2 + len(programs[sw].entries)
    assert made["t1"].call_lines() == golden_lines(GOLDEN_T1)


def test_thrift_port_of_a_host_is_an_error(topo):
    assert thrift_port(topo, "c4") == 9109
    with pytest.raises(TopologyError, match="'h1' is not a switch"):
        thrift_port(topo, "h1")


def test_refused_entry_is_an_error_naming_switch_and_entry(programs):
    api = RecordingThriftAPI(9090, refuse_after=3)
    with pytest.raises(P4DriverError, match=r"t1: refused `table_add ipv4_lpm ecmp_group 10\.2\.3"):
        program_switch(api, programs["t1"])
    assert len(api.calls) == 2 + 4  # stopped at the refused entry


def test_programs_for_unknown_switches_are_refused(topo, programs):
    bad = {"t1": programs["t1"], "zz": programs["t1"]}
    with pytest.raises(TopologyError, match=r"unknown switches \['zz'\]"):
        program_all(topo, bad, lambda s, p: RecordingThriftAPI(p))


def test_factory_needs_p4utils_and_says_so(monkeypatch):
    from controller.drivers import p4

    monkeypatch.setitem(sys.modules, "p4utils", None)  # import fails even where installed
    with pytest.raises(P4DriverError, match="needs p4-utils"):
        p4.thrift_api_factory("t1", 9090)


def test_fake_has_the_p4utils_signatures():
    # as in p4utils/utils/thrift_API.py (ThriftAPI, base of SimpleSwitchThriftAPI)
    sig = inspect.signature(RecordingThriftAPI.table_add)
    assert list(sig.parameters) == [
        "self",
        "table_name",
        "action_name",
        "match_keys",
        "action_params",
        "prio",
    ]
    sig = inspect.signature(RecordingThriftAPI.table_set_default)
    assert list(sig.parameters) == ["self", "table_name", "action_name", "action_params"]


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
