"""Wire formats, each defined and commented once (as dpkt's modules and Katran's
balancer_consts.h do): protocol numbers, header offsets, precompiled `struct` formats, MAC text,
and the encapsulation the load balancer writes and the agent accepts.

Offsets named OFF_* count from the start of an Ethernet frame carrying IPv4 without options:
the fast paths' frame. The general paths find the L4 header from the IHL.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from struct import Struct

from l4lb.errors import ConfigError

# -- Ethernet (IEEE 802.3) ----------------------------------------------------------------------
ETH_HLEN = 14
ETH_P_ALL = 0x0003  # every protocol: what an AF_PACKET socket binds to
ETH_P_IP = 0x0800  # IPv4
OFF_ETHERTYPE = 12
# Destination MAC, source MAC, EtherType.
ETH = Struct("!6s6sH")

# -- IPv4 (RFC 791) -----------------------------------------------------------------------------
IPV4_HLEN = 20  # without options (IHL 5)
IPV4_VIHL = 0x45  # version 4, IHL 5: the first header byte the fast paths take
OFF_IP = ETH_HLEN
OFF_IP_TOTLEN = OFF_IP + 2
OFF_IP_FRAG = OFF_IP + 6  # flags (3 bits) + fragment offset (13 bits)
OFF_IP_TTL = OFF_IP + 8
OFF_IP_PROTO = OFF_IP + 9
OFF_IP_SRC = OFF_IP + 12
OFF_IP_DST = OFF_IP + 16
OFF_L4 = OFF_IP + IPV4_HLEN  # the TCP/UDP/ICMP header when IHL is 5
IP_DF = 0x4000  # don't fragment
IP_OFFSET = 0x1FFF  # fragment offset: non-zero means "not the first fragment"
IP_MF_OFFSET = 0x3FFF  # MF flag + fragment offset: non-zero means "a fragment"
IPPROTO_ICMP = 1
IPPROTO_IPIP = 4
IPPROTO_TCP = 6
IPPROTO_UDP = 17
# Version/IHL, TOS, total length, ID, flags/fragment offset, TTL, protocol, checksum, source,
# destination (addresses as 4 bytes).
IPV4 = Struct("!BBHHHBBH4s4s")
# The same header with the addresses as ints (the agent compares them with ints).
IPV4_INT = Struct("!BBHHHBBHII")
# A header without options as ten 16-bit words, for its checksum.
IPV4_WORDS = Struct("!10H")

# -- TCP (RFC 9293), UDP (RFC 768), ICMP (RFC 792) ----------------------------------------------
TCP_HLEN = 20  # without options
UDP_HLEN = 8
ICMP_HLEN = 8
# Source and destination port: the first 4 bytes of TCP and UDP headers alike.
PORTS = Struct("!HH")
# TCP without options: ports, sequence, acknowledgment, data offset, flags, window, checksum,
# urgent pointer.
TCP = Struct("!HHIIBBHHH")
# UDP: ports, length, checksum.
UDP = Struct("!HHHH")
# Where the checksum field sits in the L4 header, per protocol.
L4_CSUM_OFFSET = {IPPROTO_TCP: 16, IPPROTO_UDP: 6}
# ICMP: type, code, checksum, then 4 type-specific bytes (for frag-needed: 16 unused bits and
# the next-hop MTU, RFC 1191).
ICMP = Struct("!BBHHH")
ICMP_ECHO_REQUEST = 8
ICMP_DEST_UNREACH = 3
ICMP_FRAG_NEEDED_CODE = 4
ICMP_TIME_EXCEEDED = 11
ICMP_ERROR_TOS = 0xC0  # IPTOS_PREC_INTERNETCONTROL, as Linux sends its ICMP errors


def parse_mac(text: str) -> bytes:
    """'00:00:0a:01:01:02' -> 6 bytes; ConfigError names the bad text."""
    parts = text.split(":")
    try:
        if len(parts) != 6 or any(len(p) != 2 for p in parts):
            raise ValueError
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ConfigError(
            f"bad MAC address {text!r} (expected six hex pairs like 00:00:0a:01:01:02)"
        ) from None


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def parse_ipv4(field: str, text: str) -> ipaddress.IPv4Address:
    """An IPv4 address from text; ConfigError names the field and the text."""
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        raise ConfigError(f"{field}: {text!r} is not an IPv4 address") from None


def _words(ip: bytes) -> int:
    """Sum of an IPv4 address's two 16-bit words."""
    return ((ip[0] << 8) | ip[1]) + ((ip[2] << 8) | ip[3])


# -- Encapsulation ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Encap:
    """An encapsulation as every party reads it: the LB writes `header_len` bytes in front of
    the inner IP packet (over the inner Ethernet header, `headroom` bytes before it), the agent's
    BPF filter and nftables rule match `ip_proto`, its core strips the outer header.

    IP-in-IP is the one in use. Another (GUE: UDP + a 4-byte header, or an IPv6 outer header)
    would be a second instance plus its writer in fastpath.kernel and its reader in agent.core.
    """

    name: str
    ip_proto: int
    """Protocol number of the outer IPv4 header."""
    header_len: int
    """Bytes in front of the inner IP packet: outer Ethernet + outer IP (+ any UDP/GUE)."""
    ttl: int = 64
    """TTL of the outer header."""

    @property
    def headroom(self) -> int:
        """Bytes the outer header takes before the inner frame (its Ethernet header is reused)."""
        return self.header_len - ETH_HLEN

    @property
    def ttl_proto(self) -> int:
        """The outer header's TTL and protocol bytes as one 16-bit word."""
        return (self.ttl << 8) | self.ip_proto

    def template(self, dst_mac: bytes, src_mac: bytes, src_ip: bytes, dst_ip: bytes) -> bytes:
        """Outer Ethernet + IPv4 header with TOS, total length, ID, flags and checksum zero (the
        LB writes them per packet)."""
        ip = IPV4.pack(IPV4_VIHL, 0, 0, 0, 0, self.ttl, self.ip_proto, 0, src_ip, dst_ip)
        return ETH.pack(dst_mac, src_mac, ETH_P_IP) + ip

    def checksum_base(self, src_ip: bytes, dst_ip: bytes) -> int:
        """The template's fixed IPv4 words summed, plus the length the outer header adds, minus
        one: the LB's header checksum is then 0xFFFE - (base + TOS + inner length + ID + DF) %
        0xFFFF (a ones' complement sum folds as arithmetic mod 0xFFFF; the minus one maps a sum
        of 0 mod 0xFFFF to 0 rather than 0xFFFF)."""
        fixed = (IPV4_VIHL << 8) + self.ttl_proto + _words(src_ip) + _words(dst_ip)
        return fixed + self.header_len - ETH_HLEN - 1


IPIP = Encap("ipip", IPPROTO_IPIP, ETH_HLEN + IPV4_HLEN)
"""IP-in-IP (RFC 2003): an outer IPv4 header, protocol 4, straight before the inner one."""
