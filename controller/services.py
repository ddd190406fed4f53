"""The deployment's services on a running network: load balancers, agents, web servers, haproxy.

`start(node_pid, deployment, mode)` starts, inside the mininet nodes (reached by the PID of each
node's shell, through `nsenter`), what a mode needs:

- `fastpath`: `python -m fastpath.lb hN-eth0` on every load-balancer host; on every backend
  `python -m agent.decap` and `php -S <vip>:80 -t <wwwroot>`; and the VIP announced by BGP
  (controller.bgp): BIRD on each LB host and on their ToR, whose static VIP route gives way to
  BIRD's multipath route while the services run; each fastpath.lb holds its own announcement
  (its rendered configuration says `announce`). The start ends once each ToR's kernel routes
  the VIP over every LB.
- `scapy`: the same with the course-style `bench/scapy_lb.py` in place of fastpath.
- `haproxy`: haproxy in TCP mode on the load-balancer hosts (the VIP on their `lo`), proxying to
  the backends' own addresses, where `php -S` listens (a full proxy, no DSR).
- `none`: no load balancer; `php -S` on each backend's own address (clients fetch from it).

In the DSR modes the switch port facing each load-balancer host gets TSO/GSO off (restored by
`stop`): the LB taps frames of at most one MTU, and a veth keeps a forwarded GSO frame whole,
so a client's TSO burst (an upload) would reach the LB as one frame of several segments, be
dropped (io.rx_truncated) and be resent segment by segment. Measured on the fat tree: three
300 KB POSTs through the VIP lost 570 of 1221 frames at h1/h2 with the ports as mininet makes
them, none with the ports segmenting.

In fastpath mode an exporter runs beside every LB and agent, and with `monitor` / `dashboard`
the monitoring's processes run in the root namespace (controller.monitor plans them).

Each process is recorded (PID and kernel start time) in `<state_dir>/services.json` as soon as
it starts, so `stop(state_dir)` stops exactly those processes by PID, even from another process
or after a crash of the one that started them. Logs go to files, never pipes (`php -S` blocks
when its output pipe fills). The plan (what runs where) is pure and tested without root.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from controller import backend_record, netstate, render
from l4lb import procnet

if TYPE_CHECKING:
    from controller.deployment import Deployment

Mode = Literal["fastpath", "scapy", "haproxy", "none"]
MODES: tuple[Mode, ...] = ("fastpath", "scapy", "haproxy", "none")
DSR_MODES: tuple[Mode, ...] = ("fastpath", "scapy")
STATE_DIR = netstate.STATE_DIR  # beside the running network's record
STATE_FILE = "services.json"
REPO = Path(__file__).resolve().parent.parent
HTTP_PORT = 80
STATS_INTERVAL = render.STATS_INTERVAL  # seconds between the LBs' and agents' stats rewrites

NodePid = Callable[[str], int]


class ServiceError(RuntimeError):
    """A service could not start or stop; the message says which, where, and what to do."""


class ServicesBusy(ServiceError):
    """Refused before starting anything: services already running, or a port already taken."""


@dataclass(frozen=True)
class Service:
    """One long-running process in one node."""

    name: str  # unique in a plan: "lb-h1", "agent-h3", "www-h3", ...
    node: str  # mininet node it runs in ("": the root namespace, beside the controller)
    role: Literal["lb", "agent", "www", "haproxy", "bgp", "exporter", "monitor"]
    argv: tuple[str, ...]
    log: str  # file its stdout and stderr go to
    listen: tuple[str, int] | None = None  # ready when a TCP socket listens here (in its netns)
    ready_file: str | None = None  # ready when this file exists (an LB's stats file)
    ready_packet_socket: bool = False  # ready when it holds an AF_PACKET socket (a sniffer)
    stats: str | None = None  # file of the process's own counters, JSON, if it writes one
    files: tuple[str, ...] = ()  # other files it makes (a socket, a pid file), removed by stop


@dataclass(frozen=True)
class Command:
    """A one-off command run in a node before the services start, with its undo for `stop`."""

    node: str
    argv: tuple[str, ...]
    undo: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Plan:
    mode: Mode
    setup: tuple[Command, ...]
    services: tuple[Service, ...]
    files: dict[str, str] = field(default_factory=dict)  # path -> content, written before start
    settle: tuple[Command, ...] = ()  # checks run after every service is ready; must exit 0
    dirs: tuple[str, ...] = ()  # directories the services fill, removed by stop()


def python_bin() -> str:
    """The project's interpreter: the virtualenv's when present (it sees mininet and xxhash)."""
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def lb_stats_path(state_dir: Path, host: str) -> Path:
    return render.stats_path(state_dir, "lb", host)


def agent_stats_path(state_dir: Path, host: str) -> Path:
    return render.stats_path(state_dir, "agent", host)


def haproxy_config(deployment: Deployment, lb_host: str, state_dir: Path = STATE_DIR) -> str:
    """haproxy.cfg for one LB host: TCP mode on the VIP, the backends' own addresses behind it.

    Weights come from the deployment; `balance roundrobin` spreads connections over the
    backends as fastpath's 5-tuple hash does (per connection; `balance source` would pin each
    client to one backend, which ten clients spread unevenly), and the stats socket gives the
    per-backend counters for the benchmark.
    """
    topo = deployment.topology
    servers = "\n".join(
        f"    server {host} {topo.host_ip(host)}:{HTTP_PORT} weight {weight}"
        for host, weight in deployment.backends
    )
    binds = "\n".join(f"    bind {deployment.vip}:{port}" for port in deployment.vip_ports)
    return f"""# Generated by controller/services.py for {lb_host}; do not edit.
