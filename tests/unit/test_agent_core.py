"""agent.core: golden frames (crafted with scapy here) in, inner packet or a counted drop out,
through the ring path that runs (over a FakeRing) and the full-check path it falls back on."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Packet, Raw

from agent.config import ConfigError, DecapConfig
from agent.core import VNET_HDR, VNET_HDR_LEN, Decapsulator
from agent.counters import DecapDrop
from agent.stats import AgentStats
from l4lb.ring import KERNEL, FakeRing

LOCAL = "10.2.3.2"
LB1, LB2 = "10.1.1.2", "10.1.2.2"
VIP, VIP2 = "20.0.0.1", "20.0.0.2"
CLIENT = "10.8.16.2"
MACS = {"dst": "00:00:0a:02:03:02", "src": "00:01:0a:02:03:02"}
CFG = DecapConfig(local_ip=LOCAL, vips=(VIP, VIP2), allowed_lbs=(LB1, LB2, "10.99.0.0/16"))


def tunnel(inner: Packet, src: str = LB1, dst: str = LOCAL, **outer: object) -> Packet:
    return Ether(**MACS) / IP(src=src, dst=dst, **outer) / inner


UDP_IN = IP(src=CLIENT, dst=VIP) / UDP(sport=40000, dport=80) / b"hello"
SYN_IN = IP(src=CLIENT, dst=VIP, flags="DF") / TCP(sport=40001, dport=80, flags="S")
DATA_IN = IP(src=CLIENT, dst=VIP2) / TCP(sport=40002, dport=80, flags="PA") / (b"x" * 1440)

# (description, the frame as scapy builds it, the inner packet expected out or the drop reason)
Case = tuple[str, Callable[[], Packet | bytes], Packet | DecapDrop]
CASES: list[Case] = [
    ("UDP from LB1", lambda: tunnel(UDP_IN), UDP_IN),
    ("TCP SYN from LB2, DF copied", lambda: tunnel(SYN_IN, src=LB2, flags="DF"), SYN_IN),
    ("full-size TCP data to a 2nd VIP", lambda: tunnel(DATA_IN, flags="DF"), DATA_IN),
    ("source inside an allowed CIDR", lambda: tunnel(UDP_IN, src="10.99.7.7"), UDP_IN),
    (
        "outer header with options (IHL 6)",
        lambda: tunnel(UDP_IN, options=[IPOption_NOP()] * 4),
        UDP_IN,
    ),
    (
        "inner header with options (IHL 6)",
        lambda: tunnel(IP(src=CLIENT, dst=VIP, options=[IPOption_NOP()] * 4) / UDP() / b"o"),
        IP(src=CLIENT, dst=VIP, options=[IPOption_NOP()] * 4) / UDP() / b"o",
    ),
    (
        "inner fragment (the stack reassembles)",
        lambda: tunnel(IP(src=CLIENT, dst=VIP, flags="MF", proto=17) / (b"f" * 24)),
        IP(src=CLIENT, dst=VIP, flags="MF", proto=17) / (b"f" * 24),
    ),
    ("Ethernet padding after a small packet", lambda: bytes(tunnel(UDP_IN)) + b"\0" * 8, UDP_IN),
    (
        "ICMP echo to the VIP",
        lambda: tunnel(IP(src=CLIENT, dst=VIP) / ICMP()),
        IP(src=CLIENT, dst=VIP) / ICMP(),
    ),
    ("10-byte frame", lambda: bytes(tunnel(UDP_IN))[:10], DecapDrop.TRUNCATED),
    (
        "IPv4 frame cut inside the outer header",
        lambda: bytes(tunnel(UDP_IN))[:30],
        DecapDrop.TRUNCATED,
    ),
    ("ARP", lambda: Ether(**MACS) / ARP(pdst=LOCAL), DecapDrop.NOT_IPV4),
    ("IPv6", lambda: Ether(**MACS) / IPv6() / UDP(), DecapDrop.NOT_IPV4),
    (
        "short non-IPv4 frame",
        lambda: bytes(Ether(**MACS, type=0x86DD)) + b"\0" * 4,
        DecapDrop.NOT_IPV4,
    ),
    (
        "EtherType IPv4, version 6",
        lambda: Ether(**MACS, type=0x0800) / IPv6() / UDP(),
        DecapDrop.NOT_IPV4,
    ),
    ("outer IHL 4", lambda: tunnel(UDP_IN, ihl=4), DecapDrop.BAD_IHL),
    (
        "outer IHL 15, frame too short for it",
        lambda: bytes(tunnel(UDP_IN, ihl=15))[:50],
        DecapDrop.TRUNCATED,
    ),
    (
        "outer total length beyond the frame",
        lambda: tunnel(UDP_IN, len=200),
        DecapDrop.BAD_TOTAL_LENGTH,
    ),
    (
        "outer total length below its header",
        lambda: tunnel(UDP_IN, len=19),
        DecapDrop.BAD_TOTAL_LENGTH,
    ),
    (
        "frame cut by the ring (snap < total length)",
        lambda: bytes(tunnel(DATA_IN))[:1000],
        DecapDrop.BAD_TOTAL_LENGTH,
    ),
    (
        "outer protocol UDP",
        lambda: Ether(**MACS) / IP(src=LB1, dst=LOCAL) / UDP(),
        DecapDrop.NOT_IPIP,
    ),
    ("outer protocol GRE", lambda: tunnel(UDP_IN, proto=47), DecapDrop.NOT_IPIP),
    ("outer destination another host", lambda: tunnel(UDP_IN, dst="10.2.4.2"), DecapDrop.NOT_LOCAL),
    ("spoofed tunnel from a client", lambda: tunnel(UDP_IN, src=CLIENT), DecapDrop.SPOOFED_SOURCE),
    (
        "spoofed tunnel, next to an allowed CIDR",
        lambda: tunnel(UDP_IN, src="10.98.0.1"),
        DecapDrop.SPOOFED_SOURCE,
    ),
    ("outer fragment (MF)", lambda: tunnel(UDP_IN, flags="MF"), DecapDrop.OUTER_FRAGMENT),
    ("outer fragment (offset)", lambda: tunnel(UDP_IN, frag=10), DecapDrop.OUTER_FRAGMENT),
    (
        "outer payload shorter than an IPv4 header",
        lambda: Ether(**MACS) / IP(src=LB1, dst=LOCAL, proto=4) / (b"\x45" + b"\0" * 9),
        DecapDrop.INNER_TRUNCATED,
    ),
    (
        "inner version 6",
        lambda: Ether(**MACS) / IP(src=LB1, dst=LOCAL, proto=4) / IPv6() / UDP(),
        DecapDrop.INNER_NOT_IPV4,
    ),
    (
        "inner IHL 4",
        lambda: tunnel(IP(src=CLIENT, dst=VIP, ihl=4) / UDP()),
        DecapDrop.INNER_BAD_IHL,
    ),
    (
        "inner total length beyond the outer payload",
        lambda: tunnel(IP(src=CLIENT, dst=VIP, len=300) / UDP()),
        DecapDrop.INNER_BAD_LENGTH,
    ),
    (
        "inner total length below its header",
        lambda: tunnel(IP(src=CLIENT, dst=VIP, len=12) / UDP()),
        DecapDrop.INNER_BAD_LENGTH,
    ),
    (
        "inner destination not a VIP",
        lambda: tunnel(IP(src=CLIENT, dst="10.2.3.2") / UDP()),
        DecapDrop.INNER_NOT_VIP,
    ),
]


def frame_bytes(build: Callable[[], Packet | bytes]) -> bytes:
    f = build()
    return f if isinstance(f, bytes) else bytes(f)


@pytest.mark.parametrize(("desc", "build", "expected"), CASES, ids=[c[0] for c in CASES])
def test_golden(
    desc: str, build: Callable[[], Packet | bytes], expected: Packet | DecapDrop
) -> None:
    core = Decapsulator(CFG)
    ring = FakeRing(1)
    ring.put(0, frame_bytes(build))
    sent: list[bytes] = []
    assert core.bind_ring(ring.slots, lambda p: sent.append(bytes(p)), False)(0, 1, 1.0) == 1
    c = core.counters
    if isinstance(expected, DecapDrop):
        assert sent == []
        assert c.drops[expected] == 1, c.drops
        assert c.delivered == 0
    else:
        assert sent == [bytes(expected)]
        assert c.delivered == 1
        assert sum(c.drops) == 0, c.drops
    assert c.total == 1


def test_every_drop_reason_has_a_golden_case() -> None:
    covered = {e for _, _, e in CASES if isinstance(e, DecapDrop)}
    assert covered == set(DecapDrop) - {DecapDrop.DELIVERY_FAILED}  # that one is the I/O edge's


def test_spoofed_source_is_remembered() -> None:
    core = Decapsulator(CFG)
    assert core.last_spoofed_source() is None
    core.process(memoryview(bytes(tunnel(UDP_IN, src=CLIENT))), 7.5)
    assert core.last_spoofed_source() == CLIENT
    assert core.last_spoofed is not None and core.last_spoofed[1] == 7.5


def test_process_at_reads_inside_a_larger_buffer() -> None:
    """The I/O edge passes ring offsets: the same frame at offset 100 gives offset + 100."""
    core = Decapsulator(CFG)
    frame = bytes(tunnel(SYN_IN, src=LB2))
    buf = memoryview(b"\xff" * 100 + frame + b"\xee" * 50)
    off, length = core.process_at(buf, 100, 100 + len(frame), 0.0)
    assert bytes(buf[off : off + length]) == bytes(SYN_IN)
    assert off == 100 + 14 + 20


def test_cidr_sources_join_the_fast_set() -> None:
    core = Decapsulator(CFG)
    src = "10.99.1.1"
    core.process(memoryview(bytes(tunnel(UDP_IN, src=src))), 0.0)
    assert int.from_bytes(bytes(map(int, src.split("."))), "big") in core.allowed
    assert core.counters.delivered == 1


def test_delivery_failed_moves_a_frame_from_delivered() -> None:
    core = Decapsulator(CFG)
    core.process(memoryview(bytes(tunnel(UDP_IN))), 0.0)
    core.counters.delivery_failed()
    d = AgentStats.of(core.counters, "stats", "x", 0.0, 0.0, 0, None)
    assert d.delivered == 0 and d.frames == 1 and d.dropped == 1
    assert d.drops["delivery_failed"] == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"local_ip": "10.0.0.300"}, "local_ip"),
        ({"vips": ()}, "vips"),
        ({"vips": ("20.0.0.x",)}, "vips"),
        ({"allowed_lbs": ()}, "allowed_lbs"),
        ({"allowed_lbs": ("10.1.1.2/33",)}, "allowed_lbs"),
        ({"allowed_lbs": ("10.1.1.2/16",)}, "allowed_lbs"),  # host bits set: a typo, say so
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, object], message: str) -> None:
    base: dict[str, object] = {"local_ip": LOCAL, "vips": (VIP,), "allowed_lbs": (LB1,)}
    base.update(kwargs)
    with pytest.raises(ConfigError, match=message):
        DecapConfig(**base)  # type: ignore[arg-type]


VALID = bytes(tunnel(UDP_IN))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_random_frames_never_raise_and_count_once(data: bytes) -> None:
    core = Decapsulator(CFG)
    off, length = core.process(memoryview(data), 0.0)
    assert core.counters.total == 1
    if length:
        assert off > 0 and off + length <= len(data)


@settings(max_examples=400, deadline=None)
@given(st.integers(0, len(VALID) - 1), st.integers(0, 255), st.integers(1, len(VALID)))
def test_mutated_tunnels_never_raise_and_count_once(pos: int, value: int, cut: int) -> None:
    frame = bytearray(VALID)
    frame[pos] = value
    core = Decapsulator(CFG)
    off, length = core.process(memoryview(bytes(frame[:cut])), 0.0)
    assert core.counters.total == 1
    if length:
        assert off + length <= cut
        assert frame[off] >> 4 == 4


def partial(pkt: Packet) -> bytes:
    """`pkt` with its L4 checksum as an offloading kernel leaves it: the folded pseudo-header
    sum, not the checksum."""
    raw = bytearray(bytes(pkt))
    ihl = (raw[0] & 15) * 4
    src, dst = int.from_bytes(raw[12:16], "big"), int.from_bytes(raw[16:20], "big")
    total = (src >> 16) + (src & 0xFFFF) + (dst >> 16) + (dst & 0xFFFF) + raw[9] + len(raw) - ihl
    total = (total & 0xFFFF) + (total >> 16)
    field = ihl + (16 if raw[9] == 6 else 6)
    raw[field : field + 2] = total.to_bytes(2, "big")
    return bytes(raw)


def with_mf(raw: bytes) -> bytes:
    return raw[:6] + bytes([raw[6] | 0x20]) + raw[7:]


VNET_CASES = [
    ("TCP, partial checksum", lambda: partial(SYN_IN), (1, 0, 0, 0, 20, 16)),
    ("UDP, partial checksum", lambda: partial(UDP_IN), (1, 0, 0, 0, 20, 6)),
    ("TCP, complete checksum: the stack verifies", lambda: bytes(SYN_IN), (0,) * 6),
    ("UDP without checksum", lambda: bytes(UDP_IN)[:26] + b"\0\0" + bytes(UDP_IN)[28:], (0,) * 6),
    ("first fragment: the stack reassembles first", lambda: with_mf(partial(UDP_IN)), (0,) * 6),
    ("ICMP: nothing to mark", lambda: bytes(IP(src=CLIENT, dst=VIP) / ICMP()), (0,) * 6),
]


@pytest.mark.parametrize(("desc", "inner", "header"), VNET_CASES, ids=[c[0] for c in VNET_CASES])
def test_vnet_header_marks_partial_checksums_only(
    desc: str, inner: Callable[[], bytes], header: tuple[int, ...]
) -> None:
    core = Decapsulator(CFG)
    frame = bytearray(bytes(Ether(**MACS) / IP(src=LB1, dst=LOCAL, proto=4) / Raw(inner())))
    off, length = core.process(memoryview(frame), 0.0)
    assert length, core.counters.drops
    core.vnet_header_into(memoryview(frame), off, length)
    assert VNET_HDR.unpack_from(frame, off - VNET_HDR_LEN) == header
    assert core.counters.partial_checksums == (1 if header[0] else 0)
    assert bytes(frame[off : off + length]) == inner()  # the packet itself is untouched


def test_bind_ring_agrees_with_process_and_vnet_header() -> None:
    """The ring loop's inlined fast path gives the packets, virtio-net headers and counters
    that process + vnet_header_into give, frame by frame, for every golden and vnet case."""
    frames = [frame_bytes(b) for _, b, _ in CASES]
    frames += [
        bytes(Ether(**MACS) / IP(src=LB1, dst=LOCAL, proto=4) / Raw(inner()))
        for _, inner, _ in VNET_CASES
    ]
    ring = FakeRing(len(frames) + 1)  # the last slot is not ready: the batch ends before it
    ring.load(frames)
    assert ring.slots.status[len(frames)] == KERNEL
    sent: list[bytes] = []
    core = Decapsulator(CFG)
    batch = core.bind_ring(ring.slots, lambda p: sent.append(bytes(p)), True)
    assert batch(0, len(frames) + 1, 0.0) == len(frames)

    ref = Decapsulator(CFG)
    expected = []
    for f in frames:
        buf = bytearray(f)
        off, length = ref.process(memoryview(buf), 0.0)
        if length:
            ref.vnet_header_into(memoryview(buf), off, length)
            expected.append(bytes(buf[off - VNET_HDR_LEN : off + length]))
    assert sent == expected
    snapshot = {"event": "stats", "iface": "x", "time": 0.0, "uptime": 0.0, "ring_drops": 0}
    assert AgentStats.of(core.counters, last_spoofed_source=None, **snapshot) == AgentStats.of(
        ref.counters, last_spoofed_source=None, **snapshot
    )


def test_bind_ring_counts_a_refused_delivery() -> None:
    ring = FakeRing(1)
    ring.put(0, bytes(tunnel(UDP_IN)))

    def refuse(_packet: memoryview) -> int:
        raise OSError("no buffer space")

    core = Decapsulator(CFG)
    batch = core.bind_ring(ring.slots, refuse, False)
    assert batch(0, 1, 0.0) == 1
    assert core.counters.delivered == 0
    assert core.counters.drops[DecapDrop.DELIVERY_FAILED] == 1
