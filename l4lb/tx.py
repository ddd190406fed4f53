"""Transmit on an AF_PACKET socket straight from the receive ring: sendmmsg, one message per
ring slot, one iovec each (`Slots.iov`), pointing at the slot's `out` offset, where the core
wrote the frame to send. Nothing is copied in user space; the kernel copies one piece per frame.

Why sendmmsg and not a PACKET_TX_RING (TPACKET_V2), measured on this VM by draining a
prefilled receive ring through a copy-only core: sendmmsg ~480,000 frames/s against ~355,000
for the TX ring (best of 4 alternating runs each). The ring saves the user-to-kernel copy of
64-byte frames, which is cheap, but the kernel's tpacket_snd does more per frame (status
handling, page-fragment skbs, a destructor per frame to hand the slot back).

Why from the slot (measured with bench/fwd_drain.py, CPU per frame of the whole loop, medians
of interleaved rounds): copying each frame into separate send buffers 2.83 us -> a header
store beside the ring and two iovecs per frame 2.29 us (3 rounds); that -> one iovec in place
2.28 -> 2.24 us (5 rounds). The outer header goes over the inner Ethernet header and the
`headroom` bytes before it (SlotLayout), so header and inner packet are one contiguous frame.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import socket

from l4lb.ring import PACKET_QDISC_BYPASS, SOL_PACKET, Slots

SO_SNDBUFFORCE = 32
SNDBUF = 4 << 20  # room for thousands of frames queued behind RPS before sends block


def open_tx_socket(ifname: str, bypass: bool = True, sndbuf: int = SNDBUF) -> socket.socket:
    """A send-only AF_PACKET socket on `ifname` (protocol 0: it never receives).

    `bypass` skips the qdisc layer (PACKET_QDISC_BYPASS): the LB is the only heavy sender on
    its interface, and veth has no queue to manage anyway. The send buffer is forced to
    `sndbuf` where allowed (sends then block instead of failing while frames queue).
    """
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        if bypass:
            sock.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
        try:  # beyond net.core.wmem_max: needs CAP_NET_ADMIN, which the LB has as root
            sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, sndbuf)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        sock.bind((ifname, 0))
    except BaseException:
        sock.close()
        raise
    return sock


# struct iovec, struct msghdr, struct mmsghdr (sys/uio.h, sys/socket.h), for sendmmsg(2).
class Iovec(ctypes.Structure):
    _fields_ = (("base", ctypes.c_void_p), ("len", ctypes.c_size_t))


class Msghdr(ctypes.Structure):
    _fields_ = (
        ("name", ctypes.c_void_p),
        ("namelen", ctypes.c_uint32),
        ("iov", ctypes.POINTER(Iovec)),
        ("iovlen", ctypes.c_size_t),
        ("control", ctypes.c_void_p),
        ("controllen", ctypes.c_size_t),
        ("flags", ctypes.c_int),
    )


class Mmsghdr(ctypes.Structure):
    _fields_ = (("hdr", Msghdr), ("len", ctypes.c_uint))


assert ctypes.sizeof(Iovec) == 16  # the layout of Slots.iov
_MMSG_SIZE = ctypes.sizeof(Mmsghdr)
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
sendmmsg = _libc.sendmmsg
"""sendmmsg(fd, address of an Mmsghdr array, count, flags) -> messages sent, or -1."""
sendmmsg.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int)
sendmmsg.restype = ctypes.c_int


def _address(buf: memoryview | bytearray) -> int:
    """Address of a writable buffer's first byte (valid while the buffer lives)."""
    anchor = ctypes.c_char.from_buffer(buf)
    addr = ctypes.addressof(anchor)
    del anchor  # an export would keep an mmap from closing; the address stays valid
    return addr


class ZeroCopySender:
    """sendmmsg of ring slots: message i sends slot i's `out_len[i]` bytes from its `out`
    offset. Counts what the kernel took (`sent`) and refused (`errors`, `last_errno`)."""

    def __init__(self, sock: socket.socket, slots: Slots) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        nr, stride, out = slots.count, slots.layout.stride, slots.layout.out
        base = _address(slots.mem)
        iov_addr = _address(slots.iov)
        bases = memoryview(slots.iov).cast("Q")[0::2]
        for i in range(nr):
            bases[i] = base + i * stride + out
        bases.release()
        self.msgs = (Mmsghdr * nr)()
        for i in range(nr):
            hdr = self.msgs[i].hdr
            hdr.iov = ctypes.cast(iov_addr + 16 * i, ctypes.POINTER(Iovec))
            hdr.iovlen = 1
        self.msgs_addr = ctypes.addressof(self.msgs)
        self._keep = slots  # the iovecs live in slots.iov
        self.sent = 0
        self.errors = 0
        self.last_errno = 0

    def send(self, first: int, n: int) -> int:
        """Send the messages of slots first..first+n-1; returns how many the kernel took. A
        refused frame (ENOBUFS: the peer's backlog was full) is counted in `errors`, the rest
        of the batch still goes."""
        done = errors = 0
        fd, addr = self.fd, self.msgs_addr + first * _MMSG_SIZE
        while done < n:
            r = sendmmsg(fd, addr + done * _MMSG_SIZE, n - done, 0)
            if r <= 0:
                err = ctypes.get_errno()
                if r < 0 and err == errno.EINTR:
                    continue
                errors += 1
                self.last_errno = err
                done += 1
                continue
            done += r
        self.errors += errors
        self.sent += done - errors
        return done - errors