global
    maxconn 4000  # needs 2 fds per connection: stay under the usual 20000-fd limit
    stats socket {state_dir / f"haproxy-{lb_host}.sock"} mode 600 level admin

defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s

frontend vip
{binds}
    default_backend servers

backend servers
    balance roundrobin
{servers}
"""


def backend_services(
    deployment: Deployment,
    host: str,
    mode: Mode,
    state_dir: Path = STATE_DIR,
    python: str | None = None,
) -> list[Service]:
    """What a backend host runs in a mode: its agent (DSR modes), then its web server. Any
    host but an LB may be one (a backend added by `controller backend add` needs these)."""
    py = python or python_bin()
    www = str(Path(deployment.www_root).resolve())
    topo = deployment.topology
    logs = state_dir / "logs"
    services: list[Service] = []
    if mode in DSR_MODES:
        services.append(
            Service(
                name=f"agent-{host}",
                node=host,
                role="agent",
                argv=(
                    py,
                    "-m",
                    "agent.decap",
                    "--config",
                    str(render.config_path(state_dir, "agent", topo.host_interface(host).name)),
                ),
                log=str(logs / f"agent-{host}.log"),
                # Ready once it writes its counters: by then the VIP is on the host, so
                # the server started next can bind it.
                ready_file=str(agent_stats_path(state_dir, host)),
                stats=str(agent_stats_path(state_dir, host)),
            )
        )
    # DSR modes serve on the VIP (the agent puts it on the host); the others on the host's own
    # address, which haproxy proxies to and `none` clients fetch from directly.
    addr = deployment.vip if mode in DSR_MODES else topo.host_ip(host)
    services.append(
        Service(
            name=f"www-{host}",
            node=host,
            role="www",
            argv=("php", "-S", f"{addr}:{HTTP_PORT}", "-t", www),
            log=str(logs / f"www-{host}.log"),
            listen=(addr, HTTP_PORT),
        )
    )
    return services


def plan(
    deployment: Deployment,
    mode: Mode,
    state_dir: Path = STATE_DIR,
    python: str | None = None,
    monitor: bool = False,
    dashboard: bool = False,
) -> Plan:
    """What runs where for a mode: pure, so it is tested without root or a network. In fastpath
    mode, an exporter beside each LB and agent; `monitor` adds Prometheus and its scrape proxy,
    `dashboard` the status page (controller.monitor)."""
    if mode not in MODES:
        raise ServiceError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
    py = python or python_bin()
    vip = deployment.vip
    topo = deployment.topology
    logs = state_dir / "logs"
    setup: list[Command] = []
    services: list[Service] = []
    files: dict[str, str] = {}

    for host, _weight in deployment.backends:
        services.extend(backend_services(deployment, host, mode, state_dir, py))

    for host in deployment.load_balancers:
        iface = topo.host_interface(host).name
        if mode in DSR_MODES:
            gw = topo.gateway(host)
            setup.append(
                Command(
                    node=gw.node,
                    argv=("ethtool", "-K", gw.name, "tso", "off", "gso", "off"),
                    undo=("ethtool", "-K", gw.name, "tso", "on", "gso", "on"),  # veth default
                )
            )
        if mode == "fastpath":
            services.append(
                Service(
                    name=f"lb-{host}",
                    node=host,
                    role="lb",
                    argv=(
                        py,
                        "-m",
                        "fastpath.lb",
                        iface,
                        "--config",
                        str(render.config_path(state_dir, "lb", iface)),
                    ),
                    log=str(logs / f"lb-{host}.log"),
                    ready_file=str(lb_stats_path(state_dir, host)),
                    stats=str(lb_stats_path(state_dir, host)),
                )
            )
        elif mode == "scapy":
            services.append(
                Service(
                    name=f"lb-{host}",
                    node=host,
                    role="lb",
                    argv=(
                        py,
                        "-m",
                        "bench.scapy_lb",
                        iface,
                        "--vip",
                        vip,
                        *(a for ip, _w in deployment.backend_ips() for a in ("--backend", ip)),
                        "--next-hop-mac",
                        topo.gateway(host).mac,
                        "--local-ip",
                        topo.host_ip(host),
                    ),
                    log=str(logs / f"lb-{host}.log"),
                    ready_packet_socket=True,
                )
            )
        elif mode == "haproxy":
            cfg = state_dir / f"haproxy-{host}.cfg"
            files[str(cfg)] = haproxy_config(deployment, host, state_dir)
            setup.append(
                Command(
                    node=host,
                    argv=("ip", "addr", "add", f"{vip}/32", "dev", "lo"),
                    undo=("ip", "addr", "del", f"{vip}/32", "dev", "lo"),
                )
            )
            services.append(
                Service(
                    name=f"haproxy-{host}",
                    node=host,
                    role="haproxy",
                    argv=("haproxy", "-db", "-f", str(cfg)),
                    log=str(logs / f"haproxy-{host}.log"),
                    listen=(vip, deployment.vip_ports[0]),
                    stats=str(state_dir / f"haproxy-{host}.sock"),
                )
            )
    settle: list[Command] = []
    dirs: list[str] = []
    if mode == "fastpath":
        # The VIP announced by BGP from each LB host (controller.bgp): the ToR's static VIP
        # route gives way to BIRD's while the services run.
        from controller import bgp
        from controller import monitor as mon  # it plans Services of this module

        b = bgp.plan(deployment, state_dir, py)
        setup += b.setup
        watch, watch_files, dirs = mon.services(deployment, state_dir, py, monitor, dashboard)
        services = [*b.daemons, *services, *watch]
        files.update(b.files)
        files |= watch_files
        settle += b.settle
    return Plan(
        mode=mode,
        setup=tuple(setup),
        services=tuple(services),
        files=files,
        settle=tuple(settle),
        dirs=tuple(dirs),
    )


# ---------------------------------------------------------------------------------------------
# I/O edge: processes in nodes, readiness, the state file.


def _in_node(pid: int, argv: Sequence[str]) -> list[str]:
    """The command line running argv in a node, as `ip netns exec` would.

    Mininet nodes are unnamed network namespaces: enter the one of the node's shell. Like `ip
    netns exec`, give the command a private mount namespace with sysfs mounted afresh, so
    /sys/class/net shows the node's interfaces, not the root namespace's. Every step execs
    (nsenter -n and unshare -m do not fork; sh execs the last command), so the PID we get is
    the service's own.
    """
    return [
        "nsenter", "-t", str(pid), "-n", "--",
        "unshare", "--mount", "--propagation", "private",
        "sh", "-c", 'mount -t sysfs sysfs /sys && exec "$@"', "sh", *argv,
    ]  # fmt: skip


def proc_start_time(pid: int) -> int | None:
    """Start time of a process, zombies included: services are our children to reap."""
    return netstate.proc_start_time(pid, zombie_is_gone=False)


def proc_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[0]


def proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process in seconds (for the LB CPU figure), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def listening(pid: int, ip: str, port: int) -> bool:
    """True when a TCP socket listens on ip:port (or the wildcard) in the netns of `pid`
    (/proc/PID/net/tcp is that namespace's table: no exec needed)."""
    return procnet.tcp_listening(pid, ip, port)


def has_packet_socket(pid: int) -> bool:
    """True when the process holds an AF_PACKET socket (it has started sniffing).

    /proc/PID/net/packet lists the packet sockets of its netns by inode; its fds name theirs.
    """
    try:
        lines = Path(f"/proc/{pid}/net/packet").read_text().splitlines()[1:]
        inodes = {line.split()[-1] for line in lines if line.split()}
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:[") and link[8:-1] in inodes:
                return True
    return False


def _log_tail(path: str, lines: int = 8) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return "(no log)"
    return "\n    ".join(text) or "(empty log)"


def _read_state(state_dir: Path) -> dict:
    try:
        return json.loads((state_dir / STATE_FILE).read_text())
    except FileNotFoundError:
        return {"services": [], "undo": []}
    except (OSError, ValueError) as exc:
        raise ServiceError(f"cannot read {state_dir / STATE_FILE}: {exc}") from exc


def _write_state(state_dir: Path, state: dict) -> None:
    tmp = state_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(state_dir / STATE_FILE)


def running(state_dir: Path = STATE_DIR) -> list[dict]:
    """The recorded services whose process is still the one we started."""
    out = []
    for rec in _read_state(state_dir)["services"]:
        if proc_start_time(rec["pid"]) == rec["start_time"] and proc_state(rec["pid"]) != "Z":
            out.append(rec)
    return out


def _pid_of(node_pid: NodePid, node: str) -> int | None:
    """The PID of a node's shell; None for the root namespace ("")."""
    return node_pid(node) if node else None


def preflight(
    node_pid: NodePid,
    deployment: Deployment,
    mode: Mode,
    state_dir: Path,
    monitor: bool = False,
    dashboard: bool = False,
) -> None:
    """Refuse before starting anything: services already recorded, a port already taken."""
    live = running(state_dir)
    if live:
        names = ", ".join(f"{r['name']} (pid {r['pid']})" for r in live)
        raise ServicesBusy(
            f"services already running: {names}; stop them with `python -m controller down` "
            f"(or controller.services.stop())"
        )
    p = plan(deployment, mode, state_dir, monitor=monitor, dashboard=dashboard)
    for svc in p.services:
        if svc.listen is None:
            continue
        pid = _pid_of(node_pid, svc.node)
        if listening(pid or os.getpid(), *svc.listen):
            where = svc.node or "this machine (the root namespace)"
            how = f"`python -m controller exec {svc.node} -- ss -ltnp`" if svc.node else "ss -ltnp"
            raise ServicesBusy(
                f"port {svc.listen[0]}:{svc.listen[1]} is already taken on {where}; stop what "
                f"listens there ({how}) and retry"
            )


def start(
    node_pid: NodePid,
    deployment: Deployment,
    mode: Mode = "fastpath",
    state_dir: Path = STATE_DIR,
    timeout: float = 20.0,
    monitor: bool = False,
    dashboard: bool = False,
) -> list[dict]:
    """Start a mode's services in the running network; on any failure stop what started.

    `node_pid(name)` gives the PID of a node's shell (controller.network.node_pid). Returns the
    records written to `<state_dir>/services.json`. Raises ServiceError with the reason and the
    tail of the failing service's log.
    """
    state_dir = Path(state_dir)
    p = plan(deployment, mode, state_dir, monitor=monitor, dashboard=dashboard)
    (state_dir / "logs").mkdir(parents=True, exist_ok=True)
    preflight(node_pid, deployment, mode, state_dir, monitor, dashboard)
    # Files this run makes (configs, counters, sockets, the backend record), removed again
    # by stop().
    made = [*p.files, *(f for svc in p.services for f in (svc.stats, svc.ready_file) if f)]
    made.append(str(backend_record.record_path(state_dir)))
    made += [f for svc in p.services for f in svc.files]
    state: dict = {"mode": mode, "services": [], "undo": [], "files": sorted(set(made))}
    state["dirs"] = list(p.dirs)
    _write_state(state_dir, state)
    try:
        # The backend set starts as the deployment's (a record left by a crashed run is
        # replaced); `controller backend ...` changes it from here on.
        backend_record.write_record(state_dir, backend_record.from_deployment(deployment))
        # The processes' configurations (the network's files: `down` removes them), rendered
        # from this deployment, which may not be the one the network came up with.
        render.write(deployment, state_dir)
        for path, text in p.files.items():
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
        for f in {s.ready_file for s in p.services if s.ready_file}:
            Path(f).unlink(missing_ok=True)  # a stale stats file must not pass for readiness
        for cmd in p.setup:
            pid = node_pid(cmd.node)
            _run_in_node(pid, cmd, 10)
            if cmd.undo:
                state["undo"].append({"node": cmd.node, "node_pid": pid, "argv": list(cmd.undo)})
                _write_state(state_dir, state)
        # Backends before load balancers, so the first balanced packet finds a server.
        for svc in p.services:
            rec = _spawn(_pid_of(node_pid, svc.node), svc)
            state["services"].append(rec)
            _write_state(state_dir, state)
            _wait_ready(rec, svc, timeout)
        for cmd in p.settle:
            _run_in_node(node_pid(cmd.node), cmd, timeout)
    except BaseException:
        stop(state_dir)
        raise
    return list(state["services"])


def start_host(
    node_pid: NodePid,
    deployment: Deployment,
    host: str,
    state_dir: Path = STATE_DIR,
    timeout: float = 20.0,
) -> list[dict]:
    """Start a backend's agent, web server and exporter on `host` beside the running fastpath
    services (as `start` does for the deployment's backends), recorded so that `stop` or
    `stop_host` stops them by PID; on a failure, what started is stopped again. (Prometheus, if
    it runs, keeps the targets it started with.)"""
    state_dir = Path(state_dir)
    state = _read_state(state_dir)
    if state.get("mode") != "fastpath" or not running(state_dir):
        raise ServiceError("no fastpath services are running: start them first (up --services)")
    if any(r["node"] == host for r in running(state_dir)):
        raise ServicesBusy(f"{host} already runs services: {', '.join(_names_on(state, host))}")
    from controller import monitor  # it plans Services of this module

    svcs = backend_services(deployment, host, "fastpath", state_dir)
    svcs.append(monitor.exporter_service(deployment, "agent", host, state_dir, python_bin()))
    started: list[dict] = []
    try:
        for svc in svcs:
            for f in (svc.stats, svc.ready_file):
                if f:
                    Path(f).unlink(missing_ok=True)
                    state["files"] = sorted({*state["files"], f})
            rec = _spawn(node_pid(svc.node), svc)
            started.append(rec)
            state["services"].append(rec)
            _write_state(state_dir, state)
            _wait_ready(rec, svc, timeout)
    except BaseException:
        stop_host(state_dir, host)
        raise
    return started


def stop_host(state_dir: Path = STATE_DIR, host: str = "", timeout: float = 5.0) -> int:
    """Stop the recorded services running on `host` by PID (the others keep running); returns
    how many were running."""
    state = _read_state(Path(state_dir))
    return stop_named(state_dir, _names_on(state, host), timeout)


def stop_named(state_dir: Path, names: Iterable[str], timeout: float = 5.0) -> int:
    """Stop these recorded services by PID and forget them (the others keep running); returns
    how many were running."""
    state_dir = Path(state_dir)
    state = _read_state(state_dir)
    names = set(names)
    n = _terminate([r for r in state["services"] if r["name"] in names], timeout)
    state["services"] = [r for r in state["services"] if r["name"] not in names]
    _write_state(state_dir, state)
    return n


def restart(node_pid: NodePid, state_dir: Path, name: str, timeout: float = 20.0) -> dict:
    """Stop one recorded service by PID and start it again as it was (an LB restarted this way
    reads its rendered configuration afresh: the current backend set)."""
    state_dir = Path(state_dir)
    state = _read_state(state_dir)
    rec = next((r for r in state["services"] if r["name"] == name), None)
    if rec is None:
        raise ServiceError(f"no service {name!r} is recorded ({', '.join(_names_on(state))})")
    _terminate([rec], 5.0)
    fields = {f: rec[f] for f in Service.__dataclass_fields__}
    svc = Service(**{**fields, "argv": tuple(rec["argv"])})
    if svc.ready_file:
        Path(svc.ready_file).unlink(missing_ok=True)
    new = _spawn(node_pid(svc.node), svc)
    state["services"] = [new if r["name"] == name else r for r in state["services"]]
    _write_state(state_dir, state)
    _wait_ready(new, svc, timeout)
    return new


def _names_on(state: dict, host: str | None = None) -> list[str]:
    return [r["name"] for r in state.get("services", []) if host is None or r["node"] == host]


def _terminate(recs: list[dict], timeout: float) -> int:
    """SIGTERM, then SIGKILL, the recorded processes that are still ours; reaps them."""
    live = [r for r in recs if proc_start_time(r["pid"]) == r["start_time"]]
    for rec in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(rec["pid"], signal.SIGTERM)
    _reap(live, timeout)
    for rec in live:
        if proc_start_time(rec["pid"]) == rec["start_time"] and proc_state(rec["pid"]) != "Z":
            with contextlib.suppress(ProcessLookupError):
                os.kill(rec["pid"], signal.SIGKILL)
    _reap(live, 2.0)
    return len(live)


def _run_in_node(pid: int, cmd: Command, timeout: float) -> None:
    try:
        res = subprocess.run(
            _in_node(pid, cmd.argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise ServiceError(
            f"{cmd.node}: `{' '.join(cmd.argv)}` did not finish in {timeout:.0f} s"
        ) from None
    if res.returncode != 0:
        why = (res.stderr.strip() or res.stdout.strip() or f"exit {res.returncode}").splitlines()
        raise ServiceError(f"{cmd.node}: `{' '.join(cmd.argv)}` failed: {why[-1]}")


def _spawn(node: int | None, svc: Service) -> dict:
    Path(svc.log).parent.mkdir(parents=True, exist_ok=True)
    with open(svc.log, "wb") as log:  # this run's log only (the driver counts requests in it)
        try:
            proc = subprocess.Popen(
                _in_node(node, svc.argv) if node is not None else list(svc.argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                start_new_session=True,  # Ctrl-C in the caller's terminal is ours to relay
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        except OSError as exc:
            raise ServiceError(
                f"{svc.name} on {svc.node}: cannot start {svc.argv[0]}: {exc}"
            ) from exc
    start_time = proc_start_time(proc.pid)
    return {
        **asdict(svc),
        "pid": proc.pid,
        "start_time": start_time,
        "node_pid": node,
    }


def _wait_ready(rec: dict, svc: Service, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pid = rec["pid"]
    while True:
        state = proc_state(pid)
        if state is None or state == "Z":
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            raise ServiceError(
                f"{svc.name} on {svc.node} exited at start ({' '.join(svc.argv)}); its log "
                f"{svc.log} ends:\n    {_log_tail(svc.log)}"
            )
        ready = True
        if svc.listen is not None:
            ready = listening(pid, *svc.listen)
        if ready and svc.ready_file is not None:
            ready = Path(svc.ready_file).exists()
        if ready and svc.ready_packet_socket:
            ready = has_packet_socket(pid)
        if ready:
            return
        if time.monotonic() > deadline:
            if svc.listen:
                what = f"no listener on {svc.listen[0]}:{svc.listen[1]}"
            elif svc.ready_file:
                what = f"no {svc.ready_file} yet"
            else:
                what = "no packet socket open"
            raise ServiceError(
                f"{svc.name} on {svc.node} not ready after {timeout:.0f}s ({what}); its log "
                f"{svc.log} ends:\n    {_log_tail(svc.log)}"
            )
        time.sleep(0.05)


def stop(state_dir: Path = STATE_DIR, timeout: float = 5.0) -> int:
    """Stop every recorded service by PID (SIGTERM, then SIGKILL), undo setup commands.

    Returns the number of processes that were running. Safe to call twice, or with nothing
    recorded. A PID whose start time differs from the recorded one belongs to someone else now
    and is left alone.
    """
    state_dir = Path(state_dir)
    state = _read_state(state_dir)
    recs = state.get("services", [])
    live = [r for r in recs if proc_start_time(r["pid"]) == r["start_time"]]
    # Watchers first (an exporter must not report a stopping LB as a fault); then load
    # balancers (each withdraws its announcement and drains: fastpath.drain), so no new flow
    # reaches a server that is going away; BGP last, so an LB sees its withdraw acknowledged.
    order = {
        "exporter": 0, "monitor": 0, "lb": 1, "haproxy": 1,
        "www": 2, "agent": 2, "bgp": 3,
    }  # fmt: skip
    n = 0
    for level in sorted({order.get(r["role"], 2) for r in live}):
        n += _terminate([r for r in live if order.get(r["role"], 2) == level], timeout)
    for undo in reversed(state.get("undo", [])):
        # The node may be gone already (network down first): then so is what we changed.
        if proc_state(undo["node_pid"]) is None:
            continue
        subprocess.run(
            _in_node(undo["node_pid"], undo["argv"]), capture_output=True, timeout=10, check=False
        )
    for f in state.get("files", []):
        with contextlib.suppress(OSError):
            Path(f).unlink()
    for d in {Path(f).parent for f in state.get("files", [])} - {state_dir}:
        with contextlib.suppress(OSError):
            d.rmdir()  # a directory of ours (bird/), if nothing else is in it
    for d in state.get("dirs", []):
        shutil.rmtree(d, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        (state_dir / STATE_FILE).unlink()
    return n


def _reap(recs: Iterable[dict], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = list(recs)
    while pending and time.monotonic() < deadline:
        still = []
        for rec in pending:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(rec["pid"], os.WNOHANG)  # our child: collect it, or it stays a zombie
            st = proc_state(rec["pid"])
            if st is not None and st != "Z" and proc_start_time(rec["pid"]) == rec["start_time"]:
                still.append(rec)
        pending = still
        if pending:
            time.sleep(0.05)
