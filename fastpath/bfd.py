"""BFD (RFC 5880, asynchronous mode; RFC 5881, single hop over IPv4): codec and one session.

Pure: bytes and a `now` (seconds, any monotonic clock) in, packets and state out; no socket, no
clock, no randomness of its own (the transmit jitter comes from an injected `rng`). The I/O
edge is fastpath.announce, which carries these packets over a TUN device to the host's BIRD.

What is implemented, by RFC 5880 section:
- 4.1 the mandatory section of the control packet (24 bytes; no authentication: a packet with
  the A bit is discarded, as 6.8.6 says for a session without authentication);
- 6.8.1 state variables, 6.8.6 reception (every discard rule, the state table, Poll/Final),
  6.8.7 transmission (interval max(DesiredMinTx, RemoteMinRx) less 0-25% jitter, 10-25% with a
  detect multiplier of 1; none while RemoteMinRx is 0; DesiredMinTx at least 1 s while not Up,
  6.8.3), 6.8.4 detection time (remote multiplier x max(RequiredMinRx, RemoteDesiredMinTx)),
  6.5 Poll sequences when our advertised timers change, 6.8.16 AdminDown.
- Not implemented: Demand mode (we never ask for it; a peer's D bit stops our periodic packets
  while both are Up, as 6.8.7 requires), the Echo function (RequiredMinEchoRx is sent as 0).

Two deliberate choices beyond the letter of the RFC, both to make announcements fast:
- a local state change sends one packet at once (as FRR's bfdd does) instead of waiting for the
  next periodic slot, which while not Up is up to a second away;
- `enable()` (leaving AdminDown) starts a Poll sequence, so a peer with a slow idle interval
  (BIRD: 1 s) answers at once with its new state instead of on its own next periodic packet.

RFC 5881: packets go to UDP port 3784 from a source port in 49152..65535 with TTL 255, and a
received packet with a TTL below 255 is discarded (`datagram` / `parse_datagram` below).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

from l4lb.checksum import checksum

VERSION = 1
CONTROL_PORT = 3784  # RFC 5881 4: single-hop control packets
SOURCE_PORT_MIN = 49152  # RFC 5881 4: source port range 49152..65535
TTL = 255  # RFC 5881 5: sent with 255, received with anything less discarded
IDLE_TX = 1.0  # RFC 5880 6.8.3: DesiredMinTxInterval while not Up, at least one second

# RFC 5880 4.1, the mandatory section: vers|diag, sta|P|F|C|A|D|M, detect mult, length,
# my discriminator, your discriminator, desired min TX, required min RX, required min echo RX
# (intervals in microseconds).
CONTROL = struct.Struct("!BBBBIIIII")
# IPv4 header (no options) and UDP header, for the datagrams a TUN device carries.
IPV4 = struct.Struct("!BBHHHBBH4s4s")
UDP = struct.Struct("!HHHH")
IPPROTO_UDP = 17

FLAG_POLL = 0x20
FLAG_FINAL = 0x10
FLAG_CPI = 0x08
FLAG_AUTH = 0x04
FLAG_DEMAND = 0x02
FLAG_MULTIPOINT = 0x01


class State(IntEnum):
    """bfd.SessionState (RFC 5880 4.1 "Sta")."""

    ADMIN_DOWN = 0
    DOWN = 1
    INIT = 2
    UP = 3


class Diag(IntEnum):
    """bfd.LocalDiag (RFC 5880 4.1): why the session last left Up."""

    NONE = 0
    TIME_EXPIRED = 1
    ECHO_FAILED = 2
    NEIGHBOR_DOWN = 3
    FORWARDING_RESET = 4
    PATH_DOWN = 5
    CONCATENATED_PATH_DOWN = 6
    ADMIN_DOWN = 7
    REVERSE_CONCATENATED_PATH_DOWN = 8


class Discard(IntEnum):
    """Why a received packet was discarded (RFC 5880 6.8.6, and RFC 5881 for the datagram)."""

    TOO_SHORT = 0
    """Fewer than 24 bytes, or a length field below 24 (26 with the A bit)."""
    BAD_VERSION = 1
    """Version field is not 1."""
    BAD_LENGTH = 2
    """Length field beyond the bytes received."""
    ZERO_DETECT_MULT = 3
    """Detect Mult is 0."""
    MULTIPOINT = 4
    """The M bit is set."""
    ZERO_MY_DISCRIMINATOR = 5
    """My Discriminator is 0."""
    UNKNOWN_SESSION = 6
    """Your Discriminator is neither 0 nor ours."""
    BAD_INITIAL_STATE = 7
    """Your Discriminator is 0 but the state is Init or Up."""
    AUTHENTICATION = 8
    """The A bit is set (this session uses no authentication)."""
    ADMIN_DOWN = 9
    """We are AdminDown: every packet is discarded after its fields are recorded."""
    POLL_AND_FINAL = 10
    """Both P and F set (6.5: a Final packet never polls)."""
    NOT_BFD = 11
    """Not IPv4 UDP to port 3784 (another datagram on the device)."""
    BAD_TTL = 12
    """TTL (IPv4) below 255: not from a directly connected peer (RFC 5881 5)."""


class BfdError(ValueError):
    """A packet that cannot be decoded; `reason` says why."""

    def __init__(self, reason: Discard, detail: str) -> None:
        super().__init__(f"{reason.name.lower()}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class ControlPacket:
    """The mandatory section of a BFD control packet. Intervals in microseconds, as on the
    wire."""

    state: State
    my_discriminator: int
    your_discriminator: int
    desired_min_tx_us: int
    required_min_rx_us: int
    detect_mult: int
    diag: Diag = Diag.NONE
    poll: bool = False
    final: bool = False
    demand: bool = False
    cpi: bool = False
    """Control Plane Independent: we are not (BFD runs in the LB's own process)."""
    required_min_echo_rx_us: int = 0
    auth: bool = False
    multipoint: bool = False
    version: int = VERSION
    length: int = CONTROL.size

    def encode(self) -> bytes:
        flags = (
            (FLAG_POLL if self.poll else 0)
            | (FLAG_FINAL if self.final else 0)
            | (FLAG_CPI if self.cpi else 0)
            | (FLAG_AUTH if self.auth else 0)
            | (FLAG_DEMAND if self.demand else 0)
            | (FLAG_MULTIPOINT if self.multipoint else 0)
        )
        return CONTROL.pack(
            (self.version << 5) | int(self.diag),
            (int(self.state) << 6) | flags,
            self.detect_mult,
            self.length,
            self.my_discriminator,
            self.your_discriminator,
            self.desired_min_tx_us,
            self.required_min_rx_us,
            self.required_min_echo_rx_us,
        )


def decode(data: bytes | memoryview) -> ControlPacket:
    """Parse a control packet and apply the checks of RFC 5880 6.8.6 that need no session
    (items 1-6 and the A bit); raises BfdError with the reason."""
    if len(data) < CONTROL.size:
        raise BfdError(Discard.TOO_SHORT, f"{len(data)} bytes")
    vd, sf, mult, length, mine, yours, tx, rx, echo = CONTROL.unpack_from(data)
    version, diag = vd >> 5, vd & 0x1F
    if version != VERSION:
        raise BfdError(Discard.BAD_VERSION, f"version {version}")
    auth = bool(sf & FLAG_AUTH)
    if length < CONTROL.size + (2 if auth else 0):
        raise BfdError(Discard.TOO_SHORT, f"length field {length}")
    if length > len(data):
        raise BfdError(Discard.BAD_LENGTH, f"length field {length} > {len(data)} bytes")
    if mult == 0:
        raise BfdError(Discard.ZERO_DETECT_MULT, "detect mult 0")
    if sf & FLAG_MULTIPOINT:
        raise BfdError(Discard.MULTIPOINT, "M bit set")
    if mine == 0:
        raise BfdError(Discard.ZERO_MY_DISCRIMINATOR, "my discriminator 0")
    if auth:
        raise BfdError(Discard.AUTHENTICATION, "A bit set, no authentication configured")
    if sf & FLAG_POLL and sf & FLAG_FINAL:
        raise BfdError(Discard.POLL_AND_FINAL, "P and F both set")
    try:
        diag_v = Diag(diag)
    except ValueError:
        diag_v = Diag.NONE  # reserved diagnostic codes carry no meaning for the receiver
    return ControlPacket(
        state=State(sf >> 6),
        my_discriminator=mine,
        your_discriminator=yours,
        desired_min_tx_us=tx,
        required_min_rx_us=rx,
        detect_mult=mult,
        diag=diag_v,
        poll=bool(sf & FLAG_POLL),
        final=bool(sf & FLAG_FINAL),
        demand=bool(sf & FLAG_DEMAND),
        cpi=bool(sf & FLAG_CPI),
        required_min_echo_rx_us=echo,
        length=length,
    )


# --- the IPv4/UDP datagram around it (RFC 5881) ----------------------------------------------


@dataclass(frozen=True)
class Datagram:
    src: str
    dst: str
    sport: int
    dport: int
    ttl: int
    payload: bytes


def datagram(src: str, dst: str, sport: int, payload: bytes, dport: int = CONTROL_PORT) -> bytes:
    """An IPv4/UDP datagram carrying `payload`, TTL 255, both checksums filled in."""
    s, d = ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed
    ulen = UDP.size + len(payload)
    pseudo = s + d + struct.pack("!BBH", 0, IPPROTO_UDP, ulen)
    ucsum = checksum(pseudo + UDP.pack(sport, dport, ulen, 0) + payload) or 0xFFFF
    total = IPV4.size + ulen
    header = IPV4.pack(0x45, 0xC0, total, 0, 0x4000, TTL, IPPROTO_UDP, 0, s, d)
    # TOS 0xC0: precedence Internetwork Control, as routing protocols (and BIRD's BFD) send.
    header = header[:10] + checksum(header).to_bytes(2, "big") + header[12:]
    return header + UDP.pack(sport, dport, ulen, ucsum) + payload


def parse_datagram(packet: bytes | memoryview) -> Datagram:
    """The UDP datagram in an IPv4 packet; BfdError(NOT_BFD) for anything else, BfdError(BAD_TTL)
    for a single-hop control packet that crossed a router."""
    if len(packet) < IPV4.size + UDP.size:
        raise BfdError(Discard.NOT_BFD, f"{len(packet)} bytes")
    vihl, _tos, total, _id, frag, ttl, proto, _csum, s, d = IPV4.unpack_from(packet)
    hl = (vihl & 0x0F) * 4
    if vihl >> 4 != 4 or hl < IPV4.size or proto != IPPROTO_UDP or frag & 0x3FFF:
        raise BfdError(Discard.NOT_BFD, "not an unfragmented IPv4 UDP packet")
    if total > len(packet) or total < hl + UDP.size:
        raise BfdError(Discard.NOT_BFD, f"IPv4 total length {total}, {len(packet)} bytes")
    sport, dport, ulen, _ = UDP.unpack_from(packet, hl)
    if dport != CONTROL_PORT:
        raise BfdError(Discard.NOT_BFD, f"UDP port {dport}")
    if ttl != TTL:
        raise BfdError(Discard.BAD_TTL, f"TTL {ttl}")
    end = min(total, hl + max(ulen, UDP.size))
    return Datagram(
        str(ipaddress.IPv4Address(s)),
        str(ipaddress.IPv4Address(d)),
        sport,
        dport,
        ttl,
        bytes(packet[hl + UDP.size : end]),
    )


# --- the session ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionConfig:
    """Timers of one session (seconds)."""

    desired_min_tx: float = 0.1
    """bfd.DesiredMinTxInterval while Up: how often we promise to send."""
    required_min_rx: float = 0.1
    """bfd.RequiredMinRxInterval: how often we can take the peer's packets."""
    detect_mult: int = 3
    """bfd.DetectMult: the peer declares us dead after this many intervals without a packet."""

    def __post_init__(self) -> None:
        for name in ("desired_min_tx", "required_min_rx"):
            v = getattr(self, name)
            if not 0.001 <= v <= 60:
                raise ValueError(f"{name} {v!r} s: must be within 0.001..60")
        if not 1 <= self.detect_mult <= 255:
            raise ValueError(f"detect_mult {self.detect_mult!r}: must be within 1..255")


def _us(seconds: float) -> int:
    return round(seconds * 1_000_000)


@dataclass(frozen=True)
class Transition:
    """One change of bfd.SessionState."""

    time: float
    old: State
    new: State
    diag: Diag


class Session:
    """One BFD session with one peer (RFC 5880 6.8.1 variables), driven by `receive`,
    `handle_timer` and `packets_to_send`; `next_deadline` says when to call back.

    `rng()` returns a float in [0, 1) for the transmit jitter (inject a seeded one in tests).
    `admin_down`: start withdrawn (AdminDown) instead of Down.
    """

    def __init__(
        self,
        config: SessionConfig,
        my_discriminator: int,
        now: float,
        rng: Callable[[], float],
        admin_down: bool = False,
    ) -> None:
        if not 1 <= my_discriminator < 2**32:
            raise ValueError("my_discriminator must be within 1..2**32-1")
        self.config = config
        self.my_discriminator = my_discriminator
        self.rng = rng
        self.state = State.ADMIN_DOWN if admin_down else State.DOWN
        self.local_diag = Diag.ADMIN_DOWN if admin_down else Diag.NONE
        self.since = now
        """When the session entered its current state."""
        self.remote_state = State.DOWN
        self.remote_discriminator = 0
        self.remote_min_rx_us = 1  # 6.8.1: initialised to 1
        self.remote_min_tx_us = 0
        self.remote_detect_mult = 0  # 0: nothing heard, no detection timer
        self.remote_demand = False
        self.last_seen_state: State | None = None
        """The state in the peer's last packet for this session, recorded also while AdminDown
        discards them: after our AdminDown, Down here means the peer has seen the withdraw."""
        self.last_rx: float | None = None
        self.transitions: list[Transition] = []
        self.discards: dict[Discard, int] = {}
        self.received = 0
        self.sent = 0
        self._poll_active = False
        self._send_final = False
        self._send_now = False
        self._next_tx = now  # the first packet goes out at once
        self._advertised = self._timers()

    # -- what we advertise --------------------------------------------------------------

    @property
    def desired_min_tx_us(self) -> int:
        """bfd.DesiredMinTxInterval: the configured one when Up, at least 1 s otherwise."""
        tx = self.config.desired_min_tx
        return _us(tx if self.state == State.UP else max(tx, IDLE_TX))

    @property
    def required_min_rx_us(self) -> int:
        return _us(self.config.required_min_rx)

    @property
    def poll_active(self) -> bool:
        return self._poll_active

    def _timers(self) -> tuple[int, int]:
        return (self.desired_min_tx_us, self.required_min_rx_us)

    def _set_state(self, new: State, diag: Diag, now: float) -> None:
        if new == self.state:
            return
        self.transitions.append(Transition(now, self.state, new, diag))
        self.state, self.local_diag, self.since = new, diag, now
        self._send_now = True
        if self._timers() != self._advertised:
            self._advertised = self._timers()
            self._poll_active = True  # 6.8.3: a timer change starts a Poll sequence

    # -- inputs -------------------------------------------------------------------------

    def receive(self, pkt: ControlPacket, now: float) -> Discard | None:
        """RFC 5880 6.8.6 for a decoded packet (`decode` made the checks that need no session).
        Returns why it was discarded, or None."""
        if pkt.your_discriminator not in (0, self.my_discriminator):
            return self._discard(Discard.UNKNOWN_SESSION)
        if pkt.your_discriminator == 0 and pkt.state not in (State.DOWN, State.ADMIN_DOWN):
            return self._discard(Discard.BAD_INITIAL_STATE)
        self.last_seen_state = pkt.state
        self.remote_discriminator = pkt.my_discriminator
        self.remote_state = pkt.state
        self.remote_demand = pkt.demand
        self.remote_min_rx_us = pkt.required_min_rx_us
        self.remote_min_tx_us = pkt.desired_min_tx_us
        self.remote_detect_mult = pkt.detect_mult
        if pkt.final:
            self._poll_active = False  # 6.5: the Final ends our Poll sequence
        self.last_rx = now
        if self.state == State.ADMIN_DOWN:
            return self._discard(Discard.ADMIN_DOWN)
        self.received += 1
        if pkt.state == State.ADMIN_DOWN:
            if self.state != State.DOWN:
                self._set_state(State.DOWN, Diag.NEIGHBOR_DOWN, now)
        elif self.state == State.DOWN:
            if pkt.state == State.DOWN:
                self._set_state(State.INIT, Diag.NONE, now)
            elif pkt.state == State.INIT:
                self._set_state(State.UP, Diag.NONE, now)
        elif self.state == State.INIT:
            if pkt.state in (State.INIT, State.UP):
                self._set_state(State.UP, Diag.NONE, now)
        elif pkt.state == State.DOWN:  # we are Up
            self._set_state(State.DOWN, Diag.NEIGHBOR_DOWN, now)
        if pkt.poll:
            self._send_final = True
        return None

    def _discard(self, why: Discard) -> Discard:
        self.discards[why] = self.discards.get(why, 0) + 1
        return why

    def count_discard(self, why: Discard) -> None:
        """Count a packet the caller could not decode (`BfdError.reason`)."""
        self._discard(why)

    def set_admin_down(self, now: float) -> None:
        """Withdraw (6.8.16): AdminDown with diag 7; the peer's session goes Down."""
        self._set_state(State.ADMIN_DOWN, Diag.ADMIN_DOWN, now)

    def enable(self, now: float) -> None:
        """Leave AdminDown for Down, and poll so that the peer answers at once."""
        if self.state == State.ADMIN_DOWN:
            self._set_state(State.DOWN, Diag.NONE, now)
            self._poll_active = True

    @property
    def detection_time(self) -> float | None:
        """6.8.4, asynchronous mode, in seconds; None while nothing is heard from the peer."""
        if self.remote_detect_mult == 0:
            return None
        interval = max(self.required_min_rx_us, self.remote_min_tx_us)
        return self.remote_detect_mult * interval / 1_000_000

    def handle_timer(self, now: float) -> None:
        """The detection timer: no packet for a detection time takes Init or Up Down (diag 1)
        and forgets the peer (6.8.1: bfd.RemoteDiscr back to 0)."""
        dt = self.detection_time
        if dt is None or self.last_rx is None or now < self.last_rx + dt:
            return
        if self.state in (State.INIT, State.UP):
            self._set_state(State.DOWN, Diag.TIME_EXPIRED, now)
        self.remote_discriminator = 0
        self.remote_state = State.DOWN
        self.remote_detect_mult = 0
        self.remote_min_rx_us = 1
        self.remote_demand = False

    # -- outputs ------------------------------------------------------------------------

    def _interval(self) -> float:
        return max(self.desired_min_tx_us, self.remote_min_rx_us) / 1_000_000

    def _periodic_allowed(self) -> bool:
        if self.remote_min_rx_us == 0:
            return False  # 6.8.7: the peer asked for no packets
        both_up = self.state == State.UP and self.remote_state == State.UP
        return not (self.remote_demand and both_up and not self._poll_active)

    def packets_to_send(self, now: float) -> list[ControlPacket]:
        """The packet due now, if any: a Final answer to a Poll, one for a state change, or the
        periodic one. Each resets the periodic timer (interval less the jitter of 6.8.7)."""
        due = self._periodic_allowed() and now >= self._next_tx
        if not (self._send_final or self._send_now or due):
            return []
        pkt = ControlPacket(
            state=self.state,
            my_discriminator=self.my_discriminator,
            your_discriminator=self.remote_discriminator,
            desired_min_tx_us=self.desired_min_tx_us,
            required_min_rx_us=self.required_min_rx_us,
            detect_mult=self.config.detect_mult,
            diag=self.local_diag,
            poll=self._poll_active and not self._send_final,
            final=self._send_final,
        )
        self._send_final = self._send_now = False
        r = self.rng()
        jitter = 0.10 + 0.15 * r if self.config.detect_mult == 1 else 0.25 * r
        self._next_tx = now + self._interval() * (1 - jitter)
        self.sent += 1
        return [pkt]

    def next_deadline(self) -> float:
        """When `handle_timer` / `packets_to_send` next have something to do (the caller's
        clock; 0.0 when a packet is due at once, inf when nothing ever is)."""
        if self._send_final or self._send_now:
            return 0.0
        times = [self._next_tx] if self._periodic_allowed() else []
        dt = self.detection_time
        if dt is not None and self.last_rx is not None:
            times.append(self.last_rx + dt)
        return min(times, default=float("inf"))
