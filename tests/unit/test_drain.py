"""fastpath.drain without root: the graceful stop's state machine (every path out of it), and
its plane service in the real receive loop under full load, against a BFD session playing BIRD
over a socket pair (tests/unit/bfd_peer.py)."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import pytest
from bfd_peer import Bird, announcer_pair, run

from fastpath import bfd
from fastpath.announce import Announcer
from fastpath.drain import CAP, CONFIRM_TIMEOUT, QUIET, Drain, DrainService, Phase
from l4lb.plane import Plane
from l4lb.ring import FakeRing
from l4lb.rxloop import RxLoop


@pytest.fixture()
def pair() -> Iterator[tuple[Announcer, Bird]]:
    with announcer_pair() as p:
        yield p


# --- the state machine ----------------------------------------------------------------------


def test_confirmed_then_quiet_stops_quiet_after_the_last_frame() -> None:
    d = Drain()
    assert d.stats(0.0) is None and d.step(1.0, 5, True) == Phase.RUNNING
    assert d.begin(10.0, announced=True, frames=100) == Phase.WITHDRAWING
    assert d.step(10.01, 120, confirmed=False) == Phase.WITHDRAWING
    assert d.step(10.02, 130, confirmed=True) == Phase.DRAINING
    assert d.step(10.05, 140, confirmed=True) == Phase.DRAINING  # frames still come
    assert d.step(10.05 + QUIET - 0.001, 140, confirmed=True) == Phase.DRAINING
    assert d.step(10.05 + QUIET, 140, confirmed=True) == Phase.DONE
    st = d.stats(1000.0)
    assert st is not None and st.phase == "done" and st.reason == "quiet"
    assert (st.began, st.confirmed_ms, st.last_frame_ms, st.frames) == (1010.0, 20.0, 50.0, 40)
    assert st.stopped_ms == 250.0 and st.announced


def test_quiet_counts_from_the_confirmation_not_from_before_it() -> None:
    d = Drain()
    d.begin(0.0, True, 0)
    d.step(0.5, 0, confirmed=True)  # no frame at all, BIRD answered after 500 ms
    assert d.phase == Phase.DRAINING
    assert d.step(0.5 + QUIET - 0.001, 0, True) == Phase.DRAINING
    assert d.step(0.5 + QUIET, 0, True) == Phase.DONE


def test_a_silent_bird_ends_the_wait_after_the_confirm_timeout() -> None:
    d = Drain()
    d.begin(0.0, True, 0)
    assert d.step(CONFIRM_TIMEOUT - 0.01, 0, False) == Phase.WITHDRAWING
    assert d.step(CONFIRM_TIMEOUT, 0, False) == Phase.DONE  # and nothing came for QUIET
    st = d.stats(0.0)
    assert st is not None and st.confirmed_ms is None and st.reason == "quiet"


def test_traffic_that_never_stops_is_cut_at_the_cap() -> None:
    d = Drain()
    d.begin(0.0, True, 0)
    t, n = 0.0, 0
    while d.phase != Phase.DONE:
        t, n = round(t + 0.01, 3), n + 1
        d.step(t, n, confirmed=t > 0.02)
    assert t == pytest.approx(CAP) and d.reason == "cap"


def test_not_announced_stops_at_once_and_a_second_begin_changes_nothing() -> None:
    d = Drain()
    assert d.begin(3.0, announced=False, frames=7) == Phase.DONE
    assert d.reason == "not_announced" and d.stopped_at == 3.0
    assert d.begin(4.0, announced=True, frames=9) == Phase.DONE and d.began == 3.0


# --- the service ----------------------------------------------------------------------------


def test_the_service_withdraws_waits_for_bird_and_stops(pair: tuple[Announcer, Bird]) -> None:
    ann, bird = pair
    run(ann, bird, 0.0, 0.5)
    stopped: list[float] = []
    lines: list[str] = []
    frames = [0]
    svc = DrainService(ann, lambda: frames[0], lambda: stopped.append(1), lines.append)
    try:
        assert svc.service(0.5) == math.inf  # nothing asked: not due
        assert svc.request() and not svc.request()  # the second says: stop at once
        os.write(svc.wakeup_fd, b"\x0f")  # what signal.set_wakeup_fd writes
        assert svc.fds() and svc.service(0.5) == pytest.approx(0.52)
        assert not ann.status().wanted and ann.status().bfd_state == "ADMIN_DOWN"
        t = 0.5
        while not stopped:
            t = round(t + 0.005, 3)
            frames[0] += 1 if t < 0.55 else 0  # the ToR moves the traffic away at 0.55
            ann.service(t)
            bird.step(t)
            svc.service(t)
        assert bird.session.state == bfd.State.DOWN
        st = svc.drain.stats(0.0)
        assert st is not None and st.reason == "quiet" and st.confirmed_ms is not None
        assert st.stopped_ms == pytest.approx((0.545 + QUIET - 0.5) * 1000, abs=6)
        assert [line.split(" ")[0] for line in lines] == ["stop", "withdraw", "stopping"]
    finally:
        svc.close()


def test_the_service_stops_at_once_when_not_announced(pair: tuple[Announcer, Bird]) -> None:
    ann, _ = pair  # BIRD never answered: the session is not Up
    stopped: list[int] = []
    svc = DrainService(ann, lambda: 0, lambda: stopped.append(1), lambda line: None)
    try:
        svc.request()
        assert svc.service(0.1) == math.inf and stopped == [1]
        assert ann.status().wanted, "nothing withdrawn: nothing was announced"
    finally:
        svc.close()


def test_under_full_load_the_loop_keeps_bfd_up_and_drains(pair: tuple[Announcer, Bird]) -> None:
    """The real RxLoop over a ring that is never empty (it never sleeps): the plane runs between
    batches, so BFD stays Up for 5 s of a simulated clock (0.1 ms per look at it) and the
    SIGTERM path ends by itself once the frames stop."""
    ann, bird = pair
    clock = [0.0]

    def now() -> float:
        clock[0] = round(clock[0] + 0.0001, 7)
        return clock[0]

    ring = FakeRing(64)
    ring.load([bytes(60)] * 64)
    r, w = os.pipe()
    loop = RxLoop(ring.slots, r, batch=16, idle_ms=100, clock=now)
    frames = [0]
    svc = DrainService(ann, lambda: frames[0], loop.stop, lambda line: None)
    moved_at: list[float] = []
    last: list[tuple[int, int]] = []

    def handle(first: int, end: int, t: float) -> int:
        bird.step(t)  # BIRD runs beside the loop
        if last:  # the kernel refills the slots the loop gave back after the last batch
            ring.load([bytes(60)] * (last[0][1] - last[0][0]), last[0][0])
        last[:] = [(first, end)]
        if t >= 5.0 and not svc.requests:
            svc.request()  # SIGTERM (the plane sees it within its due time)
        if not moved_at and bird.session.state == bfd.State.DOWN:
            moved_at.append(t)  # BIRD withdrew: the ToR stops sending VIP frames
        if not moved_at or t < moved_at[0] + 0.01:
            frames[0] += end - first
        return end - first

    try:
        loop.run(handle, plane=Plane([ann, svc]))
        assert loop.wakeups == 0, "the ring was never empty"
        ups = [x for x in bird.session.transitions if x.time > 1.0]
        assert [(x.old, x.new) for x in ups] == [(bfd.State.UP, bfd.State.DOWN)]
        assert ups[0].diag == bfd.Diag.NEIGHBOR_DOWN and ups[0].time >= 5.0  # our AdminDown
        assert ann.status().tx_gap_max <= 0.1 + 0.002
        st = svc.drain.stats(0.0)
        assert st is not None and st.reason == "quiet" and st.began - 5.0 < 0.11
        assert clock[0] - moved_at[0] == pytest.approx(0.01 + QUIET, abs=0.03)
    finally:
        svc.close()
        os.close(r)
        os.close(w)
