"""controller.services: what runs where per mode, and the generated haproxy config (no root)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from controller import services
from controller.deployment import load_deployment

STATE = Path("/tmp/l4lb-test-state")


@pytest.fixture(scope="module")
def dep():
    return load_deployment()


def by_node(plan: services.Plan) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for s in plan.services:
        out.setdefault(s.node, []).append(s.role)
    return out


def test_fastpath_plan_runs_lbs_agents_and_vip_servers(dep) -> None:
    p = services.plan(dep, "fastpath", STATE, python="/py")
    nodes = by_node(p)
    # on each LB host: its BIRD, the LB (which holds its announcement: controller.bgp), the
    # LB's exporter (controller.monitor)
    for h in ("h1", "h2"):
        assert nodes[h] == ["bgp", "lb", "exporter"]
    assert nodes["t1"] == ["bgp"]
    for h, _ in dep.backends:
        assert nodes[h] == ["agent", "www", "exporter"]
    assert "" not in nodes  # nothing in the root namespace without monitor or dashboard
    lb = next(s for s in p.services if s.name == "lb-h1")
    assert lb.argv == (
        "/py", "-m", "fastpath.lb", "h1-eth0", "--config", str(STATE / "config/lb-h1-eth0.json"),
    )  # fmt: skip
    agent = next(s for s in p.services if s.name == "agent-h7")
    assert agent.argv == (
        "/py", "-m", "agent.decap", "--config", str(STATE / "config/agent-h7-eth0.json"),
    )  # fmt: skip
    assert lb.ready_file == str(services.lb_stats_path(STATE, "h1"))
    www = next(s for s in p.services if s.name == "www-h3")
    assert www.argv[:3] == ("php", "-S", "20.0.0.1:80")
    assert www.argv[-1] == str(dep.www_root)
    assert www.listen == ("20.0.0.1", 80)
    assert www.log.startswith(str(STATE)), "server output goes to a file, never a pipe"
    # Backends come before load balancers: the first balanced packet finds a server.
    roles = [s.role for s in p.services]
    assert roles.index("lb") > max(i for i, r in enumerate(roles) if r == "www")
    assert set(p.files) == {str(STATE / "bird" / f"{n}.conf") for n in ("t1", "h1", "h2")}
    assert p.dirs == ()
    # Hosts are left as the network made them; the switch port facing each LB segments, so
    # the LB's tap never gets a client's GSO frame (t1-eth1 faces h1, t1-eth2 h2). (Then t1's
    # static VIP route gives way to BIRD's: tests/unit/test_bgp.py.)
    assert [(c.node, c.argv, c.undo) for c in p.setup if c.argv[0] == "ethtool"] == [
        ("t1", ("ethtool", "-K", f"t1-eth{n}", "tso", "off", "gso", "off"),
         ("ethtool", "-K", f"t1-eth{n}", "tso", "on", "gso", "on"))
        for n in (1, 2)
    ]  # fmt: skip


def test_non_dsr_plans_leave_switch_offloads_alone(dep) -> None:
    for mode in ("haproxy", "none"):
        assert not [c for c in services.plan(dep, mode, STATE).setup if c.argv[0] == "ethtool"]


def test_none_plan_serves_on_backend_addresses_without_lb(dep) -> None:
    p = services.plan(dep, "none", STATE)
    assert {s.role for s in p.services} == {"www"}
    listens = sorted(s.listen for s in p.services if s.listen)
    assert listens == sorted((dep.topology.host_ip(h), 80) for h, _ in dep.backends)


def test_haproxy_plan_binds_vip_on_lbs_and_proxies_to_backends(dep) -> None:
    p = services.plan(dep, "haproxy", STATE)
    assert [s.name for s in p.services if s.role == "haproxy"] == ["haproxy-h1", "haproxy-h2"]
    vip_cmds = [c for c in p.setup if c.argv[0] == "ip"]
    assert [(c.node, c.argv) for c in vip_cmds] == [
        (h, ("ip", "addr", "add", "20.0.0.1/32", "dev", "lo")) for h in ("h1", "h2")
    ]
    assert all(c.undo == ("ip", "addr", "del", "20.0.0.1/32", "dev", "lo") for c in vip_cmds)
    cfg = p.files[str(STATE / "haproxy-h1.cfg")]
    assert "mode tcp" in cfg and "bind 20.0.0.1:80" in cfg
    for h, w in dep.backends:
        assert f"server {h} {dep.topology.host_ip(h)}:80 weight {w}" in cfg
    assert "www" in {s.role for s in p.services} and "agent" not in {s.role for s in p.services}


@pytest.mark.skipif(not Path("/usr/sbin/haproxy").exists(), reason="haproxy not installed")
def test_haproxy_accepts_generated_config(dep, tmp_path: Path) -> None:
    cfg = tmp_path / "h.cfg"
    cfg.write_text(services.haproxy_config(dep, "h1", tmp_path))
    res = subprocess.run(["/usr/sbin/haproxy", "-c", "-f", str(cfg)], capture_output=True,
                         text=True, check=False)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr


def test_scapy_plan_passes_backends_and_next_hop(dep) -> None:
    p = services.plan(dep, "scapy", STATE, python="/py")
    lb = next(s for s in p.services if s.name == "lb-h2")
    assert lb.argv[:4] == ("/py", "-m", "bench.scapy_lb", "h2-eth0")
    args = list(lb.argv)
    backends = [args[i + 1] for i, a in enumerate(args) if a == "--backend"]
    assert backends == [ip for ip, _ in dep.backend_ips()]
    assert args[args.index("--next-hop-mac") + 1] == dep.topology.gateway("h2").mac
    assert lb.ready_packet_socket
    assert {s.role for s in p.services if s.node == "h3"} == {"agent", "www"}


def test_unknown_mode_is_a_clear_error(dep) -> None:
    with pytest.raises(services.ServiceError, match="choose one of fastpath, scapy"):
        services.plan(dep, "nginx", STATE)  # type: ignore[arg-type]


def test_listening_sees_a_real_listener_and_start_time_identifies_process(tmp_path) -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    assert not services.listening(os.getpid(), "127.0.0.1", port)
    s.listen()
    try:
        assert services.listening(os.getpid(), "127.0.0.1", port)
    finally:
        s.close()
    assert services.proc_start_time(os.getpid()) is not None
    assert not services.has_packet_socket(os.getpid())
    assert services.proc_cpu_seconds(os.getpid()) is not None


def test_stop_kills_recorded_process_by_pid_and_spares_reused_pids(tmp_path: Path) -> None:
    # A real child recorded as a service, plus a record whose start time does not match its PID
    # (a PID reused by someone else): stop must end the first and leave the second alone.
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        state = {
            "mode": "none",
            "services": [
                {"name": "x", "node": "h3", "role": "www", "pid": proc.pid,
                 "start_time": services.proc_start_time(proc.pid)},
                {"name": "y", "node": "h3", "role": "www", "pid": other.pid,
                 "start_time": (services.proc_start_time(other.pid) or 0) + 1},
            ],
            "undo": [],
        }  # fmt: skip
        services._write_state(tmp_path, state)
        assert [r["name"] for r in services.running(tmp_path)] == ["x"]
        assert services.stop(tmp_path, timeout=5) == 1
        assert proc.poll() is not None
        assert other.poll() is None
        assert not (tmp_path / services.STATE_FILE).exists()
        assert services.stop(tmp_path) == 0  # idempotent
    finally:
        for p in (proc, other):
            p.kill()
            p.wait()


def test_exporters_follow_their_process_on_the_hosts_own_address(dep) -> None:
    p = services.plan(dep, "fastpath", STATE, python="/py")
    roles = [s.name for s in p.services]
    exporters = [s for s in p.services if s.role == "exporter"]
    assert sorted(s.node for s in exporters) == sorted(["h1", "h2", *(h for h, _ in dep.backends)])
    for s in exporters:
        kind = "lb" if s.node in dep.load_balancers else "agent"
        process = f"lb-{s.node}" if kind == "lb" else f"agent-{s.node}"
        assert roles.index(s.name) > roles.index(process)  # started once its process is up
        assert s.listen == (dep.topology.host_ip(s.node), dep.metrics_port)
        assert s.argv == (
            "/py", "-m", "controller.exporter", "--config",
            str(STATE / f"config/exporter-{kind}-{s.node}.json"),
        )  # fmt: skip
    # No exporter where there is no control channel to ask (scapy's LB, haproxy, none).
    for mode in ("scapy", "haproxy", "none"):
        assert not [s for s in services.plan(dep, mode, STATE).services if s.role == "exporter"]


def test_monitor_and_dashboard_run_in_the_root_namespace_on_loopback(dep) -> None:
    p = services.plan(dep, "fastpath", STATE, python="/py", monitor=True, dashboard=True)
    root = {s.name: s for s in p.services if s.node == ""}
    assert sorted(root) == ["dashboard", "prometheus", "scrapeproxy"]
    assert all(s.listen and s.listen[0] == "127.0.0.1" for s in root.values())
    prom = root["prometheus"]
    conf = STATE / "prometheus" / "prometheus.yml"
    assert f"--config.file={conf}" in prom.argv
    assert f"--storage.tsdb.path={STATE / 'prometheus' / 'data'}" in prom.argv
    assert p.dirs == (str(STATE / "prometheus"),)  # its data goes with `down`
    text = p.files[str(conf)]
    for h in ("h1", "h2", *(h for h, _ in dep.backends)):
        assert f'["{dep.topology.host_ip(h)}:{dep.metrics_port}"]' in text
        assert f'host: "{h}"' in text
    assert text.count("proxy_url: http://127.0.0.1:9189") == 2  # job lb, job agent
    assert "scrape_interval: 1s" in text
