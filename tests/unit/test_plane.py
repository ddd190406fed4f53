"""l4lb.plane in l4lb.rxloop: control work runs when due and on its sockets' input, idle or busy,
and a failing service does not stop the packets."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Sequence

import pytest

from l4lb.plane import Plane
from l4lb.ring import FakeRing
from l4lb.rxloop import RxLoop


class Every:
    """A service that wants to run every `period` seconds and records when it ran."""

    def __init__(self, period: float, sock: socket.socket | None = None) -> None:
        self.period = period
        self.sock = sock
        self.calls: list[float] = []
        self.got: list[bytes] = []

    def fds(self) -> Sequence[int]:
        return [self.sock.fileno()] if self.sock is not None else []

    def service(self, now: float) -> float:
        self.calls.append(now)
        if self.sock is not None:
            with contextlib.suppress(BlockingIOError):
                self.got.append(self.sock.recv(100))
        return now + self.period


class Broken:
    def fds(self) -> Sequence[int]:
        return []

    def service(self, now: float) -> float:
        raise RuntimeError("a bug in a control service")


def idle_loop() -> tuple[RxLoop, socket.socket, socket.socket]:
    """A loop over an empty fake ring; its 'ring socket' is one end of a socketpair."""
    ring = FakeRing(16)
    a, b = socket.socketpair()
    return RxLoop(ring.slots, a.fileno(), batch=4, idle_ms=200), a, b


def run_for(loop: RxLoop, seconds: float, **kw: object) -> None:
    threading.Timer(seconds, loop.stop).start()
    loop.run(lambda first, end, now: 0, **kw)  # type: ignore[arg-type]


def test_idle_loop_runs_the_plane_when_due_not_only_every_idle_ms():
    loop, a, b = idle_loop()
    svc = Every(0.02)
    run_for(loop, 0.5, plane=Plane([svc]))
    # idle_ms is 200: only a due time can have made it run ~25 times in 0.5 s
    assert 15 <= len(svc.calls) <= 30
    gaps = [y - x for x, y in zip(svc.calls, svc.calls[1:], strict=False)]
    assert max(gaps) < 0.06
    a.close()
    b.close()


def test_input_on_a_plane_socket_wakes_the_idle_loop_at_once():
    loop, a, b = idle_loop()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    svc = Every(10.0, ours)  # never due again on its own
    sent_at: list[float] = []

    def poke() -> None:
        time.sleep(0.1)
        sent_at.append(time.monotonic())
        theirs.send(b"ping")

    threading.Thread(target=poke).start()
    run_for(loop, 0.4, plane=Plane([svc]))
    assert svc.got == [b"ping"]
    woke = next(t for t in svc.calls if t >= sent_at[0])
    assert woke - sent_at[0] < 0.02  # not the 200 ms idle sleep
    for s in (a, b, ours, theirs):
        s.close()


def test_busy_loop_runs_the_plane_between_batches():
    ring = FakeRing(64)
    frame = bytes(60)
    handled = []

    def handle(first: int, end: int, now: float) -> int:
        if handled:  # the kernel refills the slots the loop released after the last batch
            ring.load([frame] * (handled[-1][1] - handled[-1][0]), handled[-1][0])
        handled.append((first, end))
        return end - first  # a core that takes every frame

    ring.load([frame] * 64)
    r, w = os.pipe()
    loop = RxLoop(ring.slots, r, batch=8, idle_ms=200)
    svc = Every(0.01)
    threading.Timer(0.3, loop.stop).start()
    loop.run(handle, plane=Plane([svc]))
    assert loop.wakeups == 0 and len(handled) > 100  # it never slept
    assert 15 <= len(svc.calls) <= 35
    os.close(r)
    os.close(w)


def test_a_failing_service_is_counted_and_the_loop_goes_on(capsys: pytest.CaptureFixture[str]):
    loop, a, b = idle_loop()
    ok = Every(0.02)
    plane = Plane([Broken(), ok], name="test")
    run_for(loop, 0.3, plane=plane)
    assert plane.errors >= 5 and len(ok.calls) >= 5
    err = capsys.readouterr().err
    assert err.count("test: Broken failed") == 1 and "a bug in a control service" in err
    a.close()
    b.close()
