"""The monitoring's pure parts without root: what the controller renders (exporter
configurations, monitor.json, prometheus.yml checked by promtool), the scrape proxy's request
rules, and the status page's model fed two samples by hand."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from controller import monitor, render, targets
from controller.dashboard.model import Model, Sample, labels, parse_metrics
from controller.deployment import DeploymentError, load_deployment, parse_deployment
from controller.exporter.config import ExporterConfig
from controller.scrapeproxy import ProxyRefused, parse_request
from l4lb import cfgfile

STATE = Path("/tmp/l4lb-test-state")


@pytest.fixture(scope="module")
def dep():
    return load_deployment()


def test_render_writes_an_exporter_config_per_lb_and_agent_naming_its_process(dep) -> None:
    files = render.render(dep, STATE)
    cfg = cfgfile.from_dict(
        ExporterConfig, json.loads(files[render.exporter_path(STATE, "agent", "h7")])
    )
    assert cfg.kind == "agent" and cfg.listen == "10.4.7.2" and cfg.port == 9180
    assert cfg.process_config == str(STATE / "config" / "agent-h7-eth0.json")
    assert cfg.server_ports == (80,)
    lb = cfgfile.from_dict(
        ExporterConfig, json.loads(files[render.exporter_path(STATE, "lb", "h1")])
    )
    assert lb.process_config == str(STATE / "config" / "lb-h1-eth0.json")
    assert lb.server_ports == ()


def test_monitor_json_names_every_exporter_node_and_link(dep) -> None:
    cfg = targets.build(dep, STATE)
    assert [(t.host, t.kind, t.address) for t in cfg.targets] == [
        ("h1", "lb", "10.1.1.2:9180"), ("h2", "lb", "10.1.2.2:9180"),
        ("h3", "agent", "10.2.3.2:9180"), ("h7", "agent", "10.4.7.2:9180"),
        ("h11", "agent", "10.6.11.2:9180"), ("h15", "agent", "10.8.15.2:9180"),
    ]  # fmt: skip
    assert cfg.targets[0].netns == str(STATE / "ns" / "h1")  # the namespace's pin
    roles = {n.name: n.role for n in cfg.nodes}
    assert (roles["h1"], roles["h3"], roles["h16"]) == ("lb", "backend", "client")
    assert {roles[s] for s in ("t1", "t8")} == {"tor"}
    assert {roles[s] for s in ("a1", "a8")} == {"agg"}
    assert {roles[s] for s in ("c1", "c4")} == {"core"}
    assert len(cfg.links) == 48
    again = cfgfile.from_dict(targets.MonitorConfig, cfgfile.to_dict(cfg))
    assert again == cfg


def test_metrics_port_is_a_deployment_key_checked_by_the_exporters_rule(dep) -> None:
    data = {
        "vip": dep.vip, "vip_ports": [80], "load_balancers": ["h1", "h2"],
        "backends": {"h3": 1}, "hash_seed": 1, "server_mss": 1440, "www_root": ".",
    }  # fmt: skip
    assert (
        parse_deployment({**data, "metrics_port": 9999}, dep.topology, Path("/")).metrics_port
        == 9999
    )
    assert parse_deployment(data, dep.topology, Path("/")).metrics_port == 9180
    with pytest.raises(DeploymentError, match=r"metrics_port: must be a port 1\.\.65535"):
        parse_deployment({**data, "metrics_port": 0}, dep.topology, Path("/"))


def test_prometheus_config_and_rules_pass_promtool(dep, tmp_path: Path) -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed (./install.sh installs Debian's prometheus)")
    conf = tmp_path / "prometheus.yml"
    conf.write_text(monitor.prometheus_config(targets.build(dep, STATE)))
    res = subprocess.run(["promtool", "check", "config", str(conf)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "9 rules found" in res.stdout  # the shipped recording rules, loaded from the config


CFG = targets.MonitorConfig(
    vip="20.0.0.1",
    targets=(
        targets.Target("h1", "lb", "10.1.1.2", 9180, "/run/l4lb/ns/h1"),
        targets.Target("h3", "agent", "10.2.3.2", 9180, "/run/l4lb/ns/h3"),
    ),
    nodes=(
        targets.NodeInfo("h1", "host", "lb"),
        targets.NodeInfo("h3", "host", "backend"),
        targets.NodeInfo("t1", "switch", "tor"),
    ),
    links=(
        targets.Link("h1", "h1-eth0", "t1", "t1-eth1"),
        targets.Link("h3", "h3-eth0", "t1", "t1-eth2"),
    ),
)


def test_proxy_passes_only_get_to_our_exporters_in_origin_form() -> None:
    head = b"GET http://10.2.3.2:9180/metrics HTTP/1.1\r\nHost: 10.2.3.2:9180\r\nAccept: */*"
    head += b"\r\nProxy-Connection: keep-alive\r\nConnection: keep-alive"
    target, out = parse_request(head, CFG)
    assert target.host == "h3" and target.netns == "/run/l4lb/ns/h3"
    assert out == (
        b"GET /metrics HTTP/1.1\r\nHost: 10.2.3.2:9180\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )
    for bad, status in (
        (b"POST http://10.2.3.2:9180/metrics HTTP/1.1", 405),
        (b"GET http://10.2.3.2:22/ HTTP/1.1", 403),
        (b"GET http://8.8.8.8:9180/metrics HTTP/1.1", 403),
        (b"GET /metrics HTTP/1.1", 400),
        (b"nonsense", 400),
    ):
        with pytest.raises(ProxyRefused) as exc:
            parse_request(bad, CFG)
        assert exc.value.status == status, bad


LB_TEXT = """\
# TYPE l4lb_up gauge
l4lb_up 1
# TYPE l4lb_forwarded_packets counter
l4lb_forwarded_packets_total {fwd}
# TYPE l4lb_backend_packets counter
l4lb_backend_packets_total{{vip="20.0.0.1",backend="10.2.3.2",server="h3"}} {fwd}
# TYPE l4lb_backend_status gauge
l4lb_backend_status{{vip="20.0.0.1",backend="10.2.3.2",server="h3",state="UP"}} 1
l4lb_backend_status{{vip="20.0.0.1",backend="10.2.3.2",server="h3",state="DRAIN"}} 0
# TYPE l4lb_drops counter
l4lb_drops_total{{reason="filtered_wrong_port"}} {wrong}
l4lb_drops_total{{reason="ttl_expired"}} 0
"""
AGENT_TEXT = """\
# TYPE l4lb_agent_up gauge
l4lb_agent_up 1
# TYPE l4lb_agent_decap counter
l4lb_agent_decap_total {fwd}
# TYPE l4lb_agent_server_listening gauge
l4lb_agent_server_listening{{vip="20.0.0.1",port="80"}} {listening}
"""


def sample(t: float, fwd: int, wrong: int, tx: dict[str, int], listening: int = 1) -> Sample:
    return Sample(
        time=t,
        netdev={
            "h1": {"h1-eth0": {"tx_bytes": tx["h1"]}},
            "h3": {"h3-eth0": {"tx_bytes": tx["h3"]}},
            "t1": {"t1-eth1": {"tx_bytes": 0}, "t1-eth2": {"tx_bytes": 0}},
        },
        metrics={
            "h1": parse_metrics(LB_TEXT.format(fwd=fwd, wrong=wrong)),
            "h3": parse_metrics(AGENT_TEXT.format(fwd=fwd, listening=listening)),
        },
    )


def test_model_turns_two_samples_into_rates_split_dsr_and_drops() -> None:
    m = Model(CFG)
    first = m.update(sample(10.0, 100, 0, {"h1": 1000, "h3": 50_000}))
    assert first["lbs"][0]["fwd_pps"] is None  # one sample: no rate yet
    s = m.update(sample(10.5, 300, 40, {"h1": 2000, "h3": 150_000}))
    (lb,) = s["lbs"]
    assert (lb["host"], lb["up"], lb["fwd_pps"], lb["share"]) == ("h1", True, 400.0, 1.0)
    assert lb["announced"] is None  # this LB exports no announcement: not "withdrawn"
    (bk,) = s["backends"]
    assert (bk["host"], bk["state"], bk["pps"], bk["decap_pps"]) == ("h3", "UP", 400.0, 400.0)
    assert bk["per_lb"] == {"h1": 400.0} and bk["active_flows"] is None
    links = {(ln["a"], ln["b"]): ln for ln in s["links"]}
    assert links[("h1", "t1")]["ab_bps"] == 1000 * 8 / 0.5
    assert links[("h3", "t1")]["ab_bps"] == 100_000 * 8 / 0.5 and links[("h3", "t1")]["ba_bps"] == 0
    assert s["dsr"] == {"lb_bps": 16000.0, "backend_bps": 1_600_000.0, "ratio": 0.01}
    assert s["drops"] == [
        {"where": "lb", "reason": "filtered_wrong_port", "total": 40.0, "rate": 80.0}
    ]
    assert s["history"]["backend:h3"] == [None, 400.0] and s["history"]["drops"] == [None, 80.0]
    # The server goes away: the page says so; then the agent too.
    s = m.update(sample(11.0, 300, 40, {"h1": 2000, "h3": 150_000}, listening=0))
    assert s["backends"][0]["state"] == "NO SERVER"
    gone = sample(11.5, 300, 40, {"h1": 2000, "h3": 150_000})
    gone.metrics["h3"] = None
    assert m.update(gone)["backends"][0]["state"] == "AGENT DOWN"
    assert len(m.update(gone)["history"]["t"]) == 5


def test_model_takes_the_most_severe_lb_view_and_ignores_counter_resets() -> None:
    m = Model(CFG)
    m.update(sample(1.0, 500, 0, {"h1": 0, "h3": 0}))
    later = sample(2.0, 10, 0, {"h1": 0, "h3": 0})  # the LB restarted: its counters began again
    status = later.metrics["h1"]["l4lb_backend_status"]  # type: ignore[index]
    status[labels(vip="20.0.0.1", backend="10.2.3.2", server="h3", state="UP")] = 0
    status[labels(vip="20.0.0.1", backend="10.2.3.2", server="h3", state="DRAIN")] = 1
    s = m.update(later)
    assert s["lbs"][0]["fwd_pps"] is None
    assert s["backends"][0]["state"] == "DRAIN"
    # The LB drains (lb drain): its announcement is withdrawn while it still runs.
    later.metrics["h1"]["l4lb_vip_announced"] = {frozenset(): 0.0}  # type: ignore[index]
    assert m.update(later)["lbs"][0]["announced"] == 0
