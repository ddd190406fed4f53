"""`python -m controller backend list|add|remove|drain|weight|up|down`: the backend set of the
running cluster, changed on every load balancer or on none (controller.cluster).

Each change is checked here first (the host exists and may be a backend, the weight is in
range, the network and the fastpath services are up; for `add`, the host runs an agent and a
server on the VIP, so that no new flow is sent into a black hole), then applied to every LB
(dry run on all, then apply on all, put back on failure), then recorded in the state
directory (controller.backend_record) and in the LBs' rendered configurations, so an LB
restarted later starts with the current set. The fabric's source guard follows the set: a
backend's DSR replies come from the VIP, which its ToR lets through only from the hosts the
guard allows (controller.routes.source_guard), so `add` allows it there before any flow is
sent, and `remove` withdraws it afterwards. One backend command runs at a time
(`<state dir>/config/backends.lock`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from controller import netstate, render, services
from controller.backend_record import (
    BackendEntry,
    ClusterRecord,
    backend_hosts,
    read_record,
    write_record,
)
from controller.cluster import ClusterError, Endpoint, apply_everywhere
from controller.drivers.linux import DriverError, guard_ruleset, run_nft
from controller.netstate import STATE_DIR, NetState
from controller.routes import compute_routes
from controller.topology import Topology, load_topology
from fastpath.config import MAX_WEIGHT
from l4lb.control import ControlUnavailable, RequestRefused, request
from l4lb.errors import ConfigError, UsageError

LOCK = "config/backends.lock"  # with the rendered files: `down` removes it
LOCK_WAIT = 30.0
DRAIN_POLL = 0.5  # seconds between two looks at a draining backend's active flows


class BackendCmdError(RuntimeError):
    """Refused or failed; the message says why and, if an LB was changed, what was undone."""


@dataclass
class LbEndpoint:
    """An LB's control socket (controller.cluster.Endpoint)."""

    name: str
    path: Path
    timeout: float = 2.0

    def request(self, cmd: str, **args: Any) -> Any:
        return request(self.path, cmd, self.timeout, **args)


@dataclass
class Env:
    """The running cluster as the backend commands see it."""

    state_dir: Path
    net: NetState
    topology: Topology
    record: ClusterRecord
    lbs: list[Endpoint]

    def host_of(self, name: str) -> str:
        """A host that may be a backend, by name or address; UsageError saying why not."""
        topo = self.topology
        hosts = topo.hosts()
        by_ip = {topo.host_ip(h): h for h in hosts}
        host = by_ip.get(name, name)
        if host not in hosts:
            if host in topo.switches():
                raise UsageError(f"{host} is a switch, not a host")
            raise UsageError(f"unknown host {name!r} (hosts: {' '.join(hosts)})")
        if host not in backend_hosts(hosts, self.record.load_balancers):
            lbs = ", ".join(self.record.load_balancers)
            raise UsageError(f"{host} is a load balancer ({lbs}), not a host that can be a backend")
        return host

    def entry(self, host: str) -> BackendEntry:
        e = self.record.entry(host)
        if e is None:
            now = ", ".join(b.host for b in self.record.backends)
            raise UsageError(f"{host} is not a backend (backends: {now})")
        return e


def environment(state_dir: Path = STATE_DIR) -> Env:
    """The running cluster; BackendCmdError when there is none to work on."""
    if os.geteuid() != 0:
        raise BackendCmdError(
            "backend commands need root: the load balancers' control sockets are root-only"
        )
    st = netstate.read_state(state_dir)
    if st is None or not netstate.is_running(st.owner_pid, st.owner_start_time) or not st.ready:
        raise BackendCmdError(
            "no network is up: start one with `python -m controller up --detach --services`"
        )
    svc = services._read_state(state_dir)
    live = services.running(state_dir)
    if svc.get("mode") != "fastpath" or not live:
        what = f"services run in {svc['mode']} mode" if live else "no services run"
        raise BackendCmdError(
            f"no fastpath load balancers to change ({what}): backend commands need "
            "`python -m controller up --services` (fastpath)"
        )
    try:
        record = read_record(state_dir)
    except ConfigError as exc:
        raise BackendCmdError(f"the backend record cannot be read: {exc}") from None
    if record is None:
        raise BackendCmdError(f"no backend record in {state_dir}: restart the services")
    topo = load_topology(st.topology)
    lbs: list[Endpoint] = [
        LbEndpoint(h, render.control_path(state_dir, "lb", h)) for h in record.load_balancers
    ]
    return Env(Path(state_dir), st, topo, record, lbs)


