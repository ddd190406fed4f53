"""The golden fixture table (tests/fixtures/cases.py) replayed through the packet core: every
case gives exactly its expected frame (or none) and exactly its verdict counter."""

from __future__ import annotations

import pytest

from fastpath.balancer import Balancer
from fastpath.config import BalancerConfig, parse_mac
from fastpath.counters import DropReason
from tests.fixtures import cases


def make_config(name: str) -> BalancerConfig:
    kw = dict(cases.CONFIGS[name])
    kw["local_mac"] = parse_mac(str(kw["local_mac"]))
    kw["next_hop_mac"] = parse_mac(str(kw["next_hop_mac"]))
    return BalancerConfig(**kw)  # type: ignore[arg-type]


def replay(config: str) -> list[tuple[cases.Case, bytes | None, dict[str, object]]]:
    """Each case of `config` through one fresh Balancer, in order: (case, output, counter
    deltas)."""
    bal = Balancer(make_config(config))
    out = memoryview(bytearray(bal.cfg.mtu + 34))
    results = []
    for case in cases.load(config):
        before = (list(bal.counters.drops), list(bal.counters.forwarded))
        n = bal.process(memoryview(case.frame), out, cases.NOW)
        drops = {
            DropReason(i).name: b - a
            for i, (a, b) in enumerate(zip(before[0], bal.counters.drops, strict=True))
            if b != a
        }
        fwd = {
            bal.counters.backend_names[i]: b - a
            for i, (a, b) in enumerate(zip(before[1], bal.counters.forwarded, strict=True))
            if b != a
        }
        results.append((case, bytes(out[:n]) if n else None, {"drops": drops, "forwarded": fwd}))
    return results


ALL = [(c, r) for c in cases.CONFIGS for r in replay(c)]


@pytest.mark.parametrize(("config", "result"), ALL, ids=[r[0].spec.name for _, r in ALL])
def test_case(config: str, result: tuple[cases.Case, bytes | None, dict[str, dict]]) -> None:
    case, output, delta = result
    spec = case.spec
    assert output == case.expected, f"{spec.name}: {spec.description}"
    if spec.verdict == "forward":
        assert delta["drops"] == {}
        outer_dst = ".".join(str(b) for b in case.expected[30:34])  # type: ignore[index]
        assert delta["forwarded"] == {outer_dst: 1}
    elif spec.verdict == "icmp_reply":
        assert delta == {"drops": {"FRAG_NEEDED": 1}, "forwarded": {}}
    else:
        assert delta == {"drops": {spec.verdict: 1}, "forwarded": {}}


def test_every_drop_reason_has_a_golden_case() -> None:
    verdicts = {s.verdict for s in cases.SPECS} | {"FRAG_NEEDED"}  # icmp_reply counts there
    # INTERNAL_ERROR counts bugs, not inputs: no frame may produce it (test_fuzz checks that).
    missing = {r.name for r in DropReason} - verdicts - {"INTERNAL_ERROR"}
    assert not missing


def _backend(name: str) -> str:
    for _, (case, output, _) in ALL:
        if case.spec.name == name:
            assert output is not None
            return ".".join(str(b) for b in output[30:34])
    raise KeyError(name)


@pytest.mark.parametrize("spec", [s for s in cases.SPECS if s.same_backend_as], ids=str)
def test_related_cases_share_a_backend(spec: cases.Spec) -> None:
    """Fragments of one datagram, ICMP errors about a flow: the flow's backend."""
    assert spec.same_backend_as is not None
    assert _backend(spec.name) == _backend(spec.same_backend_as)


def test_many_flows_spread_over_every_backend() -> None:
    used = {_backend(s.name) for s in cases.SPECS if s.name.startswith("many_flows_")}
    assert used == {ip for ip, _ in cases.BACKENDS}


def test_process_batch_matches_process() -> None:
    """The batch entry point, fed the whole default table at once, sends the same frames
    (compacted: drops leave no gap)."""
    bal = Balancer(make_config("default"))
    table = cases.load("default")
    frames = [memoryview(c.frame) for c in table]
    outs = [memoryview(bytearray(bal.cfg.mtu + 34)) for _ in frames]
    lens = [0] * len(frames)
    k = bal.process_batch(frames, outs, lens, len(frames), cases.NOW)
    sent = [bytes(outs[i][: lens[i]]) for i in range(k)]
    assert sent == [c.expected for c in table if c.expected is not None]
    assert bal.counters.total == len(frames)


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
    kw = {f: getattr(make_config("default"), f) for f in BalancerConfig.__dataclass_fields__}
    bal = Balancer(BalancerConfig(**{**kw, "verify_checksum": True}))
    out = memoryview(bytearray(bal.cfg.mtu + 34))
    for case, _, _ in (r for c, r in ALL if c == "default"):
        n = bal.process(memoryview(case.frame), out, cases.NOW)
        assert (bytes(out[:n]) if n else None) == case.expected, case.spec.name
    reference = Balancer(make_config("default"))
    for case in cases.load("default"):
        reference.process(memoryview(case.frame), out, cases.NOW)
    assert bal.counters.as_dict() == reference.counters.as_dict()
