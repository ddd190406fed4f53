"""The VIP announcement owned by a process: a TUN device and a BFD responder over it.

The LB host's BIRD (controller/bgp.py renders its configuration) announces the VIP to its ToR
by BGP only while its static route `route <vip>/32 via 169.254.0.2 bfd` is valid, and that
next hop lives on a TUN device this object holds:

- the TUN is not persistent: when the holding process dies in any way (SIGKILL included) the
  kernel deletes the device, BIRD loses the next hop and withdraws the VIP (measured: 31 ms);
- for a hang (SIGSTOP, a stuck loop) BIRD runs BFD to 169.254.0.2 over that TUN, and this
  object answers it (fastpath.bfd: RFC 5880 asynchronous mode, RFC 5881 single hop) from the
  holder's own loop: a loop that stops calling `service` stops answering, and BIRD withdraws
  after detect-mult x interval (3 x 100 ms by default);
- `withdraw()` sends BFD AdminDown: BIRD's session goes Down at once and the route with it
  (graceful stop, drain); `withdraw_confirmed` turns true when BIRD's next packet says Down.
  `announce()` undoes it.

Addresses: the host side of the point-to-point TUN is 169.254.0.1 (BIRD's end: its BFD packets
come from there), the far side 169.254.0.2 (ours: we read the datagrams addressed to it from
the TUN and write our answers back into it, from 169.254.0.2 to 169.254.0.1:3784).

For a host loop: `fds()` to poll for reading, `service(now)` whenever one is readable or the
returned deadline has passed; nothing here blocks. `python -m fastpath.announce` runs one on its
own (a stand-in for the LB process in tests, and beside fastpath.lb until the LB calls it
itself; see `--health-file`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import random
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field

from fastpath import bfd

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000  # a read or write is one bare IP packet
IFREQ = struct.Struct("16sH22x")  # struct ifreq: name, flags
HOST_ADDR = "169.254.0.1"  # the host's end of the TUN: BIRD's BFD source
LB_ADDR = "169.254.0.2"  # the far end: the static route's next hop, answered by us
TUN_PREFIX = "l4an-"
MAX_READS = 64  # datagrams read per `service` call


class AnnounceError(RuntimeError):
    """The TUN device cannot be made or configured; the message says what failed."""


def tun_name(iface: str) -> str:
    """The announcement TUN for an LB on `iface` ('h1-eth0' -> 'l4an-h1-eth0', <= 15 chars)."""
    return (TUN_PREFIX + iface)[:15]


@dataclass(frozen=True)
class AnnounceConfig:
    """One announcement: the TUN, its two addresses, and the BFD timers."""

    tun: str
    """TUN device name (tun_name(iface))."""
    host_addr: str = HOST_ADDR
    """Address of the host's end (BIRD's BFD source)."""
    lb_addr: str = LB_ADDR
    """Address of the far end: BIRD's static next hop, which this object answers for."""
    bfd: bfd.SessionConfig = field(default_factory=bfd.SessionConfig)
    """Our BFD timers; BIRD detects a hang after bfd.detect_mult x bfd.desired_min_tx."""
    announced: bool = True
    """Start announced (BFD Down, then Up with BIRD), or withdrawn (AdminDown)."""

    def __post_init__(self) -> None:
        if not self.tun or len(self.tun) > 15 or "/" in self.tun:
            raise ValueError(f"TUN name {self.tun!r}: 1..15 characters, no '/'")


@dataclass(frozen=True)
class Status:
    """What the announcement looks like from here (BIRD has the last word: `lb list`)."""

    wanted: bool
    """announce() is in force (False after withdraw())."""
    announced: bool
    """Our BFD session is Up: BIRD's static route, and so the VIP, is valid."""
    bfd_state: str
    since: float
    """When the BFD session entered bfd_state (the caller's clock)."""
    peer_state: str | None
    """The state in BIRD's last packet."""
    withdraw_confirmed: bool
    """Withdrawn, and BIRD has said so (its session is Down): the route is gone from BIRD."""
    received: int
    sent: int
    discarded: dict[str, int]
    """Packets read from the TUN and dropped, by reason (fastpath.bfd.Discard names, lower
    case; `not_bfd` for other traffic on the device, such as IPv6 router solicitations)."""


def _run_ip(*args: str) -> None:
    try:
        res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise AnnounceError(f"`ip {' '.join(args)}`: {e}") from None
    if res.returncode != 0:
        raise AnnounceError(f"`ip {' '.join(args)}` failed: {res.stderr.strip()}")


@dataclass
class Device:
    """The TUN device an Announcer holds: its descriptor (non-blocking) and name."""

    fd: int
    name: str


