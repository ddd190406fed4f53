"""The receive loop (l4lb.rxloop) and the forwarding loop on it (fastpath.forward) over a FakeRing,
without root: batches stay inside the ring, slots go back to the kernel, the sends skip exactly
the dropped slots."""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Iterator

import pytest

from fastpath.balancer import Balancer
from fastpath.config import BalancerConfig
from fastpath.forward import Forwarder
from l4lb.ring import KERNEL, READY, FakeRing
from l4lb.rxloop import RxLoop
from tests.fixtures import cases


@pytest.fixture
def fd() -> Iterator[int]:
    """A socket that never becomes readable: what the loop polls while the ring is empty."""
    a, b = socket.socketpair()
    try:
        yield a.fileno()
    finally:
        a.close()
        b.close()


def test_batches_stop_at_the_ring_end_and_slots_go_back(fd: int) -> None:
    ring = FakeRing(5)
    ring.load([b"a"] * 3, first=2)  # slots 2, 3, 4, then 0, 1: the run wraps
    loop = RxLoop(ring.slots, fd, batch=4, idle_ms=1)
    loop.index = 2
    calls: list[tuple[int, int, list[int]]] = []

    def handle(first: int, end: int, now: float) -> int:
        calls.append((first, end, [ring.slots.status[i] for i in range(first, end)]))
        return sum(1 for i in range(first, end) if ring.slots.status[i] & READY)

    ticks: list[float] = []

    def tick(now: float) -> None:
        ticks.append(now)
        if len(ticks) == 2:
            loop.stop()

    ring.put(0, b"b")
    ring.put(1, b"b")
    loop.run(handle, tick, 0.0)
    assert [(f, e) for f, e, _ in calls] == [(2, 5), (0, 4)]  # never past slot 4
    assert loop.frames == 5 and loop.batches == 2 and loop.index == 2
    assert list(ring.slots.status) == [KERNEL] * 5  # every handled slot given back


def test_the_forwarder_sends_every_slot_but_the_dropped_ones(fd: int) -> None:
    """Forwarded, dropped, forwarded, forwarded, an ICMP reply, dropped: three sends, of the
    runs between the drops, from the slots themselves."""
    table = {c.spec.name: c for c in cases.load("default")}
    names = ["tcp_syn", "not_vip", "udp", "many_flows_0_0", "mtu_one_more_df", "ttl_1"]
    frames = [table[n].frame for n in names]
    config = BalancerConfig(**cases.config_kwargs("default"))  # type: ignore[arg-type]
    reference, out = Balancer(config), memoryview(bytearray(2048))
    expected = [bytes(out[:n]) for f in frames if (n := reference.process(f, out, cases.NOW))]
    ring = FakeRing(len(frames))
    ring.load(frames)

    class Sender:
        sent = errors = 0

        def __init__(self) -> None:
            self.calls: list[tuple[int, int, list[bytes]]] = []

        def send(self, first: int, n: int) -> int:
            self.calls.append((first, n, [ring.sent(i) for i in range(first, first + n)]))
            self.sent += n
            return n

    sender = Sender()
    bal = Balancer(config)
    fw = Forwarder(ring.slots, fd, sender, bal, batch=64, idle_ms=1)  # type: ignore[arg-type]
    fw.run(lambda now: fw.stop(), 0.0)
    assert [(f, n) for f, n, _ in sender.calls] == [(0, 1), (2, 3)]
    sent = [frame for _, _, out in sender.calls for frame in out]
    assert sent == expected and len(expected) == 4
    assert ring.slots.unsent == []
    io = fw.io
    assert (io.rx_frames, io.tx_frames, io.batches) == (6, 4, 1)


def test_an_error_on_the_ring_socket_is_read_once_not_spun_on() -> None:
    """What a packet socket reports when its interface goes down (ENETDOWN): POLLERR until the
    error is read. Here a UDP socket with ECONNREFUSED pending stands in for it."""
    import threading

    dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()  # nobody listens there: the send below earns an ICMP port unreachable
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.connect(("127.0.0.1", port))
        sock.send(b"x")
        p = select.poll()
        p.register(sock.fileno(), select.POLLIN)
        assert p.poll(1000) == [(sock.fileno(), select.POLLERR)], "the error is pending"
        loop = RxLoop(FakeRing(4).slots, sock.fileno(), batch=4, idle_ms=100)
        threading.Timer(0.35, loop.stop).start()
        loop.run(lambda first, end, now: 0)
        assert loop.socket_errors == 1
        assert loop.wakeups <= 6, f"{loop.wakeups} wakeups in 0.35 s: spinning on POLLERR"
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0  # read and cleared
    finally:
        sock.close()


def test_a_loop_waiting_where_the_kernel_is_not_moves_to_the_next_frame() -> None:
    """The ring's socket says a frame waits (POLLIN: here a socket with a byte never read) while
    the next slot stays empty and frames sit further on, as after a ring overflow put the loop
    and the kernel at different slots: after RESYNC_AFTER the loop goes to the first slot with a
    frame and takes the run from there."""
    ring = FakeRing(8)
    ring.load([b"a"] * 3, first=5)  # slots 5, 6, 7 hold frames; 0..4 are empty
    a, b = socket.socketpair()
    try:
        b.send(b"x")  # a stays readable
        loop = RxLoop(ring.slots, a.fileno(), batch=8, idle_ms=5)
        calls: list[tuple[int, int]] = []

        def handle(first: int, end: int, now: float) -> int:
            calls.append((first, end))
            loop.stop()
            return end - first

        threading.Timer(2.0, loop.stop).start()  # bound: the loop stops by itself
        loop.run(handle)
    finally:
        a.close()
        b.close()
    assert loop.ring_resyncs == 1
    assert calls == [(5, 8)]
    assert [ring.slots.status[i] for i in range(5, 8)] == [KERNEL] * 3


def test_no_move_while_the_socket_says_nothing_waits(fd: int) -> None:
    """Frames elsewhere in the ring but no POLLIN (the fd fixture never becomes readable): the
    loop keeps its place; only the kernel's word moves it."""
    ring = FakeRing(8)
    ring.load([b"a"] * 3, first=5)
    loop = RxLoop(ring.slots, fd, batch=8, idle_ms=5)
    handled: list[int] = []
    threading.Timer(0.3, loop.stop).start()
    loop.run(lambda first, end, now: handled.append(first) or 0)
    assert loop.ring_resyncs == 0 and handled == []
