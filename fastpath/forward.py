"""The forwarding loop: receive ring -> Balancer's ring path -> sendmmsg, in batches, no copy.

Per batch (l4lb.rxloop.RxLoop): the core (Balancer.bind_ring) takes up to `batch` ready frames
in place in the ring and writes, for each one to send, the frame at its slot's `out` offset
(the outer header over the inner Ethernet header, or an ICMP reply) and its length; then one
sendmmsg (l4lb.tx.ZeroCopySender) sends every such slot straight from the ring, one iovec
each, skipping the slots the core dropped; then the slots go back to the kernel.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fastpath.balancer import Balancer
from fastpath.stats import IoStats
from l4lb.plane import Plane
from l4lb.ring import Slots
from l4lb.rxloop import RxLoop
from l4lb.tx import ZeroCopySender


class Forwarder:
    """Runs `balancer` between the ring `slots` (whose socket is `rx_fd`) and `sender` until
    `stop()`."""

    def __init__(
        self,
        slots: Slots,
        rx_fd: int,
        sender: ZeroCopySender,
        balancer: Balancer,
        batch: int = 64,
        busy_poll_us: int = 0,
        idle_ms: int = 100,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.slots = slots
        self.sender = sender
        self.balancer = balancer
        self.loop = RxLoop(slots, rx_fd, batch, busy_poll_us, idle_ms, clock)
        self.rx_truncated = 0

    def stop(self) -> None:
        """Ask the loop to return (safe from a signal handler)."""
        self.loop.stop()

    @property
    def io(self) -> IoStats:
        loop, sender = self.loop, self.sender
        return IoStats(
            rx_frames=loop.frames,
            rx_truncated=self.rx_truncated,
            rx_csum_completed=self.slots.csum_completed,
            tx_frames=sender.sent,
            tx_errors=sender.errors,
            batches=loop.batches,
            wakeups=loop.wakeups,
            socket_errors=loop.socket_errors,
            ring_resyncs=loop.ring_resyncs,
            ring_waiting=self.slots.waiting(),
        )

    def run(
        self,
        tick: Callable[[float], None] | None = None,
        tick_every: float = 1.0,
        plane: Plane | None = None,
    ) -> None:
        """Forward until stop(); call `tick(now)` about every `tick_every` seconds and the
        control plane's services when they are due (l4lb.plane)."""
        slots = self.slots
        ring_batch = self.balancer.bind_ring(slots)
        send = self.sender.send
        unsent, wire_len, snap = slots.unsent, slots.wire_len, slots.snap

        def handle(first: int, end: int, now: float) -> int:
            n = ring_batch(first, end, now)
            if not unsent:
                send(first, n)
                return n
            # Send the runs between the slots the core dropped.
            run = first
            for slot in unsent:
                if slot > run:
                    send(run, slot - run)
                if wire_len[slot] != snap[slot]:
                    # Cut to the slot: the core dropped it by its IP total length.
                    self.rx_truncated += 1
                run = slot + 1
            if first + n > run:
                send(run, first + n - run)
            unsent.clear()
            return n

        self.loop.run(handle, tick, tick_every, plane)
