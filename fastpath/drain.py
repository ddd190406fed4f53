"""The graceful stop of an announcing load balancer: withdraw, wait for BIRD, drain, stop.

On the first SIGTERM (or SIGINT) fastpath.lb does not stop: it withdraws its announcement
(BFD AdminDown: the host's BIRD drops the VIP route and BGP withdraws it from the ToR) and
keeps forwarding while the ToR moves the traffic away, then stops:

    RUNNING --signal--> WITHDRAWING --BIRD's Down seen, or CONFIRM_TIMEOUT--> DRAINING
    DRAINING --no VIP frame for QUIET, or CAP after the signal--> DONE (the loop stops)

- BIRD's acknowledgement (`Announcer.withdraw_confirmed`: its next BFD packet says Down) means
  the route is gone from the host's BIRD; the ToR's kernel follows a few milliseconds later
  (BGP update, then its kernel protocol). A BIRD that is gone never answers: the wait ends
  after CONFIRM_TIMEOUT.
- Then the frames still arriving are the ones in flight and those the ToR sent before its
  route changed; once none has come for QUIET the ToR has moved every flow elsewhere.
- CAP bounds the whole stop well inside controller.services' stop timeout (5 s before
  SIGKILL), for a ToR that keeps sending (a static route, no BGP).
- A signal while the announcement is not up (BIRD has no route from us, or `lb drain`
  disabled it) stops at once: withdrawing would move no traffic.
- A second signal stops at once (fastpath.runner); SIGKILL and a hung loop need nothing here:
  the TUN goes with the process, and BFD times a hung loop out.

`Drain` is the pure core (`now` and the frame count passed in); `DrainService` is its
`l4lb.plane` service in the receive loop, woken by the signal through a socket pair
(`signal.set_wakeup_fd`, which fastpath.runner sets).
"""

from __future__ import annotations

import contextlib
import math
import socket
from collections.abc import Callable
from enum import Enum

from fastpath.announce import Announcer
from fastpath.stats import DrainStats

CONFIRM_TIMEOUT = 1.0
"""Seconds to wait for BIRD's acknowledgement of the withdraw."""
QUIET = 0.2
"""Seconds without a VIP frame after which the ToR has moved every flow away."""
CAP = 3.0
"""Most seconds from the signal to the stop (controller.services waits 5 s, then SIGKILLs)."""
STEP = 0.02
"""Seconds between two looks at the frame count while stopping (the QUIET resolution)."""
_EPS = 1e-9  # clock readings are floats: 10.25 - 10.05 < 0.2


class Phase(Enum):
    RUNNING = "running"
    WITHDRAWING = "withdrawing"
    DRAINING = "draining"
    DONE = "done"


class Drain:
    """The stop's state machine. `begin(now, announced, frames)` at the signal, then
    `step(now, frames, confirmed)` until it returns Phase.DONE."""

    def __init__(
        self, confirm_timeout: float = CONFIRM_TIMEOUT, quiet: float = QUIET, cap: float = CAP
    ) -> None:
        self.confirm_timeout, self.quiet, self.cap = confirm_timeout, quiet, cap
        self.phase = Phase.RUNNING
        self.began = 0.0
        self.announced = False
        self.confirmed_at: float | None = None
        self.last_frame_at: float | None = None
        self.stopped_at: float | None = None
        self.reason = ""
        self._frames0 = self._frames = 0

    def begin(self, now: float, announced: bool, frames: int) -> Phase:
        """The signal: withdraw (the caller does) when `announced`, else stop at once."""
        if self.phase != Phase.RUNNING:
            return self.phase
        self.began, self.announced = now, announced
        self._frames0 = self._frames = frames
        if announced:
            self.phase = Phase.WITHDRAWING
        else:
            self._done(now, "not_announced")
        return self.phase

    def step(self, now: float, frames: int, confirmed: bool) -> Phase:
        """Look at the frame count and BIRD's acknowledgement; returns the phase now."""
        if self.phase in (Phase.RUNNING, Phase.DONE):
            return self.phase
        if frames != self._frames:
            self._frames, self.last_frame_at = frames, now
        if self.phase == Phase.WITHDRAWING:
            if confirmed:
                self.confirmed_at = now
            if confirmed or now - self.began >= self.confirm_timeout - _EPS:
                self.phase = Phase.DRAINING
        if self.phase == Phase.DRAINING:
            since = self.last_frame_at if self.last_frame_at is not None else self.began
            if self.confirmed_at is not None:
                since = max(since, self.confirmed_at)
            if now - since >= self.quiet - _EPS:
                self._done(now, "quiet")
        if self.phase != Phase.DONE and now - self.began >= self.cap - _EPS:
            self._done(now, "cap")
        return self.phase

    def _done(self, now: float, reason: str) -> None:
        self.phase, self.stopped_at, self.reason = Phase.DONE, now, reason

    def stats(self, mono_to_wall: float) -> DrainStats | None:
        """None before the signal; `mono_to_wall` turns the caller's clock into Unix time."""
        if self.phase == Phase.RUNNING:
            return None

        def after(t: float | None) -> float | None:
            return None if t is None else round((t - self.began) * 1000, 1)

        return DrainStats(
            phase=self.phase.value,
            began=round(self.began + mono_to_wall, 3),
            announced=self.announced,
            confirmed_ms=after(self.confirmed_at),
            last_frame_ms=after(self.last_frame_at),
            frames=self._frames - self._frames0,
            stopped_ms=after(self.stopped_at),
            reason=self.reason,
        )


class DrainService:
    """The Drain in the receive loop: `request()` from the signal handler (the wakeup socket,
    `wakeup_fd`, makes the idle loop run the plane at once), then withdraw, step, and `stop()`
    the loop when done. `frames()` counts the VIP frames the core has seen."""

    def __init__(
        self,
        announcer: Announcer,
        frames: Callable[[], int],
        stop: Callable[[], None],
        log: Callable[[str], None],
        drain: Drain | None = None,
    ) -> None:
        self.announcer, self.frames, self.stop, self.log = announcer, frames, stop, log
        self.drain = drain or Drain()
        self.requests = 0
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)

    @property
    def wakeup_fd(self) -> int:
        """For signal.set_wakeup_fd: a signal makes fds() readable."""
        return self._w.fileno()

    def request(self) -> bool:
        """A stop signal (safe in a signal handler); True for the first, which drains."""
        self.requests += 1
        return self.requests == 1

    def fds(self) -> list[int]:
        return [self._r.fileno()] if self._r.fileno() >= 0 else []

    def service(self, now: float) -> float:
        with contextlib.suppress(OSError):
            while self._r.recv(64):
                pass
        d = self.drain
        if self.requests and d.phase == Phase.RUNNING:
            announced = self.announcer.status().announced
            if d.begin(now, announced, self.frames()) == Phase.WITHDRAWING:
                self.announcer.withdraw(now)
                self.log("stop requested: VIP withdrawn (BFD AdminDown), forwarding on")
        if d.phase == Phase.RUNNING:
            return math.inf
        before = d.phase
        phase = d.step(now, self.frames(), self.announcer.withdraw_confirmed)
        if phase == Phase.DRAINING and before == Phase.WITHDRAWING:
            how = "acknowledged by BIRD" if d.confirmed_at is not None else "not acknowledged"
            self.log(f"withdraw {how} after {(now - d.began) * 1000:.0f} ms; draining")
        if phase == Phase.DONE:
            self.log(f"stopping ({d.reason}) {(now - d.began) * 1000:.0f} ms after the signal")
            self.stop()
            return math.inf
        return now + STEP

    def close(self) -> None:
        self._r.close()
        self._w.close()
