"""The load balancer's command line: `python -m fastpath.lb IFACE [--config FILE] [options]`.

Taps IPv4 to the VIPs on IFACE (AF_PACKET, TPACKET_V2 ring, classic BPF filter), lets
fastpath.balancer choose the backend and encapsulate, and sends the IP-in-IP frames back out of
IFACE to the next hop with sendmmsg (fastpath.runner runs the process).

Settings: the configuration file the controller renders for each LB (`--config`, by default
/run/l4lb/config/lb-IFACE.json when it exists; fastpath.config.LbConfig lists every field),
each command-line option replacing one field. Without a file, --vip and --backend are needed.
The data plane reads no deployment or topology itself: the controller renders them.

Counters: one JSON line on stdout every --stats-interval seconds and at exit; the latest
snapshot is in --stats-file (default /run/l4lb/lb-IFACE.json); fields in fastpath.stats. The
control channel (default /run/l4lb/lb-IFACE.ctl, root only; l4lb.control) answers `show`.
With `--workers N` (N > 1) this process supervises N forwarding processes (fastpath.workers).
Exit status: 0 after a signal, 1 on a runtime failure (a worker that died included), 2 on bad
arguments or refusal.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fastpath.config import BATCH_MAX, MAX_WORKERS, LbConfig
from fastpath.conntrack import HALF_OPEN_CAPACITY, HALF_OPEN_TIMEOUT, INSERT_RATE
from fastpath.runner import run
from l4lb import cfgfile
from l4lb.busypoll import add_busy_poll_option
from l4lb.errors import ConfigError, L4lbError, UsageError
from l4lb.healthcfg import HealthConfig
from l4lb.statsfile import STATS_DIR

CONFIG_DIR = STATS_DIR / "config"
"""Where the controller renders each process's configuration (controller.render)."""


def default_config_path(ifname: str) -> Path:
    return CONFIG_DIR / f"lb-{ifname}.json"


def parse_vip(text: str) -> tuple[str, int | None]:
    """'20.0.0.1' or '20.0.0.1:80'."""
    ip, sep, port = text.partition(":")
    try:
        ipaddress.IPv4Address(ip)
        if not sep:
            return ip, None
        p = int(port)
        if not 0 < p < 65536:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad --vip {text!r} (expected IPv4[:PORT], e.g. 20.0.0.1:80)"
        ) from None
    return ip, p


def parse_backend(text: str) -> tuple[str, int]:
    """'10.2.3.2' or '10.2.3.2=3' (weight, 0 drains) or a host name of the deployment."""
    ip, sep, weight = text.partition("=")
    try:
        w = int(weight) if sep else 1
        if w < 0:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad --backend {text!r}: weight must be an integer >= 0 (IP[=WEIGHT])"
        ) from None
    return ip, w


def positive_float(text: str) -> float:
    try:
        v = float(text)
        if not v > 0:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, not {text!r}") from None
    return v


