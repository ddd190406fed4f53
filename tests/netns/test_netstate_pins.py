"""Teardown by namespace must never hit a newer namespace that reused an inode number: members
are found only in namespaces proven ours (pinned, or held by a known live process)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from controller import netstate
from controller.netstate import NetState, NodeRecord

pytestmark = pytest.mark.netns


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces and bind mounts")
    for tool in ("unshare", "nsenter"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (util-linux)")


def _wait_ns(pid: int, other_than: int) -> int:
    for _ in range(200):
        ino = netstate.netns_of(pid)
        if ino is not None and ino != other_than:
            return ino
        time.sleep(0.01)
    raise AssertionError(f"pid {pid} never entered a namespace of its own")


def _state(pid: int, ino: int) -> NetState:
    rec = NodeRecord("x", "host", pid, netstate.proc_start_time(pid) or 0, ino)
    return NetState(0, 0, "detach", "test", time.time(), True, {"x": rec})


def test_member_found_through_the_pin_after_the_shell_died(tmp_path: Path) -> None:
    _need_root()
    root = netstate.root_netns()
    shell = subprocess.Popen(["unshare", "-n", "sleep", "30"])
    stray = None
    pin = tmp_path / "ns" / "x"
    try:
        ino = _wait_ns(shell.pid, root)
        st = _state(shell.pid, ino)
        netstate.pin_netns(shell.pid, pin)
        assert netstate.pinned_inode(pin) == ino
        stray = subprocess.Popen(["nsenter", "-t", str(shell.pid), "-n", "sleep", "30"])
        _wait_ns(stray.pid, root)
        shell.kill()  # the node shell ends first, as when a network's owner crashes
        shell.wait()
        # Without the pin nothing proves the namespace is still the recorded one: left alone.
        assert netstate.kill_namespaces(st, grace=0.1, timeout=0.3) == []
        assert stray.poll() is None
        # With it, the stray is ended.
        assert netstate.kill_namespaces(st, grace=0.5, timeout=5.0, pin_dir=pin.parent) == []
        assert stray.wait(timeout=5) == -signal.SIGTERM
    finally:
        netstate.unpin_netns(pin)
        for p in (shell, stray):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    assert netstate.pinned_inode(pin) is None
    assert not pin.exists()
