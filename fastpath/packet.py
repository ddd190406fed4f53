"""Header formats (precompiled once) and the Internet checksum; no objects per packet."""

from __future__ import annotations

from struct import Struct

ETH_HLEN = 14
ETH_P_IP = 0x0800
IPV4_HLEN = 20
IPPROTO_ICMP = 1
IPPROTO_IPIP = 4
IPPROTO_TCP = 6
IPPROTO_UDP = 17
TCP_HLEN = 20
UDP_HLEN = 8
ICMP_HLEN = 8
IP_DF = 0x4000
IP_MF_OFFSET = 0x3FFF  # MF flag + fragment offset: non-zero means "a fragment"
ICMP_ECHO_REQUEST = 8
ICMP_DEST_UNREACH = 3
ICMP_FRAG_NEEDED_CODE = 4
ICMP_TIME_EXCEEDED = 11
OUTER_TTL = 64
OUTER_LEN = ETH_HLEN + IPV4_HLEN  # bytes written in front of the inner packet
ICMP_ERROR_TOS = 0xC0  # IPTOS_PREC_INTERNETCONTROL, as Linux sends its ICMP errors

# Ethernet header (IEEE 802.3): destination MAC, source MAC, ethertype.
ETH = Struct("!6s6sH")
# The fields the core reads, from the start of an Ethernet + IPv4 frame: ethertype,
# version/IHL, TOS, total length, (ID skipped), flags/fragment offset, TTL, protocol,
# (checksum, source skipped), destination as an int. One unpack for the whole decision.
ETH_IPV4_FIELDS = Struct("!12xHBBH2xHBB2x4xI")
# IPv4 header (RFC 791): version/IHL, TOS, total length, ID, flags/offset, TTL, protocol,
# checksum, source, destination.
IPV4 = Struct("!BBHHHBBH4s4s")
# Ethernet + IPv4 header in one go (outer headers of the encapsulated frame).
ETH_IPV4 = Struct("!6s6sHBBHHHBBH4s4s")
# TCP/UDP source and destination port (the first 4 bytes of both headers).
PORTS = Struct("!HH")
# TCP header without options (RFC 9293): ports, sequence, acknowledgment, data offset,
# flags, window, checksum, urgent pointer.
TCP = Struct("!HHIIBBHHH")
# UDP header (RFC 768): ports, length, checksum.
UDP = Struct("!HHHH")
# ICMP header (RFC 792): type, code, checksum, then 4 type-specific bytes (for frag-needed:
# unused 16 bits and the next-hop MTU, RFC 1191).
ICMP = Struct("!BBHHH")
# An IPv4 header without options as ten 16-bit words, for its checksum.
IPV4_WORDS = Struct("!10H")


def fold(total: int) -> int:
    """Fold a sum of 16-bit words into 16 bits with end-around carry."""
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return (total & 0xFFFF) + (total >> 16)


def checksum(data: bytes | bytearray | memoryview) -> int:
    """Internet checksum (RFC 1071) of `data`, any length: one int conversion and a modulo.

    Summing 16-bit words with end-around carry is arithmetic modulo 0xFFFF (2**16 == 1 mod
    0xFFFF), so the big-endian integer of the bytes, reduced mod 0xFFFF, is the folded sum
    (except that an all-zero sum stays 0, where the fold of a non-zero sum gives 0xFFFF).
    """
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
