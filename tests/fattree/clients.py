"""Clients of the fat-tree failover tests: long downloads that are really on the wire, short
requests in a loop, and which LB t1 sends each flow to.

- `Downloads`: rate-limited 10 MB downloads (`curl --limit-rate`, which never retries: a
  broken connection is a failure; from a given source port where a test places the flow),
  each checked by sha256. The hosts
  inherit a 32 MiB `tcp_rmem` maximum, so a whole reply would land in the client's socket
  buffer in a second and only the reading would be slow (DESIGN.md's trap): each client's
  namespace gets `tcp_rmem` capped at 256 KiB while it downloads (the old value put back).
- `RequestLoops`: bench/fetch_loop.py in some clients' namespaces (a new connection per
  request, every failure with its start time), so a test can tell when new flows failed.
- `carriers`: which LB t1 sends each flow to, seen on t1's ports toward the LBs (tcpdump):
  not computed, because t1's multipath choice is not a function of the 5-tuple here:
  `ip route get ... ipproto tcp sport dport` (which hashes the 5-tuple) named the right LB for
  5 of 10 live flows, a coin's score. The likely cause: the kernel's multipath hash takes an
  skb's L4 hash when it has one (fib_multipath_hash), and a locally sent TCP segment carries
  its socket's random hash (sk_txhash) across the veths.

Every process started here is stopped by PID in `close()`, also after a failure.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fatnet import in_node

from controller.deployment import REPO_ROOT as REPO
from controller.deployment import Deployment
from controller.netstate import NetState

RMEM_CAP = "4096 131072 262144"  # bytes: min, default, max (256 KiB)
RATE = "600k"  # curl's bytes/s: 10 MiB in about 17.5 s
FETCH = REPO / "bench" / "fetch_loop.py"


def node_run(st: NetState, node: str, argv: list[str], timeout: float = 10) -> str:
    return subprocess.run(
        in_node(st.nodes[node].pid, argv),
        capture_output=True, text=True, timeout=timeout, check=True,
    ).stdout  # fmt: skip


@dataclass
class Download:
    client: str
    proc: subprocess.Popen[bytes]
    path: Path
    t0: float
    t1: float | None = None
    sport: int | None = None
    """The client's source port (given, or read once connected: map_flows)."""
    lb: str | None = None
    """The LB t1 sent the flow to when it started (its address)."""

    @property
    def seconds(self) -> float:
        return (self.t1 or time.time()) - self.t0


