"""Helpers for the load balancer's netns tests: namespaces with unique names, the real
`python -m fastpath.lb` process, and frame capture/injection inside a namespace.

Everything made here is removed by `Bed.close` (deleting a namespace deletes its veth ends) and
`LbProc.stop` (by PID); tests call them from fixture finalizers, so also on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import threading
from typing import Any

import pytest
from agent_testbed import PY, REPO, sh
from agent_testbed import suffix as tag

__all__ = ["PY", "REPO", "Bed", "Capture", "LbProc", "capture", "require_root_tools", "sh", "tag"]


def require_root_tools(*tools: str) -> None:
    """Skip (with the reason) when not root or a tool is missing."""
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces, AF_PACKET, nftables")
    for tool in ("ip", "nft", "ethtool", *tools):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (./install.sh installs it)")


class Bed:
    """Namespaces joined by veth pairs; `close` deletes them all."""

    def __init__(self) -> None:
        self.tag = tag()
        self.namespaces: list[str] = []

    def ns(self, role: str) -> str:
        name = f"fp{role}{self.tag}"
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        # No IPv6: its router/listener chatter would be the only unexpected frames on the wire.
        sh("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", ns=name)
        sh("sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1", ns=name)
        sh("ip", "link", "set", "lo", "up", ns=name)
        return name

    def link(
        self, ns_a: str, if_a: str, ns_b: str, if_b: str, mac_a: str = "", mac_b: str = ""
    ) -> None:
        args = ["ip", "link", "add", if_a, "netns", ns_a]
        if mac_a:
            args += ["address", mac_a]
        args += ["type", "veth", "peer", "name", if_b, "netns", ns_b]
        if mac_b:
            args += ["address", mac_b]
        sh(*args)
        sh("ip", "link", "set", if_a, "up", ns=ns_a)
        sh("ip", "link", "set", if_b, "up", ns=ns_b)

    def close(self) -> None:
        for name in reversed(self.namespaces):
            sh("ip", "netns", "del", name, check=False)
        self.namespaces.clear()


class LbProc:
    """`python -m fastpath.lb` inside a namespace; JSON lines from stdout in `lines`."""

    def __init__(self, ns: str, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, PY, "-m", "fastpath.lb", *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.stderr = ""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.lines.put(json.loads(line))

    def wait_ready(self, timeout: float = 20) -> dict[str, Any]:
        """The first stats line, printed once the ring, filter and nft rule are in place."""
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            self.stop()
            raise AssertionError(f"fastpath.lb did not start: {self.stderr}") from None

    def stop(self, timeout: float = 10) -> int:
        """SIGTERM by PID, wait; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        if self.proc.stderr is not None:
            self.stderr = self.proc.stderr.read()
            self.proc.stderr.close()
        return rc

    def last_line(self) -> dict[str, Any]:
        last: dict[str, Any] = {}
        while not self.lines.empty():
            last = self.lines.get_nowait()
        return last


# Runs inside a namespace: optionally sends frames on one interface, captures every incoming
# frame on another for a while, prints the captured frames as a JSON list of hex strings.
_CAPTURE = r"""
import json, socket, sys, time
from l4lb import bpf
cap_if, seconds, send_if = sys.argv[1], float(sys.argv[2]), sys.argv[3]
frames = [bytes.fromhex(h) for h in json.loads(sys.stdin.read() or "[]")]
accept_all = [bpf.Insn(bpf.RET | bpf.K, k=bpf.ACCEPT_LEN)]  # every frame, whole
cap = bpf.open_filtered(cap_if, accept_all)  # incoming only (ignores our own sends)
print("ready", flush=True)
if frames:
    tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    tx.bind((send_if, 0))
    for f in frames:
        tx.send(f)
        time.sleep(0.002)
got = []
end = time.monotonic() + seconds
while (left := end - time.monotonic()) > 0:
    cap.settimeout(left)
    try:
        got.append(cap.recv(65536).hex())
    except (socket.timeout, TimeoutError):
        break
print(json.dumps(got))
"""


def capture(
    ns: str, cap_if: str, seconds: float, send: list[bytes] | None = None, send_if: str = ""
) -> list[bytes]:
    """Frames arriving on `cap_if` in `ns` within `seconds` (after sending `send` on
    `send_if`, if given)."""
    res = subprocess.run(
        ["ip", "netns", "exec", ns, PY, "-c", _CAPTURE, cap_if, str(seconds), send_if or cap_if],
        input=json.dumps([f.hex() for f in send or []]),
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        cwd=REPO,
    )
    if res.returncode != 0:
        raise AssertionError(f"capture in {ns} failed: {res.stderr.strip()}")
    return [bytes.fromhex(h) for h in json.loads(res.stdout.strip().splitlines()[-1])]


class Capture:
    """A capture running in the background (start, do things, then `result()`)."""

    def __init__(self, ns: str, cap_if: str, seconds: float) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, PY, "-c", _CAPTURE, cap_if, str(seconds), cap_if],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        assert self.proc.stdout is not None
        self.seconds = seconds
        if self.proc.stdout.readline().strip() != "ready":  # the socket is open: start traffic
            self.kill()
            raise AssertionError(f"capture in {ns} on {cap_if} did not start")

    def result(self) -> list[bytes]:
        try:
            out, err = self.proc.communicate(timeout=self.seconds + 30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("capture did not finish") from None
        if self.proc.returncode != 0:
            raise AssertionError(f"capture failed: {err.strip()}")
        return [bytes.fromhex(h) for h in json.loads(out.strip().splitlines()[-1])]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
