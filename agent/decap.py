"""The host agent: `python -m agent.decap [--iface IFACE] [--vip IP]... [--allow-lb IP|CIDR]...`

Receives IP-in-IP addressed to this host on an AF_PACKET receive ring (classic BPF: IPv4,
protocol 4, to this host; every outer source passes, so the core counts spoofed tunnels),
strips the outer header (agent.core), and writes the inner packet to a TUN device that carries
the VIPs (agent.deliver). Host settings (agent.host) are installed at start and removed at exit,
on SIGINT/SIGTERM and on errors.

Output: one JSON line at start ({"event": "ready", ...}), one every --stats-interval seconds
and one at exit ({"event": "stats" | "exit", ...}); the same counters, rewritten atomically, in
/run/l4lb/agent-<iface>.json while it runs (the final figures stay there after exit).
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

from agent.config import ConfigError, DecapConfig, parse_network
from agent.core import Decapsulator
from agent.counters import DecapCounters
from agent.deliver import Delivery, RawDelivery, TunDelivery
from agent.host import HostError, HostPlan, HostSetup, table_name, tun_name
from fastpath import bpf
from fastpath.ring import (
    ETH_MAC_OFFSET,
    TP_STATUS_USER,
    RxRing,
    add_busy_poll_option,
    busy_poll_error,
    kernel_drops,
    spin_for_frame,
)

STATS_DIR = Path("/run/l4lb")
BATCH = 256  # frames handled between two clock reads / stop checks
IDLE_POLL_MS = 200  # longest sleep while idle: bounds the reaction to a signal


class UsageError(Exception):
    """Bad command-line input or configuration: exit status 2 with this message."""


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
        stats_file=args.stats_file or STATS_DIR / f"agent-{iface}.json",
        ring_frames=args.ring_frames,
        rps_cpus=rps,
        busy_poll_us=args.busy_poll_us,
    )


def rps_mask(text: str) -> int:
    """--rps: 'off' -> 0; a hex mask; 'auto' -> the online CPUs outside this process's affinity
    (0 when it may run everywhere: then there is no core to spare)."""
    if text == "off":
        return 0
    if text == "auto":
        mine = os.sched_getaffinity(0)
        online = set(range(os.cpu_count() or 1))
        return sum(1 << c for c in online - mine) if mine < online else 0
    try:
        mask = int(text, 16)
    except ValueError:
        raise UsageError(f"--rps {text!r}: auto, off or a hex CPU mask") from None
    if mask < 0:
        raise UsageError(f"--rps {text!r}: a mask must be >= 0")
    return mask


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
    """Set by SIGINT/SIGTERM; the loop checks it between batches."""

    def __init__(self) -> None:
        self.set = False
        self.signal = 0

    def __call__(self, signum: int, _frame: FrameType | None) -> None:
        self.set = True
        self.signal = signum


def serve(
    ring: RxRing,
    core: Decapsulator,
    send: Callable[[memoryview], int],
    stop: StopFlag,
    tick: Callable[[float], None],
    vnet_hdr: bool,
    busy_poll_us: int = 0,
) -> None:
    """The hot loop: up to BATCH ready frames per round (Decapsulator.bind_ring decapsulates
    and delivers them), then their slots go back to the kernel in one strided store. With
    `busy_poll_us`, an empty ring is polled that long after traffic before the loop sleeps
    (as fastpath.lb's option: the next request skips a process wake-up)."""
    status, nr, fsize = ring.slot_status, ring.frame_nr, ring.frame_size
    starts = [j * fsize + ETH_MAC_OFFSET for j in range(nr)]
    ring_batch = core.bind_ring(ring.view, status, ring.slot_snap, starts, send, vnet_hdr)
    zeros = memoryview(bytearray(4 * BATCH)).cast("I")  # TP_STATUS_KERNEL
    clock = time.monotonic
    i = ring.index
    busy_poll = busy_poll_us / 1e6
    spin_until = 0.0
    while not stop.set:
        now = clock()
        tick(now)
        if not status[i] & TP_STATUS_USER:
            if spin_until:
                spin_for_frame(status, i, spin_until, clock)
                spin_until = 0.0
                continue
            ring.index = i
            ring.wait(IDLE_POLL_MS)
            continue
        if busy_poll:
            spin_until = now + busy_poll
        # Not past the ring's end, so that the slots handled are consecutive.
        end = i + BATCH if i + BATCH <= nr else nr
        n = ring_batch(i, end, now)
        status[i : i + n] = zeros if n == BATCH else zeros[:n]
        i += n
        if i == nr:
            i = 0
    ring.index = i


class Stats:
    """Periodic JSON lines on stdout and the atomically rewritten stats file."""

    def __init__(self, s: Settings, core: Decapsulator, sock_drops: Callable[[], int]) -> None:
        self.s = s
        self.core = core
        self.sock_drops = sock_drops
        self.ring_drops = 0
        self.started = time.monotonic()
        self.next = self.started + s.stats_interval if s.stats_interval > 0 else float("inf")

    def tick(self, now: float) -> None:
        if now >= self.next:
            self.next = now + self.s.stats_interval
            self.emit("stats")

    def snapshot(self, event: str) -> dict[str, object]:
        self.ring_drops += self.sock_drops()
        c: DecapCounters = self.core.counters
        return {
            "event": event,
            "iface": self.s.iface,
            "time": time.time(),
            "uptime": round(time.monotonic() - self.started, 3),
            **c.as_dict(),
            "ring_drops": self.ring_drops,
            "last_spoofed_source": self.core.last_spoofed_source(),
        }

    def emit(self, event: str) -> None:
        snap = self.snapshot(event)
        print(json.dumps(snap), flush=True)
        write_atomic(self.s.stats_file, json.dumps(snap) + "\n")


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so a reader sees the old or the new file, never a mix."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        print(f"agent: stats file {path}: {exc}", file=sys.stderr)


def open_delivery(s: Settings) -> Delivery:
    if s.deliver == "tun":
        return TunDelivery(tun_name(s.iface))
    return RawDelivery(s.cfg.vips[0])


def run(s: Settings, stop: StopFlag) -> int:
    core = Decapsulator(s.cfg)
    ring = RxRing(frames=s.ring_frames, frame_size=2048)
    sock = bpf.open_filtered(s.iface, bpf.ipip_filter(s.cfg.local_ip, None), setup=ring.setup)
    delivery: Delivery | None = None
    host: HostSetup | None = None
    stats = Stats(s, core, lambda: kernel_drops(sock)[1])
    try:
        delivery = open_delivery(s)
        plan = HostPlan(
            s.iface, s.cfg.local_ip, s.cfg.vips, delivery.name, s.server_mss, s.rps_cpus
        )
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
        serve(ring, core, delivery.send, stop, stats.tick, delivery.vnet_hdr, s.busy_poll_us)
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
    except (HostError, OSError) as exc:
        print(f"agent.decap: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
