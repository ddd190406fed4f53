"""Issue 9's failover targets on the fat tree with its services (root, mininet), each with long
downloads in flight: 10 x 10 MB, one per client, rate-limited to last about 17 s (on the wire:
the clients' tcp_rmem is capped, tests/fattree/clients.py), checked by sha256; and short
requests in a loop, a new connection each, with a 0.8 s timeout (under the first SYN
retransmission), so a request sent into a dead LB is a failure with its start time.

- SIGKILL of one LB: every download completes; short requests started after the kill fail for
  at most 1 s; restarted as the services started it, it takes new flows again within 3 s.
- SIGTERM of one LB: it withdraws, drains and stops; 0 failed requests, 0 broken downloads.
- `lb drain hN`: its flows move to the other LB with their backends (every download completes).
- `ip link set h1-eth0 down` inside h1: h1 out of t1's ECMP within 1 s (and back after).

Each figure is printed (`pytest -s`): the README's table comes from these lines.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clients import Downloads, RequestLoops, node_run
from fatnet import in_node, service, t1_gateways, wait_gateways

from controller import render, services
from controller.deployment import REPO_ROOT as REPO
from controller.deployment import load_deployment
from controller.netstate import NetState
from l4lb.control import ControlUnavailable, request

pytestmark = pytest.mark.fattree

DEP = load_deployment()
H1, H2 = DEP.topology.host_ip("h1"), DEP.topology.host_ip("h2")
CLIENTS = DEP.clients()
LOOPERS = CLIENTS[:3]  # the clients that also send short requests
DOWNLOAD_WAIT = 45.0  # s: the downloads last about 17.5 s; stalls beyond this fail


@pytest.fixture(scope="module")
def net(fattree_services: NetState) -> NetState:
    return fattree_services


@pytest.fixture()
def spool(tmp_path: Path) -> Path:
    return tmp_path


def figure(what: str, value: str) -> None:
    print(f"\n[failover] {what}: {value}")


def show(host: str) -> dict[str, Any]:
    result: dict[str, Any] = request(render.control_path(services.STATE_DIR, "lb", host), "show")
    return result


def started_downloads(net: NetState, spool: Path) -> Downloads:
    """The 10 downloads, some through each LB (by t1's own choice, asked per flow)."""
    d = Downloads(net, DEP, [(c, None) for c in CLIENTS], spool)
    try:
        time.sleep(1.0)
        per_lb = d.map_flows()
        figure("downloads per LB", str(per_lb))
        if not (per_lb.get(H1) and per_lb.get(H2)):  # 2 in 1024 runs: both ends of the hash
            pytest.fail(f"t1 sent every download to one LB ({per_lb}); rerun")
        return d
    except BaseException:
        d.close()
        raise


@contextlib.contextmanager
def traffic(net: NetState, spool: Path, seconds: float) -> Iterator[tuple[Downloads, RequestLoops]]:
    """The downloads (some through each LB), then the short-request loops for `seconds`; both
    stopped by PID at the end, also on failure."""
    downloads = started_downloads(net, spool)
    try:
        loops = RequestLoops(net, DEP, LOOPERS, seconds=seconds)
        try:
            yield downloads, loops
        finally:
            loops.close()
    finally:
        downloads.close()


def check_downloads(d: Downloads) -> list[dict[str, Any]]:
    results = d.wait(DOWNLOAD_WAIT)
    broken = [r for r in results if r["rc"] != 0 or not r["sha256_ok"]]
    assert not broken, f"broken downloads: {broken}"
    assert min(r["seconds"] for r in results) >= 15, f"not on the wire 15 s: {results}"
    return results


def nothing_broken(what: str, loops: RequestLoops, downloads: Downloads) -> None:
    """0 failed short requests and every download complete with the right sha256."""
    res = loops.results()
    figure(f"{what}: short requests", f"{res['requests']} requests, {res['failed']} failed")
    assert res["failed"] == 0, res["failures"]
    results = check_downloads(downloads)
    figure(f"{what}: downloads", f"{len(results)} of {len(results)} complete, sha256 right")


def restart(net: NetState, name: str) -> tuple[float, dict[str, Any]]:
    """Start a recorded service again the way the services started it (its new PID recorded,
    so `down` stops it); the time it was asked for."""
    t0 = time.monotonic()
    rec = services.restart(lambda node: net.nodes[node].pid, services.STATE_DIR, name)
    return t0, rec


def wait_forwarding(host: str, since: float, timeout: float = 5.0) -> float:
    """Seconds from `since` (monotonic) until the LB on `host` has forwarded a new frame."""
    while True:
        with_frames = False
        with contextlib.suppress(ControlUnavailable):  # not listening yet
            with_frames = show(host)["core"]["forwarded"] > 0
        if with_frames:
            return time.monotonic() - since
        if time.monotonic() - since > timeout:
            raise AssertionError(f"{host}'s LB forwarded nothing {timeout:.0f} s after its start")
        time.sleep(0.02)


def test_sigkill_of_an_lb_breaks_no_download_and_new_flows_fail_under_1s(
    net: NetState, spool: Path
) -> None:
    """The silent death: the TUN goes with the process, BIRD withdraws at once. Then the LB is
    restarted the way the services started it (services.restart: recorded, stopped by PID)."""
    with traffic(net, spool, seconds=14) as (downloads, loops):
        time.sleep(2.0)
        victim = service("lb-h1")
        kill_wall, kill_mono = time.time(), time.monotonic()
        os.kill(victim["pid"], signal.SIGKILL)
        out = wait_gateways(net, [H2], 1.0)
        figure("SIGKILL of lb-h1 -> out of t1's ECMP", f"{out * 1000:.0f} ms")
        time.sleep(4.0)
        t0, rec = restart(net, "lb-h1")
        assert rec["pid"] != victim["pid"]
        wait_gateways(net, [H1, H2], 3.0)
        back = time.monotonic() - t0
        fwd = wait_forwarding("h1", t0, 3.0)
        figure("restart of lb-h1 -> back in t1's ECMP", f"{back * 1000:.0f} ms")
        figure("restart of lb-h1 -> first new frame forwarded", f"{fwd * 1000:.0f} ms")
        assert fwd <= 3.0
        res = loops.results()
        after = [f for f in res["failures"] if f["t0"] >= kill_wall]
        window = max((f["t0"] for f in after), default=kill_wall) - kill_wall
        figure(
            "SIGKILL: short requests",
            f"{res['requests']} requests, {res['failed']} failed "
            f"({len(after)} started after the kill, the last {window * 1000:.0f} ms after it)",
        )
        assert window <= 1.0, res["failures"]
        results = check_downloads(downloads)
        figure("SIGKILL: downloads", f"{len(results)} of {len(results)} complete, sha256 right")
        assert time.monotonic() - kill_mono < DOWNLOAD_WAIT + 30
        # The downloads t1 hashes to h1 came back to the restarted LB, which never saw them:
        # forwarded by the lookup table and counted apart (as Katran's "LB restarting").
        flows = show("h1")["flows"]
        figure("restarted lb-h1: nonsyn_miss", str(flows["nonsyn_miss"]))
        assert flows["nonsyn_miss"] >= 1 and flows["established"] >= 1, flows


def test_sigterm_of_an_lb_is_a_graceful_drain(net: NetState, spool: Path) -> None:
    with traffic(net, spool, seconds=10) as (downloads, loops):
        time.sleep(2.0)
        victim = service("lb-h2")
        frames0 = show("h2")["core"]["frames"]
        t0, signalled = time.monotonic(), time.time()
        os.kill(victim["pid"], signal.SIGTERM)
        out = wait_gateways(net, [H1], 1.0)
        while services.proc_state(victim["pid"]) not in (None, "Z"):
            assert time.monotonic() - t0 < 4.0, "lb-h2 did not stop within 4 s of SIGTERM"
            time.sleep(0.01)
        gone = time.monotonic() - t0
        final = _final_stats("h2")
        drain = final["drain"]
        figure("SIGTERM of lb-h2 -> out of t1's ECMP", f"{out * 1000:.0f} ms")
        figure(
            "SIGTERM of lb-h2 -> drained and exited",
            f"{gone * 1000:.0f} ms (BIRD acknowledged after {drain['confirmed_ms']} ms, last "
            f"VIP frame {drain['last_frame_ms']} ms, {drain['frames']} frames forwarded "
            f"while draining, stopped: {drain['reason']})",
        )
        assert drain["reason"] == "quiet" and drain["confirmed_ms"] is not None
        assert drain["began"] - signalled < 0.1, "the loop took up the signal at once"
        assert drain["frames"] <= final["core"]["frames"] - frames0
        assert final["announce"]["withdraw_confirmed"]
        time.sleep(1.0)
        restart(net, "lb-h2")
        wait_gateways(net, [H1, H2], 3.0)
        nothing_broken("SIGTERM", loops, downloads)


def _final_stats(host: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(services.lb_stats_path(services.STATE_DIR, host).read_text())
    assert data["final"], "the LB's last snapshot (written at exit)"
    return data


def test_lb_drain_moves_flows_to_the_other_lb_with_their_backends(
    net: NetState, spool: Path
) -> None:
    try:
        with traffic(net, spool, seconds=8) as (downloads, loops):
            time.sleep(1.5)
            through_h1 = [d for d in downloads.items if d.lb == H1]
            res = _controller("lb", "drain", "h1")
            assert res.returncode == 0, res.stderr
            figure("lb drain h1", res.stdout.strip())
            assert t1_gateways(net) == [H2]
            time.sleep(1.0)
            fwd0 = show("h1")["core"]["forwarded"]
            time.sleep(1.0)
            assert show("h1")["core"]["forwarded"] == fwd0, "the drained LB still gets traffic"
            figure("lb drain h1: downloads through h1 moved to h2", str(len(through_h1)))
            nothing_broken("lb drain", loops, downloads)
    finally:
        _controller("lb", "undrain", "h1")
    wait_gateways(net, [H1, H2], 3.0)


def _controller(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controller", *args],
        cwd=REPO, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def test_link_down_inside_h1_takes_h1_out_of_t1s_ecmp(net: NetState) -> None:
    """The link goes, the LB lives on and comes back with it. `ip link set down` also deletes
    the host's routes through the link (its default route): they are put back after, as an
    operator must (without them the LB's health probes reach no agent, and a restarted LB
    finds no next hop)."""
    routes = node_run(net, "h1", ["ip", "route", "show"]).splitlines()
    t0 = time.monotonic()
    node_run(net, "h1", ["ip", "link", "set", "h1-eth0", "down"])
    try:
        wait_gateways(net, [H2], 1.0)
        out = time.monotonic() - t0
        figure("ip link set h1-eth0 down (in h1) -> out of t1's ECMP", f"{out * 1000:.0f} ms")
        assert out <= 1.0
        assert show("h1")["pid"] == service("lb-h1")["pid"], "the LB lives on"
    finally:
        node_run(net, "h1", ["ip", "link", "set", "h1-eth0", "up"])
        now = node_run(net, "h1", ["ip", "route", "show"]).splitlines()
        lost = [r for r in routes if r not in now]
        for r in lost:
            node_run(net, "h1", ["ip", "route", "replace", *r.split()])
    figure("routes deleted with the link (put back)", str(lost))
    t1 = time.monotonic()
    wait_gateways(net, [H1, H2], 15.0)
    figure("link up -> h1 back in t1's ECMP", f"{(time.monotonic() - t1) * 1000:.0f} ms")
    wait_tables_agree(10.0)  # h1's health probes reach the agents again
    # h1 forwards again: some of 20 new flows go through it
    fwd = show("h1")["core"]["forwarded"]
    for _ in range(20):
        subprocess.run(
            in_node(net.nodes["h16"].pid, ["wget", "-qO/dev/null", "-T", "3", "--tries=1",
                                           f"http://{DEP.vip}/1k.bin"]),
            check=True, timeout=10, capture_output=True,
        )  # fmt: skip
    assert show("h1")["core"]["forwarded"] > fwd


def wait_tables_agree(timeout: float) -> None:
    """Until both LBs' lookup tables are the same (their digests): flows may move between them."""
    deadline = time.monotonic() + timeout
    while True:
        digests = {h: show(h)["table"]["digest"] for h in DEP.load_balancers}
        if len(set(digests.values())) == 1:
            return
        assert time.monotonic() < deadline, f"the LBs' tables differ: {digests}"
        time.sleep(0.2)


def test_the_lb_answers_show_with_its_announcement(net: NetState) -> None:
    for host in ("h1", "h2"):
        ann = show(host)["announce"]
        assert ann["announced"] and ann["bfd_state"] == "UP" and ann["peer_state"] == "UP", ann
        assert ann["tx_gap_max_ms"] < 200, ann
        figure(f"{host}: longest gap between BFD packets while Up", f"{ann['tx_gap_max_ms']} ms")


FIFTH = "h16"  # the backend added in the double fault (a client until then)


def placed_flows() -> dict[tuple[str, int], bool]:
    """Ten downloads placed by source port: (client, port) -> whether adding FIFTH moves its
    table slot: eight on a slot that moves (to FIFTH), two on one that does not. The LBs' own
    core says where a flow lands (the same seed and tables: test_fattree_backends.chooser);
    which LB carries each is t1's choice, seen once they run (clients.carriers)."""
    from test_fattree_backends import chooser, lands

    four = dict(DEP.backends)
    bal4, bal5 = chooser(four), chooser({**four, FIFTH: 1})
    want = {True: 8, False: 2}
    clients = [c for c in CLIENTS if c != FIFTH]
    out: dict[tuple[str, int], bool] = {}
    port = 31000
    while any(want.values()):
        for c in clients:
            port += 1
            moved = lands(bal4, c, port) != lands(bal5, c, port)
            if want[moved]:
                want[moved] -= 1
                out[(c, port)] = moved
        assert port < 40000, f"no placement found: still {want}"
    return out


def test_double_fault_breaks_exactly_the_moved_flows_of_the_killed_lb(
    net: NetState, spool: Path
) -> None:
    """A backend added, then one LB killed. Each LB keeps the flows it tracks on their backend;
    the killed LB's flows reach the other LB, which never saw them and looks them up in the
    new table: those whose slot moved to the new backend break (it answers with a reset), and
    only those. (Sharing tracked flows between LBs would save them: README.)"""
    plan = placed_flows()
    started: list[str] = []
    downloads = Downloads(net, DEP, list(plan), spool)
    try:
        time.sleep(1.0)
        per_lb = downloads.map_flows()
        lb_of = {(d.client, d.sport): d.lb for d in downloads.items}
        # the fifth backend's agent and server first, as the services start them (by PID)
        recs = services.start_host(lambda h: net.nodes[h].pid, DEP, FIFTH, services.STATE_DIR)
        started += [r["name"] for r in recs]
        res = _controller("backend", "add", FIFTH)
        assert res.returncode == 0 and "tables agree" in res.stdout, res.stdout + res.stderr
        time.sleep(1.0)
        os.kill(service("lb-h1")["pid"], signal.SIGKILL)
        wait_gateways(net, [H2], 1.0)
        results = downloads.wait(DOWNLOAD_WAIT)
        broken = sorted((r["client"], r["sport"]) for r in results
                        if r["rc"] != 0 or not r["sha256_ok"])  # fmt: skip
        predicted = sorted(f for f, moved in plan.items() if moved and lb_of[f] == H1)
        survived = sorted(f for f, moved in plan.items() if moved and lb_of[f] == H2)
        figure(
            "double fault (h16 added, then lb-h1 killed)",
            f"{len(broken)} of {len(results)} downloads broke ({per_lb} per LB, 8 on a slot "
            f"that moved to h16): {broken}; predicted, through h1 on a moved slot: "
            f"{predicted}; on a moved slot through h2, which tracked them: {survived}",
        )
        assert broken == predicted
    finally:
        downloads.close()
        restart(net, "lb-h1")  # with the recorded set (h16 in), then back to the deployment's
        _controller("backend", "remove", FIFTH)
        services.stop_named(services.STATE_DIR, started)
    wait_gateways(net, [H1, H2], 3.0)


@pytest.fixture(autouse=True)
def _both_lbs_after_each(net: NetState) -> Iterator[None]:
    """A test that leaves an LB down (it failed before its restart) errors here, and the LB
    is restarted, so that the next tests start from two LBs instead of failing after it."""
    yield
    down = [
        h for h in ("h1", "h2") if services.proc_state(service(f"lb-{h}")["pid"]) in (None, "Z")
    ]
    for host in down:
        restart(net, f"lb-{host}")
    if down:
        wait_gateways(net, [H1, H2], 5.0)
        pytest.fail(f"the test left lb-{', lb-'.join(down)} down (restarted for the next tests)")


@pytest.fixture(scope="module", autouse=True)
def _no_leftover(net: NetState) -> Iterator[None]:
    yield
    # every LB still the one recorded (the restarts updated the records)
    for host in ("h1", "h2"):
        rec = service(f"lb-{host}")
        assert services.proc_state(rec["pid"]) not in (None, "Z"), f"lb-{host} not running"
