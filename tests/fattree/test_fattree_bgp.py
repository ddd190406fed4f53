"""The fat tree with its services (root, mininet): the VIP announced by BGP from each LB host
(each fastpath.lb holds its own announcement), `lb list|drain|undrain`, a hung LB withdrawn by
BFD, a killed one at once, the source guard at the ToRs, and every BIRD and its files gone
after `down`. The failover targets with downloads in flight: test_failover.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fatnet import in_node, service, t1_gateways, wait_gateways

from controller import bgp, fib, netstate, services
from controller.deployment import REPO_ROOT as REPO
from controller.deployment import load_deployment
from controller.netstate import NetState

pytestmark = pytest.mark.fattree

DEP = load_deployment()
VIP = DEP.vip
H1, H2 = DEP.topology.host_ip("h1"), DEP.topology.host_ip("h2")
FORGE = Path(__file__).with_name("forge.py")
STATE = netstate.STATE_DIR


@pytest.fixture(scope="module")
def net(fattree_services: NetState) -> NetState:
    return fattree_services


def controller(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controller", *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def fetch(st: NetState, host: str, path: str = "1k.bin") -> bytes:
    out = subprocess.run(
        in_node(st.nodes[host].pid, ["wget", "-qO-", "-T", "5", f"http://{VIP}/{path}"]),
        capture_output=True, timeout=20, check=True,
    )  # fmt: skip
    return out.stdout


def guard_drops(st: NetState, tor: str, iface: str) -> int:
    out = subprocess.run(
        in_node(st.nodes[tor].pid, ["nft", "-j", "list", "counter", "ip", "l4lb_src_guard",
                                    "denied_" + iface.replace("-", "_")]),
        capture_output=True, text=True, timeout=10, check=True,
    ).stdout  # fmt: skip
    return next(o["counter"]["packets"] for o in json.loads(out)["nftables"] if "counter" in o)


def agent_frames(host: str) -> int:
    """Frames the agent saw, less the LBs' health probes (tunnelled to it all the time)."""
    stats = json.loads(services.agent_stats_path(STATE, host).read_text())
    return int(stats["frames"]) - int((stats.get("health") or {}).get("probes", 0))


def test_t1_routes_the_vip_by_bgp_over_both_lbs_and_the_fabric_toward_t1(net: NetState) -> None:
    route = fib.read_route(f"{VIP}/32", ["mnexec", "-a", str(net.nodes["t1"].pid)])
    assert route is not None and route.protocol == "bird", fib.describe(route)
    assert route.live_gateways() == [H1, H2]
    # every other switch keeps the static route toward t1 (the Linux driver's)
    a1 = fib.read_route(f"{VIP}/32", ["mnexec", "-a", str(net.nodes["a1"].pid)])
    assert a1 is not None and a1.protocol != "bird"
    assert fetch(net, "h16") == (DEP.www_root / "1k.bin").read_bytes()


