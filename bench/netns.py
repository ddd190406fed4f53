"""Throwaway network namespaces, the one way the netns tests and the benchmarks make them: named
namespaces joined by veth pairs, commands and processes inside them, frames captured or sent
inside them, and everything removed (`Netns.close`, or leaving the `with` block: on failure,
Ctrl-C and SIGTERM too, see `install_signal_handlers`).

Names: lbb<creator pid><tag>-<role>, so parallel runs do not collide and `remove_stale()`
deletes the namespaces of creators that are gone (a run killed outright). Veths are created
inside the namespaces directly: no name is ever taken in the root namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PY = str(REPO / ".venv" / "bin" / "python")
if not Path(PY).exists():
    PY = sys.executable
PREFIX = "lbb"
_NS_RE = re.compile(rf"^{PREFIX}(\d+)(?:t[0-9a-f]+)?-\w+$")


class TestbedError(RuntimeError):
    """A setup command failed; the message names the command and its error output."""


def sh(
    *argv: str,
    ns: str | None = None,
    timeout: float = 30.0,
    check: bool = True,
    input_text: str | None = None,
    cwd: Path | None = None,
) -> str:
    """Run a command (inside namespace `ns` if given); its stdout. TestbedError names the
    command and its stderr when it fails and `check` is set."""
    cmd = ["ip", "netns", "exec", ns, *argv] if ns else list(argv)
    res = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, input=input_text, cwd=cwd
    )
    if check and res.returncode != 0:
        raise TestbedError(f"{' '.join(cmd)}: exit {res.returncode}: {res.stderr.strip()}")
    return res.stdout


def missing(*tools: str, tun: bool = False) -> str | None:
    """Why namespaces cannot be made here (not root, a tool missing, no TUN), or None."""
    if os.geteuid() != 0:
        return "needs root: network namespaces, AF_PACKET, nftables"
    for tool in ("ip", "nft", *tools):
        if shutil.which(tool) is None:
            return f"{tool} not installed (./install.sh installs it)"
    if tun and not Path("/dev/net/tun").exists():
        return "/dev/net/tun missing: no TUN support"
    return None


def py(ns: str, code: str, *args: str, timeout: float = 30.0) -> Any:
    """Run a Python snippet in `ns` (from the repository); it prints one JSON value last."""
    out = sh(PY, "-c", code, *args, ns=ns, timeout=timeout, cwd=REPO)
    return json.loads(out.strip().splitlines()[-1])


def list_netns() -> list[str]:
    out = sh("ip", "-j", "netns", "list", check=False).strip()
    return [entry["name"] for entry in json.loads(out)] if out else []


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Delete the namespaces whose creating process has exited; returns their names."""
    removed = []
    for name in list_netns():
        m = _NS_RE.match(name)
        if m and not _pid_alive(int(m.group(1))):
            sh("ip", "netns", "del", name, check=False)
            removed.append(name)
    return removed


class Netns:
    """Namespaces made by this object; `close()` (or leaving `with`) deletes them all, and the
    veths in them with them. `tag` (short, random) keeps interface names of concurrent beds
    apart in logs and captures."""

    def __init__(self, tag: str | None = None) -> None:
        self.tag = tag if tag is not None else "t" + secrets.token_hex(2)
        if self.tag and not re.fullmatch(r"t[0-9a-f]+", self.tag):
            raise ValueError(f"tag must be 't' + hex digits, not {self.tag!r}")
        self.base = f"{PREFIX}{os.getpid()}{self.tag}"
        self.made: list[str] = []

    def add(self, role: str) -> str:
        """A new namespace named for `role`, lo up, IPv6 off (no neighbour discovery chatter
        on the wire or in the counters)."""
        name = f"{self.base}-{role}"
        sh("ip", "netns", "add", name)
        self.made.append(name)
        sh("ip", "link", "set", "lo", "up", ns=name)
        for key in ("all", "default"):
            self.sysctl(name, f"net.ipv6.conf.{key}.disable_ipv6", "1")
        return name

    def veth(
        self,
        ns_a: str,
        if_a: str,
        ns_b: str,
        if_b: str,
        mac_a: str = "",
        mac_b: str = "",
        ip_a: str = "",
        ip_b: str = "",
    ) -> None:
        """A veth pair if_a (in ns_a) <-> if_b (in ns_b), both up; optional MACs and addresses
        with their prefix ("10.0.0.1/24")."""
        argv = ["ip", "link", "add", if_a, *(("address", mac_a) if mac_a else ())]
        argv += ["type", "veth", "peer", "name", if_b, *(("address", mac_b) if mac_b else ())]
        sh(*argv, "netns", ns_b, ns=ns_a)
        for ns, dev, ip in ((ns_a, if_a, ip_a), (ns_b, if_b, ip_b)):
            if ip:
                sh("ip", "addr", "add", ip, "dev", dev, ns=ns)
            sh("ip", "link", "set", dev, "up", ns=ns)

    def sysctl(self, ns: str, key: str, value: str) -> None:
        sh("sysctl", "-q", "-w", f"{key}={value}", ns=ns)

    def close(self) -> None:
        for name in reversed(self.made):
            sh("ip", "netns", "del", name, check=False)
        self.made.clear()

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


