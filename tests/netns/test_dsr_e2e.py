"""Direct server return end to end, with the real processes:

    client c0 --- r1 [router] r2 --- l0 LB (python -m fastpath.lb)
                         r3
                          |
                         b0 backend (python -m agent.decap + an HTTP server bound to the VIP)

The router sends the VIP to the LB; the LB tunnels to the backend through the router; the
backend's replies go from the VIP straight back to the client through the router.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from bench.netns import PY, Netns, Procs, py, sh

pytestmark = [pytest.mark.netns, pytest.mark.needs("tcpdump", "ethtool", tun=True)]

VIP = "20.0.0.1"
CLIENT, LB, BACKEND = "10.81.1.2", "10.81.2.2", "10.81.3.2"
MSS = 1440
VIP_SAMPLES = 5  # frames from the VIP described in a capture's summary
TCPDUMP_OPTS = ("-U", "-n", "-Z", "root")  # write each packet at once; stay root for tmp_path

# Backend's HTTP server: GET serves a directory, POST answers the body's length and SHA-256.
SERVER = r"""
import hashlib, http.server, socketserver, sys
class H(http.server.SimpleHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        out = f"{len(body)} {hashlib.sha256(body).hexdigest()}".encode()
        self.send_response(200); self.send_header("Content-Length", str(len(out)))
        self.end_headers(); self.wfile.write(out)
    def log_message(self, *a): pass
handler = lambda *a, **k: H(*a, directory=sys.argv[2], **k)
socketserver.ThreadingTCPServer.allow_reuse_address = True
with socketserver.ThreadingTCPServer((sys.argv[1], 80), handler) as srv:
    print("serving", flush=True); srv.serve_forever()
"""

# Client: a real TCP client (urllib) fetching and uploading through the VIP.
CLIENT_CODE = r"""
import hashlib, json, sys, urllib.request
url, size = sys.argv[1], int(sys.argv[2])
page = urllib.request.urlopen(url + "/page.bin", timeout=20).read()
body = bytes(range(256)) * (size // 256)
req = urllib.request.Request(url + "/upload", data=body, method="POST")
answer = urllib.request.urlopen(req, timeout=20).read().decode()
print(json.dumps({"page_sha": hashlib.sha256(page).hexdigest(), "page_len": len(page),
                  "upload": answer, "upload_sha": hashlib.sha256(body).hexdigest(),
                  "upload_len": len(body)}))
"""

SPOOF = r"""
import json, sys
from scapy.all import IP, UDP, conf
s = conf.L3socket()
s.send(IP(src=sys.argv[1], dst=sys.argv[2]) / IP(src=sys.argv[1], dst=sys.argv[3])
       / UDP(sport=5555, dport=80) / b"injected")
print(json.dumps("sent"))
"""


def mac_of(ns: str, ifname: str) -> str:
    return sh("cat", f"/sys/class/net/{ifname}/address", ns=ns).strip()


@pytest.fixture(params=["client-offloads-off", "client-offloads-on"])
def net(request: pytest.FixtureRequest, netns: Netns) -> dict[str, str]:
    t = netns.tag
    c, r, lb, b = netns.add("c"), netns.add("r"), netns.add("l"), netns.add("b")
    names = {"c0": f"ec{t}", "l0": f"el{t}", "b0": f"eb{t}"}
    names |= {"r1": f"rc{t}", "r2": f"rl{t}", "r3": f"rb{t}"}
    netns.veth(c, names["c0"], r, names["r1"], ip_a=f"{CLIENT}/24", ip_b="10.81.1.1/24")
    netns.veth(lb, names["l0"], r, names["r2"], ip_a=f"{LB}/24", ip_b="10.81.2.1/24")
    netns.veth(b, names["b0"], r, names["r3"], ip_a=f"{BACKEND}/24", ip_b="10.81.3.1/24")
    for ns, gw in ((c, "10.81.1.1"), (lb, "10.81.2.1"), (b, "10.81.3.1")):
        sh("ip", "route", "add", "default", "via", gw, ns=ns)
    sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=r)
    # Replies from the VIP enter the router from the backend, not from where the VIP is
    # routed (the LB): strict reverse-path filtering would drop them.
    for key in ("all", "default", names["r3"]):
        sh("sysctl", "-qw", f"net.ipv4.conf.{key}.rp_filter=0", ns=r)
    sh("ip", "route", "add", f"{VIP}/32", "via", LB, ns=r)
    # The LB taps frames of at most one MTU (fastpath.lb asks for this at the other end of
    # its interface): a router port facing it must segment on the way out, as a NIC does
    # on the wire. A veth keeps a forwarded GSO frame whole, so a client's TSO burst would
    # reach the LB as one frame of several segments (up to 64 KB), be dropped
    # (io.rx_truncated) and be resent segment by segment after RTOs: the 300 KB upload
    # then crawls and, on a loaded machine, outlasts its 20 s timeout.
    sh("ethtool", "-K", names["r2"], "tso", "off", "gso", "off", ns=r)
    if request.param == "client-offloads-off":
        # Like a client behind a real NIC: complete checksums on the wire.
        sh("ethtool", "-K", names["c0"], "tx", "off", "tso", "off", "gso", "off", ns=c)
    # Else a veth's default: the client's kernel leaves TCP checksums partial and 64 KB
    # GSO frames; the whole path must still deliver byte-exact data.
    return {
        "c": c,
        "r": r,
        "lb": lb,
        "b": b,
        **names,
        "r2_mac": mac_of(r, names["r2"]),
        "mode": request.param,
    }


def tcpdump(ns: str, ifname: str, pcap: Path, direction: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            *("ip", "netns", "exec", ns, "tcpdump", "-i", ifname, "-Q", direction),
            *(*TCPDUMP_OPTS, "-w", str(pcap), "ip"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    proc.stderr.readline()  # "listening on ...": the capture is up
    return proc


def stop_tcpdump(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def pcap_summary(pcap: Path) -> dict[str, Any]:
    """Count IPv4 frames in a capture by protocol and by source; the first few frames from the
    VIP are kept as one-line summaries, so a failed assertion shows what they were."""
    from scapy.layers.inet import IP
    from scapy.utils import rdpcap

    out: dict[str, Any] = {"total": 0, "ipip": 0, "other": 0, "from_vip": 0, "max_len": 0}
    samples: list[str] = []
    for p in rdpcap(str(pcap)):
        if IP not in p:
            continue
        out["total"] += 1
        ip = p[IP]
        out["ipip" if ip.proto == 4 else "other"] += 1
        out["max_len"] = max(out["max_len"], ip.len)
        if ip.src == VIP:
            out["from_vip"] += 1
            if len(samples) < VIP_SAMPLES:
                samples.append(f"{float(p.time):.6f} {ip.summary()} len={ip.len} ttl={ip.ttl}")
    out["vip_samples"] = samples
    return out


def test_client_fetches_from_vip_and_replies_bypass_the_lb(
    net: dict[str, str], procs: Procs, tmp_path: Path
) -> None:
    www = tmp_path / "www"
    www.mkdir()
    page = os.urandom(200_000)
    (www / "page.bin").write_bytes(page)
    os.chmod(tmp_path, 0o755)

    agent = procs.start(
        net["b"],
        [
            *(PY, "-m", "agent.decap", "--iface", net["b0"], "--vip", VIP, "--allow-lb", LB),
            *("--server-mss", str(MSS), "--stats-interval", "0.2"),
            *("--stats-file", str(tmp_path / "agent.json")),
        ],
    )
    agent.wait_event("ready")
    server = procs.start(net["b"], [PY, "-c", SERVER, VIP, str(www)])
    deadline = time.monotonic() + 10
    while not server.lines and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.lines, "HTTP server did not start"
    lb = procs.start(
        net["lb"],
        [
            *(PY, "-m", "fastpath.lb", net["l0"], "--vip", f"{VIP}:80", "--backend", BACKEND),
            *("--next-hop-mac", net["r2_mac"], "--stats-interval", "0.2"),
            *("--stats-file", str(tmp_path / "lb.json")),
        ],
    )
    lb.wait_event("")  # first counters line: the LB is forwarding

    # What the LB sends, seen on the wire at the router (the LB bypasses the qdisc layer, and
    # with it the taps of its own interface).
    lb_out = tcpdump(net["r"], net["r2"], tmp_path / "lb-out.pcap", "in")
    lb_in = tcpdump(net["r"], net["r2"], tmp_path / "lb-in.pcap", "out")
    bk_out = tcpdump(net["b"], net["b0"], tmp_path / "bk-out.pcap", "out")
    try:
        res = py(net["c"], CLIENT_CODE, f"http://{VIP}", "300000", timeout=60)
    finally:
        for p in (lb_out, lb_in, bk_out):
            stop_tcpdump(p)

    # The real TCP client got the page and the server got the upload, byte for byte.
    assert res["page_len"] == len(page)
    assert res["page_sha"] == hashlib.sha256(page).hexdigest()
    assert res["upload"] == f"{res['upload_len']} {res['upload_sha']}"

    sent_by_lb = pcap_summary(tmp_path / "lb-out.pcap")
    seen_by_lb = pcap_summary(tmp_path / "lb-in.pcap")
    from_backend = pcap_summary(tmp_path / "bk-out.pcap")
    assert sent_by_lb["ipip"] > 0 and sent_by_lb["other"] == 0, sent_by_lb  # only tunnels
    assert sent_by_lb["max_len"] <= 1500  # the clamped MSS made every segment fit
    # No reply passed the LB (on failure: what the frames were, and the capture to read).
    assert seen_by_lb["from_vip"] == 0, (seen_by_lb, str(tmp_path / "lb-in.pcap"))
    assert from_backend["from_vip"] > 0  # replies left the backend from the VIP (DSR)
    assert from_backend["ipip"] == 0

    # A client that spoofs the tunnel: dropped and counted by the agent, never delivered.
    before = agent.latest_event("stats")
    py(net["c"], SPOOF, CLIENT, BACKEND, VIP)
    deadline = time.monotonic() + 10
    stats = agent.latest_event("stats")
    # Wait for the spoofed frame itself: late tunnel frames of the finished connection (ACKs,
    # FIN) may move the frame count first.
    spoofed = before["drops"]["spoofed_source"]
    while stats["drops"]["spoofed_source"] == spoofed and time.monotonic() < deadline:
        stats = agent.latest_event("stats")
    assert stats["drops"]["spoofed_source"] == before["drops"]["spoofed_source"] + 1
    assert stats["last_spoofed_source"] == CLIENT
    assert stats["delivered"] > 0 and stats["drops"]["inner_not_vip"] == 0
    # With client offloads on, the LB completes the partial checksums it taps
    # (l4lb.checksum.complete_l4_checksum); the agent's own repair (partial_checksums) is for
    # tunnels from LBs that do not.

    lb_stats = json.loads((tmp_path / "lb.json").read_text())
    lb_drops = {k: v for k, v in lb_stats["core"]["drops"].items() if v}
    assert lb_drops == {} and lb_stats["io"]["rx_truncated"] == 0, lb_stats

    # After the agent exits, the VIP and its nft table are gone.
    assert agent.stop() == 0, agent.stderr
    procs.items.remove(agent)
    addrs = sh("ip", "-o", "-4", "addr", "show", ns=net["b"])
    assert f"{VIP}/" not in addrs
    assert "l4lb_agent_" not in sh("nft", "list", "tables", ns=net["b"])
