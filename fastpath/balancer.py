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

from fastpath.config import BalancerConfig, check_backends
from fastpath.conntrack import ConnTable
from fastpath.counters import Counters
from fastpath.kernel import NO_BACKEND, BatchFn, BindRingFn, ProcessFn, Tables, make_kernel
from fastpath.maglev import build_table
from fastpath.packet import ETH, ETH_P_IP, IPPROTO_IPIP, IPV4, OUTER_TTL


def _ip_words(ip: bytes) -> int:
    return ((ip[0] << 8) | ip[1]) + ((ip[2] << 8) | ip[3])


class Balancer:
    """Pure packet core; see the module docstring for the rules it applies.

    `process(frame, out, now) -> int` handles one Ethernet frame: it returns the length of the
    frame written to `out` (which must hold mtu + 34 bytes) to send on the same interface, or 0
    when the frame was dropped (counted by reason). Every frame is counted exactly once, in
    `counters.forwarded` or `counters.drops`; it never raises.

    `process_batch(frames, outs, lens, n, now) -> int` handles frames[0:n]; the k frames to send
    are written to outs[0:k] with their lengths in lens[0:k] (compacted, ready for sendmmsg);
    returns k. It is the fast entry point (the per-packet path is inlined in its loop);
    `process` is a batch of one.

    Both are plain closures (fastpath.kernel), safe to bind once: the control plane methods
    below update the tables they read in place.
    """

    process: ProcessFn
    process_batch: BatchFn
    bind_ring: BindRingFn
    """The zero-copy entry over a receive ring (fastpath.kernel, used by fastpath.forward)."""

    def __init__(self, cfg: BalancerConfig) -> None:
        self.cfg = cfg
        self.counters = Counters()
        self.conntrack = ConnTable(cfg.conn_capacity, cfg.conn_idle_timeout)
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
        self._backend_ips: list[bytes | None] = []  # per backend id; None once removed
        self.set_next_hop_mac(self._next_hop_mac)
        self.set_backends(cfg.backends)
        self.process, self.process_batch, self.bind_ring = make_kernel(
            self._tables, self.counters, self.conntrack
        )

    def set_next_hop_mac(self, mac: bytes) -> None:
        """Ethernet destination of frames sent from now on."""
        if len(mac) != 6:
            raise ValueError(f"next hop MAC must be 6 bytes, not {mac!r}")
        self._next_hop_mac = bytes(mac)
        self._tables.eth[:] = ETH.pack(self._next_hop_mac, self._local_mac, ETH_P_IP)
        self._rebuild_templates()

    def set_backends(self, backends: tuple[tuple[str, int], ...]) -> None:
        """Replace the backend set (ip, weight) and rebuild the lookup table. Tracked flows keep
        their backend unless it left the set (weight 0 keeps it: it drains)."""
        check_backends(backends)
        ids = [self.counters.add_backend(ip) for ip, _ in backends]
        ips: list[bytes | None] = [None] * len(self.counters.backend_names)
        for bid, (ip, _) in zip(ids, backends, strict=True):
            ips[bid] = ipaddress.IPv4Address(ip).packed
        self._backend_ips = ips
        self._rebuild_templates()
        slots = build_table(backends, self.cfg.table_size)
        self._tables.table[:] = [NO_BACKEND if s == NO_BACKEND else ids[s] for s in slots]

    def _rebuild_templates(self) -> None:
        templates: list[bytes] = []
        sums: list[int] = []
        for ip in self._backend_ips:
            if ip is None:
                templates.append(b"")
                sums.append(0)
                continue
            header = IPV4.pack(0x45, 0, 0, 0, 0, OUTER_TTL, IPPROTO_IPIP, 0, self._local_ip, ip)
            templates.append(ETH.pack(self._next_hop_mac, self._local_mac, ETH_P_IP) + header)
            # + 20 - 1: see Tables.sums.
            sums.append(
                (0x45 << 8) + ((OUTER_TTL << 8) | IPPROTO_IPIP) + _ip_words(self._local_ip)
                + _ip_words(ip) + 19
            )  # fmt: skip
        # Sums first: a template is only used once its sum is in place.
        self._tables.sums[:] = sums
        self._tables.templates[:] = templates

    def backend_of(self, key: int) -> str | None:
        """The backend IP the lookup table gives a flow hash (tests, diagnostics)."""
        table = self._tables.table
        bid = table[key % len(table)]
        return None if bid == NO_BACKEND else self.counters.backend_names[bid]

    @property
    def backends(self) -> list[str]:
        """IPs of the backends in the set now (weight 0 included)."""
        names = self.counters.backend_names
        return [names[i] for i, ip in enumerate(self._backend_ips) if ip is not None]
