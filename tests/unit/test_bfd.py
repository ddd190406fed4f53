"""fastpath.bfd: the control packet against scapy's BFD layer and RFC 5880's rules, the session
state machine (two sessions talking, as aioquic's tests wire a client to a server), timers."""

from __future__ import annotations

import itertools
import random
import struct
from dataclasses import replace

import pytest
from scapy.contrib.bfd import BFD
from scapy.layers.inet import IP, UDP

from fastpath import bfd
from fastpath.bfd import ControlPacket, Diag, Discard, Session, SessionConfig, State

CFG = SessionConfig(desired_min_tx=0.1, required_min_rx=0.1, detect_mult=3)


def pkt(**kw: object) -> ControlPacket:
    base: dict = dict(
        state=State.DOWN,
        my_discriminator=7,
        your_discriminator=0,
        desired_min_tx_us=1_000_000,
        required_min_rx_us=100_000,
        detect_mult=3,
    )
    base.update(kw)
    return ControlPacket(**base)


# --- codec ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ours", "scapy_pkt"),
    [
        (
            pkt(state=State.INIT, poll=True, diag=Diag.NEIGHBOR_DOWN, your_discriminator=9,
                desired_min_tx_us=100_000, required_min_rx_us=200_000),
            BFD(sta=2, flags="P", diag=3, my_discriminator=7, your_discriminator=9,
                min_tx_interval=100_000, min_rx_interval=200_000, echo_rx_interval=0),
        ),
        (
            pkt(state=State.UP, final=True, detect_mult=5, my_discriminator=2**32 - 1),
            BFD(sta=3, flags="F", detect_mult=5, my_discriminator=2**32 - 1,
                your_discriminator=0, min_tx_interval=1_000_000, min_rx_interval=100_000,
                echo_rx_interval=0),
        ),
        (
            pkt(state=State.ADMIN_DOWN, diag=Diag.ADMIN_DOWN, demand=True, cpi=True),
            BFD(sta=0, flags="CD", diag=7, my_discriminator=7, your_discriminator=0,
                min_tx_interval=1_000_000, min_rx_interval=100_000, echo_rx_interval=0),
        ),
    ],
)  # fmt: skip
def test_encode_matches_scapy_and_decodes_back(ours: ControlPacket, scapy_pkt: BFD) -> None:
    assert ours.encode() == bytes(scapy_pkt)
    assert bfd.decode(bytes(scapy_pkt)) == ours


def test_decode_takes_a_longer_buffer_and_reserved_diag() -> None:
    raw = bytearray(pkt().encode() + b"\xff" * 8)
    raw[0] = (1 << 5) | 31  # a reserved diagnostic code
    assert bfd.decode(bytes(raw)).diag == Diag.NONE


def _raw(**changes: int) -> bytes:
    """A valid packet's 24 bytes with fields replaced (vd, sf, mult, length, mine, yours)."""
    fields = dict(vd=0x20, sf=State.DOWN << 6, mult=3, length=24, mine=7, yours=0)
    fields.update(changes)
    f = fields
    return bfd.CONTROL.pack(
        f["vd"], f["sf"], f["mult"], f["length"], f["mine"], f["yours"], 1_000_000, 100_000, 0
    )


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x20" * 23, Discard.TOO_SHORT),
        (_raw(vd=0x40), Discard.BAD_VERSION),  # version 2
        (_raw(length=20), Discard.TOO_SHORT),
        (_raw(length=25), Discard.BAD_LENGTH),
        (_raw(mult=0), Discard.ZERO_DETECT_MULT),
        (_raw(sf=(State.DOWN << 6) | bfd.FLAG_MULTIPOINT), Discard.MULTIPOINT),
        (_raw(mine=0), Discard.ZERO_MY_DISCRIMINATOR),
        (_raw(sf=(State.DOWN << 6) | bfd.FLAG_AUTH, length=24), Discard.TOO_SHORT),
        (_raw(sf=(State.DOWN << 6) | bfd.FLAG_AUTH, length=26) + b"\1\2", Discard.AUTHENTICATION),
        (_raw(sf=(State.DOWN << 6) | bfd.FLAG_POLL | bfd.FLAG_FINAL), Discard.POLL_AND_FINAL),
    ],
)  # fmt: skip
def test_decode_discards_by_rfc_5880_6_8_6(data: bytes, reason: Discard) -> None:
    with pytest.raises(bfd.BfdError) as exc:
        bfd.decode(data)
    assert exc.value.reason == reason


def test_datagram_checksums_and_fields_checked_by_scapy() -> None:
    payload = pkt().encode()
    raw = bfd.datagram("169.254.0.2", "169.254.0.1", 49999, payload)
    p = IP(raw)
    assert p.ttl == 255 and p.src == "169.254.0.2" and p.dst == "169.254.0.1"
    assert p[UDP].sport == 49999 and p[UDP].dport == bfd.CONTROL_PORT
    # scapy recomputes both checksums when they are deleted: ours must be the same
    ref = IP(raw)
    del ref.chksum, ref[UDP].chksum
    assert bytes(IP(bytes(ref))) == raw
    assert bfd.decode(bytes(p[UDP].payload)) == pkt()


