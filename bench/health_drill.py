"""Health drills on the running fat tree (root): kill and restore web servers, agents and links
while clients fetch, and measure what issue 8 asks of the health checks. bench/soak.py and
tests/fattree/test_health_fattree.py drive it; it starts nothing of the network itself.

What it measures, and how:
- New flows to a backend: a capture on the backend's own interface (tcpdump in its node) of
  IP-in-IP whose inner packet is a TCP SYN without ACK, with the outer source (which LB sent
  it). "Time from the kill to the last new flow" is the last such SYN after the kill minus
  the kill's time (both wall clock, same machine); "back within" is the first SYN after the
  restarted server listens minus that time.
- Requests: bench/fetch_loop.py in each client's node, a new connection per request; every
  failure comes with its start and end time. A failure is counted as "on a killed server"
  when it ended after a kill and started before that server's last new flow (in flight on it,
  or sent to it before the LBs knew); any other failure is a real one.
- Health as each LB sees it: the LB's control socket (`health`), sampled.
Every process started here (clients, captures, restarted servers) is stopped by PID in
`close()`, also on failure and Ctrl-C (the caller's `finally`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller import netstate, network, nodeconfig, render, services
from controller.deployment import Deployment
from l4lb.control import ControlUnavailable, RequestRefused, request

REPO = Path(__file__).resolve().parent.parent
FETCH = REPO / "bench" / "fetch_loop.py"
# Outer IPv4 (IHL 5) then inner IPv4 (IHL 5) then TCP: inner protocol at byte 29, the inner
# TCP flags at byte 53; SYN set, ACK clear.
SYN_FILTER = "ip proto 4 and ip[29] = 6 and ip[53] & 0x12 = 2"
PCAP_HEADER = struct.Struct("<IHHiIII")
PCAP_RECORD = struct.Struct("<IIII")
SLACK = 0.05
"""Seconds of clock slack between a failure's timestamps and a capture's."""


@dataclass
class Syn:
    t: float
    """Wall time the SYN reached the backend."""
    lb: str
    """The outer source: the LB that sent it."""
    client: tuple[str, int]
    """The inner source address and port (SYN_FILTER's frames have 20-byte headers)."""


def read_syns(pcap: Path) -> list[Syn]:
    """The SYNs of a capture made with SYN_FILTER (Ethernet, microsecond pcap)."""
    data = pcap.read_bytes() if pcap.exists() else b""
    if len(data) < PCAP_HEADER.size:
        return []
    out = []
    off = PCAP_HEADER.size
    while off + PCAP_RECORD.size <= len(data):
        sec, usec, incl, _orig = PCAP_RECORD.unpack_from(data, off)
        frame = data[off + PCAP_RECORD.size : off + PCAP_RECORD.size + incl]
        off += PCAP_RECORD.size + incl
        if len(frame) >= 56:
            src = ".".join(str(b) for b in frame[46:50])
            sport = int.from_bytes(frame[54:56], "big")
            out.append(Syn(sec + usec / 1e6, ".".join(str(b) for b in frame[26:30]), (src, sport)))
    return out


@dataclass
class Outage:
    """A server killed (and perhaps restored)."""

    host: str
    ip: str
    killed: float
    restored: float | None = None
    """Wall time the restarted server listened again."""
    last_new_flow: float | None = None
    """Seconds from the kill to the last SYN that reached the backend before its return."""
    last_new_flow_by_lb: dict[str, float] = field(default_factory=dict)
    back_after: float | None = None
    """Seconds from the return to the first new flow."""

    def judge(self, syns: list[Syn]) -> None:
        end = self.restored if self.restored is not None else float("inf")
        after = [s for s in syns if self.killed <= s.t < end]
        self.last_new_flow = round(max((s.t for s in after), default=self.killed) - self.killed, 3)
        for s in after:
            self.last_new_flow_by_lb[s.lb] = round(s.t - self.killed, 3)
        if self.restored is not None:
            back = [s.t for s in syns if s.t >= self.restored]
            self.back_after = round(min(back) - self.restored, 3) if back else None

    def covers(self, failure: dict[str, Any]) -> bool:
        """Was this failed request in flight on the killed server, or sent to it before the
        LBs knew?"""
        last = self.killed + (self.last_new_flow or 0.0)
        return bool(failure["t1"] >= self.killed - SLACK and failure["t0"] <= last + SLACK)


class Drill:
    """The running fat tree's services, and what a drill starts in them."""

    def __init__(self, dep: Deployment, state_dir: Path = services.STATE_DIR) -> None:
        self.dep = dep
        self.state_dir = state_dir
        self.records = {r["name"]: r for r in services.running(state_dir)}
        self.work = Path(tempfile.mkdtemp(prefix="l4lb-drill-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.servers: dict[str, int] = {}
        """host -> PID of the web server now running there (the recorded one or ours)."""
        for host, _ in dep.backends:
            rec = self.records.get(f"www-{host}")
            if rec is not None:
                self.servers[host] = rec["pid"]
        self.captures: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
        self.clients: list[subprocess.Popen[bytes]] = []

    # -- reaching nodes ----------------------------------------------------------------------

    def node_pid(self, host: str) -> int:
        return network.node_pid(host, self.state_dir)

    def _spawn(self, host: str, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(["mnexec", "-a", str(self.node_pid(host)), *argv], **kw)
        self.procs.append(proc)
        return proc

    def run_in(self, host: str, argv: list[str]) -> None:
        subprocess.run(
            ["mnexec", "-a", str(self.node_pid(host)), *argv], check=True, capture_output=True,
            timeout=10,
        )  # fmt: skip

    def ip(self, host: str) -> str:
        return self.dep.topology.host_ip(host)

    # -- health as the LBs see it -------------------------------------------------------------

    def lb_health(self, lb: str) -> dict[str, Any]:
        return dict(request(render.control_path(self.state_dir, "lb", lb), "health", timeout=2))

    def lb_show(self, lb: str) -> dict[str, Any]:
        return dict(request(render.control_path(self.state_dir, "lb", lb), "show", timeout=2))

    def healthy(self, host: str) -> dict[str, bool]:
        """Each LB's `healthy` for a backend."""
        ip = self.ip(host)
        return {lb: bool(self.lb_health(lb)["backends"][ip]["healthy"]) for lb in self.lbs}

    @property
    def lbs(self) -> tuple[str, ...]:
        return self.dep.load_balancers

    def wait(self, what: str, cond: Callable[[], bool], seconds: float) -> float:
        """Poll `cond` every 20 ms; the seconds it took, or RuntimeError naming `what`."""
        t0 = time.monotonic()
        while True:
            with contextlib.suppress(ControlUnavailable, RequestRefused):
                if cond():
                    return time.monotonic() - t0
            if time.monotonic() - t0 > seconds:
                raise RuntimeError(f"{what}: not within {seconds:g} s")
            time.sleep(0.02)

    # -- servers, agents, links ---------------------------------------------------------------

    def kill_server(self, host: str) -> Outage:
        pid = self.servers.pop(host)
        killed = time.time()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        self._reap(pid)
        return Outage(host, self.ip(host), killed)

    def start_server(self, host: str, wait: bool = True) -> float:
        """Start the host's web server again (as the services started it); the wall time it
        listens (or now, without `wait`)."""
        rec = self.records[f"www-{host}"]
        log = open(self.work / f"www-{host}.log", "ab")  # noqa: SIM115 (closed below)
        try:
            proc = self._spawn(host, list(rec["argv"]), stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()
        self.servers[host] = proc.pid
        if not wait:
            return time.time()
        addr, port = rec["listen"]
        deadline = time.monotonic() + 10
        while not services.listening(proc.pid, addr, port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the web server on {host} did not listen again")
            time.sleep(0.005)
        return time.time()

    def kill_lb(self, lb: str) -> tuple[float, float]:
        """SIGKILL the LB on `lb`: (wall time of the kill, seconds until its ToR stopped
        routing the VIP over it)."""
        from controller import lbctl  # (it reads the running network)

        st = netstate.read_state(self.state_dir)
        assert st is not None, "no network"
        killed = time.time()
        os.kill(self.records[f"lb-{lb}"]["pid"], signal.SIGKILL)
        return killed, lbctl.wait_ecmp(st, self.dep, lb, present=False, timeout=5.0)

    def restart_lb(self, lb: str) -> float:
        """Start the LB on `lb` again as the services started it (recorded, stopped by PID);
        seconds from the restart until its ToR routes the VIP over it again."""
        from controller import lbctl

        st = netstate.read_state(self.state_dir)
        assert st is not None, "no network"
        t0 = time.monotonic()
        rec = services.restart(self.node_pid, self.state_dir, f"lb-{lb}")
        self.records[rec["name"]] = rec
        lbctl.wait_ecmp(st, self.dep, lb, present=True, timeout=5.0)
        return time.monotonic() - t0

    def kill_agent(self, host: str) -> float:
        pid = self.records[f"agent-{host}"]["pid"]
        t = time.time()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        return t

    def link(self, host: str, up: bool) -> float:
        """The host's fabric link down, or up again as the network built it (a link going
        down takes the default route and the neighbour entries with it)."""
        iface = self.dep.topology.host_interface(host).name
        t = time.time()
        if not up:
            self.run_in(host, ["ip", "link", "set", iface, "down"])
            return t
        for argv in nodeconfig.node_commands(self.dep.topology, host):
            self.run_in(host, argv)
        return t

    # -- captures and clients -----------------------------------------------------------------

    def capture_syns(self, hosts: Iterable[str]) -> None:
        for host in hosts:
            iface = self.dep.topology.host_interface(host).name
            pcap = self.work / f"syn-{host}.pcap"
            proc = self._spawn(
                host,
                ["tcpdump", "-i", iface, "-Q", "in", "-U", "-n", "-s", "64", "-Z", "root",
                 "-w", str(pcap), SYN_FILTER],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )  # fmt: skip
            assert proc.stderr is not None
            line = proc.stderr.readline()  # "listening on ...": the capture is up
            if b"listening" not in line:
                raise RuntimeError(f"tcpdump on {host}: {line.decode(errors='replace')}")
            self.captures[host] = (proc, pcap)

    def syns(self, host: str) -> list[Syn]:
        """The SYNs captured on a backend so far (the capture is flushed per packet)."""
        return read_syns(self.captures[host][1])

    def start_clients(
        self, hosts: Iterable[str], seconds: float, threads: int = 2, pace: float = 0.02,
        path: str = "/1k.bin",
    ) -> None:  # fmt: skip
        url = f"http://{self.dep.vip}{path}"
        for host in hosts:
            argv = [sys.executable, str(FETCH), "--url", url, "--seconds", str(seconds),
                    "--threads", str(threads), "--pace", str(pace), "--client", host]  # fmt: skip
            self.clients.append(self._spawn(host, argv, stdout=subprocess.PIPE))

    def client_results(self, timeout: float = 30) -> list[dict[str, Any]]:
        out = []
        for proc in self.clients:
            try:
                stdout, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, _ = proc.communicate()
            lines = stdout.decode(errors="replace").strip().splitlines()
            out.append(
                json.loads(lines[-1])
                if lines
                else {"requests": 0, "ok": 0, "failed": 0, "failures": [], "error": "no output"}
            )
        self.clients.clear()
        return out

    def lb_rss_kb(self) -> dict[str, int | None]:
        return {lb: rss_kb(self.records[f"lb-{lb}"]["pid"]) for lb in self.lbs}

    # -- the end ------------------------------------------------------------------------------

    def _reap(self, pid: int) -> None:
        for proc in self.procs:
            if proc.pid == pid:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
                return
        # a service's process: the network's owner reaps it

    def close(self) -> None:
        """Stop everything started here, by PID (captures last, so they see the end)."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        self.procs.clear()
        for f in self.work.iterdir():
            f.unlink()
        self.work.rmdir()


def rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def classify(outages: list[Outage], results: list[dict[str, Any]]) -> dict[str, Any]:
    """Requests, failures on a killed server, and real failures (with a few examples)."""
    on_killed: list[dict[str, Any]] = []
    real: list[dict[str, Any]] = []
    for r in results:
        for f in r.get("failures", []):
            (on_killed if any(o.covers(f) for o in outages) else real).append(
                {**f, "client": r.get("client", "")}
            )
    return {
        "requests": sum(r["requests"] for r in results),
        "ok": sum(r["ok"] for r in results),
        "failed_on_killed_server": len(on_killed),
        "failed": len(real),
        "failed_examples": real[:5],
    }


class Sampler:
    """Samples every LB's `healthy` for one backend in a thread: (wall time, lb, healthy)."""

    def __init__(self, drill: Drill, host: str, every: float = 0.02) -> None:
        self.drill, self.ip, self.every = drill, drill.ip(host), every
        self.samples: list[tuple[float, str, bool]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for lb in self.drill.lbs:
                with contextlib.suppress(ControlUnavailable, RequestRefused):
                    h = self.drill.lb_health(lb)["backends"][self.ip]["healthy"]
                    self.samples.append((time.time(), lb, bool(h)))
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def disagreement(self) -> float:
        """The longest time the LBs' views of the backend differed (from the samples)."""
        view: dict[str, bool] = {}
        since: float | None = None
        worst = 0.0
        for t, lb, h in self.samples:
            view[lb] = h
            differ = len(set(view.values())) > 1
            if differ and since is None:
                since = t
            elif not differ and since is not None:
                worst = max(worst, t - since)
                since = None
        if since is not None and self.samples:
            worst = max(worst, self.samples[-1][0] - since)
        return round(worst, 3)

    def change_times(self) -> list[float]:
        """Seconds from the first sample to each change of the first LB's view."""
        if not self.samples:
            return []
        first = self.drill.lbs[0]
        t0, last, out = self.samples[0][0], None, []
        for t, lb, h in self.samples:
            if lb == first:
                if last is not None and h != last:
                    out.append(round(t - t0, 2))
                last = h
        return out

    def changes(self) -> dict[str, int]:
        """Health changes each LB showed."""
        last: dict[str, bool] = {}
        n: dict[str, int] = {}
        for _t, lb, h in self.samples:
            if lb in last and last[lb] != h:
                n[lb] = n.get(lb, 0) + 1
            last[lb] = h
        return n
