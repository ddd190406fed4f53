"""The routed fat tree: reachability, VIP steering to the load-balancer hosts, ECMP split.

No load balancer runs: SYNs to the VIP are caught by a small AF_PACKET listener on every host
(tests/fattree/synprobe.py), which is what the routing must deliver them to.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter, defaultdict
from typing import Any

import pytest
from fatnet import in_node, probe_argv

from controller import network
from controller.deployment import REPO_ROOT as REPO
from controller.deployment import load_deployment
from controller.netstate import NetState

pytestmark = pytest.mark.fattree

DEP = load_deployment()
VIP = DEP.vip
LBS = set(DEP.load_balancers)
FLOWS_PER_HOST = 15  # x 14 sending hosts = 210 flows
REPEAT = 3  # SYNs per flow
PROBE_SECONDS = 60  # a listener stops by itself after this, whatever happens


def run_in(st: NetState, host: str, argv: list[str], timeout: float = 30) -> str:
    out = subprocess.run(
        in_node(st.nodes[host].pid, argv), capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, f"{host}: {argv}: {out.stderr}"
    return out.stdout


def test_pingall(fattree: NetState) -> None:
    """All 16 hosts reach each other, first packet included (permanent neighbours)."""
    topo = DEP.topology
    hosts = topo.hosts()
    procs = {}
    for h in hosts:
        targets = " ".join(topo.host_ip(o) for o in hosts if o != h)
        script = f"for ip in {targets}; do ping -c1 -W2 -q $ip >/dev/null || echo $ip; done"
        procs[h] = subprocess.Popen(
            in_node(fattree.nodes[h].pid, ["sh", "-c", script]), stdout=subprocess.PIPE, text=True
        )
    lost = {h: p.communicate(timeout=120)[0].split() for h, p in procs.items()}
    lost = {h: ips for h, ips in lost.items() if ips}
    sent = len(hosts) * (len(hosts) - 1)
    print(f"pingall: {sent} pairs, {sum(map(len, lost.values()))} lost")
    assert lost == {}, f"unreachable (source: destinations): {lost}"


def test_forwarding_settings(fattree: NetState) -> None:
    for lb in LBS:
        assert run_in(fattree, lb, ["sysctl", "-n", "net.ipv4.ip_forward"]).strip() == "0"
    for sw in ("t1", "a5", "c3"):
        out = run_in(fattree, sw, ["sysctl", "-n", "net.ipv4.ip_forward"])
        assert out.strip() == "1"
        policy = run_in(fattree, sw, ["sysctl", "-n", "net.ipv4.fib_multipath_hash_policy"])
        assert policy.strip() == "1"
    neigh = run_in(fattree, "t1", ["ip", "neigh", "show", "dev", "t1-eth1"])
    assert "10.1.1.2 lladdr 00:00:0a:01:01:02 PERMANENT" in neigh


@pytest.fixture(scope="module")
def vip_syns(fattree: NetState) -> dict[str, Any]:
    """Every host listens; every non-LB host sends REPEAT SYNs on each of its flows to the VIP.

    Returns {"sent": {(src ip, sport): host}, "seen": {host: [(src, sport, dport), ...]}}.
    """
    topo = DEP.topology
    hosts = topo.hosts()
    senders = [h for h in hosts if h not in LBS]
    rng = random.Random()
    listeners = {
        h: subprocess.Popen(
            probe_argv(fattree.nodes[h].pid, "listen", f"{h}-eth0", VIP, str(PROBE_SECONDS)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for h in hosts
    }
    try:
        for h, p in listeners.items():
            assert p.stdout is not None
            line = p.stdout.readline().strip()
            assert line == "ready", f"{h} listener: {line!r} {p.stderr.read() if p.stderr else ''}"
        sent: dict[tuple[str, int], str] = {}
        sends = []
        for h in senders:
            sports = rng.sample(range(10000, 60000), FLOWS_PER_HOST)
            sent.update({(topo.host_ip(h), sp): h for sp in sports})
            argv = ["send", VIP, "80", str(REPEAT), *map(str, sports)]
            sends.append(subprocess.Popen(probe_argv(fattree.nodes[h].pid, *argv)))
        for s in sends:
            assert s.wait(timeout=30) == 0
        # let the last SYNs cross the fabric (5 hops of veth: well under a millisecond)
        subprocess.run(["sleep", "0.3"], check=True)
    finally:
        for p in listeners.values():
            p.terminate()
    seen, drops = {}, {}
    for h, p in listeners.items():
        out, err = p.communicate(timeout=10)
        assert out.strip(), f"{h} listener printed nothing: {err}"
        res = json.loads(out.strip().splitlines()[-1])
        seen[h] = [tuple(s) for s in res["syns"]]
        drops[h] = res["drops"]
    # A listener whose socket overflowed lost SYNs the fabric did deliver: not a routing fault.
    assert not any(drops.values()), f"listener sockets dropped packets: {drops}"
    return {"sent": sent, "seen": seen}


def test_vip_syns_reach_only_the_load_balancers(vip_syns: dict[str, Any]) -> None:
    seen, sent = vip_syns["seen"], vip_syns["sent"]
    elsewhere = {h: len(s) for h, s in seen.items() if h not in LBS and s}
    assert elsewhere == {}, f"SYNs to the VIP at non-LB hosts: {elsewhere}"
    at_lbs = Counter((src, sport) for h in LBS for src, sport, _ in seen[h])
    assert set(at_lbs) == set(sent), "flows that never reached h1 or h2"
    assert all(n == REPEAT for n in at_lbs.values()), "SYNs lost or duplicated on the way"
    # every non-LB host's SYNs got there
    assert {sent[f] for f in at_lbs} == {h for h in DEP.topology.hosts() if h not in LBS}


def test_vip_flows_split_between_load_balancers(vip_syns: dict[str, Any]) -> None:
    flows_at: dict[str, set[tuple[str, int]]] = {
        h: {(src, sport) for src, sport, _ in vip_syns["seen"][h]} for h in sorted(LBS)
    }
    total = len(vip_syns["sent"])
    assert total > 200
    shares = {h: len(f) / total for h, f in flows_at.items()}
    print(f"VIP split over {total} flows: " + ", ".join(f"{h} {s:.1%}" for h, s in shares.items()))
    for h, share in shares.items():
        assert 0.30 <= share <= 0.70, f"{h} got {share:.1%} of {total} flows"


def test_each_flow_sticks_to_one_load_balancer(vip_syns: dict[str, Any]) -> None:
    where: dict[tuple[str, int], set[str]] = defaultdict(set)
    for h in LBS:
        for src, sport, _ in vip_syns["seen"][h]:
            where[(src, sport)].add(h)
    split = {f: hs for f, hs in where.items() if len(hs) > 1}
    assert split == {}, f"flows whose packets reached both load balancers: {split}"


def test_exec_passes_exit_status_and_runs_in_the_node(fattree: NetState) -> None:
    assert network.exec_on("h3", ["sh", "-c", "exit 7"]) == 7
    assert network.exec_on("h3", ["sh", "-c", "kill -TERM $$"]) == 128 + 15
    cli = subprocess.run(
        [sys.executable, "-m", "controller", "exec", "h3", "--", "ip", "-o", "-4", "addr"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
    )
    assert cli.returncode == 0, cli.stderr
    assert "h3-eth0    inet 10.2.3.2/24" in cli.stdout


def test_exec_unknown_host_lists_the_valid_ones(fattree: NetState) -> None:
    with pytest.raises(network.UnknownNode) as err:
        network.exec_on("h99", ["true"])
    assert "h99" in str(err.value) and "h1 h2 h3" in str(err.value) and "c4" in str(err.value)


def test_second_up_refuses(fattree: NetState) -> None:
    with pytest.raises(network.NetworkError, match="already up"):
        network.up(None, "detach")
    assert network.running() is not None  # and the running one is untouched
