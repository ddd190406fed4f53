"""AF_PACKET receive ring (TPACKET_V2, mmap), its slot layout, and the batch object the packet
cores read: `Slots`, the same over the kernel's ring (`RxRing`) and over ordinary memory
(`FakeRing`, for tests and benchmarks without root).

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

Usage:
    ring = RxRing(frames=4096)
    sock = bpf.open_filtered(ifname, prog, setup=ring.setup)   # maps the ring: ring.slots
    loop = RxLoop(ring.slots, sock.fileno(), batch=256)         # l4lb.rxloop
"""

from __future__ import annotations

import mmap
import socket
import struct
from dataclasses import dataclass
from typing import ClassVar

from l4lb.wire import ETH_HLEN, IPIP

# AF_PACKET socket options (linux/if_packet.h).
SOL_PACKET = 263
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_VERSION = 10
PACKET_QDISC_BYPASS = 20
PACKET_IGNORE_OUTGOING = 23
TPACKET_V2 = 1

# Slot status word bits (tp_status).
KERNEL = 0
"""The slot belongs to the kernel (what user space writes to hand it back)."""
READY = 1
"""TP_STATUS_USER: the slot holds a frame for user space."""
CUT = 2
"""TP_STATUS_COPY: the frame was cut to the slot (only with PACKET_COPY_THRESH; the loop
compares the wire length with the snap length instead)."""
CSUM_NOT_READY = 8
"""TP_STATUS_CSUMNOTREADY: the frame's TCP/UDP checksum is partial (a local sender's offload)."""

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
# lands 16-byte aligned. For untagged Ethernet that is 66 for every frame; the filters pass
# only frames with EtherType IPv4 at offset 12 (VLAN tags on veth/NICs are taken out of the
# frame by the driver, not left in it).
ETH_MAC_OFFSET = -(-TPACKET2_HDRLEN // TPACKET_ALIGNMENT) * TPACKET_ALIGNMENT + 16 - ETH_HLEN


@dataclass(frozen=True)
class SlotLayout:
    """Where things are in one ring slot (one TPACKET_V2 frame): struct tpacket2_hdr at 0, the
    received frame at `mac`, and a frame sent back from the slot at `out`."""

    stride: int = 2048
    """Bytes per slot (tp_frame_size): slot i starts at i * stride."""
    mac: int = ETH_MAC_OFFSET
    """Where the kernel puts the frame's Ethernet header (tp_mac)."""
    headroom: int = IPIP.headroom
    """Bytes before `mac` an outer header may take when the frame is sent from its slot: the
    tail of the slot's sockaddr_ll and the padding, which nothing reads."""

    STATUS_WORD: ClassVar[int] = 0
    """u32 index of the status word (tp_status) in a slot."""
    LEN_WORD: ClassVar[int] = 1
    """u32 index of the frame's length on the wire (tp_len)."""
    SNAP_WORD: ClassVar[int] = 2
    """u32 index of the bytes of it in the slot (tp_snaplen)."""

    def __post_init__(self) -> None:
        if self.stride % TPACKET_ALIGNMENT or self.stride <= self.mac:
            raise ValueError(f"slot stride {self.stride}: a multiple of 16 above {self.mac}")
        if not 0 <= self.headroom <= self.mac - TPACKET2_HDR.size:
            # The header written in front must not reach the status and length words.
            raise ValueError(f"headroom {self.headroom}: at most {self.mac - TPACKET2_HDR.size}")

    @property
    def out(self) -> int:
        """Where a frame sent from the slot starts (headroom bytes before the Ethernet header)."""
        return self.mac - self.headroom

    @property
    def room(self) -> int:
        """The most bytes of a frame a slot holds (longer ones are cut: snap < wire length)."""
        return self.stride - self.mac


class Slots:
    """A ring's slots as the packet cores read and write them; the same object over the kernel's
    ring and over a FakeRing. Per slot i:

    - status[i]: the status word (READY, CSUM_NOT_READY); the loop writes KERNEL to give it back;
    - snap[i] / wire_len[i]: bytes of the frame in the slot / on the wire;
    - frames[i]: the slot's bytes from the Ethernet header on (a core slices it to snap[i]);
      starts[i]: where frames[i] begins in `mem`;
    - outs[i]: the slot's bytes from `layout.out` on, where a core writes a frame to send from
      the slot; out_len[i]: its length. out_len lives in `iov`, one struct iovec {base, len}
      (two u64) per slot, so a sender hands it to sendmmsg as is (l4lb.tx.ZeroCopySender sets
      the bases). `out_mem` is the same places as one view (slot i's at i * stride): a hot path
      packs there, so that it touches no per-slot view object (measured: 3-5% of the core's
      time per frame over 4,096 slots);
    - unsent: slots of the batch being handled that a core took but that are not to be sent
      (drops), in order; the loop sends the others and clears it;
    - csum_completed: frames whose partial checksum a core completed (a running count).
    """

    def __init__(self, mem: memoryview, layout: SlotLayout, count: int) -> None:
        self.mem = mem
        self.layout = layout
        self.count = count
        stride = layout.stride
        words = mem.cast("I")
        step = stride // 4
        self.status = words[layout.STATUS_WORD :: step][:count]
        self.wire_len = words[layout.LEN_WORD :: step][:count]
        self.snap = words[layout.SNAP_WORD :: step][:count]
        words.release()
        self.starts = [i * stride + layout.mac for i in range(count)]
        self.frames = [mem[s : s - layout.mac + stride] for s in self.starts]
        self.outs = [mem[i * stride + layout.out : (i + 1) * stride] for i in range(count)]
        self.out_mem = mem[layout.out : count * stride]
        self.iov = bytearray(16 * count)
        self._iov_words = memoryview(self.iov).cast("Q")
        self.out_len = self._iov_words[1::2]
        self.unsent: list[int] = []
        self.csum_completed = 0

    def waiting(self) -> int:
        """Slots holding a frame for the loop now (a scan of the status words: for a snapshot,
        not the packet path)."""
        return sum(1 for st in self.status if st & READY)

    def release(self) -> None:
        """Drop every view into `mem` (the ring's mmap cannot close while they exist)."""
        for v in (*self.frames, *self.outs, self.out_mem, self.status, self.wire_len, self.snap):
            v.release()
        self.frames, self.outs = [], []
        self.out_len.release()
        self._iov_words.release()


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
    """A TPACKET_V2 receive ring on an AF_PACKET socket; `slots` once mapped."""

    def __init__(self, frames: int = 4096, layout: SlotLayout | None = None) -> None:
        self.layout = layout or SlotLayout()
        self.block_size, self.block_nr, self.frame_size, self.frame_nr = ring_geometry(
            frames, self.layout.stride
        )
        self.mm: mmap.mmap | None = None
        self._slots: Slots | None = None

    @property
    def slots(self) -> Slots:
        if self._slots is None:
            raise RuntimeError("the ring is not mapped (RxRing.setup)")
        return self._slots

    def setup(self, sock: socket.socket) -> None:
        """Ask the kernel for the ring and map it (call before bind, as open_filtered's
        `setup`)."""
        sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2)
        req = TPACKET_REQ.pack(self.block_size, self.block_nr, self.frame_size, self.frame_nr)
        sock.setsockopt(SOL_PACKET, PACKET_RX_RING, req)
        size = self.block_size * self.block_nr
        self.mm = mmap.mmap(sock.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._slots = Slots(memoryview(self.mm), self.layout, self.frame_nr)

    def close(self) -> None:
        """Unmap the ring (the socket is the caller's)."""
        if self._slots is not None:
            self._slots.release()
            self._slots.mem.release()
            self._slots = None
        if self.mm is not None:
            self.mm.close()
            self.mm = None


class FakeRing:
    """A receive ring in ordinary memory (a bytearray by default), laid out exactly as the
    kernel's: same SlotLayout, same Slots. `put` writes a frame into a slot as the kernel does
    (cut to the slot, status last), so the production ring path runs over it without root."""

    def __init__(
        self, count: int, layout: SlotLayout | None = None, mem: bytearray | mmap.mmap | None = None
    ) -> None:
        self.layout = layout or SlotLayout()
        self.mem = mem if mem is not None else bytearray(count * self.layout.stride)
        self.slots = Slots(memoryview(self.mem), self.layout, count)

    def put(
        self, i: int, frame: bytes | bytearray | memoryview, csum_not_ready: bool = False
    ) -> None:
        """Slot i receives `frame` (cut to the slot's room, as the kernel cuts)."""
        if not 0 <= i < self.slots.count:
            raise IndexError(f"slot {i} of a ring of {self.slots.count}")
        lay = self.layout
        snap = min(len(frame), lay.room)
        base = i * lay.stride
        self.mem[base + lay.mac : base + lay.mac + snap] = frame[:snap]
        status = READY | (CSUM_NOT_READY if csum_not_ready else 0)
        TPACKET2_HDR.pack_into(
            self.mem, base, status, len(frame), snap, lay.mac, lay.mac + ETH_HLEN, 0, 0, 0, 0
        )

    def load(self, frames: list[bytes], first: int = 0) -> None:
        """Frames into consecutive slots from `first` on."""
        for j, f in enumerate(frames):
            self.put(first + j, f)

    def sent(self, i: int) -> bytes:
        """The frame a core wrote to send from slot i."""
        return bytes(self.slots.outs[i][: self.slots.out_len[i]])


def kernel_drops(sock: socket.socket) -> tuple[int, int]:
    """(packets, drops) the kernel counted for `sock` since the last call (reading resets)."""
    raw = sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, TPACKET_STATS.size)
    packets, drops = TPACKET_STATS.unpack(raw)
    return packets, drops
