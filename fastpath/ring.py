"""AF_PACKET receive ring (TPACKET_V2, mmap): frames as memoryviews into the ring, no copies.

Why TPACKET_V2 and not TPACKET_V3 (measured on this 2-core VM, numbers in the lead's README):
- Latency. V3 hands user space whole blocks, only when a block is full or its retire timeout
  (>= 1 ms) expires, so a lone request waits for the timeout. One UDP request at a time through
  the LB alone (veth ping-pong): V3 with a 1 ms timeout 975 requests/s (p50 999 us), V2
  54,000-68,000 requests/s (p50 14-16 us). V2 publishes every frame as soon as the kernel wrote
  it (per-frame tp_status), and poll() wakes for the first one.
- Throughput. V2's per-frame ring work (read the status word, slice a memoryview, hand the
  status back) measured 0.5 us per frame in the forwarding loop (draining a prefilled ring
  with a core that sends nothing, ~2 M frames/s), next to ~1.4 us for the Balancer and ~0.9 us
  for the kernel's share of sendmmsg. V3 would save about one status store and one status read
  per frame (well under 0.1 us): not worth a second, block-based path.

Usage (the hot loop reads the ring's arrays directly; see fastpath.forward):
    ring = RxRing(frames=4096, frame_size=2048)
    sock = bpf.open_filtered(ifname, prog, setup=ring.setup)
    ring.map(sock)
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import select
import socket
import struct
from collections.abc import Callable, Iterator

SOL_PACKET = 263
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_VERSION = 10
PACKET_TX_RING = 13
PACKET_QDISC_BYPASS = 20
TPACKET_V2 = 1

TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1  # the frame belongs to user space
TP_STATUS_COPY = 2  # the frame was truncated to the ring's frame (tp_snaplen < tp_len)
TP_STATUS_LOSING = 4  # the kernel dropped frames since the last statistics read
TP_STATUS_CSUMNOTREADY = 8  # the TCP/UDP checksum is partial (a local sender's offload)

TPACKET_ALIGNMENT = 16
# struct tpacket2_hdr: status, len, snaplen (u32), mac, net (u16), sec, nsec (u32), vlan tci,
# vlan tpid (u16), padding.
TPACKET2_HDR = struct.Struct("=IIIHHIIHH4x")
SOCKADDR_LL_SIZE = 20
TPACKET2_HDRLEN = -(-TPACKET2_HDR.size // TPACKET_ALIGNMENT) * TPACKET_ALIGNMENT + SOCKADDR_LL_SIZE
TPACKET_REQ = struct.Struct("=IIII")  # block_size, block_nr, frame_size, frame_nr
TPACKET_STATS = struct.Struct("=II")  # tp_packets, tp_drops (reading resets them)

# Where the Ethernet header of a received frame starts in its slot (tp_mac): the kernel puts
# it at TPACKET_ALIGN(TPACKET2_HDRLEN) + 16 - (link header length), so that the network header
# lands 16-byte aligned. For untagged Ethernet (14 bytes) that is 66 for every frame; the
# filters pass only frames with EtherType IPv4 at offset 12, so all frames the loop sees have
# it (VLAN tags on veth/NICs are taken out of the frame by the driver, not left in it).
ETH_MAC_OFFSET = -(-TPACKET2_HDRLEN // TPACKET_ALIGNMENT) * TPACKET_ALIGNMENT + 16 - 14

# Word indexes into a frame header seen as u32 (status, len, snaplen) and u16 (mac offset).
ST_WORD = 0
LEN_WORD = 1
SNAPLEN_WORD = 2
MAC_HALF = 6


def ring_geometry(frames: int, frame_size: int) -> tuple[int, int, int, int]:
    """(block_size, block_nr, frame_size, frame_nr) for a V2 ring of about `frames` frames.

    Frames must not straddle blocks; blocks are a page multiple. Raises ValueError on sizes
    the kernel would refuse (frame_size not a multiple of 16 or not above the header).
    """
    if frame_size % TPACKET_ALIGNMENT or frame_size <= TPACKET2_HDRLEN:
        raise ValueError(f"frame size {frame_size}: must be a multiple of 16 above 52")
    if frames < 1:
        raise ValueError(f"ring of {frames} frames")
    block_size = max(mmap.PAGESIZE, frame_size)
    while block_size % frame_size:
        block_size += mmap.PAGESIZE
    per_block = block_size // frame_size
    block_nr = (frames + per_block - 1) // per_block
    return block_size, block_nr, frame_size, block_nr * per_block


class RxRing:
    """A TPACKET_V2 receive ring on an AF_PACKET socket.

    After `map`, `status` (u32 view) and `half` (u16 view) index frame headers: frame i's
    status is status[i * words], its snap length status[i * words + 2], its Ethernet offset
    half[i * halves + 6]. `frames()` is the convenient (slower) iterator.
    """

    def __init__(self, frames: int = 4096, frame_size: int = 2048) -> None:
        self.block_size, self.block_nr, self.frame_size, self.frame_nr = ring_geometry(
            frames, frame_size
        )
        self.words = self.frame_size // 4
        self.halves = self.frame_size // 2
        self.index = 0
        self.sock: socket.socket | None = None
        self.poller: select.poll | None = None
        self.mm: mmap.mmap | None = None
        self.view = memoryview(b"")
        self.status = memoryview(b"").cast("I")
        self.half = memoryview(b"").cast("H")
        self.slots: list[memoryview] = []
        self.addr = 0
        """Address of the mapping (for iovecs pointing into the slots)."""
        self.slot_status = self.status
        """Per slot (index = slot number, a strided view): status word, tp_len, tp_snaplen."""
        self.slot_len = self.status
        self.slot_snap = self.status

    def setup(self, sock: socket.socket) -> None:
        """Ask the kernel for the ring (call before bind, as open_filtered's `setup`)."""
        sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2)
        req = TPACKET_REQ.pack(self.block_size, self.block_nr, self.frame_size, self.frame_nr)
        sock.setsockopt(SOL_PACKET, PACKET_RX_RING, req)
        self.map(sock)

    def map(self, sock: socket.socket) -> None:
        """Map the ring the kernel made for `sock` (done by `setup`)."""
        if self.mm is not None:
            return
        size = self.block_size * self.block_nr
        self.sock = sock
        self.mm = mmap.mmap(sock.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self.mm)
        self.status = self.view.cast("I")
        self.half = self.view.cast("H")
        words = self.words
        self.slot_status = self.status[ST_WORD::words]
        self.slot_len = self.status[LEN_WORD::words]
        self.slot_snap = self.status[SNAPLEN_WORD::words]
        anchor = ctypes.c_char.from_buffer(self.mm)
        self.addr = ctypes.addressof(anchor)
        del anchor  # an export would keep the mmap from closing; the address stays valid
        # Per slot: the bytes from the Ethernet header on (sliced to tp_snaplen per frame).
        fsz = self.frame_size
        self.slots = [
            self.view[i * fsz + ETH_MAC_OFFSET : (i + 1) * fsz] for i in range(self.frame_nr)
        ]

    def slot_addr(self, i: int) -> int:
        """Address of slot i's Ethernet header."""
        return self.addr + i * self.frame_size + ETH_MAC_OFFSET

    def frame(self, i: int) -> memoryview:
        """Frame i as received (from its Ethernet header, snap length bytes)."""
        base = i * self.frame_size
        mac = self.half[i * self.halves + MAC_HALF]
        snap = self.status[i * self.words + SNAPLEN_WORD]
        return self.view[base + mac : base + mac + snap]

    def frames(self, limit: int = 256) -> Iterator[memoryview]:
        """Ready frames (at most `limit`), each released once the caller asks for the next."""
        status, words, nr = self.status, self.words, self.frame_nr
        i = self.index
        try:
            for _ in range(limit):
                if not status[i * words] & TP_STATUS_USER:
                    break
                yield self.frame(i)
                status[i * words] = TP_STATUS_KERNEL
                i = i + 1 if i + 1 < nr else 0
        finally:
            self.index = i

    def wait(self, timeout_ms: int) -> bool:
        """Block until the next frame is ready or `timeout_ms` passed; True if one is ready."""
        if self.status[self.index * self.words] & TP_STATUS_USER:
            return True
        if self.poller is None:  # made once, not per wait (this is the idle path of a wake-up)
            assert self.sock is not None
            self.poller = select.poll()
            self.poller.register(self.sock.fileno(), select.POLLIN | select.POLLERR)
        self.poller.poll(timeout_ms)
        return bool(self.status[self.index * self.words] & TP_STATUS_USER)

    def close(self) -> None:
        """Unmap the ring (the socket is the caller's)."""
        for v in self.slots:
            v.release()
        self.slots = []
        for v in (self.slot_status, self.slot_len, self.slot_snap):
            v.release()
        self.status.release()
        self.half.release()
        self.view.release()
        if self.mm is not None:
            self.mm.close()
            self.mm = None


