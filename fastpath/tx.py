"""Batched transmit on an AF_PACKET socket: a PACKET_TX_RING, or sendmmsg over fixed buffers.

Both give the caller a writable memoryview to build the next frame in (no allocation per
packet), take its length with `commit`, and send everything committed with one system call in
`flush`. `TxRing` is the default (measured faster here, see README): the balancer writes the
frame straight into the ring shared with the kernel and one `send` hands over the whole batch;
`MmsgSender` copies from user buffers through sendmmsg and serves as the fallback where a TX
ring cannot be made.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import socket

from fastpath.ring import (
    PACKET_QDISC_BYPASS,
    PACKET_TX_RING,
    PACKET_VERSION,
    SOCKADDR_LL_SIZE,
    SOL_PACKET,
    TPACKET2_HDRLEN,
    TPACKET_REQ,
    TPACKET_V2,
    ring_geometry,
)

TP_STATUS_AVAILABLE = 0
TP_STATUS_SEND_REQUEST = 1
TP_STATUS_SENDING = 2
TP_STATUS_WRONG_FORMAT = 4
SO_SNDBUFFORCE = 32
SNDBUF = 4 << 20  # room for thousands of frames queued behind RPS before sends block
TX_DATA_OFFSET = TPACKET2_HDRLEN - SOCKADDR_LL_SIZE  # where V2 TX frames start (no TX_HAS_OFF)


def open_tx_socket(ifname: str, bypass: bool = True) -> socket.socket:
    """A send-only AF_PACKET socket on `ifname` (protocol 0: it never receives).

    `bypass` skips the qdisc layer (PACKET_QDISC_BYPASS): the LB is the only heavy sender on
    its interface, and veth has no queue to manage anyway.
    """
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        if bypass:
            sock.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
        try:  # beyond net.core.wmem_max: needs CAP_NET_ADMIN, which the LB has as root
            sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, SNDBUF)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
        sock.bind((ifname, 0))
    except BaseException:
        sock.close()
        raise
    return sock


class TxRing:
    """A TPACKET_V2 transmit ring: frames are written in place, `flush` sends them all."""

    def __init__(self, sock: socket.socket, frames: int = 1024, frame_size: int = 2048) -> None:
        self.block_size, self.block_nr, self.frame_size, self.frame_nr = ring_geometry(
            frames, frame_size
        )
        self.sock = sock
        sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2)
        req = TPACKET_REQ.pack(self.block_size, self.block_nr, self.frame_size, self.frame_nr)
        sock.setsockopt(SOL_PACKET, PACKET_TX_RING, req)
        size = self.block_size * self.block_nr
        self.mm = mmap.mmap(sock.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self.mm)
        self.status = self.view.cast("I")
        self.words = self.frame_size // 4
        self.capacity = self.frame_size - TX_DATA_OFFSET
        # One writable view per slot, made once.
        self.slots = [
            self.view[i * self.frame_size + TX_DATA_OFFSET : (i + 1) * self.frame_size]
            for i in range(self.frame_nr)
        ]
        self.index = 0
        self.pending = 0
        self.sent = 0
        self.errors = 0  # frames the kernel refused (wrong format) or a failed send
        self.full = 0  # times no slot was free (the kernel had not sent the older frames)

    def buffer(self) -> memoryview | None:
        """The next free slot to build a frame in, or None if the ring is full (flush first)."""
        st = self.status[self.index * self.words]
        if st != TP_STATUS_AVAILABLE:
            if st == TP_STATUS_WRONG_FORMAT:
                self.errors += 1
                self.status[self.index * self.words] = TP_STATUS_AVAILABLE
            else:
                self.full += 1
                return None
        return self.slots[self.index]

    def commit(self, length: int) -> None:
        """Queue the frame of `length` bytes built in the slot `buffer` returned."""
        w = self.index * self.words
        self.status[w + 1] = length  # tp_len
        self.status[w] = TP_STATUS_SEND_REQUEST
        self.index = self.index + 1 if self.index + 1 < self.frame_nr else 0
        self.pending += 1

    def flush(self) -> int:
        """Send every committed frame; returns how many were handed to the kernel."""
        n = self.pending
        if not n:
            return 0
        self.pending = 0
        try:
            self.sock.send(b"", socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            pass  # frames stay queued; the next flush sends them
        except OSError:
            self.errors += n
            return 0
        self.sent += n
        return n

    def close(self) -> None:
        self.status.release()
        for s in self.slots:
            s.release()
        self.view.release()
        self.mm.close()


class _Iovec(ctypes.Structure):
    _fields_ = (("base", ctypes.c_void_p), ("len", ctypes.c_size_t))


class _Msghdr(ctypes.Structure):
    _fields_ = (
        ("name", ctypes.c_void_p),
        ("namelen", ctypes.c_uint32),
        ("iov", ctypes.POINTER(_Iovec)),
        ("iovlen", ctypes.c_size_t),
        ("control", ctypes.c_void_p),
        ("controllen", ctypes.c_size_t),
        ("flags", ctypes.c_int),
    )


class _Mmsghdr(ctypes.Structure):
    _fields_ = (("hdr", _Msghdr), ("len", ctypes.c_uint))


_MMSG_SIZE = ctypes.sizeof(_Mmsghdr)
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_sendmmsg = _libc.sendmmsg
_sendmmsg.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int)
_sendmmsg.restype = ctypes.c_int


class MmsgSender:
    """sendmmsg over `batch` preallocated buffers (the socket must be bound to the interface)."""

    def __init__(self, sock: socket.socket, batch: int = 256, buf_size: int = 2048) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.batch = batch
        self.store = ctypes.create_string_buffer(batch * buf_size)
        self.iov = (_Iovec * batch)()
        self.msgs = (_Mmsghdr * batch)()
        base = ctypes.addressof(self.store)
        for i in range(batch):
            self.iov[i].base = base + i * buf_size
            self.msgs[i].hdr.iov = ctypes.pointer(self.iov[i])
            self.msgs[i].hdr.iovlen = 1
        whole = memoryview(self.store).cast("B")
        self.slots = [whole[i * buf_size : (i + 1) * buf_size] for i in range(batch)]
        self.iov_words = memoryview(self.iov).cast("B").cast("Q")  # [2*i + 1] is iov[i].len
        self.iov_lens = self.iov_words[1::2]  # iov[i].len, writable in place
        self.msgs_addr = ctypes.addressof(self.msgs)
        self.capacity = buf_size
        self.pending = 0
        self.sent = 0
        self.errors = 0
        self.full = 0

    def buffer(self) -> memoryview | None:
        if self.pending >= self.batch:
            self.full += 1
            return None
        return self.slots[self.pending]

    def commit(self, length: int) -> None:
        self.iov_lens[self.pending] = length
        self.pending += 1

    def flush(self) -> int:
        """Send the committed buffers; returns how many the kernel took."""
        return self.send(self.pending)

    def send(self, n: int) -> int:
        """Send buffers 0..n-1 whose lengths are already in `iov_lens`."""
        done = 0
        while done < n:
            r = _sendmmsg(self.fd, self.msgs_addr + done * _MMSG_SIZE, n - done, 0)
            if r <= 0:
                err = ctypes.get_errno()
                if r < 0 and err == errno.EINTR:
                    continue
                self.errors += n - done  # e.g. ENOBUFS: dropped, counted
                break
            done += r
        self.pending = 0
        self.sent += done
        return done

    def close(self) -> None:
        self.iov_lens.release()
        self.iov_words.release()
        for s in self.slots:
            s.release()