@contextlib.contextmanager
def one_at_a_time(state_dir: Path, wait: float = LOCK_WAIT) -> Iterator[None]:
    fd = os.open(state_dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise BackendCmdError(
                        f"another backend command has held {state_dir / LOCK} for {wait:.0f} s"
                    ) from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)


# --- changes ---------------------------------------------------------------------------------


def check_weight(weight: int) -> int:
    if not 0 <= weight <= MAX_WEIGHT:
        raise UsageError(f"weight must be 0..{MAX_WEIGHT}, not {weight}")
    return weight


def check_serves(env: Env, host: str) -> None:
    """`host` runs an agent (its control socket answers) and a server on every VIP port: new
    flows sent there would be lost otherwise."""
    sock = render.control_path(env.state_dir, "agent", host)
    try:
        request(sock, "ping", timeout=2.0)
    except (ControlUnavailable, RequestRefused) as exc:
        cfg = render.config_path(env.state_dir, "agent", env.topology.host_interface(host).name)
        raise BackendCmdError(
            f"{host} runs no agent ({exc}): new flows sent there would be lost. Start its agent "
            f"(python -m agent.decap --config {cfg}) and a web server on "
            f"{env.record.vip}:{env.record.ports[0]} there first; nothing was changed"
        ) from None
    pid = env.net.nodes[host].pid
    for port in env.record.ports:
        if not services.listening(pid, env.record.vip, port):
            raise BackendCmdError(
                f"{host} runs an agent but no server listens on {env.record.vip}:{port} there: "
                "new flows sent there would be refused; nothing was changed"
            )


def guard_vip(env: Env, backends: Sequence[BackendEntry], host: str) -> None:
    """The source guard of `host`'s ToR as it is for the set `backends` (the LBs and these
    backends may send from the VIP), applied in one nft transaction: the rules of the ToR's
    other ports never lapse."""
    topo, rec = env.topology, env.record
    tor = topo.gateway(host).node
    sources = (*rec.load_balancers, *(b.host for b in backends))
    program = compute_routes(topo, rec.vip, rec.load_balancers, sources)[tor]
    script = guard_ruleset(program, topo)
    if script is None:
        return
    try:
        run_nft({tor: (env.net.nodes[tor].pid, script)})
    except (DriverError, OSError) as exc:
        raise BackendCmdError(f"{tor}: cannot update the source guard for {host}: {exc}") from None


def wire(backends: Sequence[BackendEntry]) -> list[dict[str, Any]]:
    """The set as `backends.replace` takes it."""
    return [{"ip": b.ip, "weight": b.weight, "admin": b.admin, "name": b.host} for b in backends]


def change(
    env: Env, backends: tuple[BackendEntry, ...], what: str, out: TextIO = sys.stdout
) -> dict[str, Any]:
    """Apply `backends` to every LB or none, then record it; prints one line of what it did."""
    try:
        done = apply_everywhere(env.lbs, wire(backends))
    except ClusterError as exc:
        raise BackendCmdError(f"{what}: {exc}") from None
    record = dataclasses.replace(env.record, backends=backends, updated=time.time())
    ifaces = {h: env.topology.host_interface(h).name for h in record.load_balancers}
    try:
        write_record(env.state_dir, record)
        render.rewrite_lb_configs(env.state_dir, record, ifaces)
    except (ConfigError, OSError) as exc:
        raise BackendCmdError(
            f"{what}: applied on every LB, but not recorded ({exc}): an LB restarted now would "
            "start with the old set"
        ) from None
    env.record = record
    first = next(iter(done.results.values()))
    times = ", ".join(f"{n} {r['build_ms']:.1f} ms" for n, r in done.results.items())
    print(
        f"{what}: applied on {', '.join(done.results)}; {first['slots_moved']} of the table's "
        f"slots moved ({times}); tables agree (digest {first['table_digest']})",
        file=out,
    )
    for name in done.differed:
        print(f"  note: {name}'s set differed from the others' before; it now agrees", file=out)
    return done.results


def active_flows(env: Env, ip: str) -> dict[str, int]:
    """A backend's active flows on each LB (BackendCmdError if one cannot be asked)."""
    out = {}
    for lb in env.lbs:
        try:
            reply = lb.request("backends")
        except (ControlUnavailable, RequestRefused) as exc:
            raise BackendCmdError(f"{lb.name} cannot be asked ({exc})") from None
        out[lb.name] = sum(b["active_flows"] for b in reply["backends"] if b["ip"] == ip)
    return out