def test_parse_datagram_reads_scapy_packets_and_refuses_others() -> None:
    good = IP(src="169.254.0.1", dst="169.254.0.2", ttl=255) / UDP(sport=50000, dport=3784)
    d = bfd.parse_datagram(bytes(good / BFD(bytes(pkt().encode()))))
    assert (d.src, d.dst, d.sport, d.dport) == ("169.254.0.1", "169.254.0.2", 50000, 3784)
    assert bfd.decode(d.payload) == pkt()
    bad = [
        (bytes(IP(ttl=254) / UDP(dport=3784) / (b"x" * 24)), Discard.BAD_TTL),
        (bytes(IP(ttl=255) / UDP(dport=4784) / (b"x" * 24)), Discard.NOT_BFD),
        (bytes(IP(ttl=255, proto=6) / (b"\0" * 30)), Discard.NOT_BFD),
        (bytes(IP(ttl=255, flags="MF") / UDP(dport=3784) / (b"x" * 24)), Discard.NOT_BFD),
        (b"\x60" + b"\0" * 47, Discard.NOT_BFD),  # IPv6 (a router solicitation, say)
        (b"\x45\0\0", Discard.NOT_BFD),
    ]  # fmt: skip
    for data, reason in bad:
        with pytest.raises(bfd.BfdError) as exc:
            bfd.parse_datagram(data)
        assert exc.value.reason == reason, data


# --- the session ----------------------------------------------------------------------------


class Link:
    """Two sessions wired back to back through the codec, with one clock."""

    def __init__(self, a: Session, b: Session) -> None:
        self.a, self.b = a, b
        self.mute_b = False  # b's packets are lost (b hung)
        self.log: list[tuple[float, str, ControlPacket]] = []

    def step(self, now: float) -> None:
        for src, dst, name in ((self.a, self.b, "a"), (self.b, self.a, "b")):
            src.handle_timer(now)
            for p in src.packets_to_send(now):
                self.log.append((now, name, p))
                if name == "b" and self.mute_b:
                    continue
                dst.receive(bfd.decode(p.encode()), now)

    def run(self, start: float, end: float, tick: float = 0.005) -> None:
        t = start
        while t <= end:
            self.step(t)
            t = round(t + tick, 6)


def pair(a_admin_down: bool = False) -> Link:
    rng = random.Random(1).random
    return Link(
        Session(CFG, 0xA, 0.0, rng, admin_down=a_admin_down),
        Session(CFG, 0xB, 0.0, random.Random(2).random),
    )


def test_three_way_handshake_reaches_up_at_once_and_polls_for_fast_timers() -> None:
    link = pair()
    link.run(0.0, 0.02)
    assert link.a.state == link.b.state == State.UP
    # a spoke first: b went Init on a's Down, a Up on b's Init, b Up on a's Up
    assert [t.new for t in link.a.transitions] == [State.UP]
    assert [t.new for t in link.b.transitions] == [State.INIT, State.UP]
    # Up: the advertised interval drops from 1 s to 100 ms, announced by a Poll sequence
    # that the peer's Final ended
    assert link.a.desired_min_tx_us == 100_000
    assert any(p.poll for _, n, p in link.log if n == "a")
    assert any(p.final for _, n, p in link.log if n == "b")
    link.run(0.02, 0.5)
    assert not link.a.poll_active and not link.b.poll_active
    assert link.a.detection_time == pytest.approx(0.3)


def test_periodic_interval_has_the_jitter_of_6_8_7() -> None:
    link = pair()
    link.run(0.0, 3.0)
    sent = [t for t, n, _ in link.log if n == "a" and t > 1.0]
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(sent)]
    assert gaps and all(0.075 <= g <= 0.105 for g in gaps), gaps  # 75-100% of 100 ms (+tick)
    one = Session(replace(CFG, detect_mult=1), 1, 0.0, lambda: 0.999)
    one.receive(pkt(state=State.DOWN, required_min_rx_us=100_000), 0.0)
    one.packets_to_send(0.0)
    assert one.next_deadline() == pytest.approx(1.0 * (1 - 0.10 - 0.15 * 0.999))  # >= 75%
    one2 = Session(replace(CFG, detect_mult=1), 1, 0.0, lambda: 0.0)
    one2.packets_to_send(0.0)
    assert one2.next_deadline() == pytest.approx(0.9)  # at most 90% with a multiplier of 1


def test_not_up_advertises_at_least_one_second_and_slow_peer_sets_the_pace() -> None:
    s = Session(CFG, 1, 0.0, lambda: 0.0)
    assert s.state == State.DOWN and s.desired_min_tx_us == 1_000_000
    s.receive(pkt(state=State.INIT, your_discriminator=1, required_min_rx_us=2_000_000), 0.0)
    assert s.state == State.UP and s.desired_min_tx_us == 100_000
    s.packets_to_send(0.0)
    assert s.next_deadline() == pytest.approx(2.0)  # max(ours, the peer's RequiredMinRx)


