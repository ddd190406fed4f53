"""Completing partial TCP/UDP checksums (CHECKSUM_PARTIAL frames from local senders)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from l4lb.checksum import complete_l4_checksum


def _fold(data: bytes) -> int:
    data += b"\0" * (len(data) % 2)
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _partial(pkt: Packet) -> tuple[bytearray, bytes]:
    """(frame as a local sender's offload leaves it, the frame with the right checksum)."""
    good = bytes(pkt)
    ip = pkt[IP]
    ihl = ip.ihl * 4 if ip.ihl else 20
    l4_len = len(good) - 14 - ihl
    pseudo = good[26:34] + bytes([0, ip.proto]) + l4_len.to_bytes(2, "big")
    off = 14 + ihl + (16 if ip.proto == 6 else 6)
    bad = bytearray(good)
    bad[off : off + 2] = _fold(pseudo).to_bytes(2, "big")  # the pseudo-header sum, not final
    return bad, good


# No deadline: scapy builds each example, which on a loaded machine can take longer than
# hypothesis's default 200 ms for reasons that have nothing to do with the code under test.
@settings(deadline=None)
@given(payload=st.binary(max_size=300), sport=st.integers(1, 65535), tcp=st.booleans())
def test_completes_to_what_scapy_computes(payload: bytes, sport: int, tcp: bool) -> None:
    l4 = TCP(sport=sport, dport=80, flags="PA") if tcp else UDP(sport=sport, dport=53)
    pkt = Ether() / IP(src="10.8.16.2", dst="20.0.0.1") / l4 / Raw(payload)
    bad, good = _partial(pkt)
    assert complete_l4_checksum(memoryview(bad))
    assert bytes(bad) == good


@pytest.mark.parametrize(
    "pkt",
    [
        Ether() / IP(src="1.2.3.4", dst="20.0.0.1", flags="MF") / UDP() / Raw(b"x" * 8),
        Ether() / IP(src="1.2.3.4", dst="20.0.0.1") / Raw(b"\x08\x00" + bytes(6)),  # ICMP-ish
    ],
)
def test_leaves_fragments_and_other_protocols(pkt: Packet) -> None:
    frame = bytearray(bytes(pkt))
    before = bytes(frame)
    assert not complete_l4_checksum(memoryview(frame))
    assert bytes(frame) == before


def test_leaves_truncated_and_non_ipv4() -> None:
    frame = bytearray(bytes(Ether() / IP(dst="20.0.0.1") / UDP() / Raw(b"abc")))
    assert not complete_l4_checksum(memoryview(frame[:40]))  # total length beyond the frame
    assert not complete_l4_checksum(memoryview(bytearray(20)))
