"""The host agent: `python -m agent.decap [--iface IFACE] [--vip IP]... [--allow-lb IP|CIDR]...`

Receives IP-in-IP addressed to this host on an AF_PACKET receive ring (classic BPF: IPv4,
the tunnel's protocol, to this host; every outer source passes, so the core counts spoofed
tunnels),
strips the outer header (agent.core), and writes the inner packet to a TUN device that carries
the VIPs (agent.deliver). Host settings (agent.host) are installed at start and removed at exit,
on SIGINT/SIGTERM and on errors.

Output: one JSON line at start ({"event": "ready", ...}), one every --stats-interval seconds
and one at exit ({"event": "stats" | "exit", ...}); the same counters, rewritten atomically, in
/run/l4lb/agent-<iface>.json while it runs (the final figures stay there after exit); fields
in agent.stats.
Exit status: 0 after a signal, 2 for bad input, 1 when the host could not be set up.
"""

from __future__ import annotations

import argparse
import ipaddress
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

from agent.config import DecapConfig, parse_network
from agent.core import Decapsulator
from agent.deliver import Delivery, RawDelivery, TunDelivery
from agent.host import HostPlan, HostSetup, table_name, tun_name
from agent.stats import AgentStats
from l4lb import bpf, rps
from l4lb.busypoll import add_busy_poll_option, busy_poll_error
from l4lb.errors import ConfigError, L4lbError, UsageError
from l4lb.ring import RxRing, kernel_drops
from l4lb.rxloop import RxLoop
from l4lb.statsfile import StatsWriter, default_path

BATCH = 256  # frames handled between two clock reads / stop checks
IDLE_POLL_MS = 200  # longest sleep while idle: bounds the reaction to a signal


@dataclass(frozen=True)
class Settings:
    """Everything the command line resolved to."""

    iface: str
    cfg: DecapConfig
    server_mss: int
    deliver: str
    stats_interval: float
    stats_file: Path
    ring_frames: int
    rps_cpus: int
    busy_poll_us: int = 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m agent.decap",
        description="Decapsulate IP-in-IP from the load balancers and deliver it to a local VIP.",
    )
    ap.add_argument("--iface", help="fabric interface (default: the host's only non-lo one)")
    ap.add_argument(
        "--vip", action="append", default=[], help="VIP to serve (repeatable; default: deployment)"
    )
    ap.add_argument(
        "--allow-lb",
        action="append",
        default=[],
        metavar="IP|CIDR",
        help="allowed tunnel source (repeatable; default: the deployment's load balancers)",
    )
    ap.add_argument("--stats-interval", type=float, default=5.0, metavar="S")
    ap.add_argument("--stats-file", type=Path, help="default: /run/l4lb/agent-<iface>.json")
    ap.add_argument("--deployment", help="deployment file (default: controller/deployment.json)")
    ap.add_argument("--server-mss", type=int, help="MSS cap for SYN-ACKs (default: deployment)")
    ap.add_argument("--deliver", choices=("tun", "raw"), default="tun")
    ap.add_argument("--ring-frames", type=int, default=4096)
    add_busy_poll_option(ap)
    ap.add_argument(
        "--rps",
        default="auto",
        metavar="auto|off|MASK",
        help="CPUs (hex mask) that run the stack's receive work for delivered packets; auto:"
        " the CPUs this process may not run on, when it is pinned (default)",
    )
    return ap.parse_args(argv)


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


def resolve(args: argparse.Namespace) -> Settings:
    """Fill the defaults from the host and the deployment; UsageError on bad input."""
    for vip in args.vip:
        try:
            ipaddress.IPv4Address(vip)
        except ValueError:
            raise UsageError(f"--vip {vip!r}: not an IPv4 address") from None
    for lb in args.allow_lb:
        try:
            parse_network("--allow-lb", lb)
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
    if args.stats_interval < 0:
        raise UsageError(f"--stats-interval {args.stats_interval}: must be >= 0")
    if args.ring_frames < 16:
        raise UsageError(f"--ring-frames {args.ring_frames}: at least 16")
    if why := busy_poll_error(args.busy_poll_us):
        raise UsageError(why)
    vips, lbs, mss = tuple(args.vip), tuple(args.allow_lb), args.server_mss
    if not vips or not lbs or mss is None:
        vips, lbs, mss = _from_deployment(args.deployment, vips, lbs, mss)
    if not 536 <= mss <= 1460:
        raise UsageError(f"--server-mss {mss}: must be in 536..1460")
    rps = rps_mask(args.rps)
    iface = args.iface or default_iface()
    local_ip = iface_ipv4(iface)
    try:
        cfg = DecapConfig(local_ip=local_ip, vips=vips, allowed_lbs=lbs)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    return Settings(
        iface=iface,
        cfg=cfg,
        server_mss=mss,
        deliver=args.deliver,
        stats_interval=args.stats_interval,
        stats_file=args.stats_file or default_path("agent", iface),
        ring_frames=args.ring_frames,
        rps_cpus=rps,
        busy_poll_us=args.busy_poll_us,
    )


