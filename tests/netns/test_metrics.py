"""The exporters beside a real `python -m fastpath.lb` and two real `python -m agent.decap`
(root): every endpoint parsed by prometheus_client's text parser and checked by `promtool check
metrics`, and moved by exactly what a known burst of frames moves it by.

    r [sender and router] --- l  LB (fastpath.lb + exporter)
        |           \\
        b1 agent     b2 agent (agent.decap + exporter each)

The burst, sent from r onto the LB's link: GOOD UDP frames to VIP:80 over as many flows (their
split over the two backends computed by the same packet core, offline), TTL_1 of them with TTL
1, WRONG TCP and UDP frames to VIP:8080 (dropped by the LB's BPF filter and its nftables rule,
before any Python counter), and SPOOFED tunnels from an address no LB has, straight to b1.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.config import AgentConfig
from bench.frames import ipip_frames, udp_frames
from bench.netns import PY, Netns, NsProc, capture, sh
from controller import nodenet
from controller.exporter.config import ExporterConfig
from fastpath.balancer import Balancer
from fastpath.config import BalancerConfig, LbConfig
from fastpath.counters import DropReason
from l4lb import cfgfile
from l4lb.wire import ETH_HLEN

pytestmark = [pytest.mark.netns, pytest.mark.needs("ethtool", tun=True)]

VIP, PORT, WRONG_PORT = "20.0.0.1", 80, 8080
R_L, LB = "10.82.1.1", "10.82.1.2"
R_B = {"b1": "10.82.2.1", "b2": "10.82.3.1"}
BK = {"b1": "10.82.2.2", "b2": "10.82.3.2"}
SEED = 2026
GOOD, TTL_1, WRONG, SPOOFED = 200, 7, 1000, 11
METRICS_PORT = 9180


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(m: Samples, name: str, **labels: str) -> float:
    return m[(name, frozenset(labels.items()))]


def delta(a: Samples, b: Samples, name: str, **labels: str) -> float:
    return value(b, name, **labels) - value(a, name, **labels)


class Endpoint:
    def __init__(self, ns: str, addr: str) -> None:
        self.netns = f"/run/netns/{ns}"
        self.addr = addr
        self.text = ""

    def scrape(self) -> Samples:
        body = nodenet.http_get(self.netns, self.addr, METRICS_PORT, "/metrics")
        self.text = body.decode()
        return parse(self.text)

    def wait(self, timeout: float = 20.0) -> Samples:
        deadline = time.monotonic() + timeout
        while True:
            try:
                m = self.scrape()
                if value(m, next(n for n, _ in m if n.endswith("_up"))) == 1:
                    return m
            except (OSError, StopIteration):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"no exporter answering with its process up on {self.addr}")
            time.sleep(0.1)


@pytest.fixture
def bed(netns: Netns, tmp_path: Path) -> Iterator[dict]:
    t = netns.tag
    r, lb = netns.add("r"), netns.add("l")
    bks = {b: netns.add(b) for b in BK}
    names = {"l": f"ml{t}", "rl": f"mr{t}"}
    netns.veth(lb, names["l"], r, names["rl"], ip_a=f"{LB}/24", ip_b=f"{R_L}/24")
    for b, ns in bks.items():
        names[b], names[f"r{b}"] = f"m{b}{t}", f"mr{b}{t}"
        netns.veth(ns, names[b], r, names[f"r{b}"], ip_a=f"{BK[b]}/24", ip_b=f"{R_B[b]}/24")
        sh("ip", "route", "add", "default", "via", R_B[b], ns=ns)
    sh("ip", "route", "add", "default", "via", R_L, ns=lb)
    sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=r)
    procs: list[NsProc] = []
    try:
        yield {"r": r, "lb": lb, "bks": bks, "names": names, "tmp": tmp_path, "procs": procs}
    finally:
        for p in reversed(procs):
            p.stop()


def start(bed: dict, ns: str, argv: list[str]) -> NsProc:
    p = NsProc(ns, argv)
    bed["procs"].append(p)
    return p


def exporter_config(bed: dict, name: str, kind: str, process: Path, addr: str) -> Path:
    cfg = ExporterConfig(kind, str(process), addr, METRICS_PORT, server_ports=(PORT,))
    path = bed["tmp"] / f"exporter-{name}.json"
    path.write_text(cfgfile.dump(cfg))
    return path


def expected_split(frames: list[bytes]) -> dict[str, int]:
    """Per backend IP, the frames the packet core sends there (same seed, same backend set)."""
    core = BalancerConfig(
        vips=((VIP, PORT),), backends=tuple((ip, 1) for ip in BK.values()), local_ip=LB,
        local_mac=bytes(6), next_hop_mac=bytes(6), hash_seed=SEED,
    )  # fmt: skip
    bal = Balancer(core)
    out = memoryview(bytearray(2048))
    for f in frames:
        bal.process(f, out, 0.0)
    return dict(zip(bal.counters.backend_names, bal.counters.forwarded, strict=True))


def wrong_port_frames(src_mac: str, dst_mac: str) -> list[bytes]:
    """WRONG frames to VIP:8080, every other one TCP (its protocol byte and ports rewritten)."""
    frames = []
    for i, f in enumerate(udp_frames(WRONG, src_mac, dst_mac, VIP, dport=WRONG_PORT)):
        if i % 2:
            b = bytearray(f)
            b[ETH_HLEN + 9] = 6  # TCP; the header checksum is not what either filter reads
            frames.append(bytes(b))
        else:
            frames.append(f)
    return frames


def promtool_check(text: str) -> None:
    if shutil.which("promtool") is None:
        return  # the parser above still parsed it; promtool comes with Debian's prometheus
    res = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert res.returncode == 0, f"promtool check metrics: {res.stdout}{res.stderr}"


def test_every_endpoint_moves_by_exactly_the_burst(bed: dict) -> None:
    n, tmp = bed["names"], bed["tmp"]
    lb_cfg = tmp / "lb.json"
    lb_cfg.write_text(
        cfgfile.dump(
            LbConfig(
                iface=n["l"], vips=((VIP, PORT),), backends=tuple((ip, 1) for ip in BK.values()),
                hash_seed=SEED, names=tuple((ip, b) for b, ip in BK.items()),
                stats_file=str(tmp / "lb-stats.json"), control_socket=str(tmp / "lb.ctl"),
                stats_interval=0.2,
            )
        )
    )  # fmt: skip
    endpoints = {"lb": Endpoint(bed["lb"], LB)}
    for b, ns in bed["bks"].items():
        cfg = tmp / f"agent-{b}.json"
        agent = AgentConfig(
            vips=(VIP,), allowed_lbs=(LB,), iface=n[b], stats_file=str(tmp / f"{b}.json"),
            control_socket=str(tmp / f"{b}.ctl"), stats_interval=0.2,
        )  # fmt: skip
        cfg.write_text(cfgfile.dump(agent))
        start(bed, ns, [PY, "-m", "agent.decap", "--config", str(cfg)]).wait_event("ready")
        ecfg = exporter_config(bed, b, "agent", cfg, BK[b])
        start(bed, ns, [PY, "-m", "controller.exporter", "--config", str(ecfg)])
        endpoints[b] = Endpoint(ns, BK[b])
    # A TCP server on b1's VIP (the agent put the VIP there), none on b2's.
    listen = f"import socket, time; s = socket.socket(); s.bind(('{VIP}', {PORT})); s.listen()"
    start(bed, bed["bks"]["b1"], [PY, "-c", f"{listen}; print('{{}}', flush=True); time.sleep(60)"])
    bed["procs"][-1].wait_event()
    start(bed, bed["lb"], [PY, "-m", "fastpath.lb", n["l"], "--config", str(lb_cfg)]).wait_event()
    ecfg = exporter_config(bed, "lb", "lb", lb_cfg, LB)
    start(bed, bed["lb"], [PY, "-m", "controller.exporter", "--config", str(ecfg)])
    before = {k: e.wait() for k, e in endpoints.items()}
    for e in endpoints.values():
        promtool_check(e.text)

    r_mac = sh("cat", f"/sys/class/net/{n['rl']}/address", ns=bed["r"]).strip()
    l_mac = sh("cat", f"/sys/class/net/{n['l']}/address", ns=bed["lb"]).strip()
    good = udp_frames(GOOD, r_mac, l_mac, VIP, dport=PORT)
    expired = []
    for f in udp_frames(TTL_1, r_mac, l_mac, VIP, dport=PORT)[::-1]:  # other flows' order
        b = bytearray(f)
        b[ETH_HLEN + 8] = 1  # TTL 1: the core drops it (ttl_expired)
        expired.append(bytes(b))
    split = expected_split(good)
    assert sum(split.values()) == GOOD and all(split.values())  # both backends get some
    capture(bed["r"], n["rl"], 0.1, send=[*good, *expired, *wrong_port_frames(r_mac, l_mac)])
    b1_mac = sh("cat", f"/sys/class/net/{n['b1']}/address", ns=bed["bks"]["b1"]).strip()
    rb1_mac = sh("cat", f"/sys/class/net/{n['rb1']}/address", ns=bed["r"]).strip()
    spoofed = ipip_frames(SPOOFED, rb1_mac, b1_mac, "10.82.9.9", BK["b1"], VIP, dport=PORT)
    capture(bed["r"], n["rb1"], 0.1, send=spoofed)

    # Wait until the agents have had every forwarded frame, then take the final scrapes.
    deadline = time.monotonic() + 15
    while True:
        after = {k: e.scrape() for k, e in endpoints.items()}
        got = sum(delta(before[b], after[b], "l4lb_agent_frames_total") for b in BK)
        if got >= GOOD + SPOOFED or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    time.sleep(0.5)
    after = {k: e.scrape() for k, e in endpoints.items()}
    a, z = before["lb"], after["lb"]
    for e in endpoints.values():
        promtool_check(e.text)

    assert delta(a, z, "l4lb_rx_packets_total") == GOOD + TTL_1  # wrong ports never reached it
    assert delta(a, z, "l4lb_forwarded_packets_total") == GOOD
    assert delta(a, z, "l4lb_tx_packets_total") == GOOD
    assert value(z, "l4lb_conntrack_flows") == GOOD
    assert value(z, "l4lb_conntrack_capacity") == 1_000_000
    for b, ip in BK.items():
        labels = {"vip": VIP, "backend": ip, "server": b}
        assert delta(a, z, "l4lb_backend_packets_total", **labels) == split[ip]
        assert value(z, "l4lb_backend_weight", **labels) == 1
        assert value(z, "l4lb_backend_status", **labels, state="UP") == 1
        assert value(z, "l4lb_backend_status", **labels, state="DRAIN") == 0
    moved = {
        r.name.lower(): delta(a, z, "l4lb_drops_total", reason=r.name.lower()) for r in DropReason
    }
    assert moved == {**{r.name.lower(): 0 for r in DropReason}, "ttl_expired": TTL_1}
    assert delta(a, z, "l4lb_drops_total", reason="filtered_wrong_port") == WRONG
    assert delta(a, z, "l4lb_kernel_drops_total") == 0
    sent = delta(a, z, "l4lb_host_network_transmit_packets_total", device=n["l"])
    assert GOOD <= sent <= GOOD + 4  # the tunnels, and at most an ARP exchange or two
    assert value(z, "l4lb_process_resident_memory_bytes") > 10e6  # the LB's, not 0
    assert value(z, "l4lb_process_cpu_seconds_total") > 0
    assert value(z, "l4lb_exporter_errors_total", reason="control") == 0
    assert value(z, "l4lb_exporter_errors_total", reason="nft") == 0

    for b, ip in BK.items():
        x, y = before[b], after[b]
        spoof = SPOOFED if b == "b1" else 0
        assert delta(x, y, "l4lb_agent_decap_total") == split[ip]
        assert delta(x, y, "l4lb_agent_frames_total") == split[ip] + spoof
        assert delta(x, y, "l4lb_agent_drops_total", reason="spoofed_source") == spoof
        drops = [(k, v) for k, v in y.items() if k[0] == "l4lb_agent_drops_total"]
        assert sum(v - x[k] for k, v in drops) == spoof  # no other reason moved
        listening = 1 if b == "b1" else 0
        assert value(y, "l4lb_agent_server_listening", vip=VIP, port=str(PORT)) == listening
        assert value(y, "l4lb_agent_process_resident_memory_bytes") > 10e6

    # The LB stops: its exporter still answers, saying so.
    bed["procs"][-2].stop()
    down = endpoints["lb"].scrape()
    assert value(down, "l4lb_up") == 0
    assert value(down, "l4lb_exporter_errors_total", reason="control") >= 1
    assert ("l4lb_rx_packets_total", frozenset()) not in down
