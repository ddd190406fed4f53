"""The network's state file, lock and process bookkeeping, and the errors `exec` gives, all
against a temporary state directory (no root, no network)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from controller import netstate
from controller.netstate import NetState, NetStateError, NodeRecord

NO_PID = 4_194_400  # above the largest pid_max (2**22): never a process


def sample(owner: int = 1, ready: bool = True) -> NetState:
    return NetState(
        owner_pid=owner,
        owner_start_time=5,
        mode="detach",
        topology="fattree.json",
        started=1.5,
        ready=ready,
        nodes={
            "h1": NodeRecord("h1", "host", NO_PID, 7, 4026532001),
            "t1": NodeRecord("t1", "switch", NO_PID + 1, 8, 4026532002),
        },
        interfaces=["h1-eth0", "t1-eth1"],
    )


def test_state_round_trip(tmp_path: Path) -> None:
    assert netstate.read_state(tmp_path) is None
    st = sample()
    netstate.write_state(st, tmp_path)
    assert netstate.read_state(tmp_path) == st
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary left
    assert st.hosts() == ["h1"] and st.switches() == ["t1"]
    netstate.remove_state(tmp_path)
    netstate.remove_state(tmp_path)  # twice is fine
    assert netstate.read_state(tmp_path) is None


def test_corrupt_state_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text('{"owner_pid": 1')
    with pytest.raises(NetStateError, match="unreadable state"):
        netstate.read_state(tmp_path)


def test_lock_is_exclusive_and_released_on_close(tmp_path: Path) -> None:
    fd = netstate.take_lock(tmp_path)
    assert fd is not None
    t0 = time.monotonic()
    assert netstate.take_lock(tmp_path, wait=0.3) is None  # held: we waited, then gave up
    assert time.monotonic() - t0 >= 0.3
    # another process sees it held too
    held = subprocess.run(["flock", "-n", str(tmp_path / "fattree.lock"), "true"], check=False)
    assert held.returncode != 0
    os.close(fd)
    fd2 = netstate.take_lock(tmp_path)
    assert fd2 is not None
    os.close(fd2)


def test_process_identity() -> None:
    me = os.getpid()
    start = netstate.proc_start_time(me)
    assert start is not None and netstate.is_running(me, start)
    assert not netstate.is_running(me, start + 1)  # a recycled PID is not ours
    child = subprocess.Popen(["true"])
    child.wait()
    assert netstate.proc_start_time(child.pid) is None
    assert netstate.wait_gone(child.pid, 0, timeout=0.1)


def test_root_namespace_is_never_a_member() -> None:
    # whatever lives in our own namespace is not part of any network, even if asked for
    assert netstate.namespace_members([netstate.root_netns()]) == []


def test_node_pid_errors(tmp_path: Path) -> None:
    network = pytest.importorskip("controller.network")
    with pytest.raises(network.NetworkError, match="no network is up"):
        network.node_pid("h1", tmp_path)
    netstate.write_state(sample(), tmp_path)
    with pytest.raises(network.UnknownNode, match=r"unknown host 'h9'; hosts: h1; switches: t1"):
        network.exec_on("h9", ["true"], tmp_path)
    with pytest.raises(network.NetworkError, match="is gone"):
        network.node_pid("h1", tmp_path)  # no such process
    netstate.write_state(sample(ready=False), tmp_path)
    with pytest.raises(network.NetworkError, match="still coming up"):
        network.node_pid("h1", tmp_path)
    with pytest.raises(ValueError, match="no command"):
        network.exec_on("h1", [], tmp_path)
