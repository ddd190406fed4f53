"""The per-packet code of the Balancer, built as closures over its tables.

Why closures: every name the hot path touches is a local or a closure cell (no attribute
lookups, no method calls on the common path), which halves the cost per packet in CPython.
The control plane (fastpath.balancer) changes the tables *in place* (list slice assignment),
so closures handed out once stay valid. The rules applied are documented in
fastpath/balancer.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from struct import Struct

import xxhash

from fastpath.conntrack import ConnTable
from fastpath.counters import Counters, DropReason
from fastpath.packet import (
    ETH_HLEN,
    ETH_IPV4_FIELDS,
    ETH_P_IP,
    ICMP,
    ICMP_DEST_UNREACH,
    ICMP_ECHO_REQUEST,
    ICMP_ERROR_TOS,
    ICMP_FRAG_NEEDED_CODE,
    ICMP_HLEN,
    ICMP_TIME_EXCEEDED,
    IP_DF,
    IP_MF_OFFSET,
    IPPROTO_ICMP,
    IPPROTO_IPIP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPV4,
    OUTER_LEN,
    OUTER_TTL,
    PORTS,
    TCP_HLEN,
    UDP_HLEN,
    checksum,
    ipv4_header_ok,
)

ProcessFn = Callable[[memoryview, memoryview, float], int]
BatchFn = Callable[[Sequence[memoryview], Sequence[memoryview], list[int], int, float], int]
RingBatchFn = Callable[[int, int, float, list[tuple[int, int]]], int]
BindRingFn = Callable[..., RingBatchFn]

NO_BACKEND = -1

_TRUNCATED = DropReason.TRUNCATED.value
_NOT_IPV4 = DropReason.NOT_IPV4.value
_BAD_IHL = DropReason.BAD_IHL.value
_BAD_TOTAL_LENGTH = DropReason.BAD_TOTAL_LENGTH.value
_BAD_CHECKSUM = DropReason.BAD_CHECKSUM.value
_NOT_VIP = DropReason.NOT_VIP.value
_WRONG_PORT = DropReason.WRONG_PORT.value
_TTL_EXPIRED = DropReason.TTL_EXPIRED.value
_IPIP_LOOP = DropReason.IPIP_LOOP.value
_UNSUPPORTED_PROTO = DropReason.UNSUPPORTED_PROTO.value
_ICMP_UNSUPPORTED = DropReason.ICMP_UNSUPPORTED.value
_ICMP_BAD_QUOTE = DropReason.ICMP_BAD_QUOTE.value
_NO_BACKEND = DropReason.NO_BACKEND.value
_TOO_BIG = DropReason.TOO_BIG.value
_FRAG_NEEDED = DropReason.FRAG_NEEDED.value
_INTERNAL_ERROR = DropReason.INTERNAL_ERROR.value

_MIN_FRAME = ETH_HLEN + 20
_TCP_UDP = frozenset((IPPROTO_TCP, IPPROTO_UDP))
_ICMP_ERRORS = frozenset((ICMP_DEST_UNREACH, ICMP_TIME_EXCEEDED))
_SUPPORTED = frozenset((IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP))
# The outer IPv4 header from its byte 1: TOS, total length, ID, flags/offset, TTL, protocol,
# checksum (the template holds the rest).
_IPV4_VAR = Struct("!BHHHBBH")
# ETH_IPV4_FIELDS plus the destination port where it is when IHL is 5 (frames >= 38 bytes).
_FAST_FIELDS = Struct("!12xHBBH2xHBB2x4xI2xH")
# The whole outer header in one go: Ethernet + version/IHL (template bytes 0..14), TOS, total
# length, ID, flags, TTL and protocol (one word), checksum, source + destination (template
# bytes 26..33).
_OUTER = Struct("!15sBHHHHH8s")
_TTL_PROTO = (OUTER_TTL << 8) | IPPROTO_IPIP


@dataclass
class Tables:
    """What the kernel reads. The control plane mutates the lists and the bytearray in place;
    the scalars are fixed for the Balancer's life."""

    vips: dict[int, frozenset[int]]
    """VIP as an int -> ports served (an empty set means any port)."""
    seeds: list[int]
    """Flow hash seed per IP protocol number."""
    mtu: int
    verify_checksum: bool
    table: list[int] = field(default_factory=list)
    """Lookup table: slot -> backend id, NO_BACKEND when no backend has weight > 0."""
    templates: list[bytes] = field(default_factory=list)
    """Per backend id: Ethernet + outer IPv4 header (TOS, length, ID, flags, checksum zero);
    b"" once the backend left the set."""
    sums: list[int] = field(default_factory=list)
    """Per backend id: 16-bit word sum of the template's IPv4 header plus 19 (the outer
    length is inner + 20, and the checksum fold below takes the sum minus one)."""
    eth: bytearray = field(default_factory=lambda: bytearray(ETH_HLEN))
    """Ethernet header of ICMP replies (next hop, local MAC, IPv4)."""


