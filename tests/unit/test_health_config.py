"""The command lines turn health checks on and off (the deployment's `health` object is
tested in test_deployment.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.decap import parse_args
from agent.decap import resolve_config as agent_resolve
from fastpath.config import LbConfig
from fastpath.lb import build_parser
from fastpath.lb import resolve_config as lb_resolve
from l4lb import cfgfile
from l4lb.healthcfg import HealthConfig


def test_command_lines_turn_health_on_and_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No rendered file by default (a fat tree up on this machine would have them in /run).
    monkeypatch.setattr("fastpath.lb.CONFIG_DIR", tmp_path / "none")
    monkeypatch.setattr("agent.decap.CONFIG_DIR", tmp_path / "none")
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
