"""Completing the TCP/UDP checksum of frames the kernel marks "checksum not ready".

A packet sent by a local socket through an interface with checksum offload (veth: tx
checksumming on by default) carries only the pseudo-header sum in its TCP/UDP checksum field
(CHECKSUM_PARTIAL); the "hardware" is to finish it. Across veth pairs and namespace routers the
packet keeps that state, so the LB's tap gets it unfinished, flagged TP_STATUS_CSUMNOTREADY in
the ring. Forwarded as it is, the backend drops it after decapsulation (bad checksum). The I/O
edge finishes such checksums in place before the core sees the frame; only flagged frames pay.
Real NICs deliver complete checksums; in the emulation this keeps clients' offloads untouched.
"""

from __future__ import annotations

IPPROTO_TCP = 6
IPPROTO_UDP = 17
CSUM_FIELD = {IPPROTO_TCP: 16, IPPROTO_UDP: 6}  # checksum offset in the L4 header


def complete_l4_checksum(frame: memoryview) -> bool:
    """Finish the TCP/UDP checksum of an Ethernet/IPv4 frame whose field holds the partial
    (pseudo-header) sum. Returns False, leaving the frame untouched, if it is not an unfragmented
    IPv4 TCP/UDP packet that fits the frame."""
    if len(frame) < 34 or frame[12] != 0x08 or frame[13] != 0x00 or frame[14] >> 4 != 4:
        return False
    ihl = (frame[14] & 0x0F) * 4
    total = (frame[16] << 8) | frame[17]
    field = CSUM_FIELD.get(frame[23])
    if field is None or frame[20] & 0x3F or frame[21] or ihl < 20 or total > len(frame) - 14:
        return False  # other protocol, or a fragment
    start, end = 14 + ihl, 14 + total
    if end - start < field + 2:
        return False
    # One's complement sum of 16-bit words = the segment as one big integer mod 0xFFFF
    # (2**16 = 1 mod 0xFFFF); an odd length is padded with a zero byte.
    value = int.from_bytes(frame[start:end], "big")
    if (end - start) & 1:
        value <<= 8
    s = value % 0xFFFF
    if s == 0 and value:
        s = 0xFFFF
    csum = ~s & 0xFFFF
    if csum == 0 and frame[23] == IPPROTO_UDP:
        csum = 0xFFFF  # UDP: 0 means "no checksum"
    pos = start + field
    frame[pos] = csum >> 8
    frame[pos + 1] = csum & 0xFF
    return True
