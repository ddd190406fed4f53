"""fastpath.announce against real BIRDs (root): the holder's TUN and BFD make and break the
VIP's multipath route at t1, by SIGKILL, SIGSTOP, SIGTERM, signals, `disable vip` and link down.

Each figure measured here is printed (`pytest -s` shows them): the time from the event until
t1's kernel route changed, polled with `ip -j route` (about 2-3 ms per look).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bird_testbed import LBS, BirdBed, require_bird, sh, wait_for

from bench.netns import REPO
from controller import birdctl, netstate
from l4lb.control import request

pytestmark = pytest.mark.netns

H1, H2 = "10.1.1.2", "10.1.2.2"


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BirdBed]:
    require_bird()
    b = BirdBed(tmp_path_factory.mktemp("bird"))
    try:
        yield b
    finally:
        b.close()


@pytest.fixture()
def announced(bed: BirdBed) -> BirdBed:
    """Both holders running and t1 routing the VIP over both (BGP up: a few seconds the first
    time, LB side connects after 1 s)."""
    for h in LBS:
        proc = bed.procs.get(f"holder-{h}")
        if proc is None or proc.poll() is not None:
            bed.start_holder(h)
    sh("ip", "-n", bed.ns["h1"], "link", "set", "h1-eth0", "up")
    bed.wait_gateways([H1, H2], 15)
    return bed


def figure(what: str, seconds: float) -> None:
    print(f"\n[announce timing] {what}: {seconds * 1000:.0f} ms")


def test_rendered_configs_make_a_multipath_route_over_both_announcers(announced: BirdBed) -> None:
    bed = announced
    protos = birdctl.parse_protocols(bed.bird("h1", "show protocols"))
    assert protos["vip"].state == "up" and protos["t1"].info == "Established"
    sessions = {
        s.address: s for s in birdctl.parse_bfd_sessions(bed.bird("h1", "show bfd sessions"))
    }
    assert (
        sessions["169.254.0.2"].state == "Up"
        and sessions["169.254.0.2"].interface == "l4an-h1-eth0"
    )
    assert sessions["10.1.1.1"].state == "Up"  # BGP's own BFD toward t1
    assert sessions["169.254.0.2"].interval == pytest.approx(0.1)
    routes = birdctl.parse_routes(bed.bird("h1", "show route 20.0.0.1/32 protocol vip"))
    assert [(r.protocol, r.via) for r in routes] == [("vip", (("169.254.0.2", "l4an-h1-eth0"),))]
    t1 = birdctl.parse_routes(bed.bird("t1", "show route 20.0.0.1/32"))
    assert sorted(r.protocol for r in t1) == ["h1", "h2"]
    st = bed.status("h1")
    assert st["announced"] and st["bfd_state"] == "UP" and st["peer_state"] == "UP"
    # nothing BIRD sent was refused (the kernel's IPv6 chatter on a new device may be there)
    assert set(st["discarded"]) <= {"not_bfd"}, st
    out = sh("ip", "netns", "exec", bed.ns["t1"], "ip", "route", "show", "20.0.0.1/32")
    assert "proto bird" in out and "nexthop" in out, out


def test_sigkill_of_the_holder_withdraws_at_once_and_a_restart_announces(
    announced: BirdBed,
) -> None:
    bed = announced
    proc = bed.procs["holder-h1"]
    t0 = time.monotonic()
    proc.send_signal(signal.SIGKILL)
    took = bed.wait_gateways([H2], 1.0)
    figure("SIGKILL of the holder -> out of t1's ECMP", took)
    proc.wait(5)
    t0 = time.monotonic()
    bed.start_holder("h1")
    bed.wait_gateways([H1, H2], 3.0)
    figure("holder restarted (python start included) -> back in t1's ECMP", time.monotonic() - t0)


def test_sigstop_of_the_holder_withdraws_after_the_bfd_detection_time(announced: BirdBed) -> None:
    bed = announced
    proc = bed.procs["holder-h1"]
    proc.send_signal(signal.SIGSTOP)
    try:
        took = bed.wait_gateways([H2], 1.0)
    finally:
        proc.send_signal(signal.SIGCONT)
    figure("SIGSTOP of the holder (BFD 100 ms x 3) -> out of t1's ECMP", took)
    # Not the TUN going (that is instant): BIRD waited for the detection time.
    assert took > 0.15, took
    t0 = time.monotonic()
    bed.wait_gateways([H1, H2], 2.0)
    figure("SIGCONT -> back", time.monotonic() - t0)


def test_sigterm_withdraws_waits_for_bird_then_exits(announced: BirdBed) -> None:
    bed = announced
    proc = bed.procs["holder-h1"]
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(5) == 0
    exited = time.monotonic() - t0
    st = bed.status("h1")
    assert st["withdraw_confirmed"] and not st["wanted"], st
    bed.wait_gateways([H2], 0.5)
    took = time.monotonic() - t0
    figure("SIGTERM (AdminDown, acknowledged by BIRD) -> holder exited", exited)
    figure("SIGTERM -> out of t1's ECMP", took)
    assert exited < 1.0, "the holder waited for BIRD's Down, not its --drain-timeout"


def test_withdraw_and_announce_by_signal_keep_the_tun(announced: BirdBed) -> None:
    bed = announced
    proc = bed.procs["holder-h1"]
    proc.send_signal(signal.SIGUSR1)
    took = bed.wait_gateways([H2], 1.0)
    figure("withdraw (BFD AdminDown) -> out of t1's ECMP", took)
    wait_for(lambda: bed.status("h1")["withdraw_confirmed"], 2, "the holder to see BIRD's Down")
    sessions = birdctl.parse_bfd_sessions(bed.bird("h1", "show bfd sessions"))
    assert {s.address: s.state for s in sessions}["169.254.0.2"] == "Down"
    assert "l4an-h1-eth0" in sh("ip", "-n", bed.ns["h1"], "link", "show")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGUSR2)
    bed.wait_gateways([H1, H2], 1.0)
    figure("announce again (Poll answered at once) -> back in t1's ECMP", time.monotonic() - t0)


def test_disable_vip_in_bird_drains_without_the_holder(announced: BirdBed) -> None:
    bed = announced
    bed.bird("h1", "disable vip")
    try:
        took = bed.wait_gateways([H2], 1.0)
        figure("`birdc disable vip` (lb drain) -> out of t1's ECMP", took)
        assert bed.status("h1")["announced"], "the holder still answers BFD: only BIRD drains"
    finally:
        bed.bird("h1", "enable vip")
    bed.wait_gateways([H1, H2], 2.0)


def test_link_down_of_the_lb_host_leaves_t1s_ecmp(announced: BirdBed) -> None:
    bed = announced
    t0 = time.monotonic()
    sh("ip", "-n", bed.ns["h1"], "link", "set", "h1-eth0", "down")
    try:
        took = bed.wait_gateways([H2], 1.0)
    finally:
        sh("ip", "-n", bed.ns["h1"], "link", "set", "h1-eth0", "up")
    figure("`ip link set h1-eth0 down` in h1 -> out of t1's ECMP", took)
    t0 = time.monotonic()
    bed.wait_gateways([H1, H2], 10.0)
    figure("link up -> back (BGP reconnects)", time.monotonic() - t0)


def show(ctl: Path) -> dict[str, Any]:
    result: dict[str, Any] = request(ctl, "show")
    return result


def _mac(ns: str, dev: str) -> str:
    return str(json.loads(sh("ip", "-j", "-n", ns, "link", "show", "dev", dev))[0]["address"])


@pytest.mark.parametrize("workers", [1, 2])
def test_the_real_lb_announces_keeps_bfd_up_under_full_load_and_drains_on_sigterm(
    announced: BirdBed, tmp_path: Path, workers: int
) -> None:
    """fastpath.lb itself on h1 (in place of the stand-in): announced once it forwards; t1
    floods h1 with 64-byte UDP to the VIP (bench.blast at full speed) while BIRD's BFD session
    must not flap: the loop answers BFD between batches (with 2 workers: the supervisor's loop,
    which forwards nothing); SIGTERM then withdraws, waits for BIRD, drains (the workers
    forwarding on) and exits 0."""
    from bench.frames import pack_frames, udp_frames

    bed = announced
    bed.stop("holder-h1")
    bed.wait_gateways([H2], 3.0)
    ns = bed.ns
    stats, ctl = tmp_path / "lb-h1.json", tmp_path / "lb-h1.ctl"
    t1_mac, h1_mac = _mac(ns["t1"], "t1-eth1"), _mac(ns["h1"], "h1-eth0")
    argv = [sys.executable, "-m", "fastpath.lb", "h1-eth0", "--vip", "20.0.0.1:9",
            "--backend", "10.2.3.2", "--next-hop-mac", t1_mac, "--announce",
            "--stats-file", str(stats), "--control-socket", str(ctl),
            "--stats-interval", "0.2", "--workers", str(workers)]  # fmt: skip
    lb = bed.spawn("lb-h1", "h1", argv)
    try:
        figure("fastpath.lb started -> in t1's ECMP", bed.wait_gateways([H1, H2], 10.0))
        frames = tmp_path / "frames.bin"
        frames.write_bytes(pack_frames(udp_frames(4096, t1_mac, h1_mac, "20.0.0.1")))
        before = show(ctl)
        blast_start = time.time()
        out = sh(sys.executable, "-m", "bench.blast", "t1-eth1", "--frames", str(frames),
                 "--duration", "4", ns=ns["t1"], timeout=30, cwd=REPO)  # fmt: skip
        sent = json.loads(out.strip().splitlines()[-1])["sent"]
        time.sleep(0.3)
        after = show(ctl)
        got = after["io"]["rx_frames"] - before["io"]["rx_frames"]
        gap = after["announce"]["tx_gap_max_ms"]
        sessions = birdctl.parse_bfd_sessions(bed.bird("h1", "show bfd sessions"))
        tun = next(x for x in sessions if x.address == "169.254.0.2")
        figure(f"under load ({got} frames in 4 s, {sent} sent): longest BFD gap", gap / 1000)
        assert got > 50_000, f"not loaded: {got} frames"
        assert tun.state == "Up" and tun.since < blast_start, "BIRD's BFD session flapped"
        assert after["announce"]["bfd_state"] == "UP" and gap < 200
        assert bed.tor_gateways() == [H1, H2]
        t0 = time.monotonic()
        lb.send_signal(signal.SIGTERM)
        figure("SIGTERM of fastpath.lb -> out of t1's ECMP", bed.wait_gateways([H2], 2.0))
        assert lb.wait(5) == 0
        figure("SIGTERM of fastpath.lb -> exited", time.monotonic() - t0)
        final = json.loads(stats.read_text())
        assert final["final"] and final["drain"]["reason"] == "quiet", final["drain"]
        assert final["workers"] is None if workers == 1 else len(final["workers"]) == workers
        assert final["drain"]["confirmed_ms"] is not None
        assert not ctl.exists(), "the control socket goes at exit"
    finally:
        bed.stop("lb-h1")
    assert "withdraw acknowledged by BIRD" in bed.log("lb-h1"), bed.log("lb-h1")


def test_a_hung_worker_takes_its_lb_out_of_t1s_ecmp_and_stops_it(
    announced: BirdBed, tmp_path: Path
) -> None:
    """fastpath.lb --workers 2 on h1 with one worker SIGSTOPped (alive, forwarding nothing):
    the supervisor's next stats request waits for it, so its BFD goes silent and BIRD
    withdraws h1 after the detection time; the request times out (REPLY_TIMEOUT) and the LB
    exits 1 naming the worker, its workers gone."""
    from fastpath.workerpool import REPLY_TIMEOUT

    bed = announced
    bed.stop("holder-h1")
    bed.wait_gateways([H2], 3.0)
    ctl = tmp_path / "lb-h1.ctl"
    argv = [sys.executable, "-m", "fastpath.lb", "h1-eth0", "--vip", "20.0.0.1:9",
            "--backend", "10.2.3.2", "--next-hop-mac", _mac(bed.ns["t1"], "t1-eth1"),
            "--announce", "--stats-file", "", "--control-socket", str(ctl),
            "--stats-interval", "0.2", "--workers", "2"]  # fmt: skip
    lb = bed.spawn("lb-h1", "h1", argv)
    pids: list[int] = []
    try:
        bed.wait_gateways([H1, H2], 10.0)
        pids = request(ctl, "ping")["workers"]
        assert len(pids) == 2
        os.kill(pids[1], signal.SIGSTOP)
        took = bed.wait_gateways([H2], 2.0)
        figure("SIGSTOP of one of 2 workers -> its LB out of t1's ECMP", took)
        assert lb.wait(REPLY_TIMEOUT + 10) == 1
        assert all(netstate.proc_start_time(p) is None for p in pids), "a worker was left"
    finally:
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGCONT)
        bed.stop("lb-h1")
    assert f"pid {pids[1]}) did not answer in time" in bed.log("lb-h1"), bed.log("lb-h1")


def test_p4_follow_reads_the_real_birds(announced: BirdBed) -> None:
    """p4-follow's view of the announcements (the LBs' BIRDs, through their control sockets)
    drives t1's entries on the fake of p4-utils as BGP drives the Linux t1."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
    from fake_p4utils import FakeNetwork, FakeSwitch

    from controller.p4follow import Follower, bird_announces
    from controller.routes import compute_routes

    bed = announced
    dep = bed.dep
    programs = compute_routes(dep.topology, dep.vip, dep.load_balancers, dep.vip_sources())
    net = FakeNetwork([FakeSwitch("t1", 1, 9090)])
    f = Follower(
        dep.topology,
        programs,
        dep.vip,
        dep.load_balancers,
        lambda h: bird_announces(bed.files(h).ctl, dep.vip),
        net.factory,
    )
    f.start()
    assert f.step() == []
    vip_key = f'["{dep.vip}/32"]'
    t0 = time.monotonic()
    bed.procs["holder-h1"].send_signal(signal.SIGKILL)
    wait_for(lambda: bool(f.step()), 2.0, "p4-follow to see h1 go")
    figure("SIGKILL of the holder -> p4-follow rewrote t1 (polling BIRD)", time.monotonic() - t0)
    assert net.switch("t1").entries["ipv4_lpm"][vip_key] == ("set_nhop", ["00:00:0a:01:02:02", "2"])
    bed.bird("h2", "disable vip")
    try:
        wait_for(lambda: bool(f.step()), 2.0, "p4-follow to see h2 drained")
        assert net.switch("t1").entries["ipv4_lpm"][vip_key] == ("drop", [])
    finally:
        bed.bird("h2", "enable vip")
    bed.start_holder("h1")

    def both() -> bool:
        f.step()
        return f.live == ["h1", "h2"]

    wait_for(both, 5.0, "p4-follow to see both back")
    assert net.switch("t1").entries["ipv4_lpm"][vip_key] == ("ecmp_group", ["1", "2"])
