"""The packet core: Ethernet frame in; IP-in-IP frame to a backend, ICMP frag-needed to the
sender, or a drop counted by reason out. Pure: no sockets, no clock (`now` is passed in).

Backend choice. Every LB instance computes the same flow hash
    h = xxh3_64(key bytes, seed = (hash_seed << 8) | protocol)
and the same lookup table (fastpath.maglev.build_table), so any instance picks
table[h % table_size] for a new flow. The key bytes are:
- TCP/UDP, not fragmented: source IP, destination IP, source port, destination port (12 bytes);
- every fragment (MF set or offset != 0, first fragment included) and ICMP echo: source IP,
  destination IP only (8 bytes). All fragments of one datagram thus reach one backend, which
  reassembles them; non-first fragments carry no ports, so the destination port of a
  fragment is not checked, only that its destination is a VIP;
- ICMP errors (destination unreachable, frag-needed included; time exceeded) about a VIP flow:
  the quoted packet's tuple reversed (it was sent by the VIP to the client), so the error
  reaches the backend of the flow it is about (as Katran and GLB do).
The connection table (keyed by h) sits in front of the lookup table: a tracked flow stays on
its backend when the backend set changes, unless that backend was removed altogether.

Encapsulation: Ethernet (src local_mac, dst next_hop_mac) + IPv4 (IHL 5, TOS and DF copied
from the inner header, ID from a counter, TTL 64, protocol 4, src local_ip, dst backend),
checksum computed incrementally from a per-backend precomputed sum; then the inner packet's
`total length` bytes unchanged (Ethernet padding is not carried).

MTU: inner + 20 > mtu with DF set -> an ICMP frag-needed (next-hop MTU = mtu - 20) from the
VIP to the sender, quoting the inner IP header + 8 bytes; with DF clear -> dropped (TOO_BIG),
not fragmented: the backend's agent would have to reassemble outer fragments, and senders of
non-DF packets that large are rare when servers advertise MSS 1440.

The inner IPv4 header checksum is not verified unless `verify_checksum` is set: the backend's
kernel verifies it after decapsulation anyway, and the check costs ~0.2 us per packet.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import xxhash

from fastpath.config import BalancerConfig, check_backends
from fastpath.conntrack import ConnTable
from fastpath.counters import Counters, DropReason
from fastpath.maglev import NO_BACKEND, build_table
from fastpath.packet import (
    ETH,
    ETH_IPV4,
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
    OUTER_TTL,
    PORTS,
    TCP_HLEN,
    UDP_HLEN,
    checksum,
    fold,
    ipv4_header_ok,
)

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

_MIN_FRAME = 14 + 20
# Constant 16-bit words of the outer header: version/IHL 0x45 (TOS added per packet) and
# TTL/protocol.
_OUTER_CONST = (0x45 << 8) + ((OUTER_TTL << 8) | IPPROTO_IPIP)
_h3 = xxhash.xxh3_64_intdigest
_TCP_UDP = frozenset((IPPROTO_TCP, IPPROTO_UDP))


def _ip_words(ip: bytes) -> int:
    return ((ip[0] << 8) | ip[1]) + ((ip[2] << 8) | ip[3])


class Balancer:
    """Pure packet core; see the module docstring for the rules it applies."""

    def __init__(self, cfg: BalancerConfig) -> None:
        self.cfg = cfg
        self.counters = Counters()
        self.conntrack = ConnTable(cfg.conn_capacity, cfg.conn_idle_timeout)
        # VIP (int) -> ports served; an empty frozenset means any port.
        vips: dict[int, set[int]] = {}
        any_port: set[int] = set()
        for ip, port in cfg.vips:
            key = int(ipaddress.IPv4Address(ip))
            vips.setdefault(key, set())
            if port is None:
                any_port.add(key)
            else:
                vips[key].add(port)
        self._vips = {k: frozenset() if k in any_port else frozenset(p) for k, p in vips.items()}
        self._seeds = [((cfg.hash_seed << 8) | proto) for proto in range(256)]
        self._size = cfg.table_size
        self._mtu = cfg.mtu
        self._verify = cfg.verify_checksum
        self._local_ip = ipaddress.IPv4Address(cfg.local_ip).packed
        self._local_mac = bytes(cfg.local_mac)
        self._next_hop_mac = bytes(cfg.next_hop_mac)
        self._ident = 0
        # Per backend id (ids index counters.forwarded; never reused): packed IP, or None once
        # removed; and the outer header's checksum sum over its constant words.
        self._backend_ip: list[bytes | None] = []
        self._backend_sum: list[int] = []
        self._table: list[int] = []
        self._has_backend = False
        self.set_backends(cfg.backends)

    # -- control plane -------------------------------------------------------------------------

    def set_next_hop_mac(self, mac: bytes) -> None:
        """Ethernet destination of frames sent from now on."""
        if len(mac) != 6:
            raise ValueError(f"next hop MAC must be 6 bytes, not {mac!r}")
        self._next_hop_mac = bytes(mac)

    def set_backends(self, backends: tuple[tuple[str, int], ...]) -> None:
        """Replace the backend set (ip, weight) and rebuild the lookup table. Tracked flows keep
        their backend unless it left the set (weight 0 keeps it: it drains)."""
        check_backends(backends)
        ids = [self.counters.add_backend(ip) for ip, _ in backends]
        while len(self._backend_ip) < len(self.counters.backend_names):
            self._backend_ip.append(None)
            self._backend_sum.append(0)
        present = set(ids)
        for bid in range(len(self._backend_ip)):
            if bid not in present:
                self._backend_ip[bid] = None
        local_sum = _ip_words(self._local_ip)
        for bid, (ip, _) in zip(ids, backends, strict=True):
            packed = ipaddress.IPv4Address(ip).packed
            self._backend_ip[bid] = packed
            self._backend_sum[bid] = _OUTER_CONST + local_sum + _ip_words(packed)
        slots = build_table(backends, self._size)
        self._table = [NO_BACKEND if s == NO_BACKEND else ids[s] for s in slots]
        self._has_backend = any(w > 0 for _, w in backends)

    def backend_of(self, key: int) -> str | None:
        """The backend IP a flow hash maps to in the lookup table (tests, diagnostics)."""
        bid = self._table[key % self._size]
        return None if bid == NO_BACKEND else self.counters.backend_names[bid]

    # -- data plane ------------------------------------------------------------------------------

    def process(self, frame: memoryview, out: memoryview, now: float) -> int:
        """Handle one Ethernet frame. Returns the length of the frame written to `out` (which
        must hold mtu + 34 bytes) to send on the same interface, or 0 when dropped (counted by
        reason). Every frame is counted exactly once. Never raises."""
        try:
            return self._process(frame, out, now)
        except Exception:  # a bug, not an input: count it, keep forwarding
            self.counters.drops[_INTERNAL_ERROR] += 1
            return 0

    def process_batch(
        self,
        frames: Sequence[memoryview],
        outs: Sequence[memoryview],
        lens: list[int],
        n: int,
        now: float,
    ) -> int:
        """Handle frames[0:n]; the k frames to send are written to outs[0:k] with their lengths
        in lens[0:k] (compacted, ready for sendmmsg). Returns k."""
        one = self._process
        k = 0
        for i in range(n):
            try:
                m = one(frames[i], outs[k], now)
            except Exception:
                self.counters.drops[_INTERNAL_ERROR] += 1
                continue
            if m:
                lens[k] = m
                k += 1
        return k

    def _process(self, frame: memoryview, out: memoryview, now: float) -> int:
        drops = self.counters.drops
        n = len(frame)
        if n < _MIN_FRAME:
            drops[_TRUNCATED] += 1
            return 0
        ethertype, vihl, tos, tl, frag, ttl, proto, dst = ETH_IPV4_FIELDS.unpack_from(frame, 0)
        if ethertype != ETH_P_IP or vihl >> 4 != 4:
            drops[_NOT_IPV4] += 1
            return 0
        hl = (vihl & 15) << 2
        if hl < 20:
            drops[_BAD_IHL] += 1
            return 0
        if n < 14 + hl:
            drops[_TRUNCATED] += 1
            return 0
        if tl < hl or tl + 14 > n:
            drops[_BAD_TOTAL_LENGTH] += 1
            return 0
        if self._verify and not ipv4_header_ok(frame, 14, hl):
            drops[_BAD_CHECKSUM] += 1
            return 0
        ports = self._vips.get(dst)
        if ports is None:
            drops[_NOT_VIP] += 1
            return 0
        if ttl <= 1:
            drops[_TTL_EXPIRED] += 1
            return 0
        l4 = 14 + hl
        if frag & IP_MF_OFFSET:
            if proto != IPPROTO_TCP and proto != IPPROTO_UDP and proto != IPPROTO_ICMP:
                drops[_IPIP_LOOP if proto == IPPROTO_IPIP else _UNSUPPORTED_PROTO] += 1
                return 0
            key = _h3(frame[26:34], self._seeds[proto])
        elif proto in _TCP_UDP:
            if tl < hl + (TCP_HLEN if proto == IPPROTO_TCP else UDP_HLEN):
                drops[_TRUNCATED] += 1
                return 0
            if ports and ((frame[l4 + 2] << 8) | frame[l4 + 3]) not in ports:
                drops[_WRONG_PORT] += 1
                return 0
            if hl == 20:
                key = _h3(frame[26:38], self._seeds[proto])
            else:
                key = _h3(bytes(frame[26:34]) + bytes(frame[l4 : l4 + 4]), self._seeds[proto])
        elif proto == IPPROTO_ICMP:
            return self._icmp(frame, out, now, hl, tl, frag, tos)
        else:
            drops[_IPIP_LOOP if proto == IPPROTO_IPIP else _UNSUPPORTED_PROTO] += 1
            return 0
        if tl + 20 > self._mtu:
            return self._too_big(frame, out, hl, tl, frag)
        # Backend: the tracked one, else the lookup table's (then tracked).
        ct = self.conntrack
        if now >= ct.rotate_at:
            ct.tick(now)
        bid = ct.young.get(key)
        if bid is None:
            bid = ct.old.pop(key, None)
            if bid is not None:
                ct.insert(key, bid)
        backend_ip = None if bid is None else self._backend_ip[bid]
        if bid is None or backend_ip is None:
            bid = self._table[key % self._size] if self._has_backend else NO_BACKEND
            if bid == NO_BACKEND:
                drops[_NO_BACKEND] += 1
                return 0
            ct.insert(key, bid)
            backend_ip = self._backend_ip[bid]
            assert backend_ip is not None  # the table names present backends only
        return self._encap(frame, out, tl, tos, frag, bid, backend_ip)

    def _encap(
        self,
        frame: memoryview,
        out: memoryview,
        tl: int,
        tos: int,
        frag: int,
        bid: int,
        backend_ip: bytes,
    ) -> int:
        ident = self._ident = (self._ident + 1) & 0xFFFF
        df = frag & IP_DF
        otl = tl + 20
        csum = fold(self._backend_sum[bid] + tos + otl + ident + df) ^ 0xFFFF
        ETH_IPV4.pack_into(
            out, 0, self._next_hop_mac, self._local_mac, ETH_P_IP,
            0x45, tos, otl, ident, df, OUTER_TTL, IPPROTO_IPIP, csum,
            self._local_ip, backend_ip,
        )  # fmt: skip
        out[34 : 34 + tl] = frame[14 : 14 + tl]
        self.counters.forwarded[bid] += 1
        return 34 + tl

    def _flow_backend(self, key: int) -> tuple[int, bytes] | None:
        """Backend for an ICMP error's flow: tracked (not refreshed) or from the table."""
        bid = self.conntrack.get(key)
        backend_ip = None if bid is None else self._backend_ip[bid]
        if bid is None or backend_ip is None:
            bid = self._table[key % self._size] if self._has_backend else NO_BACKEND
            if bid == NO_BACKEND:
                return None
            backend_ip = self._backend_ip[bid]
            assert backend_ip is not None
        return bid, backend_ip

    def _icmp(
        self, frame: memoryview, out: memoryview, now: float, hl: int, tl: int, frag: int, tos: int
    ) -> int:
        drops = self.counters.drops
        l4 = 14 + hl
        if tl < hl + ICMP_HLEN:
            drops[_TRUNCATED] += 1
            return 0
        icmp_type = frame[l4]
        if icmp_type == ICMP_ECHO_REQUEST:
            key = _h3(frame[26:34], self._seeds[IPPROTO_ICMP])
            if tl + 20 > self._mtu:
                return self._too_big(frame, out, hl, tl, frag)
            ct = self.conntrack
            bid = ct.lookup(key, now)
            backend_ip = None if bid is None else self._backend_ip[bid]
            if bid is None or backend_ip is None:
                bid = self._table[key % self._size] if self._has_backend else NO_BACKEND
                if bid == NO_BACKEND:
                    drops[_NO_BACKEND] += 1
                    return 0
                ct.insert(key, bid)
                backend_ip = self._backend_ip[bid]
                assert backend_ip is not None
            return self._encap(frame, out, tl, tos, frag, bid, backend_ip)
        if icmp_type != ICMP_DEST_UNREACH and icmp_type != ICMP_TIME_EXCEEDED:
            drops[_ICMP_UNSUPPORTED] += 1
            return 0
        # The quoted packet: the VIP's own packet to the client (IP header + >= 8 bytes).
        q = l4 + ICMP_HLEN
        end = 14 + tl
        if end - q < 20 or frame[q] >> 4 != 4:
            drops[_ICMP_BAD_QUOTE] += 1
            return 0
        qhl = (frame[q] & 15) << 2
        _, _, _, _, qfrag, _, qproto, _, qsrc, qdst = IPV4.unpack_from(frame, q)
        qsrc_int = int.from_bytes(qsrc, "big")
        ports = self._vips.get(qsrc_int)
        if qhl < 20 or end - q < qhl + 8 or ports is None or qfrag & 0x1FFF:
            # Cut or malformed, not sent by a VIP, or a non-first fragment (no ports to name
            # the flow).
            drops[_ICMP_BAD_QUOTE] += 1
            return 0
        if qproto in _TCP_UDP:
            qsport, qdport = PORTS.unpack_from(frame, q + qhl)
            if ports and qsport not in ports:
                drops[_ICMP_BAD_QUOTE] += 1
                return 0
            flow = qdst + qsrc + PORTS.pack(qdport, qsport)
        elif qproto == IPPROTO_ICMP:
            flow = qdst + qsrc
        else:
            drops[_ICMP_BAD_QUOTE] += 1
            return 0
        if tl + 20 > self._mtu:
            return self._too_big(frame, out, hl, tl, frag)
        chosen = self._flow_backend(_h3(flow, self._seeds[qproto]))
        if chosen is None:
            drops[_NO_BACKEND] += 1
            return 0
        return self._encap(frame, out, tl, tos, frag, chosen[0], chosen[1])

    def _too_big(self, frame: memoryview, out: memoryview, hl: int, tl: int, frag: int) -> int:
        """Inner + 20 > mtu: ICMP frag-needed back to the sender if DF is set, else drop."""
        drops = self.counters.drops
        if not frag & IP_DF:
            drops[_TOO_BIG] += 1
            return 0
        quote = min(hl + 8, tl)
        icmp_len = ICMP_HLEN + quote
        otl = 20 + icmp_len
        ident = self._ident = (self._ident + 1) & 0xFFFF
        ETH.pack_into(out, 0, self._next_hop_mac, self._local_mac, ETH_P_IP)
        # From the VIP (the inner destination) to the sender (the inner source).
        IPV4.pack_into(
            out, 14, 0x45, ICMP_ERROR_TOS, otl, ident, 0, OUTER_TTL, IPPROTO_ICMP, 0,
            bytes(frame[30:34]), bytes(frame[26:30]),
        )  # fmt: skip
        ICMP.pack_into(out, 34, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED_CODE, 0, 0, self._mtu - 20)
        out[42 : 42 + quote] = frame[14 : 14 + quote]
        out[36:38] = checksum(out[34 : 34 + icmp_len]).to_bytes(2, "big")
        out[24:26] = checksum(out[14:34]).to_bytes(2, "big")
        drops[_FRAG_NEEDED] += 1
        return 14 + otl