ROUTED_BACKENDS = ("10.100.3.2", "10.100.3.3")
"""The two backend addresses of `routed_lb`'s backend namespace."""


def routed_lb(netns: Netns, client_offload: bool = False) -> tuple[str, str, str, str]:
    """(client, router, lb, backend) namespaces made in `netns`: client 10.100.1.2, LB
    10.100.2.2 (IP forwarding off), the backend with ROUTED_BACKENDS, all routed by the router,
    which sends the VIP 20.0.0.1 to the LB. Interfaces c<tag>, rc/rl/rb<tag>, l<tag>, b<tag>;
    `client_offload`: the client's interface leaves TCP/UDP checksums partial (tx on)."""
    c, r, lbns, b = netns.add("C"), netns.add("R"), netns.add("L"), netns.add("B")
    t = netns.tag
    netns.veth(c, f"c{t}", r, f"rc{t}")
    netns.veth(r, f"rl{t}", lbns, f"l{t}")
    netns.veth(r, f"rb{t}", b, f"b{t}")
    sh("ip", "addr", "add", "10.100.1.2/24", "dev", f"c{t}", ns=c)
    if client_offload:
        sh("ethtool", "-K", f"c{t}", "tx", "on", ns=c)
    sh("ip", "route", "add", "default", "via", "10.100.1.1", ns=c)
    for addr, dev in (("10.100.1.1", "rc"), ("10.100.2.1", "rl"), ("10.100.3.1", "rb")):
        sh("ip", "addr", "add", f"{addr}/24", "dev", f"{dev}{t}", ns=r)
    sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=r)
    sh("ip", "route", "add", "20.0.0.1/32", "via", "10.100.2.2", ns=r)
    sh("ip", "addr", "add", "10.100.2.2/24", "dev", f"l{t}", ns=lbns)
    sh("ip", "route", "add", "default", "via", "10.100.2.1", ns=lbns)
    sh("sysctl", "-qw", "net.ipv4.ip_forward=0", ns=lbns)
    for addr in ROUTED_BACKENDS:
        sh("ip", "addr", "add", f"{addr}/24", "dev", f"b{t}", ns=b)
    sh("ip", "route", "add", "default", "via", "10.100.3.1", ns=b)
    return c, r, lbns, b


def install_signal_handlers() -> None:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so every `finally` and `__exit__` runs."""

    def _raise(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _raise)
    signal.signal(signal.SIGHUP, _raise)


class NsProc:
    """A process in a namespace (fastpath.lb, agent.decap, ...) whose stdout lines that are
    JSON objects are collected in the background; stopped by PID."""

    def __init__(self, ns: str, argv: Sequence[str], cwd: Path = REPO) -> None:
        self.argv = list(argv)
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
            with contextlib.suppress(ValueError):  # not every line is JSON
                self.events.put(json.loads(line))

    def wait_event(self, kind: str = "", timeout: float = 15) -> dict[str, Any]:
        """The next JSON line whose "event" is `kind` ("": any JSON line)."""
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
        if self.proc.poll() is not None and self.proc.stderr is not None:
            self.stderr = self.proc.stderr.read()
        raise AssertionError(f"no {kind or 'JSON'!r} line from {self.argv}: {self.stderr}")

    def latest_event(self, kind: str = "", timeout: float = 15) -> dict[str, Any]:
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
        """Signal the process by PID and wait; SIGKILL if it does not end in time. Returns its
        exit status; its stderr is then in `stderr`."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(2)
        if self.proc.stderr is not None and not self.proc.stderr.closed:
            self.stderr += self.proc.stderr.read()
            self.proc.stderr.close()
        return self.proc.returncode


class Procs:
    """Processes a test or benchmark started in namespaces, each stopped by PID, in reverse
    order (`stop_all`, from a `finally`)."""

    def __init__(self) -> None:
        self.items: list[NsProc] = []

    def start(self, ns: str, argv: Sequence[str]) -> NsProc:
        p = NsProc(ns, argv)
        self.items.append(p)
        return p

    def stop_all(self) -> None:
        while self.items:
            self.items.pop().stop()


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
    out = sh(
        PY, "-c", _CAPTURE, cap_if, str(seconds), send_if or cap_if,
        ns=ns, timeout=seconds + 30, input_text=json.dumps([f.hex() for f in send or []]),
        cwd=REPO,
    )  # fmt: skip
    return [bytes.fromhex(h) for h in json.loads(out.strip().splitlines()[-1])]


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
