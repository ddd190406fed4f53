"""Hand decapsulated inner packets to the local IP stack.

Measured here (2-core VM, kernel 6.18, CPython 3.11; one Python process pinned to one core
writing the same 46-byte inner UDP packet to a bound, unread UDP socket on the VIP; every
packet reached the socket, counted by UdpRcvbufErrors; `--deliver` compares the two kept here):

    TUN device, one os.write per packet          860,000 - 1,030,000 packets/s
    AF_PACKET on lo, sendmmsg (64 per call)      750,000 -   970,000 packets/s
    AF_PACKET on lo, one send per packet         610,000 packets/s
    raw socket (IPPROTO_RAW), sendmmsg (64)      450,000 -   635,000 packets/s
    raw socket (IPPROTO_RAW), one send           520,000 packets/s

Chosen: the TUN device. It is the fastest without batching (so a lone request is never held
for a batch), the inner packet enters the stack through `netif_receive_skb` in the writing
thread (no backlog queue, no second routing pass as the raw socket's output path takes), and
everything about it is per device: the VIP lives on it (a NOARP point-to-point device, so it is
never on the fabric), its rp_filter is set loose on it alone, and the kernel deletes the device,
the VIP with it, when the process ends in any way, SIGKILL included.
Reverse-path filtering matters: with `all.rp_filter=1`, packets written to a TUN (or injected on
lo) are dropped unless the receiving device has an IPv4 address and its own rp_filter is 2
(loose). The raw socket never sees rp_filter (its packets keep the output route) and needs no
device, so it stays as the fallback (`--deliver raw`).
"""

from __future__ import annotations

import fcntl
import functools
import os
import socket
import struct
from collections.abc import Callable

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000  # no 4-byte packet-information prefix: a write is one bare IP packet
IFF_VNET_HDR = 0x4000  # each write starts with a struct virtio_net_hdr (checksum state)
IFREQ = struct.Struct("16sH22x")  # struct ifreq: name, flags (the rest of the union unused)
IFNAMSIZ = 16


class TunDelivery:
    """A non-persistent TUN device: `send(packet)` hands one IPv4 packet to the local stack.

    Opened with IFF_VNET_HDR: every packet is preceded by a virtio-net header
    (agent.core.Decapsulator.vnet_header_into) that can mark a partial TCP/UDP checksum left by
    the client's offload, which the kernel would otherwise reject as wrong.

    The device exists while this object's file descriptor is open; `close` (or the process
    ending) removes it and every address on it.
    """

    kind = "tun"
    vnet_hdr = True

    def __init__(self, name: str) -> None:
        if not name or len(name) >= IFNAMSIZ:
            raise ValueError(f"TUN device name {name!r}: 1..15 characters")
        self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            flags = IFF_TUN | IFF_NO_PI | IFF_VNET_HDR
            ifr = fcntl.ioctl(self.fd, TUNSETIFF, IFREQ.pack(name.encode(), flags))
        except BaseException:
            os.close(self.fd)
            raise
        self.name = IFREQ.unpack(ifr)[0].rstrip(b"\0").decode()
        # os.write bound in C (a partial): no Python frame per packet.
        self.send: Callable[[memoryview], int] = functools.partial(os.write, self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class RawDelivery:
    """A raw IPv4 socket (header included): the kernel routes each packet to the local VIP."""

    kind = "raw"
    vnet_hdr = False  # partial checksums (client offload) are not repaired on this path

    def __init__(self, vip: str) -> None:
        self.name = ""
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        try:
            # Connected to a VIP: the route is local for every VIP, and the header's own
            # destination decides which local socket receives the packet.
            self.sock.connect((vip, 0))
        except BaseException:
            self.sock.close()
            raise
        self.send = self.sock.send

    def close(self) -> None:
        self.sock.close()


Delivery = TunDelivery | RawDelivery
