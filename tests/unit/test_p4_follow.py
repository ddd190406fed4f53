"""controller.p4follow: the VIP entries of an LB ToR as LBs come and go, written through the
fake of p4-utils (tests/unit/fake_p4utils.py: its handles and *_match calls are p4-utils')."""

from __future__ import annotations

import json

import pytest
from fake_p4utils import FakeNetwork, FakeSwitch, UIn_Error
from test_p4_driver import fake_p4utils_module, network_for, shipped

from controller.__main__ import main
from controller.deployment import load_deployment
from controller.drivers.p4 import P4DriverError, program_all
from controller.p4follow import (
    Change,
    Follower,
    changes,
    static_vip,
    vip_entries,
    vip_group_id,
)
from controller.routes import ECMP_GROUP_TO_NHOP, IPV4_LPM, TableEntry, compute_routes

VIP = "20.0.0.1"
H1_MAC, H2_MAC = "00:00:0a:01:01:02", "00:00:0a:01:02:02"


@pytest.fixture(scope="module")
def dep():
    return load_deployment()


@pytest.fixture(scope="module")
def programs(dep):
    return compute_routes(dep.topology, dep.vip, dep.load_balancers, dep.vip_sources())


def switch_entries(fake: FakeSwitch, table: str) -> dict[str, tuple[str, list[str]]]:
    return dict(fake.entries[table])


def program_entries(program, table: str) -> dict[str, tuple[str, list[str]]]:
    return {
        json.dumps(list(e.match)): (e.action, list(e.params))
        for e in program.entries
        if e.table == table
    }


# --- pure ----------------------------------------------------------------------------------


def test_vip_entries_for_each_live_set(dep, programs) -> None:
    t1, topo = programs["t1"], dep.topology
    assert vip_entries(topo, t1, VIP, ["h1", "h2"]) == static_vip(t1, VIP)
    one = vip_entries(topo, t1, VIP, ["h2"])
    assert one.route == TableEntry(IPV4_LPM, "set_nhop", (f"{VIP}/32",), (H2_MAC, "2"))
    assert one.members == ()
    none = vip_entries(topo, t1, VIP, [])
    assert none.route == TableEntry(IPV4_LPM, "drop", (f"{VIP}/32",), ()) and none.members == ()
    # an LB on another ToR changes nothing on this one
    assert vip_entries(topo, t1, VIP, ["h2", "h9"]) == one


def test_group_id_of_a_tor_with_one_lb_is_a_free_one(dep) -> None:
    topo = dep.topology
    progs = compute_routes(topo, VIP, ("h1", "h3"))  # one LB on t1, one on t2
    t2 = progs["t2"]
    assert static_vip(t2, VIP).route.action == "set_nhop"
    used = {int(e.match[0]) for e in t2.entries if e.table == ECMP_GROUP_TO_NHOP}
    assert vip_group_id(t2, VIP) == max(used) + 1
    assert vip_group_id(progs["t1"], VIP) == 1 or static_vip(progs["t1"], VIP).members == ()


def test_changes_never_leave_a_lookup_without_a_member(dep, programs) -> None:
    t1, topo = programs["t1"], dep.topology
    both, only_h2, none = (vip_entries(topo, t1, VIP, live) for live in (["h1", "h2"], ["h2"], []))
    shrink = changes(both, only_h2)
    assert [c.kind for c in shrink] == ["modify", "delete", "delete"]  # the VIP first
    grow = changes(only_h2, both)
    assert [c.kind for c in grow] == ["add", "add", "modify"]  # the members first
    assert [c.kind for c in changes(only_h2, none)] == ["modify"]
    assert changes(both, both) == []
    assert Change("delete", both.members[0]).cli() == "table_delete ecmp_group_to_nhop 1 0"


# --- against the fake switches -------------------------------------------------------------


class Flags:
    def __init__(self) -> None:
        self.up = {"h1": True, "h2": True}

    def __call__(self, host: str) -> bool:
        return self.up[host]


def follower(dep, programs, net: FakeNetwork, flags: Flags) -> Follower:
    return Follower(dep.topology, programs, VIP, dep.load_balancers, flags, net.factory)


def test_follow_h1_going_and_coming_back(dep, programs) -> None:
    net = network_for(shipped())
    program_all(dep.topology, programs, net.factory)  # what p4-program left
    flags = Flags()
    f = follower(dep, programs, net, flags)
    assert f.start() == ["t1: programmed (27 entries), VIP via h1, h2"]
    assert [api.thrift_port for api in net.made[-1:]] == [9090], "only the LBs' ToR"
    t1 = net.switch("t1")
    assert f.step() == []  # nothing changed: nothing sent
    flags.up["h1"] = False
    (msg,) = f.step()
    assert msg.startswith("t1: VIP via h2 (h1 withdrawn; 3 changes in ")
    assert t1.entries[IPV4_LPM][f'["{VIP}/32"]'] == ("set_nhop", [H2_MAC, "2"])
    assert not [k for k in t1.entries[ECMP_GROUP_TO_NHOP] if k.startswith('["1"')]
    flags.up["h1"] = True
    (msg,) = f.step()
    assert "VIP via h1, h2 (h1 announced" in msg
    for table in (IPV4_LPM, ECMP_GROUP_TO_NHOP):
        assert switch_entries(t1, table) == program_entries(programs["t1"], table)
    flags.up = {"h1": False, "h2": False}
    (msg,) = f.step()
    assert "VIP via nothing (drop)" in msg
    assert t1.entries[IPV4_LPM][f'["{VIP}/32"]'] == ("drop", [])


