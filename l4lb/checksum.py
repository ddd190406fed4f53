"""The Internet checksum (RFC 1071): computed, verified, and completed where a local sender's
offload left it partial. One int conversion and a modulo per call, no per-byte loop.

Summing 16-bit words with end-around carry is arithmetic modulo 0xFFFF (2**16 == 1 mod 0xFFFF),
so the big-endian integer of the bytes, reduced mod 0xFFFF, is the folded sum (except that an
all-zero sum stays 0, where the fold of a non-zero sum gives 0xFFFF).
"""

from __future__ import annotations

from l4lb.wire import ETH_HLEN, ETH_P_IP, IPPROTO_UDP, IPV4_HLEN, IPV4_WORDS, L4_CSUM_OFFSET


def fold(total: int) -> int:
    """Fold a sum of 16-bit words into 16 bits with end-around carry."""
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return (total & 0xFFFF) + (total >> 16)


def checksum(data: bytes | bytearray | memoryview) -> int:
    """Internet checksum of `data`, any length."""
    value = int.from_bytes(data, "big")
    if len(data) & 1:
        value <<= 8  # odd length: pad with a zero byte
    if value == 0:
        return 0xFFFF
    total = value % 0xFFFF or 0xFFFF
    return total ^ 0xFFFF


def ipv4_header_ok(frame: bytes | bytearray | memoryview, offset: int, header_len: int) -> bool:
    """True if the IPv4 header at `offset` (with its checksum field) sums to 0xFFFF."""
    if header_len == IPV4_HLEN:
        return fold(sum(IPV4_WORDS.unpack_from(frame, offset))) == 0xFFFF
    return checksum(frame[offset : offset + header_len]) == 0


def complete_l4_checksum(frame: memoryview) -> bool:
    """Finish the TCP/UDP checksum of an Ethernet/IPv4 frame whose field holds only the
    pseudo-header sum, in place. Returns False, leaving the frame untouched, if it is not an
    unfragmented IPv4 TCP/UDP packet that fits the frame.

    Why: a packet a local socket sends through an interface with checksum offload (veth: tx
    checksumming on by default) carries the partial sum (CHECKSUM_PARTIAL), the "hardware" is to
    finish it. Across veth pairs and namespace routers it keeps that state, so a tap gets it
    unfinished, flagged CSUM_NOT_READY in the ring slot (l4lb.ring); forwarded as it is, the
    backend drops it after decapsulation. Real NICs deliver complete checksums.
    """
    if len(frame) < 34 or (frame[12] << 8 | frame[13]) != ETH_P_IP or frame[14] >> 4 != 4:
        return False
    ihl = (frame[14] & 0x0F) * 4
    total = (frame[16] << 8) | frame[17]
    field = L4_CSUM_OFFSET.get(frame[23])
    if field is None or frame[20] & 0x3F or frame[21] or ihl < 20 or total > len(frame) - 14:
        return False  # other protocol, or a fragment
    start, end = ETH_HLEN + ihl, ETH_HLEN + total
    if end - start < field + 2:
        return False
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
