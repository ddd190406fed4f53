"""The real `python -m agent.decap` on a veth pair: a load-balancer namespace sends IP-in-IP
crafted by scapy to a backend namespace running the agent and servers bound to the VIP."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.netns import PY, Netns, NsProc, py, sh
from l4lb.control import request

pytestmark = [pytest.mark.netns, pytest.mark.needs(tun=True)]

VIP = "20.0.0.1"
LB_IP, BK_IP, SPOOF_IP = "10.77.0.1", "10.77.0.2", "10.77.0.66"
MSS = 1440

# Runs in the LB namespace: sends the described tunnels, captures what comes back for a moment.
PEER = r"""
import json, sys, threading, time
from scapy.all import AsyncSniffer, Ether, IP, TCP, UDP, conf
iface, dst_mac, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
up = threading.Event()
sniff = AsyncSniffer(iface=iface, store=True, started_callback=up.set)
sniff.start(); up.wait(10)
sock = conf.L2socket(iface=iface)
for p in spec["send"]:
    inner = IP(src=p["isrc"], dst=p["idst"])
    if p["l4"] == "udp":
        inner = inner / UDP(sport=p["sport"], dport=p["dport"]) / p["data"].encode()
    else:
        inner = inner / TCP(sport=p["sport"], dport=p["dport"], flags="S", seq=1000,
                            options=[("MSS", 1460)])
    sock.send(Ether(dst=dst_mac) / IP(src=p["osrc"], dst=p["odst"]) / inner)
time.sleep(spec.get("wait", 1.0))
sniff.stop(); sock.close()
out = {"icmp_proto_unreach": 0, "synacks": []}
for r in sniff.results:
    if r.haslayer("ICMP") and r["ICMP"].type == 3 and r["ICMP"].code == 2:
        out["icmp_proto_unreach"] += 1
    if r.haslayer(TCP) and r[TCP].flags == "SA":
        ip = r[IP]
        wire = ip[TCP].chksum
        fresh = IP(bytes(ip))
        del fresh[TCP].chksum
        mss = [v for k, v in ip[TCP].options if k == "MSS"]
        ok = IP(bytes(fresh))[TCP].chksum == wire
        out["synacks"].append({"src": ip.src, "mss": mss, "chksum_ok": ok})
print(json.dumps(out))
"""

# Runs in the backend namespace: binds UDP on the VIP and says "bound"; waits up to argv[3] s for
# the first datagram (the sender, a scapy process, can take seconds just to import on a loaded
# machine), then collects until argv[4] s pass without another; prints what came as JSON.
UDP_SINK = r"""
import json, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND: bind before the VIP appears
s.bind((sys.argv[1], int(sys.argv[2]))); s.settimeout(float(sys.argv[3]))
print("bound", flush=True)
got = []
try:
    while True:
        data, addr = s.recvfrom(2048); got.append([data.decode(), addr[0]])
        s.settimeout(float(sys.argv[4]))
except socket.timeout:
    pass
print(json.dumps(got))
"""


@pytest.fixture
def bed(netns: Netns) -> dict[str, str]:
    lb, bk = netns.add("l"), netns.add("b")
    lb_if, bk_if = f"al{netns.tag}", f"ab{netns.tag}"
    netns.veth(lb, lb_if, bk, bk_if, ip_a=f"{LB_IP}/24", ip_b=f"{BK_IP}/24")
    sh("ip", "route", "add", "default", "via", LB_IP, ns=bk)
    mac = sh("cat", f"/sys/class/net/{bk_if}/address", ns=bk).strip()
    return {"lb": lb, "bk": bk, "lb_if": lb_if, "bk_if": bk_if, "bk_mac": mac}


def start_agent(bed: dict[str, str], stats: Path, *extra: str) -> NsProc:
    argv = [PY, "-m", "agent.decap", "--iface", bed["bk_if"], "--vip", VIP]
    argv += ["--allow-lb", LB_IP, "--server-mss", str(MSS), "--stats-interval", "0.2"]
    argv += ["--stats-file", str(stats), "--control-socket", str(stats.with_suffix(".ctl"))]
    return NsProc(bed["bk"], [*argv, *extra])


@pytest.fixture
def agent(bed: dict[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[NsProc]:
    proc = start_agent(bed, tmp_path / "agent.json", *getattr(request, "param", ()))
    try:
        proc.wait_event("ready")
        yield proc
    finally:
        proc.stop()


def peer(bed: dict[str, str], send: list[dict[str, Any]], wait: float = 1.0) -> dict[str, Any]:
    spec = json.dumps({"send": send, "wait": wait})
    return dict(py(bed["lb"], PEER, bed["lb_if"], bed["bk_mac"], spec))


def tunnel(osrc: str, data: str, l4: str = "udp", dport: int = 9999) -> dict[str, Any]:
    return {
        "osrc": osrc,
        "odst": BK_IP,
        "isrc": "10.55.0.9",
        "idst": VIP,
        "l4": l4,
        "sport": 40000,
        "dport": dport,
        "data": data,
    }


def stats_with(proc: NsProc, frames: int, timeout: float = 10) -> dict[str, Any]:
    """The first stats event counting at least `frames` frames."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        ev = proc.wait_event("stats", timeout=end - time.monotonic())
        if ev["frames"] >= frames:
            return ev
    raise AssertionError(f"the agent never counted {frames} frames")


