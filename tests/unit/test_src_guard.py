"""The source guard (BCP 38 at the edge): entries from controller.routes, the table in
p4src/ecmp.p4 (which cannot be compiled here: its text is checked), and the Linux driver's
nftables realisation, which must decide every packet as the P4 table's LPM does."""

from __future__ import annotations

import ipaddress
import re

import pytest
from fake_p4utils import FakeNetwork, FakeSwitch
from test_p4_driver import action_params, p4_text, table_actions, table_body, table_keys

from controller.deployment import load_deployment
from controller.drivers import linux
from controller.drivers.p4 import program_switch
from controller.routes import (
    SRC_ALLOW,
    SRC_DENIED_COUNTER,
    SRC_DENY,
    SRC_GUARD,
    SwitchProgram,
    TableEntry,
    compute_routes,
)

VIP = "20.0.0.1"


@pytest.fixture(scope="module")
def dep():
    return load_deployment()


@pytest.fixture(scope="module")
def programs(dep):
    return compute_routes(dep.topology, dep.vip, dep.load_balancers, dep.vip_sources())


def guard(program: SwitchProgram) -> list[TableEntry]:
    return [e for e in program.entries if e.table == SRC_GUARD]


def lpm_verdict(program: SwitchProgram, port: int, src: str) -> str:
    """What bmv2 does with src_guard: exact port, then the longest matching prefix; the
    default (src_allow) when nothing matches."""
    best: tuple[int, str] | None = None
    for e in guard(program):
        net = ipaddress.IPv4Network(e.match[1])
        hit = int(e.match[0]) == port and ipaddress.IPv4Address(src) in net
        if hit and (best is None or net.prefixlen > best[0]):
            best = (net.prefixlen, e.action)
    return best[1] if best else SRC_ALLOW


def nft_verdict(script: str | None, dev: str, src: str) -> str:
    """What the nft chain does: the first rule matching iifname (and saddr), else accept."""
    if script is None:
        return SRC_ALLOW
    for line in script.splitlines():
        m = re.fullmatch(r'\s+iifname "([^"]+)"(?: ip saddr (\S+))? (accept|counter .* drop)', line)
        if not m or m[1] != dev:
            continue
        if m[2] is None or ipaddress.IPv4Address(src) in ipaddress.IPv4Network(m[2]):
            return SRC_ALLOW if m[3] == "accept" else SRC_DENY
    return SRC_ALLOW


# --- entries -------------------------------------------------------------------------------


def test_each_host_port_allows_its_host_and_denies_the_rest(dep, programs) -> None:
    topo = dep.topology
    for h in topo.hosts():
        gw = topo.gateway(h)
        entries = [e for e in guard(programs[gw.node]) if e.match[0] == str(gw.port)]
        allowed = {e.match[1] for e in entries if e.action == SRC_ALLOW}
        sends_vip = h in dep.load_balancers or h in dict(dep.backends)
        assert allowed == {f"{topo.host_ip(h)}/32", *([f"{VIP}/32"] if sends_vip else [])}, h
        assert [e.match[1] for e in entries if e.action == SRC_DENY] == ["0.0.0.0/0"], h
        assert all(not e.params for e in entries)


def test_switch_ports_and_core_switches_have_no_entries(dep, programs) -> None:
    for sw in dep.topology.switches():
        ports = {e.match[0] for e in guard(programs[sw])}
        hosts = {
            str(p)
            for p, i in dep.topology.node(sw).interfaces.items()
            if dep.topology.nodes[i.peer].kind == "host"
        }
        assert ports == hosts, sw
    assert guard(programs["c1"]) == [] and guard(programs["a1"]) == []


def test_default_vip_sources_are_the_load_balancers(dep) -> None:
    plain = compute_routes(dep.topology, VIP, dep.load_balancers)
    assert ("2", f"{VIP}/32") not in {e.match for e in guard(plain["t8"])}
    assert ("1", f"{VIP}/32") in {e.match for e in guard(plain["t1"])}
    assert dep.vip_sources() == ("h1", "h2", "h3", "h7", "h11", "h15")


@pytest.mark.parametrize(
    ("port", "src", "verdict"),
    [
        (2, "10.8.16.2", SRC_ALLOW),  # h16 itself
        (2, "10.1.1.2", SRC_DENY),  # h16 posing as h1 (the issue's forged tunnel)
        (2, VIP, SRC_DENY),  # h16 is a client: no VIP
        (1, VIP, SRC_ALLOW),  # h15 is a backend: DSR replies
        (1, "10.8.16.2", SRC_DENY),
        (3, "10.1.1.2", SRC_ALLOW),  # from a7: switch ports are not checked
    ],
)
def test_t8_decides_like_the_issue_wants(programs, port: int, src: str, verdict: str) -> None:
    assert lpm_verdict(programs["t8"], port, src) == verdict


# --- P4 source -----------------------------------------------------------------------------


def test_p4_declares_the_guard_table_the_entries_need() -> None:
    src = p4_text()
    assert table_keys(src, SRC_GUARD) == [
        ("standard_metadata.ingress_port", "exact"),
        ("hdr.ipv4.srcAddr", "lpm"),
    ]
    assert table_actions(src, SRC_GUARD) == {SRC_ALLOW, SRC_DENY}
    assert action_params(src, SRC_ALLOW) == [] and action_params(src, SRC_DENY) == []
    assert re.search(rf"default_action\s*=\s*{SRC_ALLOW}\s*;", table_body(src, SRC_GUARD))


