"""The per-packet code of the Balancer: one ring path, built as closures over its tables.

`make_kernel(...)` returns `bind_ring(slots) -> ring_batch`; `ring_batch(first, end, now) -> n`
handles the ready frames of ring slots first..end-1 in place (l4lb.ring.Slots: the kernel's
ring in production, a FakeRing in tests and benchmarks) and stops at the first slot not ready.
For each slot it handles it writes the frame to send at the slot's `out` offset and its length
in out_len, or appends the slot to `unsent` (a drop, counted by reason). The common frame takes
the fast path inlined in the loop: a non-fragmented TCP/UDP packet in IPv4 without options to a
VIP port, that fits once encapsulated, and is tracked or gets a backend. Every other frame
takes `general()`, all checks in the documented order (fastpath.balancer); both give the same
verdicts and bytes (the golden table runs with the fast path on and off).

Why closures: every name the hot path touches is a local or a closure cell (no attribute
lookups, no method calls on the common path), which halves the cost per packet in CPython.
The control plane (fastpath.balancer) changes the tables *in place* (list slice assignment),
so closures handed out once stay valid.

Where the next checks go: the fast path reads the frame's fields in one unpack (`_FAST_FIELDS`,
through the destination port); a field further on (the TCP flags byte, frame[47] with IHL 5)
is one index away, and a new counter is one more list slot in fastpath.counters. A flow the
young generation does not hold goes through `miss()` on both paths: the connection table's
rules, the SYN flood's included, are written once there, and the TCP flags byte is read
only then (an established flow's packet never reads it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from struct import Struct

import xxhash

from fastpath.conntrack import ConnTable, FlowEvent
from fastpath.counters import Counters, DropReason
from l4lb.checksum import checksum, complete_l4_checksum, ipv4_header_ok
from l4lb.ring import CSUM_NOT_READY, READY, Slots
from l4lb.wire import (
    ETH_HLEN,
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
    IP_OFFSET,
    IPIP,
    IPPROTO_ICMP,
    IPPROTO_IPIP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPV4,
    IPV4_HLEN,
    IPV4_VIHL,
    PORTS,
    TCP_HLEN,
    UDP_HLEN,
)

RingBatchFn = Callable[[int, int, float], int]
BindRingFn = Callable[[Slots], RingBatchFn]

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

NEW, NONSYN_MISS, FLOOD_BYPASS, PROMOTED = (
    FlowEvent.NEW.value, FlowEvent.NONSYN_MISS.value, FlowEvent.FLOOD_BYPASS.value,
    FlowEvent.PROMOTED.value,
)  # fmt: skip
_MIN_FRAME = ETH_HLEN + IPV4_HLEN
_TCP_UDP = frozenset((IPPROTO_TCP, IPPROTO_UDP))
_ICMP_ERRORS = frozenset((ICMP_DEST_UNREACH, ICMP_TIME_EXCEEDED))
_SUPPORTED = frozenset((IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP))
# The frame's fields the general path decides on, in one unpack from the Ethernet header:
# EtherType, version/IHL, TOS, total length, (ID skipped), flags/fragment offset, TTL,
# protocol, (checksum, source skipped), destination as an int.
_FIELDS = Struct("!12xHBBH2xHBB2x4xI")
# _FIELDS plus the destination port where it is when IHL is 5 (frames of >= 38 bytes).
_FAST_FIELDS = Struct("!12xHBBH2xHBB2x4xI2xH")
_FAST_MIN = _FAST_FIELDS.size
# The outer header from its IPv4 byte 1: TOS, total length, ID, flags/offset, TTL and
# protocol, checksum (the template holds the rest).
_IPV4_VAR = Struct("!BHHHHH")
# The whole outer header in one go: Ethernet + version/IHL (template bytes 0..14), TOS, total
# length, ID, flags, TTL and protocol (one word), checksum, source + destination (template
# bytes 26..33).
_OUTER = Struct("!15sBHHHHH8s")
_ENCAP = IPIP
_OUTER_LEN = _ENCAP.header_len
_ADDED = _ENCAP.headroom  # what encapsulation adds to the inner packet's length
assert _OUTER.size == _OUTER_LEN
# The fast path below spells these as literals (a constant costs less than a cell): IPv4 with
# IHL 5 (0x45), EtherType IPv4 (0x0800), MF + offset (0x3FFF), DF (0x4000), TCP (6) at >= 40
# bytes and UDP (17) at >= 28, Ethernet (14), and the encapsulation's 20 and 34 bytes.
assert (IPV4_VIHL, ETH_P_IP, IP_MF_OFFSET, IP_DF, _ADDED, _OUTER_LEN) == (
    0x45, 0x0800, 0x3FFF, 0x4000, 20, 34
)  # fmt: skip
_ICMP_LEN = ETH_HLEN + IPV4_HLEN + ICMP_HLEN  # an ICMP error up to its quote


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
    """Per backend id: the encapsulation's header template (l4lb.wire.Encap.template); b""
    once the backend left the set."""
    sums: list[int] = field(default_factory=list)
    """Per backend id: the template's checksum base (l4lb.wire.Encap.checksum_base)."""
    eth: bytearray = field(default_factory=lambda: bytearray(ETH_HLEN))
    """Ethernet header of ICMP replies (next hop, local MAC, IPv4)."""


