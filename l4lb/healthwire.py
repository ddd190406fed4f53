"""The health probe and its reply: the bytes an LB tunnels to an agent and the agent answers.

An LB sends each backend, every interval, an inner UDP datagram from its own address to
VIP:port, IP-in-IP to the backend's address exactly as client traffic goes (fastpath.health),
so an answer proves the tunnel, the agent's decapsulation and delivery to the VIP. The agent
answers from VIP:port straight to the LB (DSR) with its verdict on its server (agent.health),
and pushes the same reply, unasked, to every LB that probed it recently when the verdict
changes.

    probe  magic "L4HC", version 1, type 1, flags 0, token, seq, backend address   (20 bytes)
    reply  the same 20 bytes with type 2 (reply) or 3 (push), then: verdict, flags
           (bit 0: held down by dampening), detail length, pad, agent instance, verdict age
           in ms, failed checks so far, then the detail (UTF-8, at most DETAIL_MAX bytes)

`token` is a random number the LB draws at start and the agent echoes: a reply that does not
carry it was not sent in answer to this LB (an off-path forger would have to guess 32 bits).
`seq` numbers the LB's probes; a push carries the last seq the agent saw from that LB.
Decoding checks everything and raises WireError with a reason that the receiver counts.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass
from struct import Struct
from typing import Any

from l4lb.checksum import checksum
from l4lb.wire import IP_DF, IPPROTO_UDP, IPV4, IPV4_HLEN, IPV4_VIHL, UDP, UDP_HLEN

MAGIC = b"L4HC"
VERSION = 1
# Magic, version, type, flags, token, sequence number, backend address (4 bytes).
PROBE = Struct("!4sBBHII4s")
# The probe's fields, then verdict, flags, detail length, pad, agent instance, verdict age
# (ms), failed checks so far.
REPLY = Struct("!4sBBHII4sBBBxIII")
DETAIL_MAX = 96
FLAG_SUPPRESSED = 1


class Kind(enum.IntEnum):
    PROBE = 1
    REPLY = 2
    PUSH = 3


class Verdict(enum.IntEnum):
    """The agent's judgment of its server."""

    UNKNOWN = 0
    """No check has finished yet (an LB keeps what it believed)."""
    UP = 1
    DOWN = 2


class BadMessage(enum.Enum):
    """Why a probe or reply was ignored (each counted by the receiver)."""

    SHORT = "short"
    """Fewer bytes than the fixed part."""
    BAD_MAGIC = "bad_magic"
    BAD_VERSION = "bad_version"
    BAD_KIND = "bad_kind"
    """A type that does not belong here (a reply sent to an agent, a probe to an LB)."""
    BAD_LENGTH = "bad_length"
    """The detail length disagrees with the datagram's length."""
    BAD_VERDICT = "bad_verdict"
    BAD_DETAIL = "bad_detail"
    """The detail is not UTF-8."""
    WRONG_TOKEN = "wrong_token"
    """Not an answer to this LB's probes."""
    WRONG_BACKEND = "wrong_backend"
    """Names a backend this receiver does not probe (LB) or is not (agent)."""
    WRONG_SOURCE = "wrong_source"
    """Came from somewhere else than a VIP's health port."""


class WireError(ValueError):
    def __init__(self, reason: BadMessage, detail: str = "") -> None:
        super().__init__(f"{reason.value}{': ' + detail if detail else ''}")
        self.reason = reason


@dataclass(frozen=True)
class Probe:
    token: int
    seq: int
    backend: bytes
    """The backend's address (4 bytes) the LB sent the probe to."""


@dataclass(frozen=True)
class Reply:
    kind: Kind
    """REPLY (to a probe) or PUSH (the verdict changed)."""
    token: int
    seq: int
    backend: bytes
    verdict: Verdict
    suppressed: bool
    """Held down by dampening (the verdict is then DOWN)."""
    instance: int
    """Random per agent start: a change means the agent restarted."""
    age_ms: int
    """Milliseconds since the verdict last changed."""
    check_failures: int
    """Failed checks since the agent started."""
    detail: str
    """The last check's outcome, e.g. "HTTP/1.0 200 OK in 0.9 ms"."""