def open_tun(name: str) -> tuple[int, str]:
    """A non-persistent, non-blocking TUN device without packet information: (fd, name)."""
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise AnnounceError(f"cannot open /dev/net/tun: {e.strerror}") from None
    try:
        ifr = fcntl.ioctl(fd, TUNSETIFF, IFREQ.pack(name.encode(), IFF_TUN | IFF_NO_PI))
    except OSError as e:
        os.close(fd)
        why = "it exists (another holder?)" if e.errno == errno.EBUSY else e.strerror
        raise AnnounceError(f"cannot create TUN device {name!r}: {why}") from None
    return fd, IFREQ.unpack(ifr)[0].rstrip(b"\0").decode()


def open_device(config: AnnounceConfig) -> Device:
    """Make the announcement's TUN: host address, peer address, up. Root (CAP_NET_ADMIN)."""
    fd, name = open_tun(config.tun)
    try:
        _run_ip("addr", "add", config.host_addr, "peer", f"{config.lb_addr}/32", "dev", name)
        _run_ip("link", "set", name, "up")
    except BaseException:
        os.close(fd)
        raise
    return Device(fd, name)


class Announcer:
    """Holds the TUN and answers BIRD's BFD on it.

    `device`: the TUN to use (tests pass one end of a socket pair); by default one is made
    (open_device: root).
    """

    def __init__(
        self,
        config: AnnounceConfig,
        now: float,
        rng: Callable[[], float] = random.random,
        discriminator: int | None = None,
        device: Device | None = None,
    ) -> None:
        self.config = config
        dev = device or open_device(config)
        self.fd, self.tun = dev.fd, dev.name
        self.session = bfd.Session(
            config.bfd,
            discriminator or random.randrange(1, 2**32),
            now,
            rng,
            admin_down=not config.announced,
        )
        # RFC 5881 4: one source port per session, from 49152..65535
        self.source_port = random.randrange(bfd.SOURCE_PORT_MIN, 65536)
        self.not_bfd = 0
        self.send_errors = 0
        self._withdrawn_at: float | None = None if config.announced else now

    def fds(self) -> list[int]:
        """File descriptors to poll for reading (the TUN)."""
        return [self.fd] if self.fd >= 0 else []

    def service(self, now: float) -> float:
        """Read what arrived, run the timers, send what is due; returns the next deadline (the
        caller's clock) by which to call again."""
        for _ in range(MAX_READS):
            try:
                packet = os.read(self.fd, 2048)
            except BlockingIOError:
                break
            self._handle(packet, now)
        self.session.handle_timer(now)
        for pkt in self.session.packets_to_send(now):
            dgram = bfd.datagram(
                self.config.lb_addr, self.config.host_addr, self.source_port, pkt.encode()
            )
            try:
                os.write(self.fd, dgram)
            except OSError:
                self.send_errors += 1  # the device is going (down, or being deleted)
        return self.session.next_deadline()

    def _handle(self, packet: bytes, now: float) -> None:
        try:
            d = bfd.parse_datagram(packet)
            if d.src != self.config.host_addr or d.dst != self.config.lb_addr:
                raise bfd.BfdError(bfd.Discard.NOT_BFD, f"{d.src} -> {d.dst}")
            pkt = bfd.decode(d.payload)
        except bfd.BfdError as e:
            if e.reason == bfd.Discard.NOT_BFD:
                self.not_bfd += 1  # e.g. an IPv6 router solicitation on the device
            else:
                self.session.count_discard(e.reason)
            return
        self.session.receive(pkt, now)

    def announce(self, now: float) -> None:
        """Announce again after withdraw(): BFD leaves AdminDown and comes Up with BIRD."""
        self._withdrawn_at = None
        self.session.enable(now)

    def withdraw(self, now: float) -> None:
        """Withdraw the VIP, keeping the device: BFD AdminDown (BIRD's route goes at once)."""
        if self._withdrawn_at is None:
            self._withdrawn_at = now
        self.session.set_admin_down(now)

    @property
    def withdraw_confirmed(self) -> bool:
        """Withdrawn, and BIRD's last packet says its session is down."""
        return (
            self._withdrawn_at is not None
            and self.session.last_rx is not None
            and self.session.last_rx >= self._withdrawn_at
            and self.session.last_seen_state in (bfd.State.DOWN, bfd.State.ADMIN_DOWN)
        )

    def status(self) -> Status:
        s = self.session
        return Status(
            wanted=self._withdrawn_at is None,
            announced=s.state == bfd.State.UP,
            bfd_state=s.state.name,
            since=s.since,
            peer_state=s.last_seen_state.name if s.last_seen_state is not None else None,
            withdraw_confirmed=self.withdraw_confirmed,
            received=s.received,
            sent=s.sent,
            discarded={
                **{r.name.lower(): n for r, n in sorted(s.discards.items())},
                **({"not_bfd": self.not_bfd} if self.not_bfd else {}),
            },
        )

    def close(self) -> None:
        """Delete the TUN (closing the only descriptor does): BIRD withdraws at once."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
