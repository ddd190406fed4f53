"""The golden fixture table (tests/fixtures/cases.py) replayed through the packet core's ring
path, the one that forwards real traffic, over a FakeRing: every case gives exactly its
expected frame (or none) and exactly its verdict counter."""

from __future__ import annotations

import functools
import struct

import pytest

from fastpath.balancer import Balancer
from fastpath.config import BalancerConfig
from fastpath.conntrack import FlowEvent
from fastpath.counters import DropReason
from fastpath.stats import CoreStats, FlowStats
from l4lb.checksum import checksum, fold
from l4lb.ring import FakeRing
from l4lb.wire import IPV4, UDP
from tests.fixtures import cases

Result = tuple[cases.Case, bytes | None, dict[str, dict[str, int]]]
"""(case, frame sent or None, deltas: drops, forwarded per backend, flow events, and the
established and half-open counts of the connection table)."""


def make_config(name: str, **changes: object) -> BalancerConfig:
    return BalancerConfig(**{**cases.config_kwargs(name), **changes})  # type: ignore[arg-type]


def replay(bal: Balancer, table: list[cases.Case]) -> list[Result]:
    """The table loaded in a FakeRing, one slot per case, each slot handled as a batch of its
    own (so that each case's counter deltas show): (case, output, counter deltas)."""
    ring = FakeRing(len(table))
    ring.load([c.frame for c in table])
    ring_batch = bal.bind_ring(ring.slots)
    unsent = ring.slots.unsent
    results = []
    for i, case in enumerate(table):
        ct = bal.conntrack
        before = (list(bal.counters.drops), list(bal.counters.forwarded))
        events, sizes = list(ct.events), (len(ct), ct.half_open)
        assert ring_batch(i, i + 1, cases.NOW) == 1
        output = None if unsent == [i] else ring.sent(i)
        unsent.clear()
        drops = {
            DropReason(j).name: b - a
            for j, (a, b) in enumerate(zip(before[0], bal.counters.drops, strict=True))
            if b != a
        }
        fwd = {
            bal.counters.backend_names[j]: b - a
            for j, (a, b) in enumerate(zip(before[1], bal.counters.forwarded, strict=True))
            if b != a
        }
        flows = {
            FlowEvent(j).name: b - a
            for j, (a, b) in enumerate(zip(events, ct.events, strict=True))
            if b != a
        }
        table = {"established": len(ct) - sizes[0], "half_open": ct.half_open - sizes[1]}
        results.append(
            (case, output, {"drops": drops, "forwarded": fwd, "flows": flows, "table": table})
        )
    return results


@functools.cache
def replayed(config: str) -> dict[str, Result]:
    """Each case of `config` through one fresh Balancer, in table order (computed once, when a
    test first asks, not at import)."""
    results = replay(Balancer(make_config(config)), cases.load(config))
    return {r[0].spec.name: r for r in results}


@pytest.mark.parametrize("spec", cases.SPECS, ids=str)
def test_case(spec: cases.Spec) -> None:
    case, output, delta = replayed(spec.config)[spec.name]
    assert output == case.expected, f"{spec.name}: {spec.description}"
    verdict = {k: delta[k] for k in ("drops", "forwarded")}
    if spec.verdict == "forward":
        assert delta["drops"] == {}
        outer_dst = ".".join(str(b) for b in case.expected[30:34])  # type: ignore[index]
        assert delta["forwarded"] == {outer_dst: 1}
    elif spec.verdict == "icmp_reply":
        assert verdict == {"drops": {"FRAG_NEEDED": 1}, "forwarded": {}}
    else:
        assert verdict == {"drops": {spec.verdict: 1}, "forwarded": {}}
    if spec.flow is not None:
        events, established, half_open = cases.FLOW_EFFECTS[spec.flow]
        assert delta["flows"] == events, spec.name
        assert delta["table"] == {"established": established, "half_open": half_open}


def test_every_flow_effect_has_a_golden_case() -> None:
    assert {s.flow for s in cases.SPECS} - {None} == set(cases.FLOW_EFFECTS)


def test_every_drop_reason_has_a_golden_case() -> None:
    verdicts = {s.verdict for s in cases.SPECS} | {"FRAG_NEEDED"}  # icmp_reply counts there
    # INTERNAL_ERROR counts bugs, not inputs: no frame may produce it (test_fuzz checks that).
    missing = {r.name for r in DropReason} - verdicts - {"INTERNAL_ERROR"}
    assert not missing


def _backend(name: str) -> str:
    spec = next(s for s in cases.SPECS if s.name == name)
    output = replayed(spec.config)[name][1]
    assert output is not None
    return ".".join(str(b) for b in output[30:34])


@pytest.mark.parametrize("spec", [s for s in cases.SPECS if s.same_backend_as], ids=str)
def test_related_cases_share_a_backend(spec: cases.Spec) -> None:
    """Fragments of one datagram, ICMP errors about a flow: the flow's backend."""
    assert spec.same_backend_as is not None
    assert _backend(spec.name) == _backend(spec.same_backend_as)


def test_many_flows_spread_over_every_backend() -> None:
    used = {_backend(s.name) for s in cases.SPECS if s.name.startswith("many_flows_")}
    assert used == {ip for ip, _ in cases.BACKENDS}


