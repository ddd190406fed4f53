"""BIRD's side of an announcement, for unit tests without root: a BFD session on the host's end
of a socket pair standing in for the TUN (datagrams as BIRD sends them: 169.254.0.1 -> .2:3784,
TTL 255), and an Announcer on the other end."""

from __future__ import annotations

import contextlib
import random
import socket
from collections.abc import Iterator

from fastpath import bfd
from fastpath.announce import HOST_ADDR, LB_ADDR, AnnounceConfig, Announcer, Device

CFG = bfd.SessionConfig(desired_min_tx=0.1, required_min_rx=0.1, detect_mult=3)


class Bird:
    """A BFD session on the host's side of the 'TUN' (the other end of the socket pair)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.session = bfd.Session(CFG, 0xB1D, 0.0, random.Random(3).random)
        self.port = 49200
        self.seen: list[bfd.ControlPacket] = []

    def step(self, now: float) -> None:
        while True:
            try:
                raw = self.sock.recv(2048)
            except BlockingIOError:
                break
            d = bfd.parse_datagram(raw)
            assert (d.src, d.dst, d.dport, d.ttl) == (LB_ADDR, HOST_ADDR, 3784, 255)
            assert 49152 <= d.sport <= 65535
            p = bfd.decode(d.payload)
            self.seen.append(p)
            self.session.receive(p, now)
        self.session.handle_timer(now)
        for p in self.session.packets_to_send(now):
            self.sock.send(bfd.datagram(HOST_ADDR, LB_ADDR, self.port, p.encode()))


@contextlib.contextmanager
def announcer_pair() -> Iterator[tuple[Announcer, Bird]]:
    """An Announcer (the LB's side) and a Bird on the two ends of a socket pair."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setblocking(False)
    b.setblocking(False)
    ann = Announcer(AnnounceConfig(tun="l4an-test", bfd=CFG), 0.0, lambda: 0.5,
                    discriminator=0xA11, device=Device(a.detach(), "l4an-test"))  # fmt: skip
    try:
        yield ann, Bird(b)
    finally:
        ann.close()
        b.close()


def run(ann: Announcer, bird: Bird, start: float, end: float, tick: float = 0.005) -> None:
    t = start
    while t <= end:
        ann.service(t)
        bird.step(t)
        t = round(t + tick, 6)