def test_p4_counts_and_drops_denied_packets_per_port_before_routing() -> None:
    src = p4_text()
    decl = rf"counter\s*\(\s*(\w+)\s*,\s*CounterType\.packets\s*\)\s*{SRC_DENIED_COUNTER}\s*;"
    m = re.search(decl, src)
    assert m, "no packet counter src_denied"
    const = re.search(rf"const\s+bit<32>\s+{m[1]}\s*=\s*(\d+)\s*;", src)
    size = int(m[1]) if m[1].isdigit() else int(const[1]) if const else 0
    assert size >= 1 << 9, "one counter per 9-bit ingress port"
    body = re.search(rf"action\s+{SRC_DENY}\s*\(\s*\)\s*\{{(.*?)\}}", src, flags=re.S)
    assert body
    count = rf"{SRC_DENIED_COUNTER}\.count\(\s*\(bit<32>\)\s*standard_metadata\.ingress_port\s*\)"
    assert re.search(count, body[1]) and "mark_to_drop(standard_metadata)" in body[1]
    apply = src[src.index("apply {", src.index("table ipv4_lpm")) :]
    at = apply.index(f"{SRC_GUARD}.apply()")
    assert at < apply.index("ipv4_lpm.apply()") and at < apply.index("hdr.ipv4.ttl <= 1")
    assert re.search(rf"{SRC_DENY}\s*:\s*\{{\s*return\s*;", apply), "a denied packet stops"


def test_every_guard_entry_fits_the_key_widths(programs) -> None:
    for program in programs.values():
        for e in guard(program):
            assert 0 < int(e.match[0]) < 1 << 9
            ipaddress.IPv4Network(e.match[1], strict=True)


def test_p4_driver_sends_the_guard_and_its_default(dep, programs) -> None:
    net = FakeNetwork([FakeSwitch("t8", 8, 9097)])
    program_switch(net.factory("t8", 9097), programs["t8"])
    fake = net.switch("t8")
    assert fake.defaults[SRC_GUARD] == (SRC_ALLOW, [])
    assert set(fake.entries[SRC_GUARD]) == {
        '["1", "10.8.15.2/32"]', '["1", "20.0.0.1/32"]', '["1", "0.0.0.0/0"]',
        '["2", "10.8.16.2/32"]', '["2", "0.0.0.0/0"]',
    }  # fmt: skip


# --- Linux: nftables -----------------------------------------------------------------------


def test_t8_ruleset(dep, programs) -> None:
    assert linux.guard_ruleset(programs["t8"], dep.topology) == "\n".join(
        [
            "table ip l4lb_src_guard",
            "delete table ip l4lb_src_guard",
            "table ip l4lb_src_guard {",
            "  counter denied_t8_eth1 { }",
            "  counter denied_t8_eth2 { }",
            "  chain prerouting {",
            "    type filter hook prerouting priority raw; policy accept;",
            '    iifname "t8-eth1" ip saddr 10.8.15.2/32 accept',
            '    iifname "t8-eth1" ip saddr 20.0.0.1/32 accept',
            '    iifname "t8-eth1" counter name "denied_t8_eth1" drop',
            '    iifname "t8-eth2" ip saddr 10.8.16.2/32 accept',
            '    iifname "t8-eth2" counter name "denied_t8_eth2" drop',
            "  }",
            "}",
            "",
        ]
    )
    assert linux.guard_ruleset(programs["c1"], dep.topology) is None


def test_nft_rules_decide_every_packet_as_the_p4_table(dep, programs) -> None:
    topo = dep.topology
    sources = [topo.host_ip(h) for h in topo.hosts()] + [VIP, "10.8.16.3", "192.0.2.1"]
    for sw in topo.switches():
        script = linux.guard_ruleset(programs[sw], topo)
        for port, iface in topo.node(sw).interfaces.items():
            for src in sources:
                want = lpm_verdict(programs[sw], port, src)
                assert nft_verdict(script, iface.name, src) == want, (sw, iface.name, src)


def test_entries_out_of_order_still_put_the_longest_prefix_first(dep, programs) -> None:
    p = programs["t8"]
    shuffled = SwitchProgram(p.switch, p.defaults, tuple(reversed(p.entries)))
    assert linux.guard_ruleset(shuffled, dep.topology) == linux.guard_ruleset(p, dep.topology)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (TableEntry(SRC_GUARD, SRC_DENY, ("9", "0.0.0.0/0"), ()), "t8 has no port 9"),
        (TableEntry(SRC_GUARD, SRC_DENY, ("1", "10.8.15.0/16"), ()), "bad prefix"),
        (TableEntry(SRC_GUARD, "drop", ("1", "0.0.0.0/0"), ()), "expected src_allow|src_deny"),
        (TableEntry(SRC_GUARD, SRC_ALLOW, ("1",), ()), "expected src_allow|src_deny"),
    ],
)
def test_bad_guard_entries_are_refused(dep, entry: TableEntry, message: str) -> None:
    with pytest.raises(linux.DriverError, match=message):
        linux.guard_ruleset(SwitchProgram("t8", (), (entry,)), dep.topology)


def test_route_commands_ignore_the_guard_and_refuse_another_default(dep, programs) -> None:
    cmds = linux.program_commands(programs["t8"], dep.topology)
    assert not [c for c in cmds if "0.0.0.0/0" in c]
    from controller.routes import DefaultAction

    bad = SwitchProgram("t8", (DefaultAction(SRC_GUARD, SRC_DENY),), ())
    with pytest.raises(linux.DriverError, match="unsupported default action"):
        linux.program_commands(bad, dep.topology)