def make_kernel(t: Tables, counters: Counters, ct: ConnTable) -> BindRingFn:
    """Build `bind_ring(slots) -> ring_batch` over `t` (see the module docstring)."""
    drops = counters.drops
    forwarded = counters.forwarded
    fbytes = counters.forwarded_bytes
    conns = counters.connections
    young_n, old_n = ct.young_n, ct.old_n  # tracked flows per backend (fastpath.conntrack)
    vips_get = t.vips.get
    seeds = t.seeds
    table = t.table
    templates = t.templates
    sums = t.sums
    eth = t.eth
    mtu = t.mtu
    max_inner = mtu - _ADDED
    verify = t.verify_checksum
    unpack_fields = _FIELDS.unpack_from
    unpack_fast = _FAST_FIELDS.unpack_from
    pack_ipv4 = IPV4.pack_into
    pack_icmp = ICMP.pack_into
    unpack_ipv4 = IPV4.unpack_from
    unpack_ports = PORTS.unpack_from
    pack_ports = PORTS.pack
    pack_ipv4_var = _IPV4_VAR.pack_into
    h3 = xxhash.xxh3_64_intdigest
    ttl_proto = _ENCAP.ttl_proto
    ident = 0  # outer IPv4 ID counter

    def encap(out: memoryview, tl: int, tos: int, frag: int, bid: int) -> int:
        """The outer header in front of the inner packet, which is in place at out[34:]."""
        nonlocal ident
        ident = (ident + 1) & 0xFFFF
        df = frag & IP_DF
        csum = 0xFFFE - (sums[bid] + tos + tl + ident + df) % 0xFFFF
        out[0:_OUTER_LEN] = templates[bid]
        pack_ipv4_var(out, 15, tos, tl + _ADDED, ident, df, ttl_proto, csum)
        forwarded[bid] += 1
        fbytes[bid] += tl
        return _OUTER_LEN + tl

    def choose(key: int, flags: int, track: bool, now: float) -> int:
        """Backend id for a flow hash on the general path: if `track`, as the fast path
        decides (the young generation, else `miss`); else read only, tracked or the table's.
        `flags`: the TCP flags byte, -1 for other protocols (see `miss`)."""
        if track:
            bid = ct.young.get(key)
            if bid is None or not templates[bid]:
                bid = miss(key, bid, flags, now)
            return bid
        bid = ct.get(key)
        if bid is None or not templates[bid]:
            bid = table[key % len(table)]
        return bid

    half = ct.half
    events = ct.events
    _new, _nonsyn, _bypass, _promoted = NEW, NONSYN_MISS, FLOOD_BYPASS, PROMOTED

    def miss(key: int, stale: int | None, flags: int, now: float) -> int:
        """Both paths, for a flow not in the young generation, or there as `stale` (its
        backend out of service). The one definition of the rules (fastpath.conntrack):
        - tracked established (old generation) -> promoted to the young one; stale or
          tracked to a backend out of service -> re-hashed, tracked again, counted per
          backend (no new flow: it was one already);
        - half-open: a bare SYN (`flags & 0x17 == 0x02`: SYN, no ACK/FIN/RST; ECN bits
          allowed) keeps it half-open, anything else promotes it to established;
        - else a new flow, by the table: over the second's insert budget forwarded but not
          tracked (flood_bypass); a bare SYN is tracked half-open; any other TCP packet is
          a nonsyn_miss tracked as established; UDP, ICMP and fragments (`flags` -1: no
          handshake to wait for) are tracked as established at once.
        The caller ticked the established generations; the half-open ones tick here."""
        if now >= ct.syn_rotate_at:
            ct.tick_half_open(now)
        if stale is not None:  # in the young generation, so not in the old one: re-hash
            del ct.young[key]
            young_n[stale] -= 1
            bid = None
        else:
            bid = ct.old.pop(key, None)
            if bid is not None:
                old_n[bid] -= 1
                if not templates[bid]:
                    bid = None
            else:
                bid = ct.syn_young.get(key)
                if bid is None:
                    bid = ct.syn_old.get(key)
                if bid is not None:  # half-open
                    if not templates[bid]:
                        bid = table[key % len(table)]
                        if bid == NO_BACKEND:
                            ct.pop_half_open(key)
                            return bid
                    if flags & 0x17 == 0x02:  # a SYN again: still half-open, refreshed
                        ct.pop_half_open(key)
                        ct.insert_half_open(key, bid)
                        return bid
                    ct.pop_half_open(key)
                    events[_promoted] += 1
                else:  # a new flow
                    bid = table[key % len(table)]
                    if bid == NO_BACKEND:
                        return bid
                    syn = flags & 0x17 == 0x02
                    if flags >= 0 and not syn:
                        events[_nonsyn] += 1
                    if now >= ct.refill_at:
                        ct.refill(now)
                    if ct.budget <= 0:
                        events[_bypass] += 1
                        return bid
                    ct.budget -= 1
                    events[_new] += 1
                    conns[bid] += 1
                    if syn:
                        syn_young = ct.syn_young
                        if len(syn_young) >= ct.syn_half:
                            ct.insert_half_open(key, bid)  # rotates the half-open ones first
                        else:
                            syn_young[key] = bid
                        return bid
        if bid is None:
            bid = table[key % len(table)]
            if bid == NO_BACKEND:
                return bid
            conns[bid] += 1
        young = ct.young
        if len(young) >= half:
            ct.insert(key, bid)  # rotates the generations first
        else:
            young[key] = bid
            young_n[bid] += 1
        return bid

    def too_big(frame: memoryview, out: memoryview, hl: int, tl: int, frag: int) -> int:
        """Inner + 20 > mtu: ICMP frag-needed from the VIP back to the sender if DF is set.
        `out` overlaps `frame` (it starts `_ADDED` bytes before it): the quote and the
        addresses are read before anything is written."""
        nonlocal ident
        if not frag & IP_DF:
            drops[_TOO_BIG] += 1
            return 0
        quote_len = min(hl + 8, tl)
        quote = bytes(frame[ETH_HLEN : ETH_HLEN + quote_len])
        src, dst = quote[12:16], quote[16:20]
        icmp_len = ICMP_HLEN + quote_len
        otl = IPV4_HLEN + icmp_len
        ident = (ident + 1) & 0xFFFF
        out[0:ETH_HLEN] = eth
        pack_ipv4(
            out, 14, IPV4_VIHL, ICMP_ERROR_TOS, otl, ident, 0, _ENCAP.ttl, IPPROTO_ICMP, 0,
            dst, src,
        )  # fmt: skip
        pack_icmp(out, 34, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED_CODE, 0, 0, max_inner)
        out[_ICMP_LEN : _ICMP_LEN + quote_len] = quote
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
            bid = choose(h3(frame[26:34], seeds[IPPROTO_ICMP]), -1, True, now)
        elif icmp_type in _ICMP_ERRORS:
            # The quoted packet was sent by a VIP to the client: IP header + >= 8 bytes.
            q = l4 + ICMP_HLEN
            end = ETH_HLEN + tl
            if end - q < IPV4_HLEN or frame[q] >> 4 != 4:
                drops[_ICMP_BAD_QUOTE] += 1
                return 0
            qhl = (frame[q] & 15) << 2
            _, _, _, _, qfrag, _, qproto, _, qsrc, qdst = unpack_ipv4(frame, q)
            ports = vips_get(int.from_bytes(qsrc, "big"))
            # Cut or malformed, not sent by a VIP, or a non-first fragment (no ports).
            if qhl < IPV4_HLEN or end - q < qhl + 8 or ports is None or qfrag & IP_OFFSET:
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
            bid = choose(h3(flow, seeds[qproto]), -1, False, now)
        else:
            drops[_ICMP_UNSUPPORTED] += 1
            return 0
        if bid == NO_BACKEND:
            drops[_NO_BACKEND] += 1
            return 0
        return encap(out, tl, tos, frag, bid)

    def general(frame: memoryview, out: memoryview, now: float) -> int:
        """Every frame the fast path does not take: all checks, in the documented order.
        `frame` is the received frame (its snap length), `out` the same slot from `_ADDED`
        bytes earlier; returns the length of the frame written to `out`, or 0 for a drop."""
        size = len(frame)
        if size < _MIN_FRAME:
            drops[_TRUNCATED] += 1
            return 0
        ethertype, vihl, tos, tl, frag, ttl, proto, dst = unpack_fields(frame, 0)
        if ethertype != ETH_P_IP or vihl >> 4 != 4:
            drops[_NOT_IPV4] += 1
            return 0
        hl = (vihl & 15) << 2
        if hl < IPV4_HLEN:
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
            flags = -1
        elif proto in _TCP_UDP:
            l4 = ETH_HLEN + hl
            if tl < hl + (TCP_HLEN if proto == IPPROTO_TCP else UDP_HLEN):
                drops[_TRUNCATED] += 1
                return 0
            if ports and ((frame[l4 + 2] << 8) | frame[l4 + 3]) not in ports:
                drops[_WRONG_PORT] += 1
                return 0
            # Source, destination, source port, destination port.
            if hl == IPV4_HLEN:
                key = h3(frame[26:38], seeds[proto])
            else:
                key = h3(bytes(frame[26:34]) + bytes(frame[l4 : l4 + 4]), seeds[proto])
            flags = frame[l4 + 13] if proto == IPPROTO_TCP else -1
        elif proto == IPPROTO_ICMP:
            return icmp(frame, out, now, hl, tl, frag, tos)
        else:
            drops[_IPIP_LOOP if proto == IPPROTO_IPIP else _UNSUPPORTED_PROTO] += 1
            return 0
        if tl > max_inner:
            return too_big(frame, out, hl, tl, frag)
        bid = choose(key, flags, True, now)
        if bid == NO_BACKEND:
            drops[_NO_BACKEND] += 1
            return 0
        return encap(out, tl, tos, frag, bid)

    def bind_ring(slots: Slots) -> RingBatchFn:
        """`ring_batch` over `slots` (see the module docstring). The fast path writes the
        outer header after it read the frame's fields: it overwrites the inner Ethernet
        header and the headroom before it."""
        # The fast path needs the fields through the destination port; with checksum
        # verification on, every frame takes the general path.
        min_fast = 1 << 30 if verify else _FAST_MIN
        pack_outer = _OUTER.pack_into
        status, snaps, frames, outs = slots.status, slots.snap, slots.frames, slots.outs
        out_len, unsent = slots.out_len, slots.unsent
        out_mem, stride = slots.out_mem, slots.layout.stride
        ready, ready_mask = READY, READY | CSUM_NOT_READY  # the status bits, as cells
        seen: list[bytes] = []
        head = b""
        tails: list[bytes] = []

        def ring_batch(first: int, end: int, now: float) -> int:
            nonlocal ident, head, seen
            if seen != templates:  # the control plane changed them: rederive head and tails
                seen = list(templates)
                head = next((tp[:15] for tp in seen if tp), b"")
                tails[:] = [tp[26:34] for tp in seen]
            if now >= ct.rotate_at:
                ct.tick(now)
            young_get = ct.young.get
            n = end - first
            fixed = 0
            for i in range(first, end):
                try:
                    st = status[i]
                    if st & ready_mask != ready:
                        if not st & ready:
                            n = i - first
                            break
                        if complete_l4_checksum(frames[i][: snaps[i]]):
                            fixed += 1
                    frame = frames[i]
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
                                    # The TCP flags (frame[47] at IHL 5) only here.
                                    bid = miss(key, bid, frame[47] if proto == 6 else -1, now)
                                    young_get = ct.young.get  # miss() may have rotated it
                                    if bid == NO_BACKEND:
                                        drops[_NO_BACKEND] += 1
                                        unsent.append(i)
                                        continue
                                # encap(), inlined: the template's head and tail, then patch.
                                ident = (ident + 1) & 0xFFFF
                                df = frag & 0x4000
                                csum = 0xFFFE - (sums[bid] + tos + tl + ident + df) % 0xFFFF
                                pack_outer(
                                    out_mem, i * stride, head, tos, tl + 20, ident, df,
                                    ttl_proto, csum, tails[bid],
                                )  # fmt: skip
                                out_len[i] = tl + 34
                                forwarded[bid] += 1
                                fbytes[bid] += tl
                                continue
                    m = general(frame[:snap], outs[i], now)
                    young_get = ct.young.get  # general() may have rotated the generations
                    if m:
                        out_len[i] = m
                    else:
                        unsent.append(i)
                except Exception:  # a bug, not an input: count it and keep forwarding
                    drops[_INTERNAL_ERROR] += 1
                    if not unsent or unsent[-1] != i:
                        unsent.append(i)
            if fixed:
                slots.csum_completed += fixed
            return n

        return ring_batch

    return bind_ring
