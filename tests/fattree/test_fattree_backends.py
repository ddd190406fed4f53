"""Backends come and go while long downloads run (root, mininet): `python -m controller backend`
on the whole fat tree with both LBs, and bad control input refused with nothing changed.

Six rate-limited downloads of the 10 MB file (each over 15 s; the clients' tcp_rmem capped, so
the transfer really is on the wire: DESIGN.md's trap) run while, one at a time, a fifth backend
is added (its agent and server started as controller.services starts them, stopped by PID), a
backend that carries none of them is removed, one that carries three is drained (they
complete; it then gets no new flow) and weights change. Every download completes with the
right sha256 and no connection is reset. Where each flow lands is computed from the LBs' own
hash and table (the same code, the same seed), so the test picks source ports that put three
downloads on the backend it drains and none on the one it removes, and checks on the servers
that they did land there.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fatnet import in_node

from bench.frames import ipv4_header
from controller import backend_record, netstate, services
from controller.deployment import REPO_ROOT, load_deployment
from controller.netstate import NetState
from fastpath.balancer import Balancer
from fastpath.config import BalancerConfig
from l4lb.control import request
from l4lb.wire import ETH, ETH_P_IP, TCP

pytestmark = pytest.mark.fattree

DEP = load_deployment()
TOPO = DEP.topology
VIP = DEP.vip
STATE = services.STATE_DIR
SUMS = dict(
    reversed(line.split())
    for line in (REPO_ROOT / "bench/wwwroot/SHA256SUMS").read_text().splitlines()
)
RATE = "560k"  # bytes/s per download: 10 MiB take ~19 s
RMEM = "4096 65536 262144"  # the clients' TCP receive buffer: at most 256 KiB in flight
DOWNLOADERS = ("h4", "h5", "h6", "h8", "h9", "h10")
PROBER = "h12"  # short requests from here
FIFTH = "h16"


@pytest.fixture
def started() -> Iterator[set[str]]:
    """Names of the services the test starts itself (the fifth backend's agent and server,
    lb-h2 restarted: children of the test), stopped by PID afterwards."""
    names: set[str] = set()
    try:
        yield names
    finally:
        services.stop_named(STATE, names)


def node(st: NetState, host: str) -> int:
    return st.nodes[host].pid


def cli(*args: str, user: int | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "controller", "backend", *args]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    return subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def lb_sets() -> dict[str, Any]:
    """Each LB's backend set and table digest, by its own control channel."""
    out = {}
    for lb in DEP.load_balancers:
        r = request(STATE / f"lb-{lb}.ctl", "backends")
        out[lb] = (
            [(b["ip"], b["weight"], b["admin"]) for b in r["backends"]],
            r["table"]["digest"],
        )
    return out