def int_range(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer lo..hi (no upper bound when `hi` is None)."""
    bound = f"{lo}..{hi}" if hi is not None else "> 0" if lo == 1 else f">= {lo}"

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = lo - 1
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, not {text!r}")
        return v

    return parse


positive_int = int_range(1)
non_negative_int = int_range(0)
workers_count = int_range(1, MAX_WORKERS)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastpath.lb",
        description="L4 load balancer on an AF_PACKET ring: IP-in-IP to backends chosen by a "
        "flow hash into a rendezvous-hashed lookup table. Settings come from --config (the "
        "file `python -m controller up` renders for each LB); options override them.",
    )
    p.add_argument("iface", metavar="IFACE", help="interface to tap and send on, e.g. h1-eth0")
    p.add_argument(
        "--config",
        metavar="FILE",
        help=f"configuration file (default {CONFIG_DIR}/lb-IFACE.json when it exists)",
    )
    p.add_argument(
        "--vip",
        action="append",
        type=parse_vip,
        metavar="IP[:PORT]",
        help="virtual service (repeatable; no port: every port); replaces the file's",
    )
    p.add_argument(
        "--backend",
        action="append",
        type=parse_backend,
        metavar="IP[=WEIGHT]",
        help="real server (repeatable; an IP, or a host name the configuration knows such as "
        "h3; weight 0 drains); replaces the file's",
    )
    p.add_argument(
        "--stats-interval",
        type=positive_float,
        metavar="S",
        help="seconds between JSON counter lines on stdout (default 1)",
    )
    p.add_argument(
        "--stats-file",
        metavar="PATH",
        help="latest counters as JSON (default /run/l4lb/lb-IFACE.json; '-' for none)",
    )
    p.add_argument(
        "--control-socket",
        metavar="PATH",
        help="control channel, root only (default /run/l4lb/lb-IFACE.ctl; '-' for none)",
    )
    p.add_argument("--cpu", type=int, metavar="N", help="pin the forwarding loop to CPU N")
    p.add_argument(
        "--workers",
        type=workers_count,
        metavar="N",
        help=f"forwarding processes (default 1: this one; 2..{MAX_WORKERS}: this process "
        "supervises N workers sharing IFACE by flow hash, worker i pinned to the i-th CPU it "
        "may use, round robin; fastpath.workers)",
    )
    p.add_argument(
        "--rps-cpus",
        metavar="auto|off|HEXMASK",
        help="steer IFACE's receive softirq to these CPUs (RPS), restored at exit; auto "
        "(default): the CPUs this process may not run on, when it is pinned (--cpu or "
        "taskset), else left alone; off: left alone; e.g. 2 for CPU 1",
    )
    p.add_argument("--local-ip", metavar="IP", help="outer source address (default: IFACE's)")
    p.add_argument(
        "--next-hop-mac",
        metavar="MAC",
        help="Ethernet destination (default: learned from the neighbour table)",
    )
    p.add_argument(
        "--batch",
        type=positive_int,
        metavar="N",
        help=f"frames per receive/send batch (default {BATCH_MAX}, at most {BATCH_MAX})",
    )
    add_busy_poll_option(p, default=None)
    p.add_argument(
        "--ring-frames",
        type=positive_int,
        metavar="N",
        help="receive ring size in frames, 2 KiB each (default 16384: 32 MiB, about 55 ms of "
        "traffic at 300,000 frames/s to ride out a pause of the loop)",
    )
    p.add_argument(
        "--conn-capacity",
        type=positive_int,
        metavar="N",
        help="most established flows tracked (default 1,000,000; half-open ones: "
        "--conn-half-open-capacity)",
    )
    p.add_argument(
        "--conn-timeout",
        type=positive_float,
        metavar="S",
        help="idle seconds before a tracked flow may be forgotten (default 60)",
    )
    p.add_argument(
        "--conn-half-open-capacity",
        type=positive_int,
        metavar="N",
        help=f"most half-open flows (a SYN seen, nothing else yet), held apart from the "
        f"established ones (default {HALF_OPEN_CAPACITY:,}; at least 2)",
    )
    p.add_argument(
        "--conn-half-open-timeout",
        type=positive_float,
        metavar="S",
        help=f"idle seconds before a half-open flow may be forgotten (default "
        f"{HALF_OPEN_TIMEOUT:g}; at most --conn-timeout)",
    )
    p.add_argument(
        "--conn-insert-rate",
        type=non_negative_int,
        metavar="N",
        help=f"most new flows tracked per second (default {INSERT_RATE:,}; 0: no cap); "
        "flows over it are forwarded by the lookup table without being tracked",
    )
    p.add_argument(
        "--keep-offloads",
        action="store_true",
        default=None,
        help="leave IFACE's offloads as they are",
    )
    p.add_argument(
        "--health",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="probe the backends' agents through the tunnel and apply their health (the "
        "file's settings, else l4lb.healthcfg's defaults); --no-health: every backend counts "
        "as healthy (the default without a file)",
    )
    p.add_argument(
        "--no-nft",
        dest="nft",
        action="store_false",
        default=None,
        help="do not install the nftables ingress drop of VIP traffic",
    )
    p.add_argument(
        "--announce",
        dest="announce",
        action="store_true",
        default=None,
        help="announce the VIPs by BGP through this host's BIRD once forwarding (a TUN "
        "l4an-IFACE and BFD on it; SIGTERM withdraws and drains first)",
    )
    p.add_argument("--no-announce", dest="announce", action="store_false", help="do not announce")
    return p


def resolve_config(args: argparse.Namespace) -> LbConfig:
    """The configuration file (if any) with the command line's options over it."""
    path = args.config
    if path is None and default_config_path(args.iface).exists():
        path = str(default_config_path(args.iface))
    base: LbConfig | None = None
    if path is not None:
        try:
            base = cfgfile.load(LbConfig, path)
        except ConfigError as exc:
            raise UsageError(f"--config: {exc}") from None
        if base.iface != args.iface:
            raise UsageError(f"--config {path} is for {base.iface}, not {args.iface}")
    names = dict((name, ip) for ip, name in base.names) if base else {}
    given: dict[str, Any] = {}
    if args.vip:
        given["vips"] = tuple(args.vip)
    if args.backend:
        backends = []
        for name, weight in args.backend:
            try:
                ipaddress.IPv4Address(name)
                ip = name
            except ValueError:
                if name not in names:
                    known = ", ".join(sorted(names)) or "none: give IPv4 addresses"
                    raise UsageError(
                        f"--backend {name!r} is neither an IPv4 address nor a host the "
                        f"configuration knows ({known})"
                    ) from None
                ip = names[name]
            backends.append((ip, weight))
        given["backends"] = tuple(backends)
    for option, field in (
        ("stats_interval", "stats_interval"),
        ("cpu", "cpu"),
        ("workers", "workers"),
        ("rps_cpus", "rps_cpus"),
        ("local_ip", "local_ip"),
        ("next_hop_mac", "next_hop_mac"),
        ("batch", "batch"),
        ("busy_poll_us", "busy_poll_us"),
        ("ring_frames", "ring_frames"),
        ("conn_capacity", "conn_capacity"),
        ("conn_timeout", "conn_idle_timeout"),
        ("conn_half_open_capacity", "conn_half_open_capacity"),
        ("conn_half_open_timeout", "conn_half_open_timeout"),
        ("conn_insert_rate", "conn_insert_rate"),
        ("keep_offloads", "keep_offloads"),
        ("nft", "nft"),
        ("announce", "announce"),
    ):
        value = getattr(args, option)
        if value is not None:
            given[field] = value
    if args.health is not None:
        given["health"] = (
            ((base.health if base else None) or HealthConfig()) if args.health else None
        )
    for option, field in (("stats_file", "stats_file"), ("control_socket", "control_socket")):
        value = getattr(args, option)
        if value is not None:
            given[field] = "" if value == "-" else value
    try:
        if base is not None:
            return dataclasses.replace(base, **given)
        if "vips" not in given or "backends" not in given:
            raise UsageError(
                f"no configuration for {args.iface}: give --config FILE (`python -m controller "
                f"up` renders one per LB in {CONFIG_DIR}) or --vip and --backend"
            )
        return LbConfig(iface=args.iface, **given)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = resolve_config(args)
        return run(cfg)
    except UsageError as exc:
        print(f"fastpath.lb: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, L4lbError, RuntimeError) as exc:
        print(f"fastpath.lb: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