def host_state(bed: dict[str, str], tun: str) -> dict[str, Any]:
    bk, bk_if = bed["bk"], bed["bk_if"]
    links = sh("ip", "-o", "link", "show", ns=bk)
    addrs = sh("ip", "-o", "-4", "addr", "show", ns=bk)
    tables = sh("nft", "list", "tables", ns=bk)
    conf = f"/proc/sys/net/ipv4/conf/{bk_if}"
    return {
        "tun": f" {tun}:" in links,
        "vip": f" {VIP}/32 " in addrs,
        "table": f"l4lb_agent_{bk_if}" in tables,
        "arp_ignore": sh("cat", f"{conf}/arp_ignore", ns=bk).strip(),
        "arp_announce": sh("cat", f"{conf}/arp_announce", ns=bk).strip(),
    }


def test_installs_vip_table_and_arp_settings(bed: dict[str, str], agent: NsProc) -> None:
    ready = agent.wait_event("stats")  # the first stats line follows "ready"
    assert ready["frames"] == 0
    tun = f"l4a-{bed['bk_if']}"[:15]
    state = host_state(bed, tun)
    assert state == {
        "tun": True,
        "vip": True,
        "table": True,
        "arp_ignore": "1",
        "arp_announce": "2",
    }
    rules = sh("nft", "list", "table", "inet", f"l4lb_agent_{bed['bk_if']}", ns=bed["bk"])
    assert "hook ingress" in rules and "ip protocol ipencap" in rules and "drop" in rules
    assert f"maxseg size set {MSS}" in rules
    assert sh("cat", f"/proc/sys/net/ipv4/conf/{tun}/rp_filter", ns=bed["bk"]).strip() == "2"


@pytest.mark.parametrize(
    "agent", [(), ("--busy-poll-us", "5000")], ids=["sleeping", "busy-polling"], indirect=True
)
def test_delivers_allowed_tunnels_and_drops_spoofed_ones(
    bed: dict[str, str], agent: NsProc
) -> None:
    sink = subprocess.Popen(
        ["ip", "netns", "exec", bed["bk"], PY, "-c", UDP_SINK, VIP, "9999", "20", "1.5"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert sink.stdout is not None and sink.stdout.readline() == "bound\n"
        out = peer(bed, [tunnel(LB_IP, "from-the-lb"), tunnel(SPOOF_IP, "spoofed")])
        got, _ = sink.communicate(timeout=30)
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.wait()
    assert json.loads(got) == [["from-the-lb", "10.55.0.9"]]
    assert out["icmp_proto_unreach"] == 0  # the ingress drop keeps the kernel quiet
    stats = stats_with(agent, 2)
    assert stats["delivered"] == 1
    live = request(agent.argv[agent.argv.index("--control-socket") + 1], "show")
    assert (live["delivered"], live["drops"]["spoofed_source"]) == (1, 1)
    assert stats["drops"]["spoofed_source"] == 1
    assert stats["dropped"] == 1
    assert stats["last_spoofed_source"] == SPOOF_IP


def test_without_agent_kernel_answers_protocol_unreachable(bed: dict[str, str]) -> None:
    """The trap the agent exists for: no ipip module here, so the kernel complains."""
    out = peer(bed, [tunnel(LB_IP, "nobody-home")])
    assert out["icmp_proto_unreach"] == 1


def test_synack_from_vip_advertises_server_mss(bed: dict[str, str], agent: NsProc) -> None:
    # Software checksums on the backend's veth, so the capture sees the checksum nft left.
    sh("ethtool", "-K", bed["bk_if"], "tx", "off", ns=bed["bk"])
    listener = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            bed["bk"],
            PY,
            "-c",
            "import socket,time;s=socket.socket();s.bind(('20.0.0.1',80));s.listen();time.sleep(4)",
        ]
    )
    try:
        out = peer(bed, [tunnel(LB_IP, "", l4="tcp", dport=80)], wait=1.5)
    finally:
        listener.kill()
        listener.wait()
    assert len(out["synacks"]) >= 1, out
    synack = out["synacks"][0]
    assert synack["src"] == VIP  # straight from the backend (DSR), not tunnelled
    assert synack["mss"] == [MSS]  # the client offered 1460
    assert synack["chksum_ok"]


