"""The deployment file: roles resolve to hosts of the topology; bad roles are refused by name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from controller.deployment import (
    DEFAULT_DEPLOYMENT,
    REPO_ROOT,
    DeploymentError,
    load_deployment,
)


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
        ({"server_mss": 9000}, "server_mss 9000 not in"),
        ({"hash_seed": "x"}, "'hash_seed' must be int"),
        ({"topology": "nope.json"}, "topology: .*nope.json: cannot read"),
    ],
)
def test_bad_deployment(tmp_path, changes, message):
    path = _write(tmp_path, **changes)
    with pytest.raises(DeploymentError, match=message) as info:
        load_deployment(path)
    assert str(path) in str(info.value)


def test_missing_key(tmp_path):
    data = json.loads(DEFAULT_DEPLOYMENT.read_text())
    del data["backends"]
    data["topology"] = str(DEFAULT_DEPLOYMENT.parent / data["topology"])
    path = tmp_path / "dep.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DeploymentError, match="missing key 'backends'"):
        load_deployment(path)
