"""Verdict counters: one per drop reason, one per backend; plain lists so the hot path only
does `lst[i] += 1`."""

from __future__ import annotations

from enum import IntEnum


class DropReason(IntEnum):
    """Why a frame was not forwarded to a backend (each frame gets exactly one verdict)."""

    TRUNCATED = 0
    """Frame shorter than Ethernet + IPv4 header, or than the L4 header needed."""
    NOT_IPV4 = 1
    """Ethertype is not IPv4 (0x0800), or the IP version field is not 4."""
    BAD_IHL = 2
    """IPv4 header length field below 5 words."""
    BAD_TOTAL_LENGTH = 3
    """IPv4 total length beyond the frame, or shorter than the IP header."""
    BAD_CHECKSUM = 4
    """IPv4 header checksum wrong (only with BalancerConfig.verify_checksum)."""
    NOT_VIP = 5
    """Destination address is no VIP."""
    WRONG_PORT = 6
    """Destination is a VIP but not on a port it serves."""
    TTL_EXPIRED = 7
    """TTL <= 1."""
    IPIP_LOOP = 8
    """IP-in-IP (protocol 4) addressed to a VIP: forwarding it could loop."""
    UNSUPPORTED_PROTO = 9
    """Protocol other than TCP, UDP, ICMP."""
    ICMP_UNSUPPORTED = 10
    """ICMP type that is neither echo request nor an error (unreachable, time exceeded)."""
    ICMP_BAD_QUOTE = 11
    """ICMP error whose quoted packet is cut, malformed, or not from a VIP service."""
    NO_BACKEND = 12
    """No backend has weight > 0 and the flow is not tracked."""
    TOO_BIG = 13
    """Inner packet + 20 exceeds the MTU and DF is clear (dropped, not fragmented)."""
    FRAG_NEEDED = 14
    """Inner packet + 20 exceeds the MTU with DF set: an ICMP frag-needed went to the sender."""
    INTERNAL_ERROR = 15
    """A bug raised inside the core; the frame was dropped (tests assert this stays 0)."""


_REASONS = tuple(DropReason)


class Counters:
    """Counts per drop reason and per backend id (fastpath.stats.CoreStats is their view).

    A backend may have several ids over the process's life (one that left the set and came
    back gets a new one: fastpath.balancer), each with its own counts; an id always names the
    same backend, so per-backend totals are sums over its ids."""

    __slots__ = ("backend_names", "connections", "drops", "forwarded", "forwarded_bytes")

    def __init__(self) -> None:
        self.drops: list[int] = [0] * len(_REASONS)
        self.forwarded: list[int] = []
        """Frames forwarded, indexed by backend id (see backend_names)."""
        self.forwarded_bytes: list[int] = []
        """Bytes of the inner IPv4 packets forwarded (their total length), per backend id."""
        self.connections: list[int] = []
        """Flows the connection table started tracking (new connections), per backend id."""
        self.backend_names: list[str] = []
        """Backend IP per backend id."""

    def new_backend(self, name: str) -> int:
        """A new backend id for `name`, its counts at 0."""
        self.backend_names.append(name)
        for counts in (self.forwarded, self.forwarded_bytes, self.connections):
            counts.append(0)
        return len(self.backend_names) - 1

    def per_backend(self, counts: list[int]) -> dict[str, int]:
        """`counts` (one of the per-id lists) summed per backend name, first seen first."""
        out: dict[str, int] = {}
        for name, n in zip(self.backend_names, counts, strict=True):
            out[name] = out.get(name, 0) + n
        return out

    @property
    def total(self) -> int:
        """Frames seen: forwarded + every drop (FRAG_NEEDED included)."""
        return sum(self.forwarded) + sum(self.drops)