def rps_mask(text: str) -> int:
    """--rps: 'off' -> 0; a hex mask; 'auto' -> the CPUs this process may not run on (0 when it
    may run everywhere: then there is no core to spare)."""
    return rps.parse_mask(text, "--rps") or 0


def _from_deployment(
    path: str | None, vips: tuple[str, ...], lbs: tuple[str, ...], mss: int | None
) -> tuple[tuple[str, ...], tuple[str, ...], int]:
    try:
        from controller.deployment import load_deployment

        dep = load_deployment(path)
        lb_ips = tuple(dep.topology.host_ip(h) for h in dep.load_balancers)
    except (ImportError, OSError, ValueError, KeyError) as exc:
        raise UsageError(
            f"deployment {path or 'controller/deployment.json'}: {exc}"
            " (or give --vip, --allow-lb and --server-mss)"
        ) from None
    return vips or (dep.vip,), lbs or lb_ips, dep.server_mss if mss is None else mss


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

    def snapshot(self, event: str) -> AgentStats:
        self.ring_drops += self.sock_drops()
        return AgentStats.of(
            self.core.counters,
            event=event,
            iface=self.s.iface,
            time=time.time(),
            uptime=round(time.monotonic() - self.started, 3),
            ring_drops=self.ring_drops,
            last_spoofed_source=self.core.last_spoofed_source(),
        )

    def emit(self, event: str) -> None:
        self.writer.emit(self.snapshot(event).as_dict())


def serve(
    ring: RxRing,
    sock_fd: int,
    core: Decapsulator,
    send: Callable[[memoryview], int],
    stop: StopFlag,
    stats: Stats,
    vnet_hdr: bool,
    busy_poll_us: int = 0,
) -> None:
    """The hot loop (l4lb.rxloop): up to BATCH ready frames per round, decapsulated and
    delivered by Decapsulator.bind_ring; a stats line every --stats-interval seconds."""
    interval = stats.s.stats_interval
    loop = RxLoop(ring.slots, sock_fd, BATCH, busy_poll_us, IDLE_POLL_MS)
    stop.loop = loop
    if stop.set:
        return
    loop.run(
        core.bind_ring(ring.slots, send, vnet_hdr),
        lambda now: stats.emit("stats"),
        interval if interval > 0 else float("inf"),
    )


def open_delivery(s: Settings) -> Delivery:
    if s.deliver == "tun":
        return TunDelivery(tun_name(s.iface))
    return RawDelivery(s.cfg.vips[0])


def run(s: Settings, stop: StopFlag) -> int:
    core = Decapsulator(s.cfg)
    ring = RxRing(frames=s.ring_frames)
    prog = bpf.tunnel_filter(core.encap, s.cfg.local_ip, None)
    sock = bpf.open_filtered(s.iface, prog, setup=ring.setup)
    delivery: Delivery | None = None
    host: HostSetup | None = None
    stats = Stats(s, core, lambda: kernel_drops(sock)[1])
    try:
        delivery = open_delivery(s)
        plan = HostPlan(
            s.iface, s.cfg.local_ip, s.cfg.vips, delivery.name, s.server_mss, s.rps_cpus,
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
            "server_mss": s.server_mss,
            "rps_cpus": f"{s.rps_cpus:x}",
            "pid": os.getpid(),
        }
        print(json.dumps(ready), flush=True)
        stats.emit("stats")
        serve(
            ring, sock.fileno(), core, delivery.send, stop, stats, delivery.vnet_hdr,
            s.busy_poll_us,
        )  # fmt: skip
    finally:
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
        settings = resolve(args)
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
