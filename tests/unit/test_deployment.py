"""The deployment file: roles resolve to hosts of the topology; bad roles are refused by name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfig
from controller import render
from controller.deployment import (
    DEFAULT_DEPLOYMENT,
    REPO_ROOT,
    DeploymentError,
    load_deployment,
)
from fastpath.config import LbConfig
from l4lb import cfgfile
from l4lb.healthcfg import HealthConfig


def test_default_deployment():
    d = load_deployment()
    assert d.vip == "20.0.0.1" and d.vip_ports == (80,)
    assert d.load_balancers == ("h1", "h2")
    assert d.backends == (("h3", 1), ("h7", 1), ("h11", 1), ("h15", 1))
    assert d.backend_ips() == (
        ("10.2.3.2", 1),
        ("10.4.7.2", 1),
        ("10.6.11.2", 1),
        ("10.8.15.2", 1),
    )
    assert d.clients() == ["h4", "h5", "h6", "h8", "h9", "h10", "h12", "h13", "h14", "h16"]
    assert d.www_root == REPO_ROOT / "bench" / "wwwroot"
    assert d.topology.switches()[0] == "t1"


def _write(tmp_path: Path, **changes: Any) -> Path:
    data = json.loads(DEFAULT_DEPLOYMENT.read_text())
    data["topology"] = str(DEFAULT_DEPLOYMENT.parent / data["topology"])
    data.update(changes)
    path = tmp_path / "dep.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"vip": "20.0.0"}, "not an IPv4 address"),
        ({"vip": "10.1.1.2"}, "is a host's address"),
        ({"vip_ports": [0]}, "vip_ports must be"),
        ({"load_balancers": ["h1", "h99"]}, "'h99' is not a host"),
        ({"load_balancers": ["h1", "h1"]}, "lists a host twice"),
        ({"backends": {"h1": 1}}, r"\['h1'\] both load balancer and backend"),
        ({"backends": {"h3": -1}}, "weight must be an integer"),
        ({"backends": {"h3": 0}}, "every backend weight is 0"),
        ({"server_mss": 9000}, r"server_mss: must be 536..1440 \(MSS \+ 60 <= MTU 1500"),
        ({"server_mss": 1460}, r"server_mss: must be 536..1440"),
        ({"server_mss": 1460, "mtu": 1520}, None),
        ({"mtu": 100}, "mtu must be an integer 576..65535"),
        ({"hash_seed": "x"}, "'hash_seed' must be int"),
        ({"hash_seed": 2**56}, r"hash_seed: must be an integer 0 <= seed < 2\*\*56"),
        ({"hash_seed": 2**56 - 1}, None),
        ({"hash_sed": 5}, "unknown key.s. 'hash_sed' .known: backends, bgp, conn_capacity,"),
        ({"conn_insert_rate": -1}, r"conn_insert_rate: must be an integer 0..10000000"),
        ({"conn_insert_rate": 1.5}, r"conn_insert_rate: must be an integer"),
        ({"conn_insert_rate": 0}, None),
        ({"conn_half_open_timeout": 0}, r"conn_half_open_timeout: must be > 0 and at most"),
        (
            {"conn_half_open_timeout": 61},
            r"conn_half_open_timeout: must be > 0 and at most conn_idle_timeout \(60.0\)",
        ),
        ({"conn_half_open_timeout": 5, "conn_idle_timeout": 5}, None),
        ({"conn_half_open_capacity": 1}, r"conn_half_open_capacity: must be an integer >= 2"),
        ({"conn_capacity": "big"}, r"conn_capacity: must be an integer >= 2, not 'big'"),
        ({"topology": "nope.json"}, "topology: .*nope.json: cannot read"),
        ({"lb_workers": 0}, r"lb_workers: must be an integer 1\.\.64, not 0"),
        ({"lb_workers": "2"}, r"lb_workers: must be an integer 1\.\.64, not '2'"),
        ({"lb_workers": 64}, None),
    ],
)
def test_bad_deployment(tmp_path, changes, message):
    path = _write(tmp_path, **changes)
    if message is None:  # the edge of a range: accepted
        load_deployment(path)
        return
    with pytest.raises(DeploymentError, match=message) as info:
        load_deployment(path)
    assert str(path) in str(info.value)


def test_a_backend_listed_twice_is_named(tmp_path):
    path = _write(tmp_path)
    text = path.read_text().replace('"h3": 1', '"h3": 1, "h3": 2')
    path.write_text(text)
    with pytest.raises(DeploymentError, match=f"{path}: 'h3' listed twice"):
        load_deployment(path)


def test_every_process_configuration_renders_from_it():
    from controller import render

    d = load_deployment()
    lb = render.lb_config(d, "h1")
    assert (lb.iface, lb.vips, lb.hash_seed) == ("h1-eth0", (("20.0.0.1", 80),), 2026)
    assert lb.backends == d.backend_ips() and ("10.2.3.2", "h3") in lb.names
    assert (lb.announce, lb.bfd_interval_ms, lb.bfd_multiplier) == (True, 100, 3)
    assert lb.workers == 1  # the deployment's lb_workers, absent here
    agent = render.agent_config(d, "h7")
    assert (agent.iface, agent.vips, agent.allowed_lbs) == (
        "h7-eth0",
        ("20.0.0.1",),
        ("10.1.1.2", "10.1.2.2"),
    )
    assert agent.server_mss == 1440 and agent.mtu == 1500


def test_lb_workers_is_rendered_into_every_lb(tmp_path: Path) -> None:
    d = load_deployment(_write(tmp_path, lb_workers=2))
    assert {render.lb_config(d, h).workers for h in d.load_balancers} == {2}


def test_missing_key(tmp_path):
    data = json.loads(DEFAULT_DEPLOYMENT.read_text())
    del data["backends"]
    data["topology"] = str(DEFAULT_DEPLOYMENT.parent / data["topology"])
    path = tmp_path / "dep.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DeploymentError, match="missing key 'backends'"):
        load_deployment(path)


def test_health_defaults_when_absent_and_rendered_everywhere(tmp_path: Path) -> None:
    dep = load_deployment(_write(tmp_path, health={"interval": 1.0, "timeout": 0.5}))
    assert dep.health == HealthConfig(interval=1.0, timeout=0.5)
    assert load_deployment().health == HealthConfig()
    files = render.render(dep, tmp_path)
    processes = {p: t for p, t in files.items() if p.name.startswith(("lb-", "agent-"))}
    # every LB, and an agent for every host that may serve (all but the LBs)
    assert len(processes) == len(dep.topology.hosts())
    for path, text in processes.items():
        cls = LbConfig if path.name.startswith("lb-") else AgentConfig
        (tmp_path / "f.json").write_text(text)
        assert cfgfile.load(cls, tmp_path / "f.json").health == dep.health  # type: ignore[attr-defined]


def test_health_null_turns_health_checks_off(tmp_path: Path) -> None:
    dep = load_deployment(_write(tmp_path, health=None))
    assert dep.health is None
    assert render.lb_config(dep, "h1").health is None
    assert render.agent_config(dep, "h3").health is None


@pytest.mark.parametrize(
    ("health", "message"),
    [
        ({"intervall": 1}, "health: unknown key(s) 'intervall'"),
        ({"fall": 0}, "health: fall: must be an integer 1..100"),
        ({"timeout": 2.0}, "health: timeout: must be <= interval"),
        ({"port": "9181"}, "health: port: must be an integer"),
        ([], "health: must be a JSON object"),
    ],
)
def test_bad_health_is_refused_naming_the_field(
    tmp_path: Path, health: object, message: str
) -> None:
    with pytest.raises(DeploymentError) as exc:
        load_deployment(_write(tmp_path, health=health))
    assert message in str(exc.value)


def test_connection_table_keys_reach_every_lb(tmp_path: Path) -> None:
    """The SYN flood's settings (and the table's size) go from the file into each LB's
    rendered configuration; keys the file leaves out keep the LB's defaults."""
    dep = load_deployment(_write(tmp_path, conn_insert_rate=500, conn_half_open_timeout=2.5))
    for host in dep.load_balancers:
        lb = render.lb_config(dep, host)
        assert (lb.conn_insert_rate, lb.conn_half_open_timeout) == (500, 2.5)
        assert lb.conn_half_open_capacity == LbConfig.conn_half_open_capacity
    files = render.render(dep, tmp_path)
    path = next(p for p in files if p.name.startswith("lb-"))
    (tmp_path / "f.json").write_text(files[path])
    assert cfgfile.load(LbConfig, tmp_path / "f.json").conn_insert_rate == 500
