"""The host agent: `python -m agent.decap [--config FILE] [--iface IFACE] [options]`

Receives IP-in-IP addressed to this host on an AF_PACKET receive ring (classic BPF: IPv4,
the tunnel's protocol, to this host; every outer source passes, so the core counts spoofed
tunnels), strips the outer header (agent.core), and writes the inner packet to a TUN device
that carries the VIPs (agent.deliver). Host settings (agent.host) are installed at start and
removed at exit, on SIGINT/SIGTERM and on errors.

Settings: the configuration file the controller renders for each backend (`--config`, by
default /run/l4lb/config/agent-IFACE.json when it exists; agent.config.AgentConfig lists every
field), each option replacing one field; without a file, --vip and --allow-lb are needed.

Output: one JSON line at start ({"event": "ready", ...}), one every --stats-interval seconds
and one at exit ({"event": "stats" | "exit", ...}); the same counters, rewritten atomically, in
/run/l4lb/agent-<iface>.json while it runs (the final figures stay there after exit); fields
in agent.stats. The control channel (default /run/l4lb/agent-IFACE.ctl, root only;
l4lb.control) answers `show`, `health` and `ping`. With `health` configured, the loop also
checks the local server and answers the LBs' tunnelled probes (agent.healthsvc).
Exit status: 0 after a signal, 2 for bad input, 1 when the host could not be set up.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from agent.config import DELIVERY, AgentConfig, DecapConfig
from agent.core import Decapsulator
from agent.deliver import Delivery, RawDelivery, TunDelivery
from agent.healthsvc import AgentHealth
from agent.host import HostPlan, HostSetup, table_name, tun_name
from agent.stats import AgentStats
from l4lb import bpf, cfgfile, rps
from l4lb.busypoll import add_busy_poll_option
from l4lb.control import Command, ControlServer, default_socket
from l4lb.errors import ConfigError, L4lbError, UsageError
from l4lb.healthcfg import HealthConfig
from l4lb.plane import Plane
from l4lb.ring import RxRing, kernel_drops
from l4lb.rxloop import RxLoop
from l4lb.statsfile import STATS_DIR, StatsWriter, default_path

BATCH = 256  # frames handled between two clock reads / stop checks
IDLE_POLL_MS = 200  # longest sleep while idle: bounds the reaction to a signal
CONTROL_EVERY = 0.005  # seconds between looks at the control socket while busy
CONFIG_DIR = STATS_DIR / "config"


@dataclass(frozen=True)
class Settings:
    """The configuration with what the host said: the interface and its address."""

    iface: str
    cfg: DecapConfig
    conf: AgentConfig
    stats_file: Path | None
    rps_cpus: int


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m agent.decap",
        description="Decapsulate IP-in-IP from the load balancers and deliver it to a local VIP. "
        "Settings come from --config (the file `python -m controller up` renders for each "
        "backend); options override them.",
    )
    ap.add_argument(
        "--config",
        metavar="FILE",
        help=f"configuration file (default {CONFIG_DIR}/agent-IFACE.json when it exists)",
    )
    ap.add_argument("--iface", help="fabric interface (default: the host's only non-lo one)")
    ap.add_argument("--vip", action="append", help="VIP to serve (repeatable); replaces the file's")
    ap.add_argument(
        "--allow-lb",
        action="append",
        metavar="IP|CIDR",
        help="allowed tunnel source (repeatable); replaces the file's",
    )
    ap.add_argument("--stats-interval", type=float, metavar="S", help="default 5")
    ap.add_argument("--stats-file", help="default: /run/l4lb/agent-<iface>.json; '-' for none")
    ap.add_argument("--control-socket", help="default: /run/l4lb/agent-<iface>.ctl; '-' for none")
    ap.add_argument("--server-mss", type=int, help="MSS cap for SYN-ACKs (default 1440)")
    ap.add_argument("--deliver", choices=DELIVERY)
    ap.add_argument(
        "--health",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="check the local server and answer the LBs' probes (the file's settings, else "
        "l4lb.healthcfg's defaults); --no-health: neither (the default without a file)",
    )
    ap.add_argument("--ring-frames", type=int)
    add_busy_poll_option(ap, default=None)
    ap.add_argument(
        "--rps",
        metavar="auto|off|MASK",
        help="CPUs (hex mask) that run the stack's receive work for delivered packets; auto:"
        " the CPUs this process may not run on, when it is pinned (default)",
    )
    return ap.parse_args(argv)


def default_config_path(iface: str) -> Path:
    return CONFIG_DIR / f"agent-{iface}.json"


def resolve_config(args: argparse.Namespace) -> AgentConfig:
    """The configuration file (if any) with the command line's options over it."""
    path = args.config
    if path is None:
        iface = args.iface or _only_iface()
        if iface is not None and default_config_path(iface).exists():
            path = str(default_config_path(iface))
    given: dict[str, Any] = {}
    for option, field in (
        ("iface", "iface"),
        ("server_mss", "server_mss"),
        ("deliver", "deliver"),
        ("stats_interval", "stats_interval"),
        ("ring_frames", "ring_frames"),
        ("busy_poll_us", "busy_poll_us"),
        ("rps", "rps"),
    ):
        if getattr(args, option) is not None:
            given[field] = getattr(args, option)
    if args.vip:
        given["vips"] = tuple(args.vip)
    if args.allow_lb:
        given["allowed_lbs"] = tuple(args.allow_lb)
    if args.health is not None:
        given["health"] = HealthConfig() if args.health else None
    for option in ("stats_file", "control_socket"):
        value = getattr(args, option)
        if value is not None:
            given[option] = "" if value == "-" else value
    try:
        if path is not None:
            base = cfgfile.load(AgentConfig, path)
            if args.iface and base.iface and base.iface != args.iface:
                raise UsageError(f"--config {path} is for {base.iface}, not {args.iface}")
            if args.health and base.health is not None:
                given["health"] = base.health  # --health keeps the file's settings
            return dataclasses.replace(base, **given)
        if "vips" not in given or "allowed_lbs" not in given:
            raise UsageError(
                "no configuration: give --config FILE (`python -m controller up` renders one "
                f"per backend in {CONFIG_DIR}) or --vip and --allow-lb"
            )
        return AgentConfig(**given)
    except ConfigError as exc:
        raise UsageError(f"--config: {exc}" if path is not None else str(exc)) from None


