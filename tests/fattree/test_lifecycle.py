"""`up` reaches a routed network fast; `down` leaves nothing behind, also after a crash of the
process that owned the network, and Ctrl-C during `up` takes down what was built."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from fatnet import LOCK_WAIT, assert_nothing_left, down_if_ours, in_node, wait_for_lock

from controller import netstate, network
from controller.deployment import REPO_ROOT
from controller.netstate import NetState

pytestmark = pytest.mark.fattree

UP_BOUND = 10.0  # seconds, the figure


@pytest.fixture
def turn() -> Iterator[list[int]]:
    """Our turn on the fat tree. A test appends the owner PID of each network it brings up;
    whichever of those is still up afterwards is taken down (never someone else's)."""
    wait_for_lock()
    owners: list[int] = []
    try:
        yield owners
    finally:
        down_if_ours(owners)


def up_detached(owners: list[int]) -> NetState:
    assert network.up(None, "detach", wait=LOCK_WAIT) == 0
    st = network.running()
    assert st is not None and st.ready
    owners.append(st.owner_pid)
    return st


def ping(st: NetState, src: str, dst_ip: str) -> int:
    argv = in_node(st.nodes[src].pid, ["ping", "-c1", "-W2", "-q", dst_ip])
    return subprocess.run(argv, capture_output=True, timeout=10).returncode


def test_up_is_fast_and_down_leaves_nothing(turn: list[int]) -> None:
    t0 = time.monotonic()  # (includes waiting for the lock if another run took it just now)
    st = up_detached(turn)
    # routed: across the core, and the VIP to a load balancer's MAC (no reply: none runs)
    assert ping(st, "h16", "10.1.1.2") == 0
    took = time.monotonic() - t0
    print(f"up: {took:.2f} s from the call to a routed network (bound {UP_BOUND:.0f} s)")
    assert took < UP_BOUND
    assert len(st.nodes) == 36 and len(st.interfaces) == 96

    t1 = time.monotonic()
    assert network.down() == 0
    print(f"down: {time.monotonic() - t1:.2f} s")
    assert_nothing_left(st)


def test_down_after_the_owner_crashed(turn: list[int]) -> None:
    st = up_detached(turn)
    # something started in a host, outside the owner's control
    stray = subprocess.Popen(in_node(st.nodes["h3"].pid, ["sleep", "300"]))
    try:
        os.kill(st.owner_pid, signal.SIGKILL)
        assert netstate.wait_gone(st.owner_pid, st.owner_start_time, 5.0)
        assert network.running() is None  # the record stays, its owner is gone
        assert netstate.read_state() is not None
        assert network.down(owner=st.owner_pid) == 0  # (not a network someone started since)
        assert stray.wait(timeout=5) != 0  # ended by down, not by itself
    finally:
        if stray.poll() is None:
            stray.kill()
            stray.wait()
    assert_nothing_left(st)


@pytest.mark.parametrize("mode", ["--detach", "--cli"])
def test_ctrl_c_during_up_tears_down(turn: list[int], mode: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "controller", "up", mode],
        stdin=subprocess.PIPE,  # the CLI, if reached, ends at EOF
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO_ROOT,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert first.startswith("up: 36 nodes"), first
    st = netstate.read_state()
    assert st is not None and len(st.nodes) == 36
    turn.append(st.owner_pid)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal sends to `up`
    rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130, first + rest
    assert "interrupted" in rest
    assert_nothing_left(st)
