"""The receive loop fastpath.forward and agent.decap share: ready ring slots to a packet core in
batches, the slots back to the kernel, busy-polling or sleep when the ring is empty.

Per turn: the run of ready slots from the next one on (at most `batch`, never past the ring's
end, so that a batch is consecutive slots and consecutive sendmmsg messages) goes to
`handle(first, end, now) -> n`, which handles slots first..first+n-1 (it stops at the first slot
not ready); then they go back to the kernel in one strided store. An empty ring is spun on for
`busy_poll_us` after traffic, else the loop sleeps in poll() on the ring's socket, which wakes
for the first frame the kernel publishes (TPACKET_V2 has no block timeout), so a lone request
is handled at once. `tick(now)` runs about every `tick_every` seconds, busy or idle.

With a `plane` (l4lb.plane), the loop also runs the process's control work: once per batch it
compares the clock with `plane.due`; while idle it sleeps no longer than that and also wakes
for input on the plane's sockets (a control request, a health reply, a BFD packet).

If the ring's socket says a frame waits (POLLIN) while the next slot stays empty for
RESYNC_AFTER, the loop and the kernel disagree on where the ring continues: the loop would wait
on a slot the kernel fills only a lap later while the frames pile up elsewhere (seen after a
SYN flood overflowed the ring: the agent took no frame for minutes and counted no drop). The
loop then moves to the first slot holding a frame (`ring_resyncs`). A slot another CPU is still
filling is ready within microseconds, far below RESYNC_AFTER.

An error the ring's socket reports (ENETDOWN when the interface goes down) makes poll() return
at once until it is read: the loop reads it (SO_ERROR, which clears it) and counts it in
`socket_errors`, so a link that is down does not spin the loop at 100% CPU.
"""

from __future__ import annotations

import os
import select
import socket
import time
from collections.abc import Callable, Sequence

from l4lb.busypoll import spin_for_frame
from l4lb.plane import Plane
from l4lb.ring import READY, Slots

HandleFn = Callable[[int, int, float], int]
RESYNC_AFTER = 0.05
"""Seconds the next slot may stay empty while the ring's socket says a frame waits."""


def next_ready(status: Sequence[int], i: int) -> int | None:
    """The first slot from i on (wrapping) that holds a frame, or None."""
    nr = len(status)
    for k in range(1, nr):
        j = (i + k) % nr
        if status[j] & READY:
            return j
    return None


def take_socket_error(fd: int) -> int:
    """Read (and so clear) the pending error of the socket `fd`: its errno, 0 for none."""
    with socket.socket(fileno=os.dup(fd)) as sock:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)


class RxLoop:
    """Runs `handle` over the ready slots of `slots` until `stop()`."""

    def __init__(
        self,
        slots: Slots,
        fd: int,
        batch: int = 256,
        busy_poll_us: int = 0,
        idle_ms: int = 100,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if batch < 1:
            raise ValueError(f"batch {batch}: at least 1")
        self.slots = slots
        self.fd = fd
        """The ring's socket, polled while the ring is empty."""
        self.batch = min(batch, slots.count)  # a batch never wraps past the ring's end
        self.busy_poll = busy_poll_us / 1e6
        self.idle_ms = idle_ms
        """Longest sleep: bounds the reaction to stop() and the tick's lateness when idle."""
        self.clock = clock
        self.index = 0
        """The next slot to look at."""
        self.running = True
        self.frames = 0
        """Frames handled (updated before each tick and at exit)."""
        self.batches = 0
        """Non-empty batches (frames / batches is the mean batch size)."""
        self.wakeups = 0
        """poll() calls on an empty ring."""
        self.socket_errors = 0
        """Errors the ring's socket reported (read and cleared): ENETDOWN, the link went down."""
        self.ring_resyncs = 0
        """Moves to the slot holding the next frame, the kernel's position (module docstring)."""

    def stop(self) -> None:
        """Ask run() to return (safe from a signal handler); it does within idle_ms."""
        self.running = False

    def run(
        self,
        handle: HandleFn,
        tick: Callable[[float], None] | None = None,
        tick_every: float = 1.0,
        plane: Plane | None = None,
    ) -> None:
        status, nr, batch, clock = self.slots.status, self.slots.count, self.batch, self.clock
        zeros = memoryview(bytearray(4 * batch)).cast("I")  # KERNEL
        poller = select.poll()
        poller.register(self.fd, select.POLLIN | select.POLLERR)
        poll, idle_ms = poller.poll, self.idle_ms
        ring_fd = self.fd
        watched: set[int] = set()  # the plane's sockets registered in the poller
        busy_poll = self.busy_poll
        spin_until = 0.0
        i = self.index
        rx = batches = 0
        next_tick = clock() + tick_every
        if plane is None:
            plane = Plane()  # no services: due stays +inf after the first run
        plane_due = plane.run(clock())
        stuck_since = 0.0  # when the socket first said "a frame waits" with slot i empty
        try:
            while self.running:
                if not status[i] & READY:
                    if spin_until:
                        spin_for_frame(status, i, spin_until, clock)
                        spin_until = 0.0
                        continue
                    self.wakeups += 1
                    fds = plane.fds()
                    if fds or watched:
                        now_fds = set(fds)
                        for fd in watched - now_fds:
                            poller.unregister(fd)
                        for fd in now_fds - watched:
                            poller.register(fd, select.POLLIN | select.POLLERR)
                        watched = now_fds
                    left = (plane_due - clock()) * 1000.0  # ms until the plane is due
                    wait = idle_ms if left >= idle_ms else 0 if left <= 0 else int(left) + 1
                    events = poll(wait)
                    now = clock()
                    wake_plane = now >= plane_due
                    waits = False
                    for fd, ev in events:
                        if fd != ring_fd:
                            wake_plane = True
                        elif ev & select.POLLERR:
                            self.socket_errors += 1
                            take_socket_error(fd)
                        elif ev & select.POLLIN:
                            waits = True
                    if not waits or status[i] & READY:
                        stuck_since = 0.0
                    elif not stuck_since:
                        stuck_since = now
                    elif now - stuck_since >= RESYNC_AFTER:
                        j = next_ready(status, i)
                        if j is not None:
                            i = j
                            self.ring_resyncs += 1
                        stuck_since = 0.0
                    if wake_plane:
                        plane_due = plane.run(now)
                    if now < next_tick:
                        continue
                else:
                    end = i + batch
                    if end > nr:
                        end = nr
                    now = clock()
                    n = handle(i, end, now)
                    stuck_since = 0.0
                    status[i : i + n] = zeros if n == batch else zeros[:n]
                    rx += n
                    batches += 1
                    i += n
                    if i == nr:
                        i = 0
                    if busy_poll:
                        spin_until = clock() + busy_poll
                    if now >= plane_due:
                        plane_due = plane.run(now)
                    if now < next_tick:
                        continue
                self.frames += rx
                self.batches += batches
                rx = batches = 0
                if tick is not None:
                    tick(now)
                next_tick = now + tick_every
        finally:
            self.index = i
            self.frames += rx
            self.batches += batches
