"""The agent's packet core: Ethernet frames carrying IP-in-IP in ring slots in; per frame the
inner packet handed to the local stack, or a drop counted by `DecapDrop` reason, exactly once.

Pure: no sockets, no clock (`now` is passed in). `bind_ring(slots, send, vnet_hdr)` is the path
frames take (agent.decap runs it in the shared receive loop, l4lb.rxloop): the common frame's
checks inlined in the loop, every other frame through `process_at`, which applies every check
in order and names the first that fails. `process(frame, now)` is that full check for one frame
(tests replay the golden cases through both and compare).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable

from agent.config import DecapConfig, parse_network
from agent.counters import DecapCounters, DecapDrop
from l4lb.ring import READY, Slots
from l4lb.wire import (
    ETH,
    ETH_HLEN,
    ETH_P_IP,
    IP_MF_OFFSET,
    IPIP,
    IPV4_HLEN,
    IPV4_INT,
    L4_CSUM_OFFSET,
    Encap,
)

# The ring path's one read per frame: EtherType; outer IPv4 with IHL 5 (version/IHL, total
# length, flags + fragment offset, protocol, source, destination); inner IPv4 (version/IHL,
# total length, flags + fragment offset, protocol, source, destination).
RING_FAST = struct.Struct("!12xHBxHxxHxBxxIIBxHxxHxBxxII")
RING_FAST_MIN = 54  # through the inner destination
# struct virtio_net_hdr (little-endian): flags, gso_type, hdr_len, gso_size, csum_start,
# csum_offset. Written in front of each packet for a TUN opened with IFF_VNET_HDR.
VNET_HDR = struct.Struct("<BBHHHH")
VNET_HDR_LEN = VNET_HDR.size  # 10
VNET_F_NEEDS_CSUM = 1
NO_VNET_FLAGS = bytes(VNET_HDR_LEN)  # nothing to say: the stack checks as usual

DROPPED = (0, 0)
SPOOF_CACHE_MAX = 4096  # addresses remembered from allowed CIDRs (bounded memory)


class Decapsulator:
    """Checks one frame and locates the inner packet; counts every frame in `counters`."""

    def __init__(self, cfg: DecapConfig, encap: Encap = IPIP) -> None:
        self.cfg = cfg
        self.encap = encap
        """The tunnel accepted; its fast path below is IP-in-IP's (an outer IPv4 of IHL 5)."""
        self.counters = DecapCounters()
        self.local = int(ipaddress.IPv4Address(cfg.local_ip))
        self.vips = frozenset(int(ipaddress.IPv4Address(v)) for v in cfg.vips)
        nets = [parse_network("allowed_lbs", s) for s in cfg.allowed_lbs]
        # Single addresses go to a set (one lookup on the fast path); CIDRs are tested on the
        # slow path, and sources found inside them join `allowed` (up to SPOOF_CACHE_MAX).
        self.allowed: set[int] = {int(n.network_address) for n in nets if n.prefixlen == 32}
        self.allowed_nets = tuple(
            (int(n.network_address), int(n.netmask)) for n in nets if n.prefixlen < 32
        )
        self.last_spoofed: tuple[int, float] | None = None
        """(outer source, now) of the latest tunnel from a source that is not allowed."""

    def process(self, frame: memoryview, now: float) -> tuple[int, int]:
        """(offset, length) of the inner packet inside `frame`, or (0, 0) if dropped."""
        return self.process_at(frame, 0, len(frame), now)

    def process_at(self, buf: memoryview, start: int, end: int, now: float) -> tuple[int, int]:
        """As `process` for the frame buf[start:end] (no slicing); the offset is into `buf`.
        Every check in order; the first that fails names the drop."""
        drop = self._drop
        n = end - start
        if n < ETH_HLEN + IPV4_HLEN:
            if n >= ETH_HLEN and ETH.unpack_from(buf, start)[2] != ETH_P_IP:
                return drop(DecapDrop.NOT_IPV4)
            return drop(DecapDrop.TRUNCATED)
        if ETH.unpack_from(buf, start)[2] != ETH_P_IP:
            return drop(DecapDrop.NOT_IPV4)
        vi, _, otot, _, frag, _, proto, _, src, dst = IPV4_INT.unpack_from(buf, start + ETH_HLEN)
        if vi >> 4 != 4:
            return drop(DecapDrop.NOT_IPV4)
        ohl = (vi & 15) * 4
        if ohl < IPV4_HLEN:
            return drop(DecapDrop.BAD_IHL)
        if n < ETH_HLEN + ohl:
            return drop(DecapDrop.TRUNCATED)
        if otot < ohl or otot > n - ETH_HLEN:
            return drop(DecapDrop.BAD_TOTAL_LENGTH)
        if proto != self.encap.ip_proto:
            return drop(DecapDrop.NOT_IPIP)
        if dst != self.local:
            return drop(DecapDrop.NOT_LOCAL)
        if not self._allowed(src):
            self.last_spoofed = (src, now)
            return drop(DecapDrop.SPOOFED_SOURCE)
        if frag & IP_MF_OFFSET:
            return drop(DecapDrop.OUTER_FRAGMENT)
        payload = otot - ohl
        if payload < IPV4_HLEN:
            return drop(DecapDrop.INNER_TRUNCATED)
        inner = start + ETH_HLEN + ohl
        ivi, _, itot, _, _, _, _, _, _, idst = IPV4_INT.unpack_from(buf, inner)
        if ivi >> 4 != 4:
            return drop(DecapDrop.INNER_NOT_IPV4)
        ihl = (ivi & 15) * 4
        if ihl < IPV4_HLEN:
            return drop(DecapDrop.INNER_BAD_IHL)
        if itot < ihl or itot > payload:
            return drop(DecapDrop.INNER_BAD_LENGTH)
        if idst not in self.vips:
            return drop(DecapDrop.INNER_NOT_VIP)
        self.counters.delivered += 1
        return (inner, itot)

    def vnet_header_into(self, buf: memoryview, off: int, length: int) -> None:
        """Write the virtio-net header for the inner packet at buf[off:off + length] into the
        VNET_HDR_LEN bytes before it (the end of the outer header, no longer needed).

        Why: a client whose kernel left its TCP/UDP checksum to offload (every veth does)
        sends a *partial* checksum; the load balancer's AF_PACKET tap copies it as is. Such a
        field holds exactly the folded pseudo-header sum. When it does, the header says
        NEEDS_CSUM, so the stack gets the packet in the state the client's kernel made it
        (CHECKSUM_PARTIAL, which local delivery accepts); any other checksum is left for the
        stack to verify as usual. A complete checksum equal to that sum by chance would only
        skip verification for that packet.
        """
        ihl = (buf[off] & 15) * 4  # process_at checked version and IHL
        proto = buf[off + 9]
        field = L4_CSUM_OFFSET.get(proto, 0)
        # A fragment (MF or an offset) carries no checksum the stack checks before reassembly.
        if field and length >= ihl + field + 2 and not (buf[off + 6] & 0x3F or buf[off + 7]):
            at = off + ihl + field
            wire = buf[at] << 8 | buf[at + 1]
            if wire:  # 0: UDP without checksum (an offloaded sum is never 0)
                src, dst = IPV4_INT.unpack_from(buf, off)[8:]
                total = (src >> 16) + (src & 0xFFFF) + (dst >> 16) + (dst & 0xFFFF)
                total += proto + length - ihl
                total = (total & 0xFFFF) + (total >> 16)
                if total + (total >> 16) & 0xFFFF == wire:
                    self.counters.partial_checksums += 1
                    VNET_HDR.pack_into(
                        buf, off - VNET_HDR_LEN, VNET_F_NEEDS_CSUM, 0, 0, 0, ihl, field
                    )
                    return
        buf[off - VNET_HDR_LEN : off] = NO_VNET_FLAGS

    def bind_ring(
        self, slots: Slots, send: Callable[[memoryview], object], vnet_hdr: bool
    ) -> Callable[[int, int, float], int]:
        """`ring_batch(first, end, now) -> n` over the ring `slots` (l4lb.ring.Slots): the
        ready frames of slots first..end-1 (it stops at the first slot not ready) are checked,
        `process_at` and `vnet_header_into` inlined for the common frame, and each delivered
        packet is handed to `send` (which may raise OSError: counted as delivery_failed); with
        vnet_hdr, with its virtio-net header in front (written over the end of the outer
        header). The slots' status is left to the caller."""
        unpack = RING_FAST.unpack_from
        local, allowed, vips = self.local, self.allowed, self.vips
        counters = self.counters
        full_check = self.process_at
        mark = self.vnet_header_into
        pack_vnet = VNET_HDR.pack_into
        hdr = VNET_HDR_LEN if vnet_hdr else 0
        ipip, eth_ip = self.encap.ip_proto, ETH_P_IP
        view, status, snaps, starts = slots.mem, slots.status, slots.snap, slots.starts

        def ring_batch(first: int, end: int, now: float) -> int:
            delivered = partial = failed = 0
            n = end - first
            for i in range(first, end):
                if not status[i] & READY:
                    n = i - first
                    break
                start = starts[i]
                snap = snaps[i]
                if snap >= RING_FAST_MIN:
                    (et, ovi, otot, ofrag, proto, src, dst,
                     ivi, itot, ifrag, iproto, isrc, idst) = unpack(view, start)  # fmt: skip
                    # Literals cost less than names here: IHL 5 (0x45) outer and inner, MF +
                    # offset (0x3FFF), Ethernet 14, IPv4 20, the inner header at 14 + 20.
                    if (
                        et == eth_ip
                        and ovi == 0x45
                        and proto == ipip
                        and dst == local
                        and src in allowed
                        and not ofrag & 0x3FFF
                        and ivi == 0x45
                        and otot <= snap - 14
                        and 20 <= itot <= otot - 20
                        and idst in vips
                    ):
                        off = start + 34
                        delivered += 1
                        if hdr:
                            # vnet_header_into for an inner header of 20 bytes (IHL 5).
                            field = 16 if iproto == 6 else 6 if iproto == 17 else 0
                            if field and itot >= 22 + field and not ifrag & 0x3FFF:
                                at = off + 20 + field
                                wire = view[at] << 8 | view[at + 1]
                                if wire:
                                    t = (isrc >> 16) + (isrc & 0xFFFF) + (idst >> 16)
                                    t += (idst & 0xFFFF) + iproto + itot - 20
                                    t = (t & 0xFFFF) + (t >> 16)
                                    if t + (t >> 16) & 0xFFFF == wire:
                                        partial += 1
                                        pack_vnet(view, off - 10, 1, 0, 0, 0, 20, field)
                                    else:
                                        pack_vnet(view, off - 10, 0, 0, 0, 0, 0, 0)
                                else:
                                    pack_vnet(view, off - 10, 0, 0, 0, 0, 0, 0)
                            else:
                                pack_vnet(view, off - 10, 0, 0, 0, 0, 0, 0)
                        try:
                            send(view[off - hdr : off + itot])
                        except OSError:
                            failed += 1
                        continue
                off, length = full_check(view, start, start + snap, now)
                if length:
                    if hdr:
                        mark(view, off, length)
                    try:
                        send(view[off - hdr : off + length])
                    except OSError:
                        counters.delivery_failed()
            counters.delivered += delivered
            counters.partial_checksums += partial
            for _ in range(failed):
                counters.delivery_failed()
            return n

        return ring_batch

    def last_spoofed_source(self) -> str | None:
        """The latest spoofed outer source as dotted text, for the stats line."""
        if self.last_spoofed is None:
            return None
        return str(ipaddress.IPv4Address(self.last_spoofed[0]))

    def _allowed(self, src: int) -> bool:
        if src in self.allowed:
            return True
        for net, mask in self.allowed_nets:
            if src & mask == net:
                if len(self.allowed) < SPOOF_CACHE_MAX:
                    self.allowed.add(src)  # the fast path takes it from now on
                return True
        return False

    def _drop(self, reason: DecapDrop) -> tuple[int, int]:
        self.counters.drops[reason] += 1
        return DROPPED
