"""Random frames and random mutations of valid frames through the core's ring path (over a
FakeRing): it never raises, never reports an internal error, counts each frame exactly once,
and what it sends is well formed."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastpath.balancer import Balancer
from fastpath.config import BalancerConfig
from fastpath.counters import DropReason
from l4lb.checksum import checksum
from l4lb.ring import FakeRing
from tests.fixtures import cases

VALID = [c.frame for config in cases.CONFIGS for c in cases.load(config)]
VIPS = [bytes([20, 0, 0, 1]), bytes([20, 0, 0, 3])]


def balancers() -> list[Balancer]:
    """The default fixture config, a small MTU (too-big paths) and checksum verification."""
    kw = cases.config_kwargs("default")
    return [
        Balancer(BalancerConfig(**kw)),  # type: ignore[arg-type]
        Balancer(BalancerConfig(**{**kw, "mtu": 120})),  # type: ignore[arg-type]
        Balancer(BalancerConfig(**{**kw, "verify_checksum": True, "conn_capacity": 8})),  # type: ignore[arg-type]
    ]


def check_one(bal: Balancer, frame: bytes, now: float) -> None:
    out = memoryview(bytearray(bal.cfg.mtu + 34))
    before_total = bal.counters.total
    before_fwd = sum(bal.counters.forwarded)
    before_icmp = bal.counters.drops[DropReason.FRAG_NEEDED]
    n = bal.process(frame, out, now)  # a FakeRing slot of its own
    assert bal.counters.total == before_total + 1  # exactly one verdict
    assert bal.counters.drops[DropReason.INTERNAL_ERROR] == 0
    forwarded = sum(bal.counters.forwarded) - before_fwd
    icmp = bal.counters.drops[DropReason.FRAG_NEEDED] - before_icmp
    assert (n > 0) == (forwarded + icmp == 1)
    if n:
        sent = bytes(out[:n])
        assert n <= len(out)
        assert sent[12:14] == b"\x08\x00"
        assert checksum(sent[14:34]) == 0  # outer IPv4 header checksum valid
        assert struct.unpack("!H", sent[16:18])[0] == n - 14
    if forwarded:
        tl = struct.unpack("!H", frame[16:18])[0]
        assert sent[23] == 4 and sent[34:] == frame[14 : 14 + tl]  # inner unchanged
        assert sent[22] == 64 and sent[15] == frame[15]


BALANCERS = balancers()
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=200), st.floats(0, 1e6))
def test_random_bytes(frame: bytes, now: float) -> None:
    for bal in BALANCERS:
        check_one(bal, frame, now)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    frame = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(0, 4))):
        if frame:
            frame[draw(st.integers(0, len(frame) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(frame)))
    tail = draw(st.binary(max_size=40))
    return bytes(frame[:cut] + tail) if draw(st.booleans()) else bytes(frame)


@FUZZ
@given(mutated(), st.floats(0, 1e6))
def test_mutated_valid_frames(frame: bytes, now: float) -> None:
    for bal in BALANCERS:
        check_one(bal, frame, now)


@st.composite
def ipv4_frames(draw: st.DrawFn) -> bytes:
    """Plausible IPv4 headers with random fields (reaches every branch, quotes included)."""
    payload = draw(st.binary(max_size=200))
    if draw(st.booleans()):  # an ICMP error quoting some IPv4 packet
        quoted = draw(ipv4_header()) + draw(st.binary(max_size=16))
        payload = bytes([draw(st.sampled_from([3, 11, 8, 0])), 4, 0, 0, 0, 0, 5, 0]) + quoted
    header = draw(ipv4_header(len(payload)))
    return bytes.fromhex("00000a01010200010a0101020800") + header + payload


@st.composite
def ipv4_header(draw: st.DrawFn, payload_len: int = 8) -> bytes:
    ihl = draw(st.sampled_from([5, 5, 5, 6, 4, 15, 0]))
    tl = draw(st.one_of(st.just(ihl * 4 + payload_len), st.integers(0, 0xFFFF)))
    hdr = struct.pack(
        "!BBHHHBBH4s4s",
        (draw(st.sampled_from([4, 4, 4, 6])) << 4) | ihl,
        draw(st.integers(0, 255)),
        tl,
        draw(st.integers(0, 0xFFFF)),
        draw(st.sampled_from([0, 0x4000, 0x2000, 0x0007, 0x4000 | 0x2000])),
        draw(st.sampled_from([64, 1, 0, 255])),
        draw(st.sampled_from([6, 17, 1, 4, 47])),
        0,
        draw(st.sampled_from([*VIPS, bytes([10, 8, 16, 2])])),
        draw(st.sampled_from([*VIPS, bytes([20, 0, 0, 2])])),
    )
    hdr = hdr[:10] + checksum(hdr).to_bytes(2, "big") + hdr[12:]
    return hdr + draw(st.binary(min_size=max(0, ihl * 4 - 20), max_size=max(0, ihl * 4 - 20)))


@FUZZ
@given(ipv4_frames(), st.floats(0, 1e6))
def test_structured_ipv4(frame: bytes, now: float) -> None:
    for bal in BALANCERS:
        check_one(bal, frame, now)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.one_of(mutated(), ipv4_frames(), st.binary(max_size=80)), st.booleans()),
        max_size=40,
    )
)
def test_batches_count_every_frame(frames: list[tuple[bytes, bool]]) -> None:
    """A batch of slots (some flagged CSUM_NOT_READY): each frame counted once, the slots not
    listed as unsent are exactly the ones sent, each a whole frame."""
    bal = BALANCERS[1]
    ring = FakeRing(len(frames) + 1)
    for i, (frame, flagged) in enumerate(frames):
        ring.put(i, frame, csum_not_ready=flagged)
    before_total = bal.counters.total
    before_sent = sum(bal.counters.forwarded) + bal.counters.drops[DropReason.FRAG_NEEDED]
    assert bal.bind_ring(ring.slots)(0, len(frames) + 1, 5.0) == len(frames)
    assert bal.counters.total == before_total + len(frames)
    sent = sum(bal.counters.forwarded) + bal.counters.drops[DropReason.FRAG_NEEDED]
    unsent = ring.slots.unsent
    assert len(frames) - len(unsent) == sent - before_sent
    assert all(ring.slots.out_len[i] > 34 for i in range(len(frames)) if i not in unsent)
    assert bal.counters.drops[DropReason.INTERNAL_ERROR] == 0
