"""`python -m controller`: routes output, clear errors for bad input (no root needed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from controller.__main__ import main
from controller.routes import compute_routes
from controller.topology import DEFAULT_TOPOLOGY, load_topology

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controller", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_routes_for_t1_in_a_subprocess():
    res = run("routes", "--switch", "t1")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert "table_add ipv4_lpm ecmp_group 20.0.0.1/32 => 1 2" in lines
    # exactly the computed program, nothing else: the output can be piped to simple_switch_CLI
    assert lines == compute_routes(load_topology())["t1"].cli_lines()


def test_unknown_switch_exits_2_with_message():
    res = run("routes", "--switch", "t9")
    assert res.returncode == 2
    assert res.stdout == ""
    assert "unknown switch 't9'" in res.stderr
    assert "t1, t2" in res.stderr  # says which names exist


def test_all_switches_with_headers(capsys):
    assert main(["routes"]) == 0
    out = capsys.readouterr().out.splitlines()
    headers = [ln for ln in out if ln.startswith("#")]
    assert len(headers) == 20
    assert headers[0] == "# t1 (device_id 1, thrift port 9090)"
    assert headers[-1] == "# c4 (device_id 20, thrift port 9109)"


def test_bad_topology_file_exits_2_naming_it(tmp_path, capsys):
    data = json.loads(DEFAULT_TOPOLOGY.read_text())
    data["topology"]["links"].append(["t1", "zz"])
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    assert main(["routes", "--topo", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "unknown node 'zz'" in err


def test_exec_without_command_is_a_usage_error(capsys):
    assert main(["exec", "h1", "--"]) == 2
    assert "no command given" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["up", "--cli", "--detach"]])
def test_bad_usage_exits_2(argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