class Downloads:
    """10 MB downloads, on the wire for about 17 s each: one per client in `flows`, from its
    source port when one is given (else the kernel's)."""

    def __init__(
        self, st: NetState, dep: Deployment, flows: list[tuple[str, int | None]], spool: Path
    ) -> None:
        self.st, self.dep, self.spool = st, dep, spool
        self.want = hashlib.sha256((dep.www_root / "10m.bin").read_bytes()).hexdigest()
        self.rmem: dict[str, str] = {}
        self.items: list[Download] = []
        try:
            for c in dict.fromkeys(c for c, _ in flows):
                self.rmem[c] = node_run(st, c, ["sysctl", "-n", "net.ipv4.tcp_rmem"]).strip()
                node_run(st, c, ["sysctl", "-q", "-w", f"net.ipv4.tcp_rmem={RMEM_CAP}"])
            for i, (c, port) in enumerate(flows):
                path = spool / f"{c}-{i}-10m.bin"
                argv = ["curl", "-sS", "-o", str(path), "--limit-rate", RATE,
                        "--speed-limit", "1", "--speed-time", "10",  # a stall of 10 s fails
                        *(("--local-port", str(port)) if port else ()),
                        f"http://{dep.vip}/10m.bin"]  # fmt: skip
                proc = subprocess.Popen(
                    in_node(st.nodes[c].pid, argv),
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
                self.items.append(Download(c, proc, path, time.time(), sport=port))
        except BaseException:
            self.close()
            raise

    def map_flows(self, timeout: float = 5.0) -> dict[str, int]:
        """Each download's source port and the LB t1 sends it to; LB address -> count."""
        deadline = time.monotonic() + timeout
        for d in self.items:
            while d.sport is None:
                out = node_run(self.st, d.client, ["ss", "-Htn", "state", "established",
                                                   "dst", self.dep.vip])  # fmt: skip
                ports = [int(line.split()[2].rsplit(":", 1)[1]) for line in out.splitlines()]
                if ports:  # one download per client when the kernel picks the port
                    d.sport = ports[0]
                elif time.monotonic() > deadline:
                    raise AssertionError(f"{d.client}: no connection to the VIP")
                else:
                    time.sleep(0.05)
        seen = carriers(self.st, self.dep)
        for d in self.items:
            d.lb = seen.get((self.dep.topology.host_ip(d.client), d.sport))
            assert d.lb is not None, f"{d.client}:{d.sport}: no packet seen at t1 toward an LB"
        counts: dict[str, int] = {}
        for d in self.items:
            counts[str(d.lb)] = counts.get(str(d.lb), 0) + 1
        return counts

    def wait(self, timeout: float) -> list[dict[str, Any]]:
        """Wait for every download; each one's client, exit status, sha256 check, seconds."""
        deadline = time.monotonic() + timeout
        out = []
        for d in self.items:
            try:
                rc = d.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                d.proc.kill()
                rc = d.proc.wait()
            d.t1 = d.t1 or time.time()
            try:
                ok = hashlib.sha256(d.path.read_bytes()).hexdigest() == self.want
            except OSError:
                ok = False
            out.append({"client": d.client, "sport": d.sport, "rc": rc, "sha256_ok": ok,
                        "seconds": round(d.seconds, 1), "lb": d.lb})  # fmt: skip
        return out

    def close(self) -> None:
        for d in self.items:
            if d.proc.poll() is None:
                d.proc.kill()
            d.proc.wait()
            d.path.unlink(missing_ok=True)
        for c, old in self.rmem.items():
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                node_run(self.st, c, ["sysctl", "-q", "-w", f"net.ipv4.tcp_rmem={old}"])


def carriers(st: NetState, dep: Deployment, seconds: float = 1.5) -> dict[tuple[str, int], str]:
    """(client address, source port) -> the LB address t1 sent its packets to, for every TCP
    flow to VIP:80 seen on t1's ports toward the LBs during `seconds`."""
    procs = {}
    try:
        for lb in dep.load_balancers:
            port = dep.topology.gateway(lb)
            argv = ["tcpdump", "-nn", "-l", "-q", "-i", port.name, "-c", "5000",
                    f"tcp and dst host {dep.vip} and dst port 80"]  # fmt: skip
            procs[dep.topology.host_ip(lb)] = subprocess.Popen(
                in_node(st.nodes[port.node].pid, argv), text=True,
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        time.sleep(seconds)
    finally:
        for p in procs.values():
            p.terminate()
    seen: dict[tuple[str, int], str] = {}
    for lb, p in procs.items():
        out, _ = p.communicate(timeout=10)
        for line in out.splitlines():  # "12:00:00.1 IP 10.2.4.2.31001 > 20.0.0.1.80: tcp 0"
            fields = line.split()
            if len(fields) > 2 and fields[1] == "IP":
                ip, _, sport = fields[2].rpartition(".")
                seen[(ip, int(sport))] = lb
    return seen


class RequestLoops:
    """Short requests (1k.bin, a new connection each) in a loop from each of `clients` for
    `seconds`; `timeout` per request, under the 1 s of a first SYN retransmission, so a request
    whose SYN went to a dead LB fails instead of succeeding a second late."""

    def __init__(
        self, st: NetState, dep: Deployment, clients: list[str], seconds: float,
        timeout: float = 0.8,
    ) -> None:  # fmt: skip
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.seconds = seconds
        try:
            for c in clients:
                argv = [sys.executable, str(FETCH), "--url", f"http://{dep.vip}/1k.bin",
                        "--seconds", str(seconds), "--threads", "2", "--pace", "0.02",
                        "--timeout", str(timeout), "--client", c]  # fmt: skip
                self.procs[c] = subprocess.Popen(
                    in_node(st.nodes[c].pid, argv), stdout=subprocess.PIPE, text=True,
                    stdin=subprocess.DEVNULL,
                )  # fmt: skip
        except BaseException:
            self.close()
            raise

    def results(self) -> dict[str, Any]:
        """Wait for the loops: requests, failed, and every failure (client, t0, t1, error)."""
        total = failed = 0
        failures: list[dict[str, Any]] = []
        for c, p in self.procs.items():
            out, _ = p.communicate(timeout=self.seconds + 20)
            res = json.loads(out.strip().splitlines()[-1])
            total += res["requests"]
            failed += res["failed"]
            failures += [dict(f, client=c) for f in res["failures"]]
        return {"requests": total, "failed": failed, "failures": failures}

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
            p.wait()
            if p.stdout is not None:
                p.stdout.close()
