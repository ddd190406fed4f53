"""Helpers for the agent's netns tests: namespaces with unique names, commands inside them, and
the real `python -m agent.decap` process watched through its JSON lines.

Everything made here is removed by `NetnsBed.close` (namespaces delete their veths) and
`AgentProc.stop` (by PID); the tests call them from fixture finalizers, so also on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
PY = str(REPO / ".venv" / "bin" / "python")
if not Path(PY).exists():
    PY = sys.executable


def require_root_tools(*tools: str) -> None:
    """Skip (with the reason) when not root or a tool is missing."""
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces, AF_PACKET, TUN, nftables")
    for tool in ("ip", "nft", *tools):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (./install.sh installs it)")
    if not Path("/dev/net/tun").exists():
        pytest.skip("/dev/net/tun missing: no TUN support")


def suffix() -> str:
    """Short unique tag for names (interface names are at most 15 characters)."""
    return f"{os.getpid() % 10000:04d}{secrets.token_hex(2)}"


def sh(*argv: str, ns: str | None = None, timeout: float = 20, check: bool = True) -> str:
    cmd = ["ip", "netns", "exec", ns, *argv] if ns else list(argv)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout


def py(ns: str, code: str, *args: str, timeout: float = 30) -> Any:
    """Run a Python snippet in `ns`; it prints one JSON value last, which is returned."""
    out = sh(PY, "-c", code, *args, ns=ns, timeout=timeout)
    return json.loads(out.strip().splitlines()[-1])


class NetnsBed:
    """Named namespaces joined by veth pairs; `close` deletes them all."""

    def __init__(self) -> None:
        self.tag = suffix()
        self.namespaces: list[str] = []

    def ns(self, role: str) -> str:
        name = f"ag{role}{self.tag}"
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        sh("ip", "link", "set", "lo", "up", ns=name)
        return name

    def link(self, a: str, a_if: str, a_ip: str, b: str, b_if: str, b_ip: str) -> None:
        """veth a_if (in a, a_ip with prefix) <-> b_if (in b, b_ip)."""
        sh("ip", "link", "add", a_if, "netns", a, "type", "veth", "peer", "name", b_if, "netns", b)
        for ns, ifname, ip in ((a, a_if, a_ip), (b, b_if, b_ip)):
            sh("ip", "addr", "add", ip, "dev", ifname, ns=ns)
            sh("ip", "link", "set", ifname, "up", ns=ns)

    def close(self) -> None:
        for name in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)
        self.namespaces.clear()


class AgentProc:
    """`python -m agent.decap` (or another command, e.g. fastpath.lb) in a namespace, stdout
    lines parsed as JSON events in the background."""

    def __init__(self, ns: str, argv: list[str], cwd: Path = REPO) -> None:
        self.argv = argv
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.lines: list[str] = []
        self.stderr = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            with contextlib.suppress(ValueError):  # not every line is an event
                self.events.put(json.loads(line))

    def wait_event(self, kind: str, timeout: float = 15) -> dict[str, Any]:
        """The next JSON line whose "event" is `kind` ("" for any JSON line)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                ev = self.events.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None and self.events.empty():
                    self._reader.join(1)
                    if self.events.empty():
                        break
                continue
            if not kind or ev.get("event") == kind:
                return ev
        err = self.proc.stderr.read() if self.proc.poll() is not None and self.proc.stderr else ""
        raise AssertionError(f"no {kind!r} event from {self.argv}; stdout {self.lines} {err}")

    def latest_event(self, kind: str, timeout: float = 15) -> dict[str, Any]:
        """The newest `kind` event: waits for one, then drains whatever is already queued."""
        ev = self.wait_event(kind, timeout)
        while True:
            try:
                nxt = self.events.get_nowait()
            except queue.Empty:
                return ev
            if not kind or nxt.get("event") == kind:
                ev = nxt

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        """Signal the process by PID and wait; SIGKILL if it does not end in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(2)
        if self.proc.stderr:
            self.stderr = self.proc.stderr.read()
        return self.proc.returncode
