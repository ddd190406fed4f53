"""The wget load over the fat tree: every client fetches files from the VIP, rounds at a time.

    python -m bench.wget_load [--lb fastpath|scapy|haproxy|none] [--clients N|h4,h16,...]
                              [--rounds N] [--file 1k.bin,100k.bin|all] [--concurrency N]

Checks options and tools first (exit 2, nothing started), builds the fat tree
(controller.network), starts the chosen mode's services (controller.services), runs `wget` from
every client concurrently for several rounds (a worker per client per round inside the client's
namespace, bench/wget_worker.py), checks every download's sha256, shows progress, prints a
summary and, as its last line, one JSON object also written to bench/results/. Everything it
started is stopped by PID and the network torn down, also on failure, Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from bench.wget_summary import Fetch, format_summary, progress_line, summarize, verdict
from controller import services
from controller.deployment import Deployment, DeploymentError, load_deployment
from controller.monitor import DASHBOARD_PORT
from l4lb import procnet
from l4lb.errors import UsageError  # bad option, missing tool, busy machine: exit 2 up front

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
WORKER = REPO / "bench" / "wget_worker.py"
SPOOL_PARENT = Path("/dev/shm")  # tmpfs: downloads land in RAM
LOCK = services.STATE_DIR / "fattree.lock"
OWNER = services.STATE_DIR / "wget-load.owner"
ENV = {  # option -> environment variable giving its default
    "lb": "WGET_LB",
    "clients": "WGET_CLIENTS",
    "rounds": "WGET_ROUNDS",
    "file": "WGET_FILE",
    "concurrency": "WGET_CONCURRENCY",
    "repeat": "WGET_REPEAT",
    "timeout": "WGET_TIMEOUT",
    "wait_network": "WGET_WAIT_NETWORK",
    "tool": "WGET_TOOL",
}
# LBs and agents rewrite their stats files every services.STATS_INTERVAL s: wait this long
# after the load before reading them.
STATS_SETTLE = services.STATS_INTERVAL + 0.2
WORKER_START_S = 0.3  # head start for the workers of a round (plus 50 ms per client)
TOOLS = {"wget", "php", "nsenter", "mnexec", "ip"}


@dataclass
class Options:
    lb: services.Mode
    clients: list[str]
    rounds: int
    files: list[str]
    concurrency: int
    repeat: int
    timeout: float
    wait_network: float
    deployment: Deployment
    expected: dict[str, str]  # file name -> sha256, from the wwwroot's SHA256SUMS
    results: Path = RESULTS
    quiet: bool = False
    tool: str = "wget"  # or "python": the same downloads without a process per request
    dashboard: bool = False  # the status page (controller.dashboard) while the load runs


# ---------------------------------------------------------------------------------------------
# Options: all checked before anything starts.


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    ap = argparse.ArgumentParser(
        prog="bench/run_wget_load.sh",
        description="Run the wget load over the fat tree through a load balancer.",
        epilog="Each option's default can also come from the environment variable in brackets, "
        "e.g. `WGET_LB=haproxy WGET_ROUNDS=5 bench/run_wget_load.sh`. Needs root. Exit status: "
        "0 every download good, 1 some failed or the run broke, 2 bad option or busy machine.",
    )
    ap.add_argument(
        "--lb",
        default=env("WGET_LB", "fastpath"),
        help="what carries the VIP: fastpath (default), scapy (course-style LB), haproxy (full "
        "TCP proxy on h1,h2, no DSR), none (clients fetch from backends' own addresses) "
        "[WGET_LB]",
    )
    ap.add_argument(
        "--clients",
        default=env("WGET_CLIENTS", "all"),
        help="how many clients (first N of the deployment's clients) or a comma list of hosts; "
        "default all (the 10 hosts that are neither LB nor backend) [WGET_CLIENTS]",
    )
    ap.add_argument(
        "--rounds", default=env("WGET_ROUNDS", "3"), help="rounds (default 3) [WGET_ROUNDS]"
    )
    ap.add_argument(
        "--file",
        default=env("WGET_FILE", "all"),
        help="comma list of files from bench/wwwroot each client fetches per round, or `all` "
        "(index.html, 1k.bin, 100k.bin, 10m.bin; default) [WGET_FILE]",
    )
    ap.add_argument(
        "--concurrency",
        default=env("WGET_CONCURRENCY", "1"),
        help="downloads in flight per client (default 1); all clients run at once "
        "[WGET_CONCURRENCY]",
    )
    ap.add_argument(
        "--repeat",
        default=env("WGET_REPEAT", "1"),
        help="times each file is fetched per client per round (default 1) [WGET_REPEAT]",
    )
    ap.add_argument(
        "--timeout",
        default=env("WGET_TIMEOUT", "60"),
        help="seconds one wget may take (default 60) [WGET_TIMEOUT]",
    )
    ap.add_argument(
        "--wait-network",
        default=env("WGET_WAIT_NETWORK", "0"),
        help="seconds to wait for another fat tree on this machine to go down (default 0: "
        "refuse at once) [WGET_WAIT_NETWORK]",
    )
    ap.add_argument(
        "--tool",
        default=env("WGET_TOOL", "wget"),
        help="wget (default; one process per download, as the course does) or python (one TCP "
        "connection per download from a resident worker: shows the path's rate without "
        "wget's process start) [WGET_TOOL]",
    )
    ap.add_argument("--deployment", default=None, help="deployment file (default the project's)")
    ap.add_argument("--results", default=str(RESULTS), help="where the JSON result goes")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    ap.add_argument(
        "--dashboard",
        action="store_true",
        help="also run the status page on http://127.0.0.1:8145/ to watch the load (fastpath)",
    )
    ap.add_argument(
        "--cleanup",
        action="store_true",
        help="only clean up after a run that was killed (services, then the network it built)",
    )
    return ap


def _int(name: str, value: str, lo: int, hi: int) -> int:
    try:
        n = int(value)
    except ValueError:
        raise UsageError(f"--{name} {value!r}: not a whole number") from None
    if not lo <= n <= hi:
        raise UsageError(f"--{name} {n}: must be between {lo} and {hi}")
    return n


def _float(name: str, value: str, lo: float, hi: float) -> float:
    try:
        x = float(value)
    except ValueError:
        raise UsageError(f"--{name} {value!r}: not a number") from None
    if not lo <= x <= hi:
        raise UsageError(f"--{name} {x:g}: must be between {lo:g} and {hi:g}")
    return x


def read_sums(www: Path) -> dict[str, str]:
    """name -> sha256 from the wwwroot's SHA256SUMS, each checked against the file served."""
    sums_file = www / "SHA256SUMS"
    try:
        lines = sums_file.read_text().splitlines()
    except OSError as exc:
        raise UsageError(
            f"{sums_file}: {exc.strerror}; run `python bench/make_wwwroot.py`"
        ) from None
    out = {}
    for line in lines:
        digest, _, name = line.partition("  ")
        out[name] = digest
    for name, digest in out.items():
        path = www / name
        got = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        if got != digest:
            raise UsageError(
                f"{path} is missing or differs from SHA256SUMS; run `python bench/make_wwwroot.py`"
            )
    return out