def _only_iface() -> str | None:
    try:
        return default_iface()
    except UsageError:
        return None


def default_iface() -> str:
    """The host's only interface besides lo (and agents' TUN devices)."""
    names = sorted(
        n for n in os.listdir("/sys/class/net") if n != "lo" and not n.startswith("l4a-")
    )
    if len(names) != 1:
        raise UsageError(
            f"cannot choose an interface: found {', '.join(names) or 'none'} besides lo;"
            " pass --iface"
        )
    return names[0]


def iface_ipv4(iface: str) -> str:
    """The first IPv4 address of `iface`; UsageError if there is no such interface or address."""
    if not Path(f"/sys/class/net/{iface}").exists():
        raise UsageError(f"no interface {iface!r} on this host")
    out = subprocess.run(
        ["ip", "-j", "-4", "addr", "show", "dev", iface], capture_output=True, text=True, timeout=10
    )
    for link in json.loads(out.stdout or "[]"):
        for addr in link.get("addr_info", []):
            return str(addr["local"])
    raise UsageError(f"interface {iface!r} has no IPv4 address")


def resolve(conf: AgentConfig) -> Settings:
    """The configuration with the host's interface and address; UsageError on bad input."""
    iface = conf.iface or default_iface()
    local_ip = iface_ipv4(iface)
    try:
        cfg = DecapConfig(local_ip=local_ip, vips=conf.vips, allowed_lbs=conf.allowed_lbs)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    if conf.stats_file == "":
        stats_file = None
    else:
        stats_file = Path(conf.stats_file) if conf.stats_file else default_path("agent", iface)
    return Settings(
        iface=iface, cfg=cfg, conf=conf, stats_file=stats_file, rps_cpus=rps_mask(conf.rps)
    )


def rps_mask(text: str) -> int:
    """--rps: 'off' -> 0; a hex mask; 'auto' -> the CPUs this process may not run on (0 when it
    may run everywhere: then there is no core to spare)."""
    return rps.parse_mask(text, "--rps") or 0


class StopFlag:
    """Set by SIGINT/SIGTERM; stops the receive loop once it runs."""

    def __init__(self) -> None:
        self.set = False
        self.signal = 0
        self.loop: RxLoop | None = None

    def __call__(self, signum: int, _frame: FrameType | None) -> None:
        self.set = True
        self.signal = signum
        if self.loop is not None:
            self.loop.stop()


class Stats:
    """Periodic snapshots (AgentStats) as JSON lines on stdout and in the stats file."""

    def __init__(self, s: Settings, core: Decapsulator, sock_drops: Callable[[], int]) -> None:
        self.s = s
        self.core = core
        self.sock_drops = sock_drops
        self.ring_drops = 0
        self.started = time.monotonic()
        self.writer = StatsWriter(s.stats_file, "agent.decap")
        self.health: AgentHealth | None = None
        self.loop: RxLoop | None = None
        """The receive loop, once it runs (its ring_resyncs)."""

    def snapshot(self, event: str) -> AgentStats:
        self.ring_drops += self.sock_drops()
        return AgentStats.of(
            self.core.counters,
            event=event,
            iface=self.s.iface,
            time=time.time(),
            uptime=self.uptime(),
            ring_drops=self.ring_drops,
            last_spoofed_source=self.core.last_spoofed_source(),
            health=self.health.stats(time.monotonic()) if self.health is not None else None,
            ring_resyncs=self.loop.ring_resyncs if self.loop is not None else 0,
        )

    def uptime(self) -> float:
        return round(time.monotonic() - self.started, 3)

    def emit(self, event: str) -> None:
        self.writer.emit(self.snapshot(event).as_dict())


