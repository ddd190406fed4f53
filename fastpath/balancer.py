"""The packet core: Ethernet frames in ring slots in; per frame an IP-in-IP frame to a backend,
an ICMP frag-needed to the sender, or a drop counted by reason out. Pure: no sockets, no clock
(`now` is passed in). The rules below; the per-packet code in fastpath.kernel.

Backend choice. Every LB instance computes the same flow hash
    h = xxh3_64(key bytes, seed = (hash_seed << 8) | protocol)
and the same lookup table (fastpath.lookup_table.rendezvous_table, kept current across
changes by RendezvousTable), so any instance picks table[h % table_size] for a new flow. The
key bytes are:
- TCP/UDP, not fragmented: source IP, destination IP, source port, destination port (12 bytes);
- every fragment (MF set or offset != 0, first fragment included) and ICMP echo: source IP,
  destination IP only (8 bytes). All fragments of one datagram thus reach one backend, which
  reassembles them; non-first fragments carry no ports, so the destination port of a
  fragment is not checked, only that its destination is a VIP;
- ICMP errors (destination unreachable, frag-needed included; time exceeded) about a VIP flow:
  the quoted packet's tuple reversed (it was sent by the VIP to the client), so the error
  reaches the backend of the flow it is about (as Katran and GLB do).
The connection table (keyed by h) sits in front of the lookup table: a tracked flow stays on
its backend when the backend set changes while that backend serves (in the set, not down;
weight 0 drains: it serves its tracked flows but gets no new one). A flow tracked to a
backend that does not serve is re-hashed at its next packet (as Maglev reuses a tracked flow
only while its backend is healthy); one that left the set is forgotten for good: should it
come back it gets a new backend id, so no old entry returns to it.

What the connection table tracks (fastpath.conntrack; applied in fastpath.kernel's `miss`): a
TCP flow whose packets so far are bare SYNs is half-open, apart from the established flows,
with a shorter idle timeout, and becomes established with its next packet; a TCP packet that
is no bare SYN of an untracked flow (nonsyn_miss), and a new UDP/ICMP flow, are established at
once; new flows are tracked at most conn_insert_rate per second, the others forwarded by the
lookup table untracked (flood_bypass).

Encapsulation (l4lb.wire.IPIP): Ethernet (src local_mac, dst next_hop_mac) + IPv4 (IHL 5, TOS
and DF copied from the inner header, ID from a counter, TTL 64, protocol 4, src local_ip, dst
backend), checksum computed incrementally from a per-backend precomputed sum, written in the
ring slot over the inner Ethernet header; then the inner packet's `total length` bytes,
unchanged and never copied (Ethernet padding is not carried).

MTU: inner + 20 > mtu with DF set -> an ICMP frag-needed (next-hop MTU = mtu - 20) from the
VIP to the sender, quoting the inner IP header + 8 bytes; with DF clear -> dropped (TOO_BIG),
not fragmented: the backend's agent would have to reassemble outer fragments, and senders of
non-DF packets that large are rare when servers advertise MSS 1440.

The inner IPv4 header checksum is not verified unless `verify_checksum` is set: the backend's
kernel verifies it after decapsulation anyway, and the check costs ~0.2 us per packet.
"""

from __future__ import annotations

import ipaddress
import struct
from array import array
from collections import Counter
from collections.abc import Collection, Sequence
from typing import Any

import xxhash

from fastpath.config import BalancerConfig, check_backends
from fastpath.conntrack import ConnTable
from fastpath.counters import Counters
from fastpath.kernel import RingBatchFn, Tables, make_kernel
from fastpath.lookup_table import RendezvousTable
from l4lb.ring import ETH_MAC_OFFSET, FakeRing, SlotLayout
from l4lb.wire import ETH, ETH_HLEN, ETH_P_IP, IPIP


