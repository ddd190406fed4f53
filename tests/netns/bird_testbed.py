"""A BGP testbed of its own: the fat tree's t1, h1 and h2 as three namespaces, each with a real
BIRD running the configuration controller.bgp renders for it, and the announcement holders
(`python -m fastpath.announce_cli`, standing in for the LB process) on h1 and h2.

Interface names and addresses are the fat tree's (h1-eth0 10.1.1.2 <-> t1-eth1 10.1.1.1, h2-eth0
10.1.2.2 <-> t1-eth2 10.1.2.1), which is what the rendered configurations name; they live in
namespaces of the project's testbed module (bench.netns), so a fat tree up at the same time is
not touched. `close()` stops every process by PID and deletes the namespaces (and their veths),
also after a failure.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from bench.netns import PY, REPO, Netns, list_netns, missing, sh
from controller import bgp, birdctl, fib
from controller.deployment import Deployment, load_deployment
from controller.drivers import linux
from controller.routes import compute_routes

LBS = ("h1", "h2")


def require_bird() -> None:
    why = missing(tun=True)
    if why is None and shutil.which("bird") is None:
        why = "bird not installed (./install.sh installs bird2)"
    if why:
        pytest.skip(why)


class BirdBed:
    """t1, h1, h2 with BIRD each; holders started and stopped per test."""

    def __init__(self, workdir: Path, dep: Deployment | None = None) -> None:
        self.dep = dep or load_deployment()
        self.dir = workdir
        self.netns = Netns()
        self.ns: dict[str, str] = {}
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.logs: dict[str, Path] = {}
        try:
            for node in ("t1", *LBS):
                self.ns[node] = self.netns.add(node)
            topo = self.dep.topology
            for h in LBS:
                hi, gw = topo.host_interface(h), topo.gateway(h)
                assert hi.ip is not None and gw.ip is not None
                self.netns.veth(self.ns[h], hi.name, self.ns["t1"], gw.name, ip_a=hi.ip, ip_b=gw.ip)
            # t1's routes to h1's and h2's /24 as the Linux driver makes them: via the host,
            # onlink, in place of the connected routes (BIRD must cope with that). Not its
            # neighbour entries: the veths here have MACs of their own.
            t1 = compute_routes(topo, self.dep.vip, self.dep.load_balancers)["t1"]
            for argv in linux.program_commands(t1, topo):
                if argv[1] == "route" and argv[3] in ("10.1.1.0/24", "10.1.2.0/24"):
                    sh("ip", "-n", self.ns["t1"], *argv[1:])
            for node in ("t1", *LBS):
                self.start_bird(node)
        except BaseException:
            self.close()
            raise

    # -- processes ----------------------------------------------------------------------

    def files(self, node: str) -> bgp.BirdFiles:
        return bgp.bird_files(self.dir, node)

    def start_bird(self, node: str) -> None:
        f = self.files(node)
        f.conf.parent.mkdir(parents=True, exist_ok=True)
        conf = bgp.tor_config(self.dep, node) if node == "t1" else bgp.lb_config(self.dep, node)
        f.conf.write_text(conf)
        argv = ["bird", "-f", "-c", str(f.conf), "-s", str(f.ctl), "-P", str(f.pid)]
        self._spawn(f"bird-{node}", node, argv)
        wait_for(lambda: _answers(f.ctl), 10, f"BIRD on {node} to open {f.ctl}")

    def start_holder(self, host: str, *extra: str) -> subprocess.Popen[str]:
        iface = self.dep.topology.host_interface(host).name
        argv = [PY, "-m", "fastpath.announce_cli", iface, "--status-file",
                str(self.status_path(host)), *extra]  # fmt: skip
        self.status_path(host).unlink(missing_ok=True)
        return self._spawn(f"holder-{host}", host, argv)

    def status_path(self, host: str) -> Path:
        return self.dir / f"{host}-announce.json"

    def status(self, host: str) -> dict[str, Any]:
        return json.loads(self.status_path(host).read_text())

    def _spawn(self, name: str, node: str, argv: list[str]) -> subprocess.Popen[str]:
        self.stop(name)
        log = self.dir / f"{name}.log"
        self.logs[name] = log
        with open(log, "w") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns[node], *argv],  # ip execs: the PID is argv's
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                cwd=REPO,
            )
        self.procs[name] = proc
        return proc

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 5) -> int | None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
                proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        return proc.returncode

    def log(self, name: str) -> str:
        try:
            return self.logs[name].read_text()
        except (KeyError, OSError):
            return ""

    def close(self) -> None:
        for name in [n for n in self.procs if n.startswith("holder")] + list(self.procs):
            self.stop(name)
        made = list(self.netns.made)
        self.netns.close()
        self.ns.clear()
        assert not set(made) & set(list_netns()), "a namespace was left behind"

    # -- observing ----------------------------------------------------------------------

    def tor_gateways(self) -> list[str]:
        """The live gateways of t1's kernel route to the VIP (BIRD's)."""
        route = fib.read_route(f"{self.dep.vip}/32", ["ip", "netns", "exec", self.ns["t1"]])
        return route.live_gateways() if route is not None else []

    def bird(self, node: str, command: str) -> list[birdctl.Line]:
        return birdctl.query(self.files(node).ctl, command)

    def wait_gateways(self, want: list[str], timeout: float) -> float:
        """Seconds until t1 routes the VIP over exactly `want`; fails after `timeout`."""
        t0 = time.monotonic()
        want = sorted(want)
        wait_for(lambda: self.tor_gateways() == want, timeout, f"t1 to route the VIP via {want}",
                 poll=0.0, detail=lambda: f"t1 has {self.tor_gateways()}")  # fmt: skip
        return time.monotonic() - t0

    def ip(self, host: str) -> str:
        return self.dep.topology.host_ip(host)


def _answers(ctl: Path) -> bool:
    try:
        birdctl.query(ctl, "show status", timeout=1)
    except birdctl.BirdError:
        return False
    return True


def wait_for(cond: Any, timeout: float, what: str, poll: float = 0.02, detail: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            extra = f" ({detail()})" if detail else ""
            raise AssertionError(f"waited {timeout} s for {what}{extra}")
        if poll:
            time.sleep(poll)