def test_a_new_api_object_cannot_modify_entries_another_one_added(dep, programs) -> None:
    """Why start() programs the ToR afresh: p4-utils' *_match calls know only their own."""
    net = network_for(shipped())
    program_all(dep.topology, programs, net.factory)
    fresh = net.factory("t1", 9090)
    with pytest.raises(UIn_Error, match="has no match"):
        fresh.table_modify_match(IPV4_LPM, "drop", [f"{VIP}/32"], [])
    # ... except the last entry the switch lists (p4-utils' loader keeps only that one)
    last = list(net.switch("t1").entries[IPV4_LPM])[-1]
    assert fresh.table_modify_match(IPV4_LPM, "drop", json.loads(last), []) is not None


def test_a_refused_change_is_an_error_naming_it(dep, programs) -> None:
    net = network_for(shipped())
    flags = Flags()
    f = follower(dep, programs, net, flags)
    f.start()
    other = net.factory("t1", 9090)  # someone deletes the VIP entry behind our back
    handle = net.switch("t1").handle_of(IPV4_LPM, f'["{VIP}/32"]')
    other.table_delete(IPV4_LPM, handle)
    flags.up["h1"] = False
    with pytest.raises(P4DriverError, match=r"t1: refused `table_modify ipv4_lpm set_nhop 20\.0"):
        f.step()


def test_a_delete_that_did_nothing_is_caught_by_the_count(dep, programs, monkeypatch) -> None:
    net = network_for(shipped())
    flags = Flags()
    f = follower(dep, programs, net, flags)
    f.start()
    monkeypatch.setattr(net.switch("t1"), "delete", lambda table, handle: None)
    flags.up["h2"] = False
    with pytest.raises(P4DriverError, match="holds 4 entries after the change, not 2"):
        f.step()


def test_wrong_switch_on_the_port_is_refused_before_writing(dep, programs) -> None:
    net = FakeNetwork([FakeSwitch("a1", 9, 9090)])  # not t1 behind t1's thrift port
    f = follower(dep, programs, net, Flags())
    with pytest.raises(P4DriverError, match="answers as device 9, not 1"):
        f.start()
    assert all(not es for es in net.switch("a1").entries.values())


# --- the command ---------------------------------------------------------------------------


def test_p4_follow_once_without_any_bird_drops_the_vip(monkeypatch, capsys, tmp_path) -> None:
    net = network_for(shipped())
    fake_p4utils_module(monkeypatch, net)
    assert main(["p4-follow", "--once", "--state-dir", str(tmp_path)]) == 0
    # (p4-utils prints as it goes, as the fake does: "trying to delete entry with handle ...")
    out = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(("t1:", "p4-"))]
    assert out[0] == "t1: programmed (27 entries), VIP via h1, h2"
    assert out[1].startswith(f"p4-follow: following h1 ({tmp_path}/bird/h1.ctl)")
    assert out[2].startswith("t1: VIP via nothing (drop) (h1 withdrawn; h2 withdrawn;")
    assert net.switch("t1").entries[IPV4_LPM][f'["{VIP}/32"]'] == ("drop", [])


def test_p4_follow_bad_socket_option_exits_2(capsys) -> None:
    assert main(["p4-follow", "--socket", "h3=/x"]) == 2
    assert "expected HOST=PATH with HOST one of h1, h2" in capsys.readouterr().err
    assert main(["p4-follow", "--socket", "h1"]) == 2


def test_bird_config_command(capsys) -> None:
    assert main(["bird-config", "t1"]) == 0
    assert "protocol bgp h1 from lb" in capsys.readouterr().out
    assert main(["bird-config", "h3"]) == 2
    assert "'h3' runs no BIRD" in capsys.readouterr().err


def test_fake_change_signatures_are_p4utils(dep) -> None:
    import inspect

    from fake_p4utils import RecordingThriftAPI

    params = {  # p4utils/utils/thrift_API.py
        "table_modify": ["self", "table_name", "action_name", "entry_handle", "action_params"],
        "table_modify_match": ["self", "table_name", "action_name", "match_keys", "action_params"],
        "table_delete": ["self", "table_name", "entry_handle", "quiet"],
        "table_delete_match": ["self", "table_name", "match_keys"],
        "get_handle_from_match": ["self", "table_name", "match_keys", "pop"],
    }
    for method, names in params.items():
        assert list(inspect.signature(getattr(RecordingThriftAPI, method)).parameters) == names
