"""fastpath.announce without root: the Announcer over a socket pair standing in for its TUN,
against a BFD session playing BIRD (datagrams as BIRD sends them: 169.254.0.1 -> .2:3784, TTL
255), and the CLI's options and health rule. With a real TUN and BIRD: tests/netns."""

from __future__ import annotations

import json
import os
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastpath import announce_cli, bfd
from fastpath.announce import (
    HOST_ADDR,
    LB_ADDR,
    AnnounceConfig,
    Announcer,
    Device,
    tun_name,
)

CFG = bfd.SessionConfig(desired_min_tx=0.1, required_min_rx=0.1, detect_mult=3)


class Bird:
    """A BFD session on the host's side of the 'TUN' (the other end of the socket pair)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.session = bfd.Session(CFG, 0xB1D, 0.0, random.Random(3).random)
        self.port = 49200
        self.seen: list[bfd.ControlPacket] = []

    def step(self, now: float) -> None:
        while True:
            try:
                raw = self.sock.recv(2048)
            except BlockingIOError:
                break
            d = bfd.parse_datagram(raw)
            assert (d.src, d.dst, d.dport, d.ttl) == (LB_ADDR, HOST_ADDR, 3784, 255)
            assert 49152 <= d.sport <= 65535
            p = bfd.decode(d.payload)
            self.seen.append(p)
            self.session.receive(p, now)
        self.session.handle_timer(now)
        for p in self.session.packets_to_send(now):
            self.sock.send(bfd.datagram(HOST_ADDR, LB_ADDR, self.port, p.encode()))


@pytest.fixture()
def pair() -> Iterator[tuple[Announcer, Bird]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setblocking(False)
    b.setblocking(False)
    ann = Announcer(AnnounceConfig(tun="l4an-test", bfd=CFG), 0.0, lambda: 0.5,
                    discriminator=0xA11, device=Device(a.detach(), "l4an-test"))  # fmt: skip
    try:
        yield ann, Bird(b)
    finally:
        ann.close()
        b.close()


def run(ann: Announcer, bird: Bird, start: float, end: float, tick: float = 0.005) -> None:
    t = start
    while t <= end:
        ann.service(t)
        bird.step(t)
        t = round(t + tick, 6)


def test_comes_up_with_bird_and_reports_it(pair: tuple[Announcer, Bird]) -> None:
    ann, bird = pair
    assert ann.fds() == [ann.fd]
    run(ann, bird, 0.0, 0.5)
    st = ann.status()
    assert st.announced and st.bfd_state == "UP" and st.peer_state == "UP" and st.wanted
    assert bird.session.state == bfd.State.UP
    assert st.discarded == {} and st.received > 0 and st.sent > 0


def test_withdraw_is_acknowledged_and_announce_comes_back(pair: tuple[Announcer, Bird]) -> None:
    ann, bird = pair
    run(ann, bird, 0.0, 0.5)
    ann.withdraw(0.5)
    assert not ann.withdraw_confirmed  # not before BIRD has said so
    run(ann, bird, 0.5, 0.6)
    assert bird.session.state == bfd.State.DOWN and ann.withdraw_confirmed
    assert not ann.status().wanted and ann.status().bfd_state == "ADMIN_DOWN"
    ann.announce(1.0)
    run(ann, bird, 1.0, 1.05)
    assert ann.status().announced and bird.session.state == bfd.State.UP


def test_a_loop_that_stops_calling_service_loses_the_session(pair) -> None:
    ann, bird = pair
    run(ann, bird, 0.0, 0.5)
    for i in range(100):  # the holder hangs: only BIRD's side runs
        bird.step(0.5 + i * 0.005)
    assert bird.session.state == bfd.State.DOWN
    assert bird.session.transitions[-1].diag == bfd.Diag.TIME_EXPIRED


def test_other_traffic_on_the_device_is_counted_not_fatal(pair) -> None:
    ann, bird = pair
    bird.sock.send(b"\x60" + b"\0" * 47)  # an IPv6 router solicitation
    bird.sock.send(bfd.datagram("10.9.9.9", LB_ADDR, 50000, b"\0" * 24))  # not from BIRD
    bird.sock.send(bfd.datagram(HOST_ADDR, LB_ADDR, 50000, b"\x20" * 10))  # cut
    ann.service(0.0)
    assert ann.status().discarded == {"too_short": 1, "not_bfd": 2}


def test_service_returns_the_next_deadline(pair) -> None:
    ann, _ = pair
    d = ann.service(0.0)  # the first packet goes at once, the next one in 0.75..1 s
    assert 0.75 <= d <= 1.0


def test_close_is_idempotent(pair) -> None:
    ann, _ = pair
    ann.close()
    ann.close()
    assert ann.fds() == []


def test_names_and_config() -> None:
    assert tun_name("h1-eth0") == "l4an-h1-eth0"
    assert len(tun_name("averylonginterfacename0")) == 15
    with pytest.raises(ValueError, match="TUN name"):
        AnnounceConfig(tun="")
    with pytest.raises(ValueError, match="TUN name"):
        AnnounceConfig(tun="x" * 16)


# --- the CLI -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["h1-eth0", "--interval-ms", "0"], "expected a number >= 1"),
        (["h1-eth0", "--multiplier", "x"], "expected a number >= 1, not 'x'"),
        (["h1-eth0", "--max-age", "0"], "expected a number >= 0.05"),
        ([], "the following arguments are required: IFACE"),
    ],
)
def test_cli_bad_arguments_exit_2(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        announce_cli.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_cli_bad_tun_name_exits_2(capsys) -> None:
    assert announce_cli.main(["h1-eth0", "--tun", "x" * 16]) == 2
    assert "TUN name" in capsys.readouterr().err


def test_health_is_a_fresh_stats_file_not_marked_final(tmp_path: Path) -> None:
    f = tmp_path / "lb-h1.json"
    now = time.time()
    assert not announce_cli.healthy(f, 1.5, now)  # missing
    f.write_text(json.dumps({"final": False}))
    assert announce_cli.healthy(f, 1.5, time.time())
    assert not announce_cli.healthy(f, 1.5, time.time() + 2)  # stale
    f.write_text(json.dumps({"final": True}))
    assert not announce_cli.healthy(f, 1.5, time.time())
    f.write_text("{half")
    assert not announce_cli.healthy(f, 1.5, time.time())


def test_status_file_is_replaced_whole(tmp_path: Path) -> None:
    f = tmp_path / "st.json"
    announce_cli.write_atomic(f, "one\n")
    announce_cli.write_atomic(f, "two\n")
    assert f.read_text() == "two\n" and os.listdir(tmp_path) == ["st.json"]


def test_lb_watch_follows_the_writer_of_the_stats_file(tmp_path: Path) -> None:
    import select
    import subprocess

    f = tmp_path / "lb-h1.json"
    lb = subprocess.Popen(["sleep", "30"])
    try:
        f.write_text(json.dumps({"final": False, "pid": lb.pid}))
        watch = announce_cli.LbWatch(f, 1.5)
        assert watch.check(time.time()) and len(watch.fds()) == 1
        assert select.select(watch.fds(), [], [], 0)[0] == []
        lb.kill()
        lb.wait()
        assert select.select(watch.fds(), [], [], 2)[0] == watch.fds()  # at once, not stale
        watch.exited()
        assert not watch.check(time.time()), "its file is fresh, but its writer is dead"
        f.write_text(json.dumps({"final": False}))
        assert not watch.check(time.time()), "a file without a pid is no LB's"
        f.write_text(json.dumps({"final": False, "pid": os.getpid()}))  # a restarted LB
        assert watch.check(time.time()) and watch.fds()
    finally:
        lb.kill()
        lb.wait()