def parse_options(argv: Sequence[str] | None) -> tuple[Options, argparse.Namespace]:
    args = build_parser().parse_args(argv)
    if args.tool not in ("wget", "python"):
        raise UsageError(f"--tool {args.tool!r}: choose wget or python")
    if args.lb not in services.MODES:
        raise UsageError(f"--lb {args.lb!r}: choose one of {', '.join(services.MODES)}")
    if args.dashboard and args.lb != "fastpath":
        raise UsageError("--dashboard reads the fastpath LBs' and agents' exporters: --lb fastpath")
    try:
        dep = load_deployment(args.deployment)
    except DeploymentError as exc:
        raise UsageError(str(exc)) from None
    all_clients = dep.clients()
    if args.clients == "all":
        clients = all_clients
    elif args.clients.isdigit():
        clients = all_clients[: _int("clients", args.clients, 1, len(all_clients))]
    else:
        clients = [c.strip() for c in args.clients.split(",") if c.strip()]
        bad = [c for c in clients if c not in all_clients]
        if bad or not clients:
            raise UsageError(
                f"--clients: {', '.join(bad) or 'empty'} not a client; clients are "
                f"{', '.join(all_clients)} (or give a number)"
            )
    expected = read_sums(Path(dep.www_root))
    servable = [n for n in expected if n != "SHA256SUMS"]
    files = servable if args.file == "all" else [f.strip() for f in args.file.split(",")]
    unknown = [f for f in files if f not in servable]
    if unknown or not files:
        raise UsageError(
            f"--file: {', '.join(unknown) or 'empty'} not in {dep.www_root}; "
            f"choose from {', '.join(servable)} or `all`"
        )
    opts = Options(
        lb=args.lb,
        clients=clients,
        rounds=_int("rounds", args.rounds, 1, 10_000),
        files=files,
        concurrency=_int("concurrency", args.concurrency, 1, 64),
        repeat=_int("repeat", args.repeat, 1, 10_000),
        timeout=_float("timeout", args.timeout, 1, 3600),
        wait_network=_float("wait-network", args.wait_network, 0, 24 * 3600),
        deployment=dep,
        expected=expected,
        results=Path(args.results),
        quiet=args.quiet,
        tool=args.tool,
        dashboard=args.dashboard,
    )
    return opts, args


