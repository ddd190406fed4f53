"""The LB's health probing as an l4lb.plane service: fastpath.health's probes on the wire.

Probes leave through a raw IP-in-IP socket (`socket(AF_INET, SOCK_RAW, IPPROTO_IPIP)`): its
payload is the inner packet (IPv4 + UDP from this LB's address to VIP:port, built by
l4lb.healthwire.udp_datagram) and the kernel adds the outer header to the backend, routed out
of the LB's interface like the fast path's frames. The socket has a drop-all filter: it sends
only (the kernel would otherwise queue every IP-in-IP packet that reaches this host on it).
The agents' answers come from VIP:port to this LB's own address, to a UDP socket bound there:
neither the LB's tap (IPv4 to a VIP) nor its nftables drop (to a VIP) sees them. Probes never
cross the fast path, so the per-backend client counters (core.backends) do not count them.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Sequence

from fastpath.health import HealthTarget, Prober
from fastpath.stats import ProberStats
from l4lb import bpf
from l4lb.healthcfg import HealthConfig
from l4lb.healthwire import BadMessage, udp_datagram

REPLIES_PER_CALL = 256
"""Datagrams read per call, so a flood cannot hold the packet loop."""


class LbHealth:
    """fds()/service(now) of the prober; sockets made here unless given (tests)."""

    def __init__(
        self,
        cfg: HealthConfig,
        target: HealthTarget,
        local_ip: str,
        vip: str,
        now: float,
        tunnel: socket.socket | None = None,
        replies: socket.socket | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.vip = vip
        self.local = socket.inet_aton(local_ip)
        self.vip_packed = socket.inet_aton(vip)
        self.wall = wall
        made: list[socket.socket] = []
        try:
            if tunnel is None:
                tunnel = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_IPIP)
                made.append(tunnel)
                bpf.attach(tunnel, bpf.DROP_ALL)
                tunnel.bind((local_ip, 0))
            if replies is None:
                replies = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                made.append(replies)
                replies.bind((local_ip, 0))
        except OSError as exc:
            for s in made:
                s.close()
            raise OSError(exc.errno, f"health: cannot open the probe sockets: {exc}") from None
        tunnel.setblocking(False)
        replies.setblocking(False)
        self.tunnel, self.replies = tunnel, replies
        self.sport = replies.getsockname()[1]
        self.prober = Prober(cfg, target, now)
        self.socket_errors = 0

    def fds(self) -> Sequence[int]:
        return [self.replies.fileno()]

    def service(self, now: float) -> float:
        p = self.prober
        for _ in range(REPLIES_PER_CALL):
            try:
                data, (ip, port) = self.replies.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.socket_errors += 1  # an ICMP error queued on the socket
                continue
            if ip != self.vip or port != self.cfg.port:
                p.malformed[BadMessage.WRONG_SOURCE.value] += 1
                continue
            p.on_reply(data, now)
        for backend, payload in p.due(now):
            inner = udp_datagram(self.local, self.vip_packed, self.sport, self.cfg.port, payload)
            try:
                self.tunnel.sendto(inner, (backend, 0))
            except OSError:
                self.socket_errors += 1  # the probe is lost: missed when its time runs out
        return p.next_due()

    def stats(self, now: float) -> ProberStats:
        s = self.prober.stats(now, self.wall())
        s.socket_errors = self.socket_errors
        return s

    def close(self) -> None:
        for s in (self.tunnel, self.replies):
            with contextlib.suppress(OSError):
                s.close()