@pytest.mark.parametrize("config", list(cases.CONFIGS))
def test_the_whole_table_as_one_batch(config: str) -> None:
    """One batch over the whole table, as the ring hands it over: the same frames from the
    same slots, the dropped slots listed, nothing past the last ready slot touched."""
    bal = Balancer(make_config(config))
    table = cases.load(config)
    ring = FakeRing(len(table) + 1)  # the last slot is never ready
    ring.load([c.frame for c in table])
    ring_batch = bal.bind_ring(ring.slots)
    assert ring_batch(0, len(table) + 1, cases.NOW) == len(table)
    unsent = ring.slots.unsent
    assert unsent == [i for i, c in enumerate(table) if c.expected is None]
    sent = [ring.sent(i) for i in range(len(table)) if i not in unsent]
    assert sent == [c.expected for c in table if c.expected is not None]
    assert bal.counters.total == len(table)


def test_one_frame_adapter_gives_the_same_frames() -> None:
    bal = Balancer(make_config("default"))
    out = memoryview(bytearray(bal.cfg.mtu + 34))
    for case in cases.load("default"):
        frame = bytes(case.frame)
        n = bal.process(frame, out, cases.NOW)
        assert (bytes(out[:n]) if n else None) == case.expected, case.spec.name
        assert frame == case.frame  # the caller's frame is left alone


def test_fixtures_are_what_make_fixtures_writes(tmp_path, monkeypatch) -> None:
    """The committed pcaps are reproducible from the table (no hand-edited bytes)."""
    pytest.importorskip("scapy", reason="scapy crafts the fixtures")
    from tests.fixtures import make_fixtures

    committed = {p.name: p.read_bytes() for p in cases.FIXTURES.glob("golden_*.pcap")}
    monkeypatch.setattr(cases, "FIXTURES", tmp_path)
    make_fixtures.main()
    assert {p.name: p.read_bytes() for p in tmp_path.glob("golden_*.pcap")} == committed


def test_general_path_matches_fast_path() -> None:
    """With checksum verification on, every frame takes the kernel's general path (the fast
    path skips it); on the default table (valid checksums) it must send the same frames and
    give the same verdicts as the fast path did."""
    table = cases.load("default")
    checked = Balancer(make_config("default", verify_checksum=True))
    general = replay(checked, table)
    for case, output, _ in general:
        assert output == case.expected, case.spec.name
    fast = Balancer(make_config("default"))
    assert [r[2] for r in general] == [r[2] for r in replay(fast, table)]  # verdict per case
    assert CoreStats.of(checked.counters) == CoreStats.of(fast.counters)
    assert FlowStats.of(checked.conntrack) == FlowStats.of(fast.conntrack)


def test_general_path_matches_fast_path_under_the_cap() -> None:
    """The SYN flood cap's cases take the same decisions on both paths (one rule: `miss`)."""
    table = cases.load("syn_cap")
    checked = Balancer(make_config("syn_cap", verify_checksum=True))
    fast = Balancer(make_config("syn_cap"))
    assert replay(checked, table) == replay(fast, table)
    assert FlowStats.of(checked.conntrack) == FlowStats.of(fast.conntrack)


def _udp_to_vip(payload: bytes, csum_field: int | None) -> bytes:
    """A UDP datagram to VIP:53 with the given checksum field (None: the right one)."""
    src, dst = bytes([10, 8, 16, 2]), bytes([20, 0, 0, 1])
    length = 8 + len(payload)
    ip = bytearray(IPV4.pack(0x45, 0, 20 + length, 7, 0x4000, 64, 17, 0, src, dst))
    ip[10:12] = checksum(ip).to_bytes(2, "big")
    pseudo = src + dst + struct.pack("!BBH", 0, 17, length)
    if csum_field is None:
        csum_field = checksum(pseudo + UDP.pack(40000, 53, length, 0) + payload)
    udp = UDP.pack(40000, 53, length, csum_field) + payload
    eth = bytes.fromhex(cases.LB_MAC.replace(":", "") + cases.GW_MAC.replace(":", "")) + b"\x08\0"
    return eth + bytes(ip) + udp


def test_a_partial_checksum_flagged_by_the_ring_is_completed() -> None:
    """A slot flagged CSUM_NOT_READY (a local sender's offload left only the pseudo-header sum
    in the UDP checksum) is forwarded with the checksum completed, and counted."""
    payload = b"partial checksum"
    src, dst = bytes([10, 8, 16, 2]), bytes([20, 0, 0, 1])
    pseudo_sum = fold(sum(struct.unpack("!6H", src + dst + struct.pack("!BBH", 0, 17, 24))))
    partial, complete = _udp_to_vip(payload, pseudo_sum), _udp_to_vip(payload, None)
    bal = Balancer(make_config("default"))
    ring = FakeRing(2)
    ring.put(0, partial, csum_not_ready=True)
    ring.put(1, partial)  # not flagged: left as it is
    assert bal.bind_ring(ring.slots)(0, 2, cases.NOW) == 2
    assert ring.slots.unsent == []
    assert ring.sent(0)[34:] == complete[14:]
    assert ring.sent(1)[34:] == partial[14:]
    assert ring.slots.csum_completed == 1
