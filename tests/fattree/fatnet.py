"""Helpers of the fat-tree tests: reaching nodes, waiting for the fat-tree lock, checking that
nothing of a network is left once it is down, and t1's route to the VIP and the recorded
services (with the services up)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controller import fib, netstate, services
from controller.deployment import load_deployment
from controller.netstate import NetState

LOCK_WAIT = 600.0  # seconds to wait for another run's fat tree to go away
PROBE = Path(__file__).with_name("synprobe.py")
# interface names of a fat tree in the root namespace: must never be there
FATTREE_IFACE = re.compile(r"^\d+: ([htac]\d+-eth\d+)[@:]")


def wait_for_lock(seconds: float = LOCK_WAIT) -> None:
    """Wait until no fat tree is up (the lock is free), so timing starts at our turn."""
    deadline = time.monotonic() + seconds
    while True:
        fd = netstate.take_lock(wait=0.0)
        if fd is not None:
            os.close(fd)
            return
        if time.monotonic() > deadline:
            pytest.fail(f"another fat tree held {netstate.LOCK_FILE} for over {seconds:.0f} s")
        time.sleep(0.5)


def in_node(pid: int, argv: list[str]) -> list[str]:
    return ["mnexec", "-a", str(pid), *argv]


def probe_argv(pid: int, *args: str) -> list[str]:
    return in_node(pid, [sys.executable, str(PROBE), *args])


def root_fattree_interfaces() -> list[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return [m.group(1) for line in out.splitlines() if (m := FATTREE_IFACE.match(line))]


def live_namespaces() -> set[int]:
    out = subprocess.run(
        ["lsns", "-t", "net", "-n", "-o", "NS"], capture_output=True, text=True, check=True
    ).stdout
    return {int(x) for x in out.split()}


def assert_nothing_left(st: NetState) -> None:
    """What `down` promises: no process, namespace or interface of the network remains."""
    inodes = {r.netns for r in st.nodes.values()}
    assert netstate.read_state() is None, "state file left behind"
    alive = [n for n, r in st.nodes.items() if netstate.is_running(r.pid, r.start_time)]
    assert not alive, f"node shells still running: {alive}"
    assert not netstate.is_running(st.owner_pid, st.owner_start_time), "owner still running"
    members = netstate.namespace_members(inodes)
    assert not members, f"processes left in the network's namespaces: {members}"
    assert not (inodes & live_namespaces()), "network namespaces still exist"
    assert root_fattree_interfaces() == [], "fat-tree interfaces in the root namespace"
    fd = netstate.take_lock()
    assert fd is not None, "the fat-tree lock is still held"
    os.close(fd)


@contextlib.contextmanager
def fat_tree(**up: Any) -> Iterator[NetState]:
    """The fat tree up (detached; `up` as controller.network.up takes it: services=True, ...)
    until the block ends, then down (ours only: if `up` failed, the network that is up belongs
    to someone else)."""
    from controller import network

    wait_for_lock()
    assert network.up(None, "detach", wait=LOCK_WAIT, **up) == 0
    st = network.running()
    try:
        assert st is not None and st.ready
        yield st
    finally:
        down_if_ours([st.owner_pid] if st else [])


def down_if_ours(owners: list[int]) -> None:
    """Take the network down if one of `owners` owns it (never someone else's fat tree)."""
    from controller import network

    st = netstate.read_state()
    if st is not None and st.owner_pid in owners:
        network.down(owner=st.owner_pid)


def t1_gateways(st: NetState) -> list[str]:
    """The LB addresses t1's kernel routes the VIP over now (live next hops, sorted)."""
    vip = load_deployment().vip
    route = fib.read_route(f"{vip}/32", ["mnexec", "-a", str(st.nodes["t1"].pid)])
    return route.live_gateways() if route else []


def wait_gateways(st: NetState, want: list[str], timeout: float) -> float:
    """Seconds until t1 routes the VIP over exactly `want`; AssertionError after `timeout`."""
    t0 = time.monotonic()
    while t1_gateways(st) != sorted(want):
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"t1 routes the VIP via {t1_gateways(st)}, not {want}")
        time.sleep(0.005)
    return time.monotonic() - t0


def service(name: str) -> dict[str, Any]:
    """The record of a running service (controller.services' state file)."""
    recs = json.loads((netstate.STATE_DIR / services.STATE_FILE).read_text())["services"]
    return next(r for r in recs if r["name"] == name)
