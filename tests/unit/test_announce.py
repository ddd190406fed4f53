"""fastpath.announce without root: the Announcer over a socket pair standing in for its TUN,
against a BFD session playing BIRD (datagrams as BIRD sends them: 169.254.0.1 -> .2:3784, TTL
255), and the CLI's options. With a real TUN and BIRD: tests/netns."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from bfd_peer import Bird, announcer_pair, run

from fastpath import announce_cli, bfd
from fastpath.announce import HOST_ADDR, LB_ADDR, AnnounceConfig, Announcer, tun_name


@pytest.fixture()
def pair() -> Iterator[tuple[Announcer, Bird]]:
    with announcer_pair() as p:
        yield p


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
        (["h1-eth0", "--drain-timeout", "-1"], "expected a number >= 0"),
        (["h1-eth0", "--health-file", "x"], "unrecognized arguments: --health-file"),
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


def test_status_file_is_replaced_whole(tmp_path: Path) -> None:
    f = tmp_path / "st.json"
    announce_cli.write_atomic(f, "one\n")
    announce_cli.write_atomic(f, "two\n")
    assert f.read_text() == "two\n" and os.listdir(tmp_path) == ["st.json"]


def test_the_longest_gap_between_sends_while_up_is_kept(pair: tuple[Announcer, Bird]) -> None:
    ann, bird = pair
    run(ann, bird, 0.0, 2.0)  # serviced every 5 ms: periodic sends 75..100 ms apart
    assert 0.07 <= ann.status().tx_gap_max <= 0.105
    run(ann, bird, 2.0, 2.4, tick=0.2)  # a loop that comes by only every 200 ms
    assert 0.19 <= ann.status().tx_gap_max <= 0.215  # the last send at 2.0 - 0.01 at worst
    assert bird.session.state == bfd.State.UP, "200 ms is still inside BIRD's 300 ms"
    st = ann.stats(1000.0)
    assert st.announced and st.bfd_state == "UP" and st.tun == "l4an-test"
    assert st.tx_gap_max_ms == round(ann.status().tx_gap_max * 1000, 1)
    assert st.since == round(ann.status().since + 1000.0, 3) and st.send_errors == 0