def make_kernel(
    t: Tables, counters: Counters, ct: ConnTable
) -> tuple[ProcessFn, BatchFn, BindRingFn]:
    """Build `process(frame, out, now) -> int`, `process_batch(...)` and `bind_ring(...)`
    over `t`."""
    drops = counters.drops
    forwarded = counters.forwarded
    vips_get = t.vips.get
    seeds = t.seeds
    table = t.table
    templates = t.templates
    sums = t.sums
    eth = t.eth
    mtu = t.mtu
    max_inner = mtu - 20
    verify = t.verify_checksum
    unpack_fields = ETH_IPV4_FIELDS.unpack_from
    unpack_fast = _FAST_FIELDS.unpack_from
    pack_ipv4 = IPV4.pack_into
    pack_icmp = ICMP.pack_into
    unpack_ipv4 = IPV4.unpack_from
    unpack_ports = PORTS.unpack_from
    pack_ports = PORTS.pack
    pack_ipv4_var = _IPV4_VAR.pack_into
    h3 = xxhash.xxh3_64_intdigest
    ident = 0  # outer IPv4 ID counter

    def encap(frame: memoryview, out: memoryview, tl: int, tos: int, frag: int, bid: int) -> int:
        # General-path twin of the encapsulation inlined in process and process_batch.
        nonlocal ident
        ident = (ident + 1) & 0xFFFF
        df = frag & IP_DF
        otl = tl + 20
        # Ones' complement sum of the header words, folded by `% 0xFFFF` (see packet.checksum).
        csum = 0xFFFE - (sums[bid] + tos + tl + ident + df) % 0xFFFF
        out[0:OUTER_LEN] = templates[bid]
        pack_ipv4_var(out, 15, tos, otl, ident, df, OUTER_TTL, IPPROTO_IPIP, csum)
        out[OUTER_LEN : OUTER_LEN + tl] = frame[ETH_HLEN : ETH_HLEN + tl]
        forwarded[bid] += 1
        return OUTER_LEN + tl

    def choose(key: int, track: bool, now: float) -> int:
        """Backend id for a flow hash: tracked (refreshed if `track`), else from the table."""
        bid = ct.lookup(key, now) if track else ct.get(key)
        if bid is None or not templates[bid]:
            bid = table[key % len(table)]
            if bid != NO_BACKEND and track:
                ct.insert(key, bid)
        return bid

    half = ct.half

    def miss(key: int) -> int:
        """Fast path, not in the young generation (or its backend left the set): promote from
        the old generation, else the table's choice; track it. The caller ticked the clock."""
        bid = ct.old.pop(key, None)
        if bid is None or not templates[bid]:
            bid = table[key % len(table)]
            if bid == NO_BACKEND:
                return bid
        young = ct.young
        if len(young) >= half:
            ct.insert(key, bid)  # rotates the generations first
        else:
            young[key] = bid
        return bid

    def too_big(frame: memoryview, out: memoryview, hl: int, tl: int, frag: int) -> int:
        """Inner + 20 > mtu: ICMP frag-needed from the VIP back to the sender if DF is set."""
        nonlocal ident
        if not frag & IP_DF:
            drops[_TOO_BIG] += 1
            return 0
        quote = min(hl + 8, tl)
        icmp_len = ICMP_HLEN + quote
        otl = 20 + icmp_len
        ident = (ident + 1) & 0xFFFF
        out[0:ETH_HLEN] = eth
        pack_ipv4(
            out, 14, 0x45, ICMP_ERROR_TOS, otl, ident, 0, OUTER_TTL, IPPROTO_ICMP, 0,
            bytes(frame[30:34]), bytes(frame[26:30]),
        )  # fmt: skip
        pack_icmp(out, 34, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED_CODE, 0, 0, mtu - 20)
        out[42 : 42 + quote] = frame[ETH_HLEN : ETH_HLEN + quote]
        out[36:38] = checksum(out[34 : 34 + icmp_len]).to_bytes(2, "big")
        out[24:26] = checksum(out[14:34]).to_bytes(2, "big")
        drops[_FRAG_NEEDED] += 1
        return ETH_HLEN + otl

    def icmp(
        frame: memoryview, out: memoryview, now: float, hl: int, tl: int, frag: int, tos: int
    ) -> int:
        l4 = ETH_HLEN + hl
        if tl < hl + ICMP_HLEN:
            drops[_TRUNCATED] += 1
            return 0
        icmp_type = frame[l4]
        if icmp_type == ICMP_ECHO_REQUEST:
            if tl > max_inner:
                return too_big(frame, out, hl, tl, frag)
            bid = choose(h3(frame[26:34], seeds[IPPROTO_ICMP]), True, now)
        elif icmp_type in _ICMP_ERRORS:
            # The quoted packet was sent by a VIP to the client: IP header + >= 8 bytes.
            q = l4 + ICMP_HLEN
            end = ETH_HLEN + tl
            if end - q < 20 or frame[q] >> 4 != 4:
                drops[_ICMP_BAD_QUOTE] += 1
                return 0
            qhl = (frame[q] & 15) << 2
            _, _, _, _, qfrag, _, qproto, _, qsrc, qdst = unpack_ipv4(frame, q)
            ports = vips_get(int.from_bytes(qsrc, "big"))
            # Cut or malformed, not sent by a VIP, or a non-first fragment (no ports).
            if qhl < 20 or end - q < qhl + 8 or ports is None or qfrag & 0x1FFF:
                drops[_ICMP_BAD_QUOTE] += 1
                return 0
            if qproto in _TCP_UDP:
                qsport, qdport = unpack_ports(frame, q + qhl)
                if ports and qsport not in ports:
                    drops[_ICMP_BAD_QUOTE] += 1
                    return 0
                flow = qdst + qsrc + pack_ports(qdport, qsport)
            elif qproto == IPPROTO_ICMP:
                flow = qdst + qsrc
            else:
                drops[_ICMP_BAD_QUOTE] += 1
                return 0
            if tl > max_inner:
                return too_big(frame, out, hl, tl, frag)
            bid = choose(h3(flow, seeds[qproto]), False, now)
        else:
            drops[_ICMP_UNSUPPORTED] += 1
            return 0
        if bid == NO_BACKEND:
            drops[_NO_BACKEND] += 1
            return 0
        return encap(frame, out, tl, tos, frag, bid)

    def general(frame: memoryview, out: memoryview, now: float) -> int:
        """Every frame the fast path does not take: all checks, in the documented order."""
        size = len(frame)
        if size < _MIN_FRAME:
            drops[_TRUNCATED] += 1
            return 0
        ethertype, vihl, tos, tl, frag, ttl, proto, dst = unpack_fields(frame, 0)
        if ethertype != ETH_P_IP or vihl >> 4 != 4:
            drops[_NOT_IPV4] += 1
            return 0
        hl = (vihl & 15) << 2
        if hl < 20:
            drops[_BAD_IHL] += 1
            return 0
        if size < ETH_HLEN + hl:
            drops[_TRUNCATED] += 1
            return 0
        if tl < hl or tl + ETH_HLEN > size:
            drops[_BAD_TOTAL_LENGTH] += 1
            return 0
        if verify and not ipv4_header_ok(frame, ETH_HLEN, hl):
            drops[_BAD_CHECKSUM] += 1
            return 0
        ports = vips_get(dst)
        if ports is None:
            drops[_NOT_VIP] += 1
            return 0
        if ttl <= 1:
            drops[_TTL_EXPIRED] += 1
            return 0
        if frag & IP_MF_OFFSET:
            # A fragment: hash addresses only, so every fragment of a datagram (the first one
            # too) reaches the same backend. No port to check on non-first fragments.
            if proto not in _SUPPORTED:
                drops[_IPIP_LOOP if proto == IPPROTO_IPIP else _UNSUPPORTED_PROTO] += 1
                return 0
            key = h3(frame[26:34], seeds[proto])
        elif proto in _TCP_UDP:
            l4 = ETH_HLEN + hl
            if tl < hl + (TCP_HLEN if proto == IPPROTO_TCP else UDP_HLEN):
                drops[_TRUNCATED] += 1
                return 0
            if ports and ((frame[l4 + 2] << 8) | frame[l4 + 3]) not in ports:
                drops[_WRONG_PORT] += 1
                return 0
            # Source, destination, source port, destination port.
            if hl == 20:
                key = h3(frame[26:38], seeds[proto])
            else:
                key = h3(bytes(frame[26:34]) + bytes(frame[l4 : l4 + 4]), seeds[proto])
        elif proto == IPPROTO_ICMP:
            return icmp(frame, out, now, hl, tl, frag, tos)
        else:
            drops[_IPIP_LOOP if proto == IPPROTO_IPIP else _UNSUPPORTED_PROTO] += 1
            return 0
        if tl > max_inner:
            return too_big(frame, out, hl, tl, frag)
        bid = choose(key, True, now)
        if bid == NO_BACKEND:
            drops[_NO_BACKEND] += 1
            return 0
        return encap(frame, out, tl, tos, frag, bid)

    def process_batch(
        frames: Sequence[memoryview],
        outs: Sequence[memoryview],
        lens: list[int],
        n: int,
        now: float,
    ) -> int:
        # Fast path inlined in the loop: a non-fragmented TCP/UDP packet in IPv4 without
        # options to a VIP port, that fits, is tracked or gets a backend. It must give exactly
        # what general() gives (tests replay the golden table through both).
        nonlocal ident
        k = 0
        if now >= ct.rotate_at:
            ct.tick(now)
        young_get = ct.young.get
        for i in range(n):
            frame = frames[i]
            try:
                if len(frame) >= 38 and not verify:
                    # ethertype, version/IHL, TOS, total length, flags/offset, TTL, protocol,
                    # destination, destination port (if IHL is 5).
                    et, vihl, tos, tl, frag, ttl, proto, dst, dport = unpack_fast(frame, 0)
                    if (
                        vihl == 0x45
                        and et == 0x0800
                        and ttl > 1
                        and not frag & 0x3FFF
                        and (tl >= 40 if proto == 6 else proto == 17 and tl >= 28)
                        and tl + 14 <= len(frame)
                        and tl <= max_inner
                    ):
                        ports = vips_get(dst)
                        if ports is not None and (not ports or dport in ports):
                            key = h3(frame[26:38], seeds[proto])
                            bid = young_get(key)
                            # Not in the young generation, or its backend left the set.
                            if bid is None or not templates[bid]:
                                bid = miss(key)
                                young_get = ct.young.get  # miss() may have rotated it
                                if bid == NO_BACKEND:
                                    drops[_NO_BACKEND] += 1
                                    continue
                            # Inlined encap(): header from the backend's template, then patch.
                            ident = (ident + 1) & 0xFFFF
                            df = frag & 0x4000
                            csum = 0xFFFE - (sums[bid] + tos + tl + ident + df) % 0xFFFF
                            out = outs[k]
                            out[0:34] = templates[bid]
                            pack_ipv4_var(out, 15, tos, tl + 20, ident, df, 64, 4, csum)
                            out[34 : 34 + tl] = frame[14 : 14 + tl]
                            forwarded[bid] += 1
                            lens[k] = tl + 34
                            k += 1
                            continue
                m = general(frame, outs[k], now)
                young_get = ct.young.get  # general() may have rotated the generations
                if m:
                    lens[k] = m
                    k += 1
            except Exception:  # a bug, not an input: count it and keep forwarding
                drops[_INTERNAL_ERROR] += 1
        return k

    def process(frame: memoryview, out: memoryview, now: float) -> int:
        # The fast path of process_batch again, for one frame (a batch of one would cost
        # ~0.4 us more); the golden table runs through both entry points.
        nonlocal ident
        try:
            if now >= ct.rotate_at:
                ct.tick(now)
            if len(frame) >= 38 and not verify:
                et, vihl, tos, tl, frag, ttl, proto, dst, dport = unpack_fast(frame, 0)
                if (
                    vihl == 0x45
                    and et == 0x0800
                    and ttl > 1
                    and not frag & 0x3FFF
                    and (tl >= 40 if proto == 6 else proto == 17 and tl >= 28)
                    and tl + 14 <= len(frame)
                    and tl <= max_inner
                ):
                    ports = vips_get(dst)
                    if ports is not None and (not ports or dport in ports):
                        key = h3(frame[26:38], seeds[proto])
                        bid = ct.young.get(key)
                        if bid is None or not templates[bid]:
                            bid = miss(key)
                            if bid == NO_BACKEND:
                                drops[_NO_BACKEND] += 1
                                return 0
                        ident = (ident + 1) & 0xFFFF
                        df = frag & 0x4000
                        csum = 0xFFFE - (sums[bid] + tos + tl + ident + df) % 0xFFFF
                        out[0:34] = templates[bid]
                        pack_ipv4_var(out, 15, tos, tl + 20, ident, df, 64, 4, csum)
                        out[34 : 34 + tl] = frame[14 : 14 + tl]
                        forwarded[bid] += 1
                        return tl + 34
            return general(frame, out, now)
        except Exception:  # a bug, not an input: count it and keep forwarding
            drops[_INTERNAL_ERROR] += 1
            return 0

    def bind_ring(
        slots: Sequence[memoryview],
        status: memoryview,
        snaps: memoryview,
        hdrs: memoryview,
        hdr_stride: int,
        flens: memoryview,
        spare: Sequence[memoryview],
        fixup: Callable[[memoryview], bool],
        fixed: list[int],
    ) -> RingBatchFn:
        """The zero-copy batch entry over a receive ring (see fastpath.forward): frames are
        read in place and never copied; for each frame sent from slot i the core writes only
        the 34-byte outer header at hdrs[i * hdr_stride] and the frame's length (outer header
        + inner packet) in flens[i]. fastpath.forward lays hdrs over the ring itself, so the
        header lands right before the inner IP header, over the inner Ethernet header, and
        the sender's one iovec per slot covers header and packet (fastpath.tx.ZeroCopySender).
        The header is written after the frame's fields were read.

        slots[i]: slot i's bytes from its Ethernet header; status[i] / snaps[i]: its status
        word (bit 0: ready for user space, bit 3: TCP/UDP checksum left partial) and snap
        length. Frames the fast path does not take go through general(), which writes into
        spare[j] (j = the number of marks so far); each is recorded in `marks` as (i, length
        written to spare[j], 0 for a drop). `fixup(frame)` completes partial checksums
        (counted in fixed[0]).

        Returns `ring_batch(first, end, now, marks) -> n`: slots first..n-1 were ready and
        handled (it stops at the first slot not ready, or at `end`).
        """
        # The fast path needs 38 bytes (through the destination port); with checksum
        # verification on, every frame takes the general path.
        min_fast = 1 << 30 if verify else 38
        pack_outer = _OUTER.pack_into
        seen: list[bytes] = []
        head = b""
        tails: list[bytes] = []

        def ring_batch(first: int, end: int, now: float, marks: list[tuple[int, int]]) -> int:
            nonlocal ident, head, seen
            if seen != templates:  # the control plane changed them: rederive head and tails
                seen = list(templates)
                head = next((tp[:15] for tp in seen if tp), b"")
                tails[:] = [tp[26:34] for tp in seen]
            if now >= ct.rotate_at:
                ct.tick(now)
            young_get = ct.young.get
            n = end - first
            for i in range(first, end):
                try:
                    st = status[i]
                    if st & 9 != 1:
                        if not st & 1:
                            n = i - first
                            break
                        if fixup(slots[i][: snaps[i]]):
                            fixed[0] += 1
                    frame = slots[i]
                    snap = snaps[i]
                    if snap >= min_fast:
                        et, vihl, tos, tl, frag, ttl, proto, dst, dport = unpack_fast(frame, 0)
                        if (
                            vihl == 0x45
                            and et == 0x0800
                            and ttl > 1
                            and not frag & 0x3FFF
                            and (tl >= 40 if proto == 6 else proto == 17 and tl >= 28)
                            and tl + 14 <= snap
                            and tl <= max_inner
                        ):
                            ports = vips_get(dst)
                            if ports is not None and (not ports or dport in ports):
                                key = h3(frame[26:38], seeds[proto])
                                bid = young_get(key)
                                if bid is None or not templates[bid]:
                                    bid = miss(key)
                                    young_get = ct.young.get  # miss() may have rotated it
                                    if bid == NO_BACKEND:
                                        drops[_NO_BACKEND] += 1
                                        marks.append((i, 0))
                                        continue
                                ident = (ident + 1) & 0xFFFF
                                df = frag & 0x4000
                                csum = 0xFFFE - (sums[bid] + tos + tl + ident + df) % 0xFFFF
                                pack_outer(
                                    hdrs, i * hdr_stride, head, tos, tl + 20, ident, df,
                                    _TTL_PROTO, csum, tails[bid],
                                )  # fmt: skip
                                flens[i] = tl + OUTER_LEN
                                forwarded[bid] += 1
                                continue
                    marks.append((i, general(frame[:snap], spare[len(marks)], now)))
                    young_get = ct.young.get  # general() may have rotated the generations
                except Exception:  # a bug, not an input: count it and keep forwarding
                    drops[_INTERNAL_ERROR] += 1
                    if not marks or marks[-1][0] != i:
                        marks.append((i, 0))
            return n

        return ring_batch

    return process, process_batch, bind_ring