class ControlService:
    """The control channel as a plane service (looked at every CONTROL_EVERY while busy)."""

    def __init__(self, server: ControlServer) -> None:
        self.server = server

    def fds(self) -> Sequence[int]:
        return self.server.fds()

    def service(self, now: float) -> float:
        self.server.service()
        return now + CONTROL_EVERY


def serve(
    ring: RxRing,
    sock_fd: int,
    core: Decapsulator,
    send: Callable[[memoryview], int],
    stop: StopFlag,
    stats: Stats,
    vnet_hdr: bool,
    busy_poll_us: int = 0,
    plane: Plane | None = None,
) -> None:
    """The hot loop (l4lb.rxloop): up to BATCH ready frames per round, decapsulated and
    delivered by Decapsulator.bind_ring; a stats line every --stats-interval seconds; the
    control plane's services when due."""
    interval = stats.s.conf.stats_interval
    loop = RxLoop(ring.slots, sock_fd, BATCH, busy_poll_us, IDLE_POLL_MS)
    stop.loop = stats.loop = loop
    if stop.set:
        return
    loop.run(
        core.bind_ring(ring.slots, send, vnet_hdr),
        lambda now: stats.emit("stats"),
        interval if interval > 0 else float("inf"),
        plane,
    )


def open_delivery(s: Settings) -> Delivery:
    if s.conf.deliver == "tun":
        return TunDelivery(tun_name(s.iface))
    return RawDelivery(s.cfg.vips[0])


def run(s: Settings, stop: StopFlag) -> int:
    core = Decapsulator(s.cfg)
    ring = RxRing(frames=s.conf.ring_frames)
    prog = bpf.tunnel_filter(core.encap, s.cfg.local_ip, None)
    sock = bpf.open_filtered(s.iface, prog, setup=ring.setup)
    delivery: Delivery | None = None
    host: HostSetup | None = None
    control: ControlServer | None = None
    health: AgentHealth | None = None
    stats = Stats(s, core, lambda: kernel_drops(sock)[1])
    try:
        delivery = open_delivery(s)
        plan = HostPlan(
            s.iface, s.cfg.local_ip, s.cfg.vips, delivery.name, s.conf.server_mss, s.rps_cpus,
            core.encap,
        )  # fmt: skip
        host = HostSetup(plan)
        host.apply()
        ready = {
            "event": "ready",
            "iface": s.iface,
            "local_ip": s.cfg.local_ip,
            "vips": list(s.cfg.vips),
            "allowed_lbs": list(s.cfg.allowed_lbs),
            "deliver": delivery.kind,
            "tun": delivery.name,
            "nft_table": f"inet {table_name(s.iface)}",
            "server_mss": s.conf.server_mss,
            "rps_cpus": f"{s.rps_cpus:x}",
            "pid": os.getpid(),
        }
        plane = Plane(name="agent.decap")
        if s.conf.health is not None:  # after host.apply(): the VIP is there to bind
            health = stats.health = AgentHealth(
                s.conf.health, s.cfg.vips[0], s.cfg.local_ip, time.monotonic()
            )
            plane.add(health)
            ready["health_port"] = s.conf.health.port
        if s.conf.control_socket != "":
            commands = {
                "show": Command(
                    lambda req: stats.snapshot("show").as_dict(),
                    "counters and state now (the stats file's fields)",
                ),
                "health": Command(
                    lambda req: (
                        dataclasses.asdict(health.stats(time.monotonic()))
                        if health is not None
                        else None
                    ),
                    "the health checks of the local server (null without them)",
                ),
                "ping": Command(
                    lambda req: {"pid": os.getpid(), "uptime": stats.uptime()},
                    "is the process alive and its loop turning",
                ),
            }
            path = s.conf.control_socket or default_socket("agent", s.iface)
            control = ControlServer(path, commands)
            plane.add(ControlService(control))
            ready["control_socket"] = str(control.path)
        print(json.dumps(ready), flush=True)
        stats.emit("stats")
        serve(
            ring, sock.fileno(), core, delivery.send, stop, stats, delivery.vnet_hdr,
            s.conf.busy_poll_us, plane,
        )  # fmt: skip
    finally:
        if control is not None:
            control.close()
        if health is not None:
            health.close()
        if host is not None:
            host.undo()
        if delivery is not None:
            delivery.close()
        stats.emit("exit")  # before the socket closes: it reads the ring's drop counter
        ring.close()
        sock.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stop = StopFlag()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        settings = resolve(resolve_config(args))
    except UsageError as exc:
        print(f"agent.decap: {exc}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("agent.decap: needs root (AF_PACKET, TUN, nftables)", file=sys.stderr)
        return 1
    try:
        return run(settings, stop)
    except (L4lbError, OSError) as exc:
        print(f"agent.decap: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
