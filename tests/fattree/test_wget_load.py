"""The wget load over the whole fat tree (root, mininet): the service works end to end with DSR.

Runs bench/wget_load.py as the README's main job does, at a small size, and reads its last line
(the JSON result). Each run takes the machine's fat-tree lock (waiting its turn, bounded) and
gives it back; every test checks that nothing is left behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from controller import services
from controller.deployment import load_deployment

REPO = Path(__file__).resolve().parents[2]
STATE = services.STATE_DIR
WAIT_NETWORK = 900  # seconds to wait for another fat tree on this machine (parallel CI jobs)

pytestmark = [
    pytest.mark.fattree,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mininet, namespaces)"),
    pytest.mark.skipif(shutil.which("mnexec") is None, reason="mininet not installed"),
]


def run_load(tmp_path: Path, *args: str, timeout: float = 1200) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.wget_load", "--wait-network", str(WAIT_NETWORK),
         "--results", str(tmp_path), *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout + WAIT_NETWORK, check=False,
    )  # fmt: skip
    out = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and out, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    res: dict[str, Any] = json.loads(out[-1])  # the last line is the result object
    written = list(tmp_path.glob(f"wget-{res['lb']}-*.json"))
    assert len(written) == 1 and json.loads(written[0].read_text()) == res
    assert_nothing_left(res["network_owner"])
    return res


def assert_nothing_left(owner: int) -> None:
    """Our network and its services are gone. Another run waiting for the lock (CI jobs share
    the machine) may have brought up its own since: that one is not ours to judge."""
    assert services.proc_state(owner) is None, f"network owner {owner} still running"
    st = STATE / "state.json"
    try:
        current = json.loads(st.read_text())["owner_pid"]
    except FileNotFoundError:
        current = None
    assert current != owner, f"our network (owner {owner}) is still recorded"
    if current is None:
        assert not (STATE / services.STATE_FILE).exists(), "services still recorded"
        assert services.running(STATE) == []


def test_fastpath_serves_every_file_to_every_client_with_dsr(tmp_path: Path) -> None:
    dep = load_deployment()
    files = ["index.html", "1k.bin", "100k.bin", "10m.bin"]
    res = run_load(tmp_path, "--lb", "fastpath", "--rounds", "1", "--file", ",".join(files))
    n = len(dep.clients()) * len(files)
    assert (res["requests"], res["ok"], res["failed"]) == (n, n, 0), res["errors"]
    # Both load balancers and all four backends carried traffic, by their own counters.
    for lb in dep.load_balancers:
        stats = res["per_lb"][lb]["stats"]  # the LB's own counters
        assert stats["forwarded"] > 0, f"{lb} forwarded nothing: {res['per_lb']}"
        assert "drops" not in stats, f"{lb} dropped: {stats}"
    for host, _w in dep.backends:
        be = res["per_backend"][host]
        assert be["requests"] > 0 and be["agent"]["delivered"] > 0, f"{host}: {be}"
        assert be["agent"]["dropped"] == 0, f"{host}: {be}"
    # What the LBs forwarded is what the agents delivered: nothing lost between them.
    forwarded = sum(res["per_lb"][lb]["stats"]["forwarded"] for lb in dep.load_balancers)
    delivered = sum(res["per_backend"][h]["agent"]["delivered"] for h, _ in dep.backends)
    assert forwarded == delivered
    # DSR: replies do not cross the LB hosts; what they send is the encapsulated requests/ACKs.
    assert res["client_bytes"] >= len(dep.clients()) * (10 * 1024 * 1024)
    assert res["lb_host_bytes"] < 0.05 * res["client_bytes"], res["per_lb"]


def test_haproxy_carries_every_reply_byte_through_the_lb_hosts(tmp_path: Path) -> None:
    # The contrast that makes DSR visible: a full proxy sends all the reply bytes itself.
    res = run_load(tmp_path, "--lb", "haproxy", "--rounds", "1", "--file", "100k.bin")
    assert res["failed"] == 0 and res["ok"] == len(load_deployment().clients())
    assert res["lb_host_bytes"] >= res["client_bytes"]


def test_none_spreads_clients_over_backend_addresses(tmp_path: Path) -> None:
    res = run_load(tmp_path, "--lb", "none", "--rounds", "2", "--file", "1k.bin")
    assert res["failed"] == 0 and res["lb_host_bytes"] < 1000
    assert all(b["requests"] > 0 for b in res["per_backend"].values())


def test_interrupt_tears_everything_down(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.wget_load", "--lb", "none", "--rounds", "10000",
         "--file", "1k.bin", "--wait-network", str(WAIT_NETWORK), "--results", str(tmp_path)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    seen = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + WAIT_NETWORK + 120
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("round 1/"):
                break
            assert time.monotonic() < deadline, "".join(seen)
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 130, "".join(seen)
    owner = next(
        int(m.group(1)) for line in seen if (m := re.search(r"background \(pid (\d+)\)", line))
    )
    assert_nothing_left(owner)
    assert not list(tmp_path.glob("wget-*.json")), "an interrupted run writes no result"