def test_sigterm_removes_everything_and_restores_sysctls(
    bed: dict[str, str], tmp_path: Path
) -> None:
    tun = f"l4a-{bed['bk_if']}"[:15]
    before = host_state(bed, tun)
    proc = start_agent(bed, tmp_path / "a.json")
    try:
        proc.wait_event("ready")
        assert host_state(bed, tun)["vip"]
    finally:
        rc = proc.stop(signal.SIGTERM)
    assert rc == 0, proc.stderr
    assert host_state(bed, tun) == before
    assert before["vip"] is False and before["table"] is False
    final = json.loads((tmp_path / "a.json").read_text())
    assert final["event"] == "exit"


def test_sigint_also_cleans_up(bed: dict[str, str], tmp_path: Path) -> None:
    tun = f"l4a-{bed['bk_if']}"[:15]
    proc = start_agent(bed, tmp_path / "a.json")
    try:
        proc.wait_event("ready")
    finally:
        rc = proc.stop(signal.SIGINT)
    assert rc == 0, proc.stderr
    state = host_state(bed, tun)
    assert not state["vip"] and not state["table"] and not state["tun"]


def test_after_sigkill_the_vip_is_gone_and_a_restart_replaces_the_stale_table(
    bed: dict[str, str], tmp_path: Path
) -> None:
    tun = f"l4a-{bed['bk_if']}"[:15]
    proc = start_agent(bed, tmp_path / "a.json")
    try:
        proc.wait_event("ready")
    finally:
        proc.stop(signal.SIGKILL)
    state = host_state(bed, tun)
    assert not state["vip"] and not state["tun"]  # they went with the TUN file descriptor
    assert state["table"]  # a killed process cannot delete it...
    again = start_agent(bed, tmp_path / "b.json")
    try:
        again.wait_event("ready")  # ...the next start replaces it atomically
        assert sh("nft", "list", "tables", ns=bed["bk"]).count("l4lb_agent_") == 1
    finally:
        assert again.stop() == 0, again.stderr
    assert not host_state(bed, tun)["table"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--iface", "nosuchif0"], "no interface"),
        (["--vip", "20.0.0.x"], "not an IPv4 address"),
        (["--allow-lb", "10.77.0.1/33"], "allowed_lbs: '10.77.0.1/33'"),
        (["--stats-interval", "-1"], "stats_interval: must be >= 0"),
        (["--server-mss", "9000"], "server_mss: must be 536..1440"),
        (["--rps", "zz"], "rps"),
    ],
)
def test_bad_input_exits_2_with_a_reason(
    bed: dict[str, str], args: list[str], message: str
) -> None:
    base = {"--iface": bed["bk_if"], "--vip": VIP, "--allow-lb": LB_IP, "--server-mss": "1440"}
    base[args[0]] = args[1]
    argv = [PY, "-m", "agent.decap"] + [x for kv in base.items() for x in kv]
    if args[0] not in base:
        argv += args
    res = subprocess.run(
        ["ip", "netns", "exec", bed["bk"], *argv],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert res.returncode == 2, res.stderr
    assert message in res.stderr
    assert "Traceback" not in res.stderr
    assert "l4lb_agent_" not in sh("nft", "list", "tables", ns=bed["bk"])