def wait_drained(
    env: Env,
    host: str,
    seconds: float,
    out: TextIO,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Wait until `host`'s active flows on every LB reach 0, or `seconds` pass; returns the
    flows still tracked then."""
    ip = env.entry(host).ip
    deadline = clock() + seconds
    said = -1.0
    while True:
        flows = active_flows(env, ip)
        left = sum(flows.values())
        now = clock()
        if left == 0 or now >= deadline:
            return left
        if now - said >= 5.0:
            per = ", ".join(f"{n} {c}" for n, c in flows.items())
            print(f"  {host}: {left} active flows ({per}), {deadline - now:.0f} s left", file=out)
            said = now
        sleep(min(DRAIN_POLL, max(0.0, deadline - now)))


def run_change(args: argparse.Namespace, env: Env, out: TextIO = sys.stdout) -> int:
    """One of add, remove, drain, weight, up, down on `env` (checked, applied, recorded)."""
    host = env.host_of(args.host)
    rec = env.record
    cmd = args.action
    what = f"backend {cmd} {host}"
    if cmd == "add":
        if (e := rec.entry(host)) is not None:
            raise UsageError(f"{host} is already a backend (weight {e.weight}, {e.admin})")
        weight = check_weight(args.weight)
        check_serves(env, host)
        new = (*rec.backends, BackendEntry(host, env.topology.host_ip(host), weight))
        guard_vip(env, new, host)  # its replies (from the VIP) may leave before it gets flows
        try:
            change(env, new, what, out)
        except BackendCmdError:
            guard_vip(env, rec.backends, host)
            raise
        return 0
    entry = env.entry(host)

    def with_entry(**kw: Any) -> tuple[BackendEntry, ...]:
        return tuple(dataclasses.replace(b, **kw) if b.host == host else b for b in rec.backends)

    if cmd == "remove":
        if args.wait_drained is not None:
            if entry.weight != 0:
                change(env, with_entry(weight=0), f"backend drain {host}", out)
            left = wait_drained(env, host, args.wait_drained, out)
            if left:
                print(
                    f"  {host}: {left} flows still tracked after {args.wait_drained:g} s: "
                    "removing it anyway (they are forgotten)",
                    file=out,
                )
        new = tuple(b for b in env.record.backends if b.host != host)
        change(env, new, what, out)
        try:
            guard_vip(env, new, host)
        except BackendCmdError as exc:
            print(f"  note: {exc}: it may still send from the VIP", file=out)
    elif cmd == "drain":
        change(env, with_entry(weight=0), what, out)
    elif cmd == "weight":
        change(env, with_entry(weight=check_weight(args.weight)), f"{what} {args.weight}", out)
    else:  # up, down
        change(env, with_entry(admin=cmd), what, out)
    return 0


# --- list ------------------------------------------------------------------------------------


def gather(env: Env) -> dict[str, Any]:
    """Every LB's `backends` reply, merged per backend: what `list` prints (and --json)."""
    lbs: dict[str, Any] = {}
    replies: dict[str, Any] = {}
    for lb in env.lbs:
        try:
            replies[lb.name] = lb.request("backends")
            r = replies[lb.name]
            lbs[lb.name] = {"ok": True, "fail_open": r["fail_open"], "table": r["table"]}
        except (ControlUnavailable, RequestRefused) as exc:
            lbs[lb.name] = {"ok": False, "error": str(exc)}
    hosts = {b.ip: b.host for b in env.record.backends}
    order: list[str] = [b.ip for b in env.record.backends]
    for r in replies.values():
        order += [b["ip"] for b in r["backends"] if b["ip"] not in order]
    rows = []
    for ip in order:
        per = {n: b for n, r in replies.items() for b in r["backends"] if b["ip"] == ip}
        if not per:
            continue
        one = next(iter(per.values()))

        def common(key: str, per: dict[str, Any] = per) -> Any:
            values = {str(b[key]) for b in per.values()}
            return per[next(iter(per))][key] if len(values) == 1 else "mixed"

        rows.append(
            {
                "host": hosts.get(ip) or one.get("name"),
                "ip": ip,
                "weight": common("weight"),
                "admin": common("admin"),
                "health": common("health"),
                "health_since": min(b["health_since"] for b in per.values()),
                "state": common("state"),
                **{
                    k: sum(b[k] for b in per.values())
                    for k in ("active_flows", "connections", "packets", "bytes", "pps", "bps")
                },
                "per_lb": per,
            }
        )
    digests = {v["table"]["digest"] for v in lbs.values() if v["ok"]}
    return {
        "vip": env.record.vip,
        "ports": list(env.record.ports),
        "load_balancers": lbs,
        "tables_agree": len(digests) == 1 and all(v["ok"] for v in lbs.values()),
        "backends": rows,
    }


def _num(n: float) -> str:
    """Short, as ipvsadm prints: 1234, 12.3K, 4.5M, 6.7G (exact figures: --json)."""
    if n >= 1e9:
        return f"{n / 1e9:.1f}G"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e4:
        return f"{n / 1e3:.1f}K"
    return f"{n:.0f}"


def _age(seconds: float) -> str:
    s = int(max(0, seconds))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


COLUMNS = ("BACKEND", "LB", "WEIGHT", "ADMIN", "HEALTH", "STATE", "ACTIVE", "CONNS",
           "PACKETS", "BYTES", "PKT/S")  # fmt: skip


def format_list(data: dict[str, Any], now: float | None = None) -> str:
    """`backend list` as a table: a total row per backend, a row per LB under it."""
    now = time.time() if now is None else now
    ports = ",".join(str(p) for p in data["ports"])
    lbs = data["load_balancers"]
    live = [n for n, v in lbs.items() if v["ok"]]
    head = f"VIP {data['vip']}:{ports}  load balancers: {', '.join(lbs)}"
    if live:
        t = lbs[live[0]]["table"]
        agree = "agree" if data["tables_agree"] else "DIFFER"
        head += f"  table {t['size']} slots, digest {t['digest']} ({agree})"
    lines = [head]
    for n, v in lbs.items():
        if not v["ok"]:
            lines.append(f"  {n}: cannot be reached: {v['error']}")
        elif v["fail_open"]:
            lines.append(f"  {n}: FAIL OPEN: no backend is healthy, health is ignored")
    table: list[tuple[str, ...]] = [COLUMNS]
    for b in data["backends"]:
        name = f"{b['ip']} ({b['host']})" if b["host"] else b["ip"]
        health = f"{b['health']} {_age(now - b['health_since'])}"
        table.append(
            (name, "total", str(b["weight"]), b["admin"], health, b["state"],
             _num(b["active_flows"]), _num(b["connections"]), _num(b["packets"]),
             _num(b["bytes"]), _num(b["pps"]))
        )  # fmt: skip
        for lb, x in b["per_lb"].items():
            table.append(
                ("", lb, str(x["weight"]), x["admin"], f"{x['health']} {_age(x['health_for_s'])}",
                 x["state"], _num(x["active_flows"]), _num(x["connections"]),
                 _num(x["packets"]), _num(x["bytes"]), _num(x["pps"]))
            )  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    for row in table:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def run_list(args: argparse.Namespace, env: Env, out: TextIO = sys.stdout) -> int:
    data = gather(env)
    if args.json:
        print(json.dumps(data, indent=1, sort_keys=True), file=out)
    else:
        print(format_list(data), file=out)
    down = [n for n, v in data["load_balancers"].items() if not v["ok"]]
    return 1 if down else 0


# --- command line ----------------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    """`backend ...` under controller.__main__'s subcommands."""
    p = sub.add_parser("backend", help="the backend set of the running LBs: list, add, ...")
    acts = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = acts.add_parser("list", help="one row per backend, per LB and in total")
    q.add_argument("--json", action="store_true", help="the data as JSON")
    q = acts.add_parser("add", help="add HOST (about 1/(N+1) of new flows go to it)")
    q.add_argument("host", metavar="HOST")
    q.add_argument("--weight", type=int, default=1, help=f"0..{MAX_WEIGHT} (default 1)")
    q = acts.add_parser("remove", help="remove HOST: no new flows, its tracked flows forgotten")
    q.add_argument("host", metavar="HOST")
    q.add_argument(
        "--wait-drained",
        type=float,
        metavar="SECONDS",
        help="drain first, wait until its active flows reach 0 (or SECONDS pass), then remove",
    )
    q = acts.add_parser("drain", help="weight 0: no new flows, tracked flows stay")
    q.add_argument("host", metavar="HOST")
    q = acts.add_parser("weight", help=f"set HOST's weight (0..{MAX_WEIGHT})")
    q.add_argument("host", metavar="HOST")
    q.add_argument("weight", type=int, metavar="W")
    for state, why in (
        ("up", "administratively up: new flows again"),
        ("down", "administratively down: no new flows, its tracked flows re-hashed"),
    ):
        q = acts.add_parser(state, help=why)
        q.add_argument("host", metavar="HOST")
    p.set_defaults(func=main, subparser=p)


def main(args: argparse.Namespace, state_dir: Path = STATE_DIR) -> int:
    if args.action == "remove" and args.wait_drained is not None and args.wait_drained < 0:
        raise UsageError("--wait-drained: SECONDS must be >= 0")
    env = environment(state_dir)
    if args.action == "list":
        return run_list(args, env)
    with one_at_a_time(env.state_dir):
        env.record = read_record(env.state_dir) or env.record  # another command's, just now
        return run_change(args, env)