def test_lb_list_shows_both_announced(net: NetState) -> None:
    res = controller("lb", "list", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["tors"]["t1"] == {"protocol": "bird", "next_hops": [H1, H2]}
    for lb in report["lbs"]:
        assert lb["announced"] and not lb["drained"] and lb["in_ecmp"], lb
        assert lb["bgp"] == "Established" and lb["bfd"] == "Up", lb
        assert lb["since"] and lb["since"] <= time.time()
        assert lb["forwarded_pps"] is not None and lb["tracked_flows"] is not None
    text = controller("lb", "list")
    assert text.returncode == 0 and "h1  10.1.1.2  yes" in text.stdout, text.stdout
    assert f"t1 routes {VIP} via {H1}, {H2} (proto bird)" in text.stdout


def test_drain_moves_traffic_off_an_lb_and_undrain_brings_it_back(net: NetState) -> None:
    res = controller("lb", "drain", "h1")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("h1: drained; out of t1's ECMP in ")
    assert t1_gateways(net) == [H2]
    assert fetch(net, "h16") == (DEP.www_root / "1k.bin").read_bytes()  # through h2
    lb = {x["host"]: x for x in json.loads(controller("lb", "list", "--json").stdout)["lbs"]}
    assert lb["h1"]["drained"] and not lb["h1"]["announced"]
    assert lb["h1"]["bfd"] is None  # BIRD's BFD session went with the disabled static protocol
    # the last announcing LB is not drained by accident
    last = controller("lb", "drain", "h2")
    assert last.returncode == 1 and "the last load balancer announcing" in last.stderr
    assert t1_gateways(net) == [H2]
    again = controller("lb", "drain", "h1")
    assert again.returncode == 0 and again.stdout.strip() == "h1: already drained"
    back = controller("lb", "undrain", "h1")
    assert back.returncode == 0 and back.stdout.startswith("h1: undrained; back in t1's ECMP")
    assert t1_gateways(net) == [H1, H2]


def test_bad_lb_commands_change_nothing(net: NetState) -> None:
    for args, status, msg in (
        (("lb", "drain", "h3"), 2, "h3 is not a load balancer"),
        (("lb", "undrain", "h99"), 2, "unknown host 'h99'"),
    ):
        res = controller(*args)
        assert res.returncode == status and msg in res.stderr, res.stderr
    assert t1_gateways(net) == [H1, H2]


def test_a_hung_lb_is_withdrawn_by_bfd(net: NetState) -> None:
    """SIGSTOP of fastpath.lb on h1: its loop, which answers BFD, stops; BIRD withdraws after
    the detection time (3 x 100 ms), and the LB comes back when it runs again."""
    pid = service("lb-h1")["pid"]
    t0 = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    try:
        took = wait_gateways(net, [H2], 1.0)
    finally:
        os.kill(pid, signal.SIGCONT)
    print(f"\n[fat tree] SIGSTOP of fastpath.lb on h1 -> out of t1's ECMP: {took * 1000:.0f} ms")
    assert took > 0.15, "withdrawn by BFD's detection time, not at once"
    assert time.monotonic() - t0 < 0.6
    wait_gateways(net, [H1, H2], 3.0)


def test_forged_tunnel_from_h16_is_dropped_and_counted_at_t8(net: NetState) -> None:
    n = 100
    drops, frames = guard_drops(net, "t8", "t8-eth2"), agent_frames("h3")
    h3, h16 = DEP.topology.host_ip("h3"), DEP.topology.host_ip("h16")
    forge = [sys.executable, str(FORGE), H1, h3, h16, VIP, str(n)]
    out = subprocess.run(in_node(net.nodes["h16"].pid, forge), capture_output=True, text=True,
                         timeout=20, check=True)  # fmt: skip
    assert out.stdout.strip() == str(n)
    time.sleep(1.2)  # the agent rewrites its stats file every 0.5 s
    assert guard_drops(net, "t8", "t8-eth2") - drops == n, "each dropped at t8, and counted"
    assert agent_frames("h3") == frames, "none reached h3's agent"
    # The same packets from h1, whose address it is, pass the guard and reach the agent:
    # what the count above would show if t8 did not drop them.
    h1_drops = guard_drops(net, "t1", "t1-eth1")
    subprocess.run(in_node(net.nodes["h1"].pid, [*forge[:-1], "5"]), check=True, timeout=20,
                   capture_output=True)  # fmt: skip
    deadline = time.monotonic() + 3
    while agent_frames("h3") < frames + 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert agent_frames("h3") >= frames + 5
    assert guard_drops(net, "t1", "t1-eth1") == h1_drops
    # DSR replies from the VIP still pass the backends' ToRs
    assert fetch(net, "h4", "100k.bin") == (DEP.www_root / "100k.bin").read_bytes()


def test_a_killed_lb_is_withdrawn_at_once(net: NetState) -> None:
    """SIGKILL of fastpath.lb on h1 (last but one: it stays dead): its TUN goes with it, BIRD
    loses the VIP's next hop and withdraws; short requests keep working through h2."""
    pid = service("lb-h1")["pid"]
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    wait_gateways(net, [H2], 1.0)
    took = time.monotonic() - t0
    print(f"\n[fat tree] SIGKILL of fastpath.lb on h1 -> out of t1's ECMP: {took * 1000:.0f} ms")
    assert took < 0.5, "withdrawn when the LB died, not when BFD timed out"
    for _ in range(20):
        assert fetch(net, "h16") == (DEP.www_root / "1k.bin").read_bytes()


def test_stop_gives_t1_its_static_route_back_and_down_leaves_no_bird(net: NetState) -> None:
    from controller import network

    birds = [r for r in json.loads((STATE / services.STATE_FILE).read_text())["services"]
             if r["role"] == "bgp"]  # fmt: skip
    assert sorted(r["name"] for r in birds) == ["bird-h1", "bird-h2", "bird-t1"]
    services.stop(STATE)  # (from here, not their parent: they stay zombies until it reaps)
    for r in birds:
        assert not netstate.is_running(r["pid"], r["start_time"]), f"{r['name']} survived"
    assert not (STATE / bgp.BIRD_DIR).exists(), "bird/ (configs, sockets, pid files) left"
    route = fib.read_route(f"{VIP}/32", ["mnexec", "-a", str(net.nodes["t1"].pid)])
    assert route is not None and route.protocol != "bird" and route.live_gateways() == [H1, H2]
    assert network.down(owner=net.owner_pid) == 0