def kernel_drops(sock: socket.socket) -> tuple[int, int]:
    """(packets, drops) the kernel counted for `sock` since the last call (reading resets)."""
    raw = sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, TPACKET_STATS.size)
    packets, drops = TPACKET_STATS.unpack(raw)
    return packets, drops


# -- busy-polling (fastpath.lb and agent.decap, --busy-poll-us) ---------------------------------
BUSY_POLL_MAX_US = 1_000_000


def add_busy_poll_option(parser: argparse.ArgumentParser) -> None:
    """The shared `--busy-poll-us US` option (checked by busy_poll_error)."""
    parser.add_argument(
        "--busy-poll-us",
        type=int,
        default=0,
        metavar="US",
        help="after traffic, spin this many microseconds for the next frame before sleeping "
        "(lower latency for sparse requests, at the cost of CPU; default 0: sleep at once)",
    )


def busy_poll_error(us: int) -> str | None:
    """Why `us` is not a valid --busy-poll-us, or None."""
    if 0 <= us <= BUSY_POLL_MAX_US:
        return None
    return f"--busy-poll-us {us}: expected 0..{BUSY_POLL_MAX_US}"


def spin_for_frame(status: memoryview, i: int, until: float, clock: Callable[[], float]) -> None:
    """Busy-poll slot i's status word until the kernel hands it over or `clock()` passes
    `until`: a frame that follows within the window skips the sleep and wake-up (10-20 us on
    this VM). Yields the CPU on each turn, so others runnable on this core go first."""
    sched_yield = os.sched_yield
    while not status[i] & TP_STATUS_USER and clock() < until:
        sched_yield()