def check_machine(opts: Options) -> None:
    """Root, tools, the mode's programs, a writable results directory."""
    if os.geteuid() != 0:
        raise UsageError("needs root (mininet, namespaces, raw sockets): run it with sudo")
    tools = set(TOOLS) | ({"haproxy"} if opts.lb == "haproxy" else set())
    missing = sorted(t for t in tools if shutil.which(t) is None)
    if missing:
        raise UsageError(f"missing tools: {', '.join(missing)}; run ./install.sh (as root)")
    need = {
        "fastpath": [REPO / "fastpath" / "lb.py", REPO / "agent" / "decap.py"],
        "scapy": [REPO / "bench" / "scapy_lb.py", REPO / "agent" / "decap.py"],
    }.get(opts.lb, [])
    absent = [str(p.relative_to(REPO)) for p in need if not p.exists()]
    if absent:
        raise UsageError(f"--lb {opts.lb} needs {', '.join(absent)}, not in this checkout")
    try:
        opts.results.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"results directory {opts.results}: {exc.strerror}") from None
    if not os.access(opts.results, os.W_OK):
        raise UsageError(f"results directory {opts.results} is not writable")


# ---------------------------------------------------------------------------------------------
# The network: one fat tree per machine, guarded by the network's lock.


def network_busy() -> bool:
    """True when another fat tree holds the machine's lock (controller.network holds it)."""
    try:
        fd = os.open(LOCK, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def wait_for_network_free(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while network_busy():
        if time.monotonic() >= deadline:
            raise UsageError(
                f"a fat tree is already up on this machine ({LOCK} is held); stop it with "
                "`sudo .venv/bin/python -m controller down` if it is yours, or wait for it "
                "(--wait-network SECONDS)"
            )
        time.sleep(1.0)


@dataclass
class Fabric:
    """The running network: node PIDs, interface counters; brought up and down once."""

    up_done: bool = False
    owner: int | None = None  # PID owning the network we brought up: down() touches only it
    _net: Any = None

    def up(self, wait: float = 0.0, deployment: Deployment | None = None) -> None:
        from controller import network  # needs mininet and root: imported only here

        self._net = network
        # `wait` again here: another run may take the lock between our check and this call.
        # The network comes up from the run's own deployment: its topology, its processes.
        path = deployment.path if deployment is not None else None
        rc = network.up(None, "detach", wait=wait, deployment=str(path) if path else None)
        if rc != 0:
            raise RuntimeError(f"the fat tree did not come up (controller.network.up: exit {rc})")
        self.up_done = True
        st = network.running()
        self.owner = st.owner_pid if st is not None else None
        # Who we are and which network is ours, for `--cleanup` after a killed run.
        OWNER.write_text(json.dumps({"driver": os.getpid(), "network_owner": self.owner}))

    def node_pid(self, name: str) -> int:
        return int(self._net.node_pid(name))

    def down(self) -> None:
        try:
            if self.up_done:
                self._net.down(owner=self.owner)
                self.up_done = False
        finally:
            OWNER.unlink(missing_ok=True)


def iface_counters(pid: int) -> dict[str, dict[str, int]]:
    """Interface counters in the netns of `pid` (/proc/PID/net/dev is that namespace's)."""
    return procnet.net_dev(pid)


# ---------------------------------------------------------------------------------------------
# Counters from the services themselves, before and after the load.


def _json_file(path: str | None) -> Any:
    if not path:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _php_requests(log: str, vip: str) -> int:
    # `php -S` logs one "[...] ip:port [200]: GET /path" line per request. The agent's health
    # checks come from the VIP itself (agent.healthsvc): not client requests.
    own = f" {vip}:"
    try:
        with open(log, errors="replace") as f:
            return sum(
                1 for line in f if ("]: GET " in line or "]: HEAD " in line) and own not in line
            )
    except OSError:
        return 0


def _haproxy_stats(sock_path: str) -> dict[str, Any]:
    """Sessions and bytes per backend server from haproxy's stats socket (`show stat`)."""
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(sock_path)
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except OSError as exc:
        return {"error": f"stats socket: {exc}"}
    lines = data.decode(errors="replace").splitlines()
    if not lines or not lines[0].startswith("# "):
        return {"error": "unexpected stats output"}
    head = lines[0][2:].split(",")
    out: dict[str, Any] = {}
    for line in lines[1:]:
        row = dict(zip(head, line.split(","), strict=False))
        if row.get("pxname") == "servers" and row.get("svname") not in ("BACKEND", None):
            out[row["svname"]] = {"sessions": int(row.get("stot") or 0),
                                  "bytes_out": int(row.get("bout") or 0)}  # fmt: skip
    return out


@dataclass
class Snapshot:
    at: float
    ifaces: dict[str, dict[str, int]]  # "h1-eth0" -> counters, for LBs and backends
    cpu: dict[str, float]  # LB host -> CPU seconds of its LB process
    php: dict[str, int]  # backend -> requests in its server log
    stats: dict[str, Any] = field(default_factory=dict)  # service name -> its own counters


def snapshot(fabric: Fabric, dep: Deployment, recs: Sequence[Mapping[str, Any]]) -> Snapshot:
    ifaces: dict[str, dict[str, int]] = {}
    topo = dep.topology
    for host in [*dep.load_balancers, *(h for h, _ in dep.backends)]:
        name = topo.host_interface(host).name
        ifaces[name] = iface_counters(fabric.node_pid(host)).get(name, {})
    cpu: dict[str, float] = {}
    php: dict[str, int] = {}
    stats: dict[str, Any] = {}
    for r in recs:
        if r["role"] in ("lb", "haproxy"):
            cpu[r["node"]] = services.proc_cpu_seconds(r["pid"]) or 0.0
        if r["role"] == "www":
            php[r["node"]] = _php_requests(r["log"], dep.vip)
        if r["role"] == "haproxy" and r.get("stats"):
            stats[r["name"]] = _haproxy_stats(r["stats"])
        elif r.get("stats"):
            stats[r["name"]] = _json_file(r["stats"])
    return Snapshot(time.time(), ifaces, cpu, php, stats)


def _delta(after: Any, before: Any) -> Any:
    """after - before for nested counters; non-numbers are taken from `after`."""
    if isinstance(after, dict):
        b = before if isinstance(before, dict) else {}
        return {k: _delta(v, b.get(k)) for k, v in after.items()}
    if isinstance(after, int | float) and not isinstance(after, bool):
        return after - before if isinstance(before, int | float) else after
    return after


def _lb_stats(d: Any) -> Any:
    """The LB's own counters that tell the story: frames, forwarded, per backend, drops > 0."""
    if not isinstance(d, dict) or not isinstance(d.get("core"), dict):
        return d  # haproxy's per-server table, or a format we do not know: as it is
    core = d["core"]
    out = {k: core[k] for k in ("frames", "forwarded", "backends") if k in core}
    drops = {k: v for k, v in (core.get("drops") or {}).items() if v}
    if drops:
        out["drops"] = drops
    io = d.get("io") or {}
    for k in ("tx_errors", "rx_truncated"):
        if io.get(k):
            out[k] = io[k]
    if d.get("kernel_drops"):
        out["kernel_drops"] = d["kernel_drops"]
    return out


def counters(
    dep: Deployment, mode: str, before: Snapshot, after: Snapshot
) -> tuple[dict[str, Any], dict[str, Any], int]:
    """per_backend, per_lb and the LB hosts' transmitted bytes over the run."""
    topo = dep.topology
    per_backend: dict[str, Any] = {}
    for host, _w in dep.backends:
        ifn = topo.host_interface(host).name
        d = _delta(after.ifaces.get(ifn, {}), before.ifaces.get(ifn, {}))
        entry: dict[str, Any] = {
            "requests": after.php.get(host, 0) - before.php.get(host, 0),
            "tx_bytes": d.get("tx_bytes", 0),
            "rx_bytes": d.get("rx_bytes", 0),
        }
        agent = after.stats.get(f"agent-{host}")
        if isinstance(agent, dict):
            d = _delta(agent, before.stats.get(f"agent-{host}"))
            # The agent's own counters: frames decapsulated and delivered, drops by reason;
            # the LBs' health probes are delivered too, and counted apart (not client traffic).
            entry["agent"] = {k: d[k] for k in ("frames", "delivered", "dropped") if k in d}
            probes = (d.get("health") or {}).get("probes", 0)
            if probes and "delivered" in entry["agent"]:
                entry["agent"]["delivered"] -= probes
                entry["agent"]["health_probes"] = probes
            drops = {k: v for k, v in (d.get("drops") or {}).items() if v}
            if drops:
                entry["agent"]["drops"] = drops
        per_backend[host] = entry
    per_lb: dict[str, Any] = {}
    lb_bytes = 0
    for host in dep.load_balancers:
        ifn = topo.host_interface(host).name
        d = _delta(after.ifaces.get(ifn, {}), before.ifaces.get(ifn, {}))
        lb_bytes += d.get("tx_bytes", 0)
        entry = {
            "rx_packets": d.get("rx_packets", 0),
            "tx_packets": d.get("tx_packets", 0),
            "tx_bytes": d.get("tx_bytes", 0),
            # DSR shows here: a few dozen bytes (encapsulated requests and ACKs), not full MTU.
            "avg_tx_packet": round(d.get("tx_bytes", 0) / d["tx_packets"], 1)
            if d.get("tx_packets")
            else 0,
        }
        if host in after.cpu:
            entry["cpu_s"] = round(after.cpu[host] - before.cpu.get(host, 0.0), 3)
        for key in (f"lb-{host}", f"haproxy-{host}"):
            if after.stats.get(key) is not None:
                entry["stats"] = _lb_stats(_delta(after.stats[key], before.stats.get(key)))
        per_lb[host] = entry
    return per_backend, per_lb, lb_bytes


# ---------------------------------------------------------------------------------------------
# The load.


def client_urls(opts: Options, client_index: int) -> list[str]:
    dep = opts.deployment
    if opts.lb == "none":
        # No VIP: spread the clients over the backends' own addresses.
        host = dep.backends[client_index % len(dep.backends)][0]
        base = f"http://{dep.topology.host_ip(host)}"
    else:
        base = f"http://{dep.vip}"
    paths = ["" if f == "index.html" else f for f in opts.files]
    return [f"{base}/{p}" for p in paths for _ in range(opts.repeat)]


def run_round(
    opts: Options,
    node_pid: Callable[[str], int],
    rnd: int,
    log: Callable[[str], None] | None = None,
) -> list[Fetch]:
    """All clients at once; returns when every worker has ended. Logs progress every 5 s."""
    py = services.python_bin()
    procs: dict[int, tuple[str, subprocess.Popen[bytes]]] = {}
    sel = selectors.DefaultSelector()
    fetches: list[Fetch] = []
    # Workers start one after another (an interpreter each, ~50-100 ms on a busy machine):
    # they all begin downloading at the same instant, this far ahead.
    start_at = time.time() + WORKER_START_S + 0.05 * len(opts.clients)
    # wget writes here (RAM, not disk); each file is hashed and removed as soon as it is done,
    # and the directory goes with the round, whatever happens to the workers.
    spool = tempfile.mkdtemp(
        prefix="l4lb-wget-", dir=SPOOL_PARENT if SPOOL_PARENT.is_dir() else None
    )
    try:
        for i, client in enumerate(opts.clients):
            argv = ["nsenter", "-t", str(node_pid(client)), "-n", "--", py, str(WORKER),
                    "--client", client, "--round", str(rnd), "--tool", opts.tool,
                    "--start-at", f"{start_at:.3f}", "--concurrency",
                    str(opts.concurrency), "--timeout", str(opts.timeout),
                    "--spool", spool, *client_urls(opts, i)]  # fmt: skip
            p = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
            assert p.stdout is not None
            procs[p.pid] = (client, p)
            sel.register(p.stdout, selectors.EVENT_READ, (client, p))
        bufs: dict[str, bytes] = {}
        open_pipes = len(procs)
        deadline = time.monotonic() + opts.timeout * len(client_urls(opts, 0)) + 30
        total = len(client_urls(opts, 0)) * len(opts.clients)
        next_note = time.monotonic() + 5.0
        while open_pipes and time.monotonic() < deadline:
            if log is not None and time.monotonic() >= next_note:
                bad = sum(1 for f in fetches if verdict(f, opts.expected))
                log(f"  round {rnd}: {len(fetches)}/{total} downloads done, {bad} failed")
                next_note += 5.0
            for key, _ in sel.select(timeout=1.0):
                client, p = key.data
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    open_pipes -= 1
                    continue
                data = bufs.get(client, b"") + chunk
                *lines, bufs[client] = data.split(b"\n")
                fetches.extend(Fetch.from_json(json.loads(line)) for line in lines)
        for client, p in procs.values():
            try:
                rc = p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                rc = p.wait()
            got = sum(1 for f in fetches if f.client == client)
            want = len(client_urls(opts, 0))
            if got < want:
                # A worker that died or hung: its missing downloads are failures, not silence.
                now = time.time()
                fetches.extend(
                    Fetch(client, "?", rnd, now, now, 0, "", -1, f"worker exit {rc}, no result")
                    for _ in range(want - got)
                )
    finally:
        for _client, p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
            if p.stdout:
                p.stdout.close()
        sel.close()
        shutil.rmtree(spool, ignore_errors=True)
    return fetches


def wait_fresh_stats(
    recs: Sequence[Mapping[str, Any]], since: float, timeout: float = 10.0
) -> list[str]:
    """Wait until every LB's and agent's stats file was rewritten at or after `since`, so the
    counters include the load's last packets (on a busy machine a starved process writes late).
    Returns the files still stale at the timeout (their figures may then be short)."""
    files = [
        r["stats"]
        for r in recs
        if r["role"] in ("lb", "agent") and str(r.get("stats", "")).endswith(".json")
    ]
    deadline = since + timeout
    while True:
        stale = []
        for f in files:
            try:
                if os.stat(f).st_mtime < since:
                    stale.append(f)
            except OSError:
                stale.append(f)
        if not stale or time.time() >= deadline:
            return stale
        time.sleep(0.05)


def run_load(
    opts: Options,
    fabric: Fabric,
    recs: Sequence[Mapping[str, Any]],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """The rounds on a network with services up; returns the result object."""
    before = snapshot(fabric, opts.deployment, recs)
    fetches: list[Fetch] = []
    failed = 0
    for rnd in range(1, opts.rounds + 1):
        fetches += run_round(opts, fabric.node_pid, rnd, log)
        failed = sum(1 for f in fetches if verdict(f, opts.expected))
        log(progress_line(rnd, opts.rounds, fetches, failed))
    wait_fresh_stats(recs, time.time() + STATS_SETTLE)
    after = snapshot(fabric, opts.deployment, recs)
    per_backend, per_lb, lb_bytes = counters(opts.deployment, opts.lb, before, after)
    return summarize(
        fetches,
        opts.expected,
        lb=opts.lb,
        per_backend=per_backend,
        per_lb=per_lb,
        lb_host_bytes=lb_bytes,
        extra={
            "clients": len(opts.clients),
            "rounds": opts.rounds,
            "files": opts.files,
            "concurrency": opts.concurrency,
            "repeat": opts.repeat,
            "tool": opts.tool,
            "network_owner": fabric.owner,  # the PID that owned the fat tree of this run
            "lb_cpu_s": round(sum(v.get("cpu_s", 0.0) for v in per_lb.values()), 3),
        },
    )


def write_result(res: Mapping[str, Any], results: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = results / f"wget-{res['lb']}-{stamp}.json"
    path.write_text(json.dumps(res, indent=1) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Entry point: validate, then up, services, load, down (always).


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    # Once is enough: a second signal (the terminal's SIGINT and the wrapper's SIGTERM arrive
    # together) must not interrupt the teardown that the first one starts.
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def interrupts_as_exceptions() -> Iterator[None]:
    """SIGINT and SIGTERM become KeyboardInterrupt, so `finally` tears down on both. Set
    explicitly: a shell starts background jobs with SIGINT ignored."""
    old = {s: signal.signal(s, _raise_interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def teardown(fabric: Fabric, log: Callable[[str], None]) -> None:
    """Stop services, then the network; a second Ctrl-C must not cut this short."""
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            if fabric.up_done:  # never someone else's services, on a network that is not ours
                services.stop()
        finally:
            fabric.down()
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def cleanup(log: Callable[[str], None]) -> int:
    """After a killed run: stop recorded services; take the network down if that run built it."""
    try:
        rec = json.loads(OWNER.read_text())
        driver, owner = int(rec["driver"]), rec.get("network_owner")
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    if services.proc_state(driver) in (None, "Z"):  # gone, or dead but not yet reaped
        from controller import network

        if owner is not None and (st := network.running()) is not None and st.owner_pid == owner:
            log(f"stopped {services.stop()} service process(es)")
        if owner is not None:
            network.down(owner=int(owner))  # ours only: someone else's network is left alone
        OWNER.unlink(missing_ok=True)
        log("took down the fat tree a killed wget load had built")
    return 0


class _SafeStream:
    """A stream whose writes never raise: when Ctrl-C also kills a `| tee` reading our output,
    the teardown must still run to the end (it prints as it goes)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def write(self, text: str) -> int:
        try:
            return int(self._inner.write(text))
        except (OSError, ValueError):
            return len(text)

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._inner.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def safe_streams() -> None:
    if not isinstance(sys.stdout, _SafeStream):
        sys.stdout = _SafeStream(sys.stdout)
    if not isinstance(sys.stderr, _SafeStream):
        sys.stderr = _SafeStream(sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        opts, args = parse_options(argv)
        if args.cleanup:
            return cleanup(log)
        check_machine(opts)
        wait_for_network_free(opts.wait_network)
    except UsageError as exc:
        print(f"wget_load: {exc}", file=sys.stderr)
        return 2
    fabric = Fabric()
    res: dict[str, Any] | None = None
    safe_streams()
    with interrupts_as_exceptions():
        try:
            log(f"bringing up the fat tree (lb={opts.lb}, {len(opts.clients)} clients, "
                f"{opts.rounds} rounds, files {','.join(opts.files)})")  # fmt: skip
            fabric.up(opts.wait_network, opts.deployment)
            recs = services.start(
                fabric.node_pid, opts.deployment, opts.lb, dashboard=opts.dashboard
            )
            log(f"services up: {', '.join(r['name'] for r in recs)}")
            if opts.dashboard:
                log(f"status page: http://127.0.0.1:{DASHBOARD_PORT}/ (until the load ends)")
            res = run_load(opts, fabric, recs, log if not opts.quiet else lambda m: None)
        except KeyboardInterrupt:
            log("interrupted: tearing down")
            return 130
        except services.ServicesBusy as exc:
            log(f"wget_load: {exc}")
            return 2  # refused before any service started (the network goes down again)
        except services.ServiceError as exc:
            log(f"wget_load: {exc}")
            return 1
        except Exception as exc:
            log(f"wget_load: {type(exc).__name__}: {exc}")
            return 1
        finally:
            teardown(fabric, log)
    path = write_result(res, opts.results)
    print(format_summary(res))
    print(f"result written to {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    print(json.dumps(res))
    return 0 if res["failed"] == 0 and res["ok"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