def test_no_periodic_packets_when_the_peer_wants_none() -> None:
    s = Session(CFG, 1, 0.0, lambda: 0.0)
    s.receive(pkt(required_min_rx_us=0), 0.0)
    assert s.state == State.INIT
    assert len(s.packets_to_send(0.0)) == 1  # the state change still goes out once
    assert s.packets_to_send(5.0) == []


def test_silent_peer_is_detected_after_multiplier_times_interval() -> None:
    link = pair()
    link.run(0.0, 1.0)
    assert link.a.state == State.UP
    link.mute_b = True
    link.run(1.0, 2.0)
    down = [t for t in link.a.transitions if t.new == State.DOWN]
    assert len(down) == 1 and down[0].diag == Diag.TIME_EXPIRED
    assert 1.2 <= down[0].time <= 1.31  # 3 x 100 ms after b's last packet
    assert link.a.remote_discriminator == 0
    link.mute_b = False
    link.run(2.0, 4.0)
    assert link.a.state == link.b.state == State.UP


def test_admin_down_takes_the_peer_down_and_enable_brings_it_back_at_once() -> None:
    link = pair()
    link.run(0.0, 1.0)
    link.a.set_admin_down(1.0)
    link.run(1.0, 1.05)
    assert link.a.state == State.ADMIN_DOWN and link.a.local_diag == Diag.ADMIN_DOWN
    assert link.b.state == State.DOWN and link.b.local_diag == Diag.NEIGHBOR_DOWN
    assert link.a.last_seen_state == State.DOWN  # the peer acknowledged
    assert link.a.discards.get(Discard.ADMIN_DOWN, 0) >= 1
    link.run(1.05, 3.0)
    assert link.b.state == State.DOWN, "AdminDown keeps the peer down"
    link.a.enable(3.0)
    link.run(3.0, 3.02)  # the poll makes b answer at once, not on its 1 s idle interval
    assert link.a.state == link.b.state == State.UP


def test_starting_admin_down_never_comes_up() -> None:
    link = pair(a_admin_down=True)
    link.run(0.0, 3.0)
    assert link.a.state == State.ADMIN_DOWN and link.b.state == State.DOWN
    assert all(p.state == State.ADMIN_DOWN for _, n, p in link.log if n == "a")


def test_poll_is_answered_with_final_and_never_both() -> None:
    s = Session(CFG, 1, 0.0, lambda: 0.0)
    s.packets_to_send(0.0)
    s.receive(pkt(state=State.DOWN, poll=True), 0.1)
    assert s.next_deadline() == 0.0  # due at once
    (answer,) = s.packets_to_send(0.1)
    assert answer.final and not answer.poll and answer.state == State.INIT
    assert answer.your_discriminator == 7


@pytest.mark.parametrize(
    ("incoming", "reason"),
    [
        (pkt(your_discriminator=99), Discard.UNKNOWN_SESSION),
        (pkt(state=State.UP, your_discriminator=0), Discard.BAD_INITIAL_STATE),
        (pkt(state=State.INIT, your_discriminator=0), Discard.BAD_INITIAL_STATE),
    ],
)
def test_session_discards(incoming: ControlPacket, reason: Discard) -> None:
    s = Session(CFG, 1, 0.0, lambda: 0.0)
    assert s.receive(incoming, 0.0) == reason
    assert s.state == State.DOWN and s.discards == {reason: 1} and s.received == 0


@pytest.mark.parametrize(
    ("ours", "theirs", "after"),
    [
        (State.DOWN, State.ADMIN_DOWN, State.DOWN),
        (State.DOWN, State.DOWN, State.INIT),
        (State.DOWN, State.INIT, State.UP),
        (State.DOWN, State.UP, State.DOWN),
        (State.INIT, State.ADMIN_DOWN, State.DOWN),
        (State.INIT, State.DOWN, State.INIT),
        (State.INIT, State.INIT, State.UP),
        (State.INIT, State.UP, State.UP),
        (State.UP, State.ADMIN_DOWN, State.DOWN),
        (State.UP, State.DOWN, State.DOWN),
        (State.UP, State.INIT, State.UP),
        (State.UP, State.UP, State.UP),
    ],
)
def test_state_table_of_6_8_6(ours: State, theirs: State, after: State) -> None:
    s = Session(CFG, 1, 0.0, lambda: 0.0)
    if ours != State.DOWN:
        s.receive(pkt(state=State.DOWN), 0.0)  # -> Init
    if ours == State.UP:
        s.receive(pkt(state=State.UP, your_discriminator=1), 0.0)
    assert s.state == ours
    s.receive(pkt(state=theirs, your_discriminator=1), 0.01)
    assert s.state == after


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="detect_mult"):
        SessionConfig(detect_mult=0)
    with pytest.raises(ValueError, match="desired_min_tx"):
        SessionConfig(desired_min_tx=0)
    with pytest.raises(ValueError, match="my_discriminator"):
        Session(CFG, 0, 0.0, lambda: 0.0)


def test_control_struct_is_the_rfc_layout() -> None:
    assert bfd.CONTROL.size == 24
    raw = pkt(state=State.UP, poll=True).encode()
    vd, sf = struct.unpack_from("!BB", raw)
    assert vd == 0x20 and sf == (3 << 6) | 0x20
