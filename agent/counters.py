"""Agent verdict counters: one per drop reason, plus delivered; plain lists so the hot path only
does `lst[i] += 1` (the style of fastpath/counters.py, with the agent's own reasons)."""

from __future__ import annotations

from enum import IntEnum


class DecapDrop(IntEnum):
    """Why a received frame was not delivered (each frame gets exactly one verdict)."""

    TRUNCATED = 0
    """Frame shorter than Ethernet + outer IPv4 header (or cut by the receive ring)."""
    NOT_IPV4 = 1
    """EtherType is not IPv4, or the outer version field is not 4."""
    BAD_IHL = 2
    """Outer IPv4 header length below 5 words."""
    BAD_TOTAL_LENGTH = 3
    """Outer total length beyond the frame, or shorter than its own header."""
    NOT_IPIP = 4
    """Outer protocol is not 4 (IP-in-IP)."""
    NOT_LOCAL = 5
    """Outer destination is not this host's address."""
    SPOOFED_SOURCE = 6
    """Outer source is not an allowed load balancer: a tunnel nobody may inject into."""
    OUTER_FRAGMENT = 7
    """Outer header is a fragment (MF or offset set): the agent does not reassemble tunnels."""
    INNER_TRUNCATED = 8
    """Outer payload shorter than an IPv4 header."""
    INNER_NOT_IPV4 = 9
    """Inner version field is not 4."""
    INNER_BAD_IHL = 10
    """Inner IPv4 header length below 5 words."""
    INNER_BAD_LENGTH = 11
    """Inner total length beyond the outer payload, or shorter than its own header."""
    INNER_NOT_VIP = 12
    """Inner destination is not a VIP served here."""
    DELIVERY_FAILED = 13
    """The local stack refused the inner packet (the I/O edge moves it here from delivered)."""


_REASONS = tuple(DecapDrop)


class DecapCounters:
    """Frames delivered and dropped by reason (agent.stats.AgentStats is their view)."""

    __slots__ = ("delivered", "drops", "partial_checksums")

    def __init__(self) -> None:
        self.drops: list[int] = [0] * len(_REASONS)
        self.delivered = 0
        """Inner packets handed to the local stack."""
        self.partial_checksums = 0
        """Delivered packets whose TCP/UDP checksum was left partial by the client's kernel
        (offload): handed over as CHECKSUM_PARTIAL (see Decapsulator.vnet_header_into)."""

    def delivery_failed(self) -> None:
        """The I/O edge could not hand over a packet the core had passed: recount it."""
        self.delivered -= 1
        self.drops[DecapDrop.DELIVERY_FAILED] += 1

    @property
    def total(self) -> int:
        """Frames seen: delivered + every drop (each frame counted exactly once)."""
        return self.delivered + sum(self.drops)
