"""The forwarding loop: receive ring -> Balancer.process_batch -> sendmmsg, in batches.

Per batch: the core (Balancer.bind_ring) takes up to `batch` ready frames in place in the
TPACKET_V2 ring and writes for each one to send only its outer header and inner length; one
sendmmsg sends header + inner packet straight from the ring slots (two iovecs per slot, no
copy in user space), then the slots go back to the kernel in one strided store. When the ring
is empty the loop sleeps in poll() on the ring socket, which wakes for the first frame the
kernel publishes (V2 has no block timeout), so a lone request is forwarded at once.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from fastpath.balancer import Balancer
from fastpath.csum_fixup import complete_l4_checksum
from fastpath.ring import ETH_MAC_OFFSET, TP_STATUS_USER, TPACKET2_HDR, RxRing, spin_for_frame
from fastpath.tx import MmsgSender, ZeroCopySender

# The in-place outer header must not reach the slot's tpacket2_hdr (status, lengths).
assert TPACKET2_HDR.size <= ETH_MAC_OFFSET - ZeroCopySender.HEADROOM


@dataclass
class IoCounters:
    """What the I/O edge saw (the core counts verdicts)."""

    rx_frames: int = 0
    """Frames taken from the ring."""
    rx_truncated: int = 0
    """Frames longer than a ring slot (cut by the kernel) that the core dropped for it."""
    rx_csum_completed: int = 0
    """Frames whose TCP/UDP checksum was left partial by a local sender (checksum offload on
    a veth): completed before forwarding, see fastpath.csum_fixup."""
    tx_frames: int = 0
    """Frames handed to the kernel by sendmmsg."""
    tx_errors: int = 0
    """Frames sendmmsg refused (e.g. ENOBUFS): lost, counted."""
    batches: int = 0
    """Non-empty receive batches (rx_frames / batches is the mean batch size)."""
    wakeups: int = 0
    """poll() calls on an empty ring."""

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class Forwarder:
    """Runs `balancer` between a receive ring and a sendmmsg sender until `stop()`."""

    def __init__(
        self,
        ring: RxRing,
        sock: socket.socket,
        sender: MmsgSender,
        balancer: Balancer,
        batch: int = 64,
        busy_poll_us: int = 0,
    ) -> None:
        if not 1 <= batch <= sender.batch:
            raise ValueError(f"batch {batch} must be 1..{sender.batch} (the sender's buffers)")
        self.ring = ring
        self.sock = sock
        self.sender = sender
        self.balancer = balancer
        self.batch = batch
        self.busy_poll_us = busy_poll_us
        """After a batch, spin this long for the next frame before sleeping in poll()."""
        self.io = IoCounters()
        self.running = True

    def stop(self) -> None:
        """Ask the loop to return (safe from a signal handler); it does within `idle_ms`."""
        self.running = False

    def run(
        self,
        tick: Callable[[float], None] | None = None,
        tick_every: float = 1.0,
        idle_ms: int = 100,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Forward until stop(); call `tick(now)` about every `tick_every` seconds."""
        ring, sender, io = self.ring, self.sender, self.io
        status, snaps, nr = ring.slot_status, ring.slot_snap, ring.frame_nr
        zc = ZeroCopySender(sender, [ring.slot_addr(j) for j in range(nr)])
        # Slot j's outer header goes at hdrs[j * frame_size]: HEADROOM bytes before its
        # Ethernet header, past the slot's tpacket2_hdr (whose status word must stay intact).
        hdrs = ring.view[ETH_MAC_OFFSET - zc.HEADROOM :]
        fixed = [0]
        marks: list[tuple[int, int]] = []
        ring_batch = self.balancer.bind_ring(
            ring.slots, status, snaps, hdrs, ring.frame_size, zc.flens, sender.slots,
            complete_l4_checksum, fixed,
        )  # fmt: skip
        zsend = zc.send
        batch = self.batch
        zeros = memoryview(bytearray(4 * batch)).cast("I")
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN | select.POLLERR)
        poll = poller.poll
        i = ring.index
        next_tick = clock() + tick_every
        rx = 0
        busy_poll = self.busy_poll_us / 1e6
        spin_until = 0.0
        try:
            while self.running:
                if not status[i] & TP_STATUS_USER:
                    if spin_until:
                        spin_for_frame(status, i, spin_until, clock)
                        spin_until = 0.0
                        continue
                    io.wakeups += 1
                    poll(idle_ms)
                    now = clock()
                    if now < next_tick:
                        continue
                else:
                    # The ready frames from slot i on (at most `batch`, not past the ring's
                    # end so that slots first..first+n-1 are consecutive messages).
                    end = i + batch
                    if end > nr:
                        end = nr
                    now = clock()
                    n = ring_batch(i, end, now, marks)
                    if marks:
                        self._send_marked(zc, i, n, marks)
                        marks.clear()
                    else:
                        zsend(i, n)
                    # Sent (the kernel copied the frames): give the slots back.
                    status[i : i + n] = zeros if n == batch else zeros[:n]
                    rx += n
                    io.batches += 1
                    i += n
                    if i == nr:
                        i = 0
                    if busy_poll:
                        spin_until = clock() + busy_poll
                    if now < next_tick:
                        continue
                io.rx_frames += rx
                io.rx_csum_completed += fixed[0]
                rx = fixed[0] = 0
                if tick is not None:
                    tick(now)
                next_tick = now + tick_every
        finally:
            ring.index = i
            io.rx_frames += rx
            io.rx_csum_completed += fixed[0]
            io.tx_frames = sender.sent
            io.tx_errors = sender.errors
            zc.close()
            hdrs.release()

    def _send_marked(
        self, zc: ZeroCopySender, first: int, n: int, marks: list[tuple[int, int]]
    ) -> None:
        """Send slots first..first+n-1 in order, except the marked ones: a drop (length 0) is
        skipped, a frame the general path wrote into the sender's buffer j (the j-th mark) is
        sent from there."""
        sender, ring = self.sender, self.ring
        run = first
        for j, (slot, m) in enumerate(marks):
            if slot > run:
                zc.send(run, slot - run)
            if m:
                sender.iov_lens[j] = m
                sender.send(1, j)
            elif ring.slot_len[slot] != ring.slot_snap[slot]:
                # Cut to the slot (the kernel flags that only with PACKET_COPY_THRESH): the
                # core dropped it by its IP total length; counted here too.
                self.io.rx_truncated += 1
            run = slot + 1
        if first + n > run:
            zc.send(run, first + n - run)