class Balancer:
    """Pure packet core; see the module docstring for the rules it applies.

    `bind_ring(slots) -> ring_batch` is the one path frames take (fastpath.kernel):
    `ring_batch(first, end, now) -> n` handles the ready frames of slots first..end-1 in place
    (l4lb.ring.Slots: the kernel's ring, or a FakeRing) and returns how many were ready. For
    each, it writes the frame to send at the slot's `out` offset with its length in
    `slots.out_len`, or lists the slot in `slots.unsent` (a drop, counted by reason). Every
    frame is counted exactly once, in `counters.forwarded` or `counters.drops`; it never
    raises. The closure is safe to keep: the control plane methods below update the tables it
    reads in place.

    `process(frame, out, now)` is one frame through that path, over a one-slot FakeRing, for
    tests and tools.
    """

    def __init__(self, cfg: BalancerConfig) -> None:
        self.cfg = cfg
        self.counters = Counters()
        self.conntrack = ConnTable(
            cfg.conn_capacity,
            cfg.conn_idle_timeout,
            cfg.conn_half_open_capacity,
            cfg.conn_half_open_timeout,
            cfg.conn_insert_rate,
        )
        ports_of: dict[int, set[int]] = {}
        any_port: set[int] = set()
        for ip, port in cfg.vips:
            key = int(ipaddress.IPv4Address(ip))
            ports_of.setdefault(key, set())
            if port is None:
                any_port.add(key)
            else:
                ports_of[key].add(port)
        self._tables = Tables(
            vips={k: frozenset() if k in any_port else frozenset(p) for k, p in ports_of.items()},
            seeds=[(cfg.hash_seed << 8) | proto for proto in range(256)],
            mtu=cfg.mtu,
            verify_checksum=cfg.verify_checksum,
        )
        self._local_ip = ipaddress.IPv4Address(cfg.local_ip).packed
        self._local_mac = bytes(cfg.local_mac)
        self._next_hop_mac = bytes(cfg.next_hop_mac)
        self._backend_ips: list[bytes | None] = []  # per backend id; None while it serves not
        self._ids: dict[str, int] = {}  # IP of each backend in the set -> its id
        self._retired: dict[str, list[tuple[int, int]]] = {}  # IP -> (id, rotations then)
        self._rt = RendezvousTable(cfg.table_size, self._tables.table)
        self.table_digest = ""
        """xxh64 of the table as the IPv4 of each slot's backend (equal on every LB instance
        with the same set), hex; updated by set_backends."""
        self.set_next_hop_mac(self._next_hop_mac)
        self.set_backends(cfg.backends)
        self.bind_ring = make_kernel(self._tables, self.counters, self.conntrack)
        self._one: FakeRing | None = None
        self._one_batch: RingBatchFn | None = None

    def process(self, frame: bytes | bytearray | memoryview, out: memoryview, now: float) -> int:
        """`frame` through the ring path in a slot of its own: the length of the frame written
        to `out` (which must hold mtu + 34 bytes), or 0 when it was dropped."""
        one = self._one
        if one is None or len(frame) > one.layout.room:
            room = max(len(frame), self.cfg.mtu + ETH_HLEN)
            stride = -(-(ETH_MAC_OFFSET + room) // 16) * 16
            one = self._one = FakeRing(1, SlotLayout(stride=stride))
            self._one_batch = self.bind_ring(one.slots)
        assert self._one_batch is not None
        one.put(0, frame)
        self._one_batch(0, 1, now)
        slots = one.slots
        if slots.unsent:
            slots.unsent.clear()
            return 0
        n = slots.out_len[0]
        out[:n] = slots.outs[0][:n]
        return n

    def set_next_hop_mac(self, mac: bytes) -> None:
        """Ethernet destination of frames sent from now on."""
        if len(mac) != 6:
            raise ValueError(f"next hop MAC must be 6 bytes, not {mac!r}")
        self._next_hop_mac = bytes(mac)
        self._tables.eth[:] = ETH.pack(self._next_hop_mac, self._local_mac, ETH_P_IP)
        self._rebuild_templates()

    def set_backends(self, backends: Sequence[tuple[str, int]], down: Collection[str] = ()) -> int:
        """Make the backend set `backends` (ip, weight), in one table update at the cost of
        the change; returns the number of table slots that changed backend.

        A listed backend serves its tracked flows and gets new flows in proportion to its
        weight (weight 0: none, it drains), unless it is in `down`: then it serves nothing and
        its tracked flows are re-hashed at their next packet. A backend no longer listed is
        forgotten with its tracked flows (see the module docstring). Raises ConfigError (and
        changes nothing) for a bad entry, ValueError for a `down` IP not listed."""
        check_backends(tuple(backends))
        listed = {ip for ip, _ in backends}
        if not listed.issuperset(down):
            raise ValueError(f"down: {sorted(set(down) - listed)} not in the backend set")
        rotations = self.conntrack.rotations
        for ip, bid in self._ids.items():
            if ip not in listed:
                self._retired.setdefault(ip, []).append((bid, rotations))
        self._ids = {ip: self._id_for(ip) for ip, _ in backends}
        ips: list[bytes | None] = [None] * len(self.counters.backend_names)
        for ip, bid in self._ids.items():
            if ip not in down:
                ips[bid] = ipaddress.IPv4Address(ip).packed
        self._backend_ips = ips
        self._rebuild_templates()
        moved = self._rt.update(
            {self._ids[ip]: (ip, w) for ip, w in backends if w > 0 and ip not in down}
        )
        self.table_digest = self._digest()
        return moved

    def _id_for(self, ip: str) -> int:
        """The backend id for `ip` (in the set, or joining it): its own, a retired one of its
        no tracked flow can name any more (two rotations of the connection table since it
        left), or a new one."""
        bid = self._ids.get(ip)
        if bid is not None:
            return bid
        retired = self._retired.get(ip, [])
        for k, (old, at) in enumerate(retired):
            if self.conntrack.rotations >= at + 2:
                del retired[k]
                return old
        bid = self.counters.new_backend(ip)
        counted = self.conntrack.add_value()
        if counted != bid:  # one id space for counters and tracked flows
            raise RuntimeError(f"backend id {bid} but tracked-flow counter {counted}")
        return bid

    def _digest(self) -> str:
        # IPv4 as int per id, plus a 0 at the end for NO_BACKEND (-1) slots.
        by_id = [int.from_bytes(ip, "big") if ip else 0 for ip in self._backend_ips] + [0]
        return xxhash.xxh64_hexdigest(array("I", map(by_id.__getitem__, self._tables.table)))

    def _rebuild_templates(self) -> None:
        templates: list[bytes] = []
        sums: list[int] = []
        for ip in self._backend_ips:
            if ip is None:
                templates.append(b"")
                sums.append(0)
                continue
            templates.append(IPIP.template(self._next_hop_mac, self._local_mac, self._local_ip, ip))
            sums.append(IPIP.checksum_base(self._local_ip, ip))
        # Sums first: a template is only used once its sum is in place.
        self._tables.sums[:] = sums
        self._tables.templates[:] = templates

    @property
    def table_size(self) -> int:
        return self.cfg.table_size

    @property
    def backends(self) -> list[str]:
        """IPs of the backends in the set now (weight 0 and down included), in the set's order."""
        return list(self._ids)

    def slots_owned(self) -> dict[str, int]:
        """Lookup-table slots per backend of the set (its share of new flows is slots / size);
        a count over the table, ~3 ms."""
        owners = Counter(self._tables.table)
        return {ip: owners.get(bid, 0) for ip, bid in self._ids.items()}

    def flow(self, src: str, sport: int, dst: str, dport: int, proto: int) -> dict[str, Any]:
        """Where the connection table has a TCP/UDP flow (client src:sport -> VIP dst:dport):
        {"state": "established" | "half_open" | "untracked", "backend": its IP or None,
        "table_backend": the lookup table's choice for it (None: no backend)}. The key is the
        packet core's (the module docstring): xxh3_64 of the 12 bytes, the protocol's seed."""
        raw = (
            ipaddress.IPv4Address(src).packed
            + ipaddress.IPv4Address(dst).packed
            + struct.pack("!HH", sport, dport)
        )
        key = xxhash.xxh3_64_intdigest(raw, seed=self._tables.seeds[proto])
        ct = self.conntrack
        state, bid = "untracked", None
        for name, gens in (
            ("established", (ct.young, ct.old)),
            ("half_open", (ct.syn_young, ct.syn_old)),
        ):
            for gen in gens:
                if key in gen:
                    state, bid = name, gen[key]
        table = self._tables.table
        choice = table[key % len(table)]
        names = self.counters.backend_names
        return {
            "state": state,
            "backend": None if bid is None else names[bid],
            "table_backend": None if choice < 0 else names[choice],
        }

    def tracked(self, ip: str) -> int:
        """Flows tracked to a backend of the set now (0 for one not in the set)."""
        bid = self._ids.get(ip)
        return 0 if bid is None else self.conntrack.tracked(bid)