def encode_probe(p: Probe) -> bytes:
    return PROBE.pack(MAGIC, VERSION, Kind.PROBE, 0, p.token, p.seq, p.backend)


def _header(data: bytes, fmt: Struct, kinds: tuple[Kind, ...]) -> tuple[Any, ...]:
    if len(data) < fmt.size:
        raise WireError(BadMessage.SHORT, f"{len(data)} bytes")
    fields = fmt.unpack_from(data)
    if fields[0] != MAGIC:
        raise WireError(BadMessage.BAD_MAGIC)
    if fields[1] != VERSION:
        raise WireError(BadMessage.BAD_VERSION, str(fields[1]))
    if fields[2] not in kinds:
        raise WireError(BadMessage.BAD_KIND, str(fields[2]))
    return fields


def decode_probe(data: bytes) -> Probe:
    _m, _v, _k, _f, token, seq, backend = _header(data, PROBE, (Kind.PROBE,))
    if len(data) != PROBE.size:
        raise WireError(BadMessage.BAD_LENGTH, f"{len(data)} bytes")
    return Probe(token, seq, backend)


def encode_reply(r: Reply) -> bytes:
    detail = r.detail.encode("utf-8", "replace")[:DETAIL_MAX]
    detail = detail.decode("utf-8", "ignore").encode()  # never cut inside a character
    flags = FLAG_SUPPRESSED if r.suppressed else 0
    head = REPLY.pack(
        MAGIC, VERSION, r.kind, 0, r.token, r.seq, r.backend, r.verdict, flags, len(detail),
        r.instance, min(r.age_ms, 0xFFFFFFFF), min(r.check_failures, 0xFFFFFFFF),
    )  # fmt: skip
    return head + detail


def decode_reply(data: bytes) -> Reply:
    fields = _header(data, REPLY, (Kind.REPLY, Kind.PUSH))
    _m, _v, kind, _f, token, seq, backend, verdict, flags, n, instance, age, fails = fields
    if len(data) != REPLY.size + n or n > DETAIL_MAX:
        raise WireError(BadMessage.BAD_LENGTH, f"{len(data)} bytes, detail {n}")
    if verdict not in Verdict._value2member_map_:
        raise WireError(BadMessage.BAD_VERDICT, str(verdict))
    try:
        detail = data[REPLY.size :].decode()
    except UnicodeDecodeError:
        raise WireError(BadMessage.BAD_DETAIL) from None
    return Reply(
        Kind(kind), token, seq, backend, Verdict(verdict), bool(flags & FLAG_SUPPRESSED),
        instance, age, fails, detail,
    )  # fmt: skip


_ids = itertools.count(1)


def udp_datagram(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    """An IPv4 + UDP packet (IHL 5, DF, TTL 64, both checksums): the probe's inner packet, which
    the LB's raw IP-in-IP socket wraps in the outer header."""
    ulen = UDP_HLEN + len(payload)
    pseudo = src + dst + bytes((0, IPPROTO_UDP)) + ulen.to_bytes(2, "big")
    ucsum = checksum(pseudo + UDP.pack(sport, dport, ulen, 0) + payload)
    if ucsum == 0:
        ucsum = 0xFFFF  # 0 would mean "no checksum"
    total = IPV4_HLEN + ulen
    ident = next(_ids) & 0xFFFF
    head = IPV4.pack(IPV4_VIHL, 0, total, ident, IP_DF, 64, IPPROTO_UDP, 0, src, dst)
    head = IPV4.pack(IPV4_VIHL, 0, total, ident, IP_DF, 64, IPPROTO_UDP, checksum(head), src, dst)
    return head + UDP.pack(sport, dport, ulen, ucsum) + payload
