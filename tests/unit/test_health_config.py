"""The deployment's `health` object: defaults when absent, checked once naming the field,
null turns health checks off, and it reaches every LB's and agent's configuration file (and
back through l4lb.cfgfile) unchanged; the command lines turn it on and off."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfig
from agent.decap import parse_args
from agent.decap import resolve_config as agent_resolve
from controller import render
from controller.deployment import DEFAULT_DEPLOYMENT, DeploymentError, load_deployment
from fastpath.config import LbConfig
from fastpath.lb import build_parser
from fastpath.lb import resolve_config as lb_resolve
from l4lb import cfgfile
from l4lb.healthcfg import HealthConfig


def write(tmp_path: Path, **changes: Any) -> Path:
    data = json.loads(DEFAULT_DEPLOYMENT.read_text())
    data["topology"] = str(DEFAULT_DEPLOYMENT.parent / data["topology"])
    data.update(changes)
    path = tmp_path / "dep.json"
    path.write_text(json.dumps(data))
    return path


def test_defaults_when_absent_and_rendered_everywhere(tmp_path: Path) -> None:
    dep = load_deployment(write(tmp_path, health={"interval": 1.0, "timeout": 0.5}))
    assert dep.health == HealthConfig(interval=1.0, timeout=0.5)
    assert load_deployment().health == HealthConfig()
    files = render.render(dep, tmp_path)
    for path, text in files.items():
        cls = LbConfig if path.name.startswith("lb-") else AgentConfig
        (tmp_path / "f.json").write_text(text)
        assert cfgfile.load(cls, tmp_path / "f.json").health == dep.health  # type: ignore[attr-defined]


def test_null_turns_health_checks_off(tmp_path: Path) -> None:
    dep = load_deployment(write(tmp_path, health=None))
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
        load_deployment(write(tmp_path, health=health))
    assert message in str(exc.value)


def test_command_lines_turn_health_on_and_off(tmp_path: Path) -> None:
    base = ["h1-eth0", "--vip", "20.0.0.1:80", "--backend", "10.2.3.2"]
    assert lb_resolve(build_parser().parse_args(base)).health is None  # off without a file
    assert lb_resolve(build_parser().parse_args([*base, "--health"])).health == HealthConfig()
    cfg = LbConfig(
        iface="h1-eth0", vips=(("20.0.0.1", 80),), backends=(("10.2.3.2", 1),),
        health=HealthConfig(port=9999),
    )  # fmt: skip
    path = tmp_path / "lb.json"
    path.write_text(cfgfile.dump(cfg))
    args = ["h1-eth0", "--config", str(path)]
    assert lb_resolve(build_parser().parse_args(args)).health == HealthConfig(port=9999)
    assert lb_resolve(build_parser().parse_args([*args, "--health"])).health.port == 9999  # type: ignore[union-attr]
    assert lb_resolve(build_parser().parse_args([*args, "--no-health"])).health is None
    agent = ["--iface", "h3-eth0", "--vip", "20.0.0.1", "--allow-lb", "10.1.1.2"]
    assert agent_resolve(parse_args(agent)).health is None
    assert agent_resolve(parse_args([*agent, "--health"])).health == HealthConfig()
