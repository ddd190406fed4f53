"""controller.services on throwaway namespaces standing in for the fat tree's hosts (root).

Each host of the deployment that a mode touches gets its own network namespace with the host's
address on lo, and a `sleep` inside it plays the mininet node's shell (the
PID that services.start enters). Checks that services start in the right namespace, are ready
when start returns, are recorded by PID, and that stop leaves nothing behind.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.netns import Netns, sh
from controller import services
from controller.deployment import load_deployment

pytestmark = [pytest.mark.netns, pytest.mark.needs("php")]


@pytest.fixture()
def nodes(netns: Netns) -> Iterator[dict[str, int]]:
    dep = load_deployment()
    sleepers: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for host in dep.topology.hosts():
            ns = netns.add(host)
            # The host's address on lo (no dummy module on this kernel): enough to bind and serve.
            sh("ip", "addr", "add", f"{dep.topology.host_ip(host)}/32", "dev", "lo", ns=ns)
            sleepers[host] = subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "120"])
        yield {h: p.pid for h, p in sleepers.items()}
    finally:
        for p in sleepers.values():
            p.kill()
            p.wait()


def test_none_mode_servers_answer_in_their_namespace_and_stop_by_pid(nodes, tmp_path) -> None:
    dep = load_deployment()
    recs = services.start(nodes.__getitem__, dep, "none", state_dir=tmp_path, timeout=10)
    try:
        assert sorted(r["node"] for r in recs) == sorted(h for h, _ in dep.backends)
        for r in recs:
            ip = dep.topology.host_ip(r["node"])
            assert services.listening(nodes[r["node"]], ip, 80), "listens in the node's netns"
            assert not services.listening(os.getpid(), ip, 80), "... and not in ours"
        # A real request, made from inside h3's namespace, gets the page.
        h3 = dep.topology.host_ip("h3")
        out = subprocess.run(
            ["nsenter", "-t", str(nodes["h3"]), "-n", "wget", "-qO-", f"http://{h3}/1k.bin"],
            capture_output=True, timeout=10, check=True,
        )  # fmt: skip
        assert out.stdout == (dep.www_root / "1k.bin").read_bytes()
        # A second start is refused while these run: no double servers.
        with pytest.raises(services.ServiceError, match="already running"):
            services.start(nodes.__getitem__, dep, "none", state_dir=tmp_path)
    finally:
        n = services.stop(tmp_path)
    assert n == 4
    for r in recs:
        assert services.proc_state(r["pid"]) is None, f"{r['name']} still running"
    assert services.running(tmp_path) == []


def test_port_taken_is_refused_before_anything_starts(nodes, tmp_path) -> None:
    dep = load_deployment()
    h7 = dep.topology.host_ip("h7")
    squatter = subprocess.Popen(
        ["nsenter", "-t", str(nodes["h7"]), "-n", "php", "-S", f"{h7}:80", "-t", "/tmp"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(100):
            if services.listening(nodes["h7"], h7, 80):
                break
            subprocess.run(["sleep", "0.05"], check=True)
        with pytest.raises(services.ServiceError, match=f"port {h7}:80 is already taken on h7"):
            services.start(nodes.__getitem__, dep, "none", state_dir=tmp_path, timeout=5)
        assert services.running(tmp_path) == []
    finally:
        squatter.kill()
        squatter.wait()


def test_failing_service_stops_the_others_and_shows_its_log(nodes, tmp_path) -> None:
    dep = load_deployment()
    # h3's namespace loses its address: php cannot bind, start must fail naming it and its log.
    h3 = dep.topology.host_ip("h3")
    unbind = ["ip", "addr", "del", f"{h3}/32", "dev", "lo"]
    subprocess.run(["nsenter", "-t", str(nodes["h3"]), "-n", *unbind], check=True)
    with pytest.raises(services.ServiceError, match=r"www-h3 on h3 exited at start") as ei:
        services.start(nodes.__getitem__, dep, "none", state_dir=tmp_path, timeout=10)
    assert h3 in str(ei.value)  # php's own message ("Failed to listen on 10.2.3.2:80") quoted
    assert services.running(tmp_path) == []
    assert not (tmp_path / services.STATE_FILE).exists()


@pytest.mark.needs("php", "haproxy")
def test_haproxy_mode_binds_vip_on_lb_hosts_and_undoes_it(nodes, tmp_path) -> None:
    dep = load_deployment()
    recs = services.start(nodes.__getitem__, dep, "haproxy", state_dir=tmp_path, timeout=10)
    try:
        for lb in dep.load_balancers:
            assert services.listening(nodes[lb], dep.vip, 80)
        # haproxy proxies to the servers: from h1's namespace the VIP answers only if a backend
        # is reachable, which it is not here; the stats socket shows the configured servers.
        assert Path(tmp_path / "haproxy-h1.sock").exists()
    finally:
        services.stop(tmp_path)
    for r in recs:
        assert services.proc_state(r["pid"]) is None
    assert (
        not (tmp_path / "haproxy-h1.cfg").exists() and not (tmp_path / "haproxy-h1.sock").exists()
    )
    addrs = subprocess.run(
        ["nsenter", "-t", str(nodes["h1"]), "-n", "ip", "-4", "addr", "show", "dev", "lo"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert dep.vip not in addrs, "the VIP added for haproxy is removed again"
