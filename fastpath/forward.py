"""The forwarding loop: receive ring -> Balancer.process_batch -> sendmmsg, in batches.

Per batch: collect up to `batch` ready frames from the TPACKET_V2 ring as memoryviews (no
copy), let the core write the frames to send into the sender's fixed buffers, hand the ring
slots back to the kernel, set the iovec lengths and send them with one sendmmsg. When the ring
is empty the loop sleeps in poll() on the ring socket, which wakes for the first frame the
kernel publishes (V2 has no block timeout), so a lone request is forwarded at once.
"""

from __future__ import annotations

import os
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from fastpath.balancer import Balancer
from fastpath.csum_fixup import complete_l4_checksum
from fastpath.ring import (
    LEN_WORD,
    SNAPLEN_WORD,
    TP_STATUS_CSUMNOTREADY,
    TP_STATUS_KERNEL,
    TP_STATUS_USER,
    RxRing,
)
from fastpath.tx import MmsgSender


@dataclass
class IoCounters:
    """What the I/O edge saw (the core counts verdicts)."""

    rx_frames: int = 0
    """Frames taken from the ring."""
    rx_truncated: int = 0
    """Frames longer than a ring slot (cut by the kernel; the core then drops them)."""
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
        status, slots, nr = ring.status, ring.slots, ring.frame_nr
        # Per slot: the index of its status word, and the next slot (saves arithmetic per frame).
        sw = [i * ring.words for i in range(nr)]
        nxt = [*range(1, nr), 0]
        process_batch = self.balancer.process_batch
        batch = self.batch
        frames: list[memoryview] = [slots[0][0:0]] * batch
        frame = frames[0]
        outs = sender.slots
        # The core writes each length straight into iov_len of the sender's iovec array.
        lens = cast(list[int], sender.iov_lens)
        send = sender.send
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN | select.POLLERR)
        poll = poller.poll
        i = ring.index
        next_tick = clock() + tick_every
        rx = truncated = 0
        busy_poll = self.busy_poll_us / 1e6
        spin_until = 0.0
        sched_yield = os.sched_yield
        try:
            while self.running:
                if not status[sw[i]] & TP_STATUS_USER:
                    if spin_until:
                        # Busy-poll briefly after traffic: a request that follows within
                        # busy_poll_us skips the sleep/wake-up (about 10 us on this VM).
                        w = sw[i]
                        while not status[w] & TP_STATUS_USER and clock() < spin_until:
                            sched_yield()  # others runnable on this core go first
                        spin_until = 0.0
                        continue
                    io.wakeups += 1
                    poll(idle_ms)
                    now = clock()
                    if now < next_tick:
                        continue
                else:
                    # Collect the ready frames (at most `batch`) as views into the ring.
                    start = i
                    n = 0
                    while n < batch:
                        w = sw[i]
                        st = status[w]
                        if not st & TP_STATUS_USER:
                            break
                        snap = status[w + SNAPLEN_WORD]
                        frame = slots[i][:snap]
                        # Cut to the slot (the kernel flags that only with PACKET_COPY_THRESH):
                        # the core drops it by its IP total length; counted here too.
                        if snap != status[w + LEN_WORD]:
                            truncated += 1
                        elif st & TP_STATUS_CSUMNOTREADY and complete_l4_checksum(frame):
                            io.rx_csum_completed += 1
                        frames[n] = frame
                        n += 1
                        i = nxt[i]
                    now = clock()
                    k = process_batch(frames, outs, lens, n, now)
                    # The core copied what it sends: give the slots back to the kernel.
                    j = start
                    for _ in range(n):
                        status[sw[j]] = TP_STATUS_KERNEL
                        j = nxt[j]
                    rx += n
                    io.batches += 1
                    if k:
                        send(k)
                    if busy_poll:
                        spin_until = clock() + busy_poll
                    if now < next_tick:
                        continue
                io.rx_frames += rx
                io.rx_truncated += truncated
                rx = truncated = 0
                if tick is not None:
                    tick(now)
                next_tick = now + tick_every
        finally:
            frames.clear()  # drop views into the ring so it can be unmapped
            del frame
            ring.index = i
            io.rx_frames += rx
            io.rx_truncated += truncated
            io.tx_frames = sender.sent
            io.tx_errors = sender.errors