def listing() -> dict[str, Any]:
    res = cli("list", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    data: dict[str, Any] = json.loads(res.stdout)
    assert data["tables_agree"], data["load_balancers"]
    return data


def row(data: dict[str, Any], host: str) -> dict[str, Any]:
    return next(b for b in data["backends"] if b["host"] == host)


def change(*args: str) -> str:
    res = cli(*args)
    assert res.returncode == 0, f"backend {' '.join(args)}: {res.stdout}{res.stderr}"
    assert "applied on h1, h2" in res.stdout and "tables agree" in res.stdout, res.stdout
    return res.stdout


# --- where a flow lands: the LBs' own choice, computed ---------------------------------------


def syn(src: str, sport: int) -> bytes:
    """A client's SYN to VIP:80 as the LB taps it (Ethernet addresses do not matter)."""
    tcp = TCP.pack(sport, 80, 0, 0, 0x50, 0x02, 1000, 0, 0)
    return ETH.pack(bytes(6), bytes(6), ETH_P_IP) + ipv4_header(src, VIP, 6, len(tcp)) + tcp


def chooser(weights: dict[str, int]) -> Balancer:
    """A packet core with the LBs' seed and this set: it picks what they pick for a new flow."""
    backends = tuple((TOPO.host_ip(h), w) for h, w in weights.items())
    return Balancer(
        BalancerConfig(
            vips=((VIP, 80),), backends=backends, local_ip="10.1.1.2", local_mac=bytes(6),
            next_hop_mac=bytes(6), hash_seed=DEP.hash_seed,
        )
    )  # fmt: skip


def lands(bal: Balancer, client: str, port: int) -> str:
    out = memoryview(bytearray(1600))
    assert bal.process(syn(TOPO.host_ip(client), port), out, 0.0)
    ip = str(ipaddress.IPv4Address(bytes(out[30:34])))
    return next(h for h in TOPO.hosts() if TOPO.host_ip(h) == ip)


def ports_to(bal: Balancer, client: str, backend: str, n: int, start: int) -> list[int]:
    found = [p for p in range(start, start + 4000) if lands(bal, client, p) == backend]
    assert len(found) >= n
    return found[:n]


def server_peers(st: NetState, host: str) -> set[tuple[str, int]]:
    """Clients with an established connection to the VIP's port 80 on `host`."""
    peers = set()
    for line in Path(f"/proc/{node(st, host)}/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        local, remote, state = cols[1], cols[2], cols[3]
        if state == "01" and local.endswith(":0050"):
            addr, port = remote.split(":")
            ip = ipaddress.IPv4Address(bytes.fromhex(addr)[::-1])
            peers.add((str(ip), int(port, 16)))
    return peers


def estab_resets(st: NetState, host: str) -> int:
    """The host's TCP EstabResets: connections reset from ESTABLISHED or CLOSE-WAIT."""
    lines = Path(f"/proc/{node(st, host)}/net/snmp").read_text().splitlines()
    names, values = (ln.split() for ln in lines if ln.startswith("Tcp:"))
    return int(values[names.index("EstabResets")])


# --- the downloads and the short requests ----------------------------------------------------


@dataclass
class Download:
    client: str
    port: int
    path: Path
    proc: subprocess.Popen[str]


def start_download(st: NetState, client: str, port: int, tmp: Path) -> Download:
    path = tmp / f"dl-{client}.bin"
    out = "%{http_code} %{size_download} %{time_total}"
    argv = ["curl", "-sS", "--limit-rate", RATE, "--local-port", str(port), "-o", str(path),
            "-w", out, f"http://{VIP}/10m.bin"]  # fmt: skip
    proc = subprocess.Popen(in_node(node(st, client), argv), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    return Download(client, port, path, proc)


def short_requests(st: NetState, ports: list[int]) -> None:
    """One small request per source port from PROBER; every one must succeed."""
    for p in ports:
        argv = ["curl", "-sS", "--max-time", "5", "--local-port", str(p), "-o", "/dev/null",
                "-w", "%{http_code}", f"http://{VIP}/1k.bin"]  # fmt: skip
        res = subprocess.run(in_node(node(st, PROBER), argv), capture_output=True, text=True,
                             timeout=10)  # fmt: skip
        assert (res.returncode, res.stdout) == (0, "200"), (p, res.stdout, res.stderr)


def connections(host: str) -> int:
    """New flows both LBs sent to `host` so far (their per-backend connection counters)."""
    total = 0
    for lb in DEP.load_balancers:
        for b in request(STATE / f"lb-{lb}.ctl", "backends")["backends"]:
            if b["name"] == host:
                total += b["connections"]
    return total


def test_backends_change_under_long_downloads_and_bad_input_changes_nothing(
    fattree_services: NetState, started: set[str], tmp_path: Path
) -> None:
    st = fattree_services
    four = dict(DEP.backends)
    bal4 = chooser(four)
    # Three downloads on h3 (to be drained), three on h7, none on h11 (to be removed).
    plan = dict(zip(DOWNLOADERS, ["h3", "h7", "h3", "h7", "h3", "h7"], strict=True))
    ports = {c: ports_to(bal4, c, b, 1, 30000)[0] for c, b in plan.items()}
    for c in (*DOWNLOADERS, PROBER):
        subprocess.run(in_node(node(st, c), ["sysctl", "-qw", f"net.ipv4.tcp_rmem={RMEM}"]),
                       check=True)  # fmt: skip
    resets = {c: estab_resets(st, c) for c in (*DOWNLOADERS, PROBER)}
    t0 = time.monotonic()
    downloads = [start_download(st, c, p, tmp_path) for c, p in ports.items()]
    try:
        time.sleep(1.0)
        for backend in ("h3", "h7"):
            want = {(TOPO.host_ip(c), ports[c]) for c, b in plan.items() if b == backend}
            assert want <= server_peers(st, backend), f"downloads not on {backend} as computed"
        assert not server_peers(st, "h11")

        # 1. A fifth backend: its agent and server first (by PID: services.stop_host), then add.
        started.update(
            r["name"] for r in services.start_host(lambda h: node(st, h), DEP, FIFTH, STATE)
        )
        out = change("add", FIFTH)
        bal5 = chooser({**four, FIFTH: 1})
        before = connections(FIFTH)
        short_requests(st, ports_to(bal5, PROBER, FIFTH, 4, 40000))
        assert connections(FIFTH) - before == 4, "new flows did not reach the fifth backend"
        data = listing()
        assert abs(row(data, FIFTH)["per_lb"]["h1"]["slots"] / 65537 - 0.2) < 0.02, out

        # 2. Remove a backend that carries none of the downloads.
        change("remove", "h11")
        # 3. Drain one that carries three: they go on; new flows that would go there do not.
        change("drain", "h3")
        before = connections("h3")
        short_requests(st, ports_to(bal5, PROBER, "h3", 4, 45000))
        assert connections("h3") == before, "a drained backend got a new flow"
        data = listing()
        assert row(data, "h3")["state"] == "draining" and row(data, "h3")["active_flows"] >= 3
        # 4. Weights change.
        change("weight", "h7", "3")
        change("weight", "h15", "2")
        data = listing()
        assert [(b["host"], b["weight"]) for b in data["backends"]] == [
            ("h3", 0), ("h7", 3), ("h15", 2), (FIFTH, 1)
        ]  # fmt: skip
        text = cli("list")
        assert text.returncode == 0 and "10.2.3.2 (h3)" in text.stdout, text.stdout
        print(text.stdout)  # the README's example

        # Every download completes, whole and right, and took what a long download takes.
        for d in downloads:
            stdout, stderr = d.proc.communicate(timeout=90)
            assert d.proc.returncode == 0, f"{d.client}: curl {d.proc.returncode}: {stderr}"
            code, size, took = stdout.split()
            assert (code, int(size)) == ("200", 10 * 1024 * 1024), d.client
            assert float(took) >= 15.0, f"{d.client}: only {took} s: not a long download"
            digest = hashlib.sha256(d.path.read_bytes()).hexdigest()
            assert digest == SUMS["10m.bin"], f"{d.client}: wrong sha256"
        assert {c: estab_resets(st, c) for c in resets} == resets, "a connection was reset"
        print(f"downloads: {time.monotonic() - t0:.1f} s")
    finally:
        for d in downloads:
            if d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait()

    # --- bad control input: refused, nothing changed on any LB ---------------------------------
    sets = lb_sets()
    record = backend_record.read_record(STATE)
    assert len({digest for _, digest in sets.values()}) == 1
    for args, rc, why in [
        (("add", "h99"), 2, "unknown host 'h99'"),
        (("add", "h1"), 2, "h1 is a load balancer"),
        (("weight", "h7", "1001"), 2, r"weight must be 0..1000"),
        (("weight", "h7", "-1"), 2, r"weight must be 0..1000"),
        (("add", "h14"), 1, "h14 runs no agent"),
        (("drain", "h11"), 2, "h11 is not a backend"),
    ]:
        res = cli(*args)
        assert res.returncode == rc and why in res.stderr, (args, res.returncode, res.stderr)
        assert lb_sets() == sets and backend_record.read_record(STATE) == record, args
    res = cli("drain", "h7", user=65534)  # a caller who is not root
    assert res.returncode == 1 and "need root" in res.stderr, res.stderr
    sock = STATE / "lb-h1.ctl"
    res = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
         "l4lb.control", str(sock), "backend.drain", "ip=10.4.7.2"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert res.returncode == 1 and "permission denied" in res.stderr, res.stderr
    assert lb_sets() == sets

    # An LB down during `backend add` (h11 still runs its agent and server): refused, h1 kept
    # its set; restarted, h2 starts with the recorded set, not the deployment's.
    lb2 = next(r for r in services.running(STATE) if r["name"] == "lb-h2")
    os.kill(lb2["pid"], signal.SIGTERM)
    assert netstate.wait_gone(lb2["pid"], lb2["start_time"], 10.0)
    res = cli("add", "h11")
    assert res.returncode == 1 and "h2 cannot be reached" in res.stderr, res.stderr
    assert "nothing was changed on any LB" in res.stderr
    assert request(STATE / "lb-h1.ctl", "backends")["table"]["digest"] == sets["h1"][1]
    started.add(services.restart(lambda h: node(st, h), STATE, "lb-h2")["name"])
    assert lb_sets() == sets  # the record's set (h3 drained, h11 gone, h16 in), same table
    assert [b.host for b in backend_record.read_record(STATE).backends] == [
        "h3",
        "h7",
        "h15",
        FIFTH,
    ]
    assert services.stop_host(STATE, FIFTH) == 3  # the fifth backend's agent, server, exporter
