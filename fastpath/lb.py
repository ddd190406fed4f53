"""The load balancer process: `python -m fastpath.lb IFACE [options]`.

Taps IPv4 to the VIPs on IFACE (AF_PACKET, TPACKET_V2 ring, classic BPF filter), lets
fastpath.balancer choose the backend and encapsulate, and sends the IP-in-IP frames back out of
IFACE to the next hop with sendmmsg. Defaults come from the deployment configuration
(controller/deployment.json: VIP 20.0.0.1:80, backends h3 h7 h11 h15, hash seed).

While it runs it owns, and at exit (also on SIGINT/SIGTERM) restores:
- IFACE's offloads (GRO/LRO/TSO/GSO off: fastpath.offload);
- an nftables netdev ingress table dropping VIP traffic on IFACE, so the LB host's own stack
  never answers it (fastpath.nft; the tap still sees the frames);
- RPS of IFACE's receive queue (--rps-cpus; by default, when the process is pinned, the CPUs
  it may not run on, so the receive softirq never shares the LB's core: receive livelock).
Refuses to start (exit 2) when IPv4 forwarding is on in its namespace: the host would route
the VIP packets back into the fabric as well.

Counters: one JSON line on stdout every --stats-interval seconds and at exit; the latest
snapshot is in --stats-file (default /run/l4lb/lb-IFACE.json); fields in fastpath.stats.
Exit status: 0 after a signal, 1 on a runtime failure, 2 on bad arguments or refusal.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from fastpath.balancer import Balancer
from fastpath.config import BalancerConfig
from fastpath.forward import Forwarder
from fastpath.neigh import NextHop, interface_info
from fastpath.nft import VipDrop
from fastpath.offload import Offloads
from fastpath.stats import CoreStats, LbStats
from l4lb import bpf, rps
from l4lb.busypoll import add_busy_poll_option, busy_poll_error
from l4lb.errors import ConfigError, L4lbError, UsageError
from l4lb.ring import RxRing, kernel_drops
from l4lb.statsfile import StatsWriter, default_path
from l4lb.tx import ZeroCopySender, open_tx_socket
from l4lb.wire import format_mac, parse_mac

IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


class Stop(Exception):
    """SIGINT/SIGTERM arrived before the forwarding loop started."""


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


def positive_int(text: str) -> int:
    try:
        v = int(text)
        if v <= 0:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer > 0, not {text!r}") from None
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastpath.lb",
        description="L4 load balancer on an AF_PACKET ring: IP-in-IP to backends chosen by a "
        "flow hash into a rendezvous-hashed lookup table.",
    )
    p.add_argument("iface", metavar="IFACE", help="interface to tap and send on, e.g. h1-eth0")
    p.add_argument(
        "--vip",
        action="append",
        type=parse_vip,
        metavar="IP[:PORT]",
        help="virtual service (repeatable; no port: every port). "
        "Default: the deployment's VIP and ports",
    )
    p.add_argument(
        "--backend",
        action="append",
        type=parse_backend,
        metavar="IP[=WEIGHT]",
        help="real server (repeatable; an IP or a deployment host name such as h3; "
        "weight 0 drains). Default: the deployment's backends",
    )
    p.add_argument(
        "--config", metavar="FILE", help="deployment JSON (default: controller/deployment.json)"
    )
    p.add_argument(
        "--stats-interval",
        type=positive_float,
        default=1.0,
        metavar="S",
        help="seconds between JSON counter lines on stdout (default 1)",
    )
    p.add_argument(
        "--stats-file",
        metavar="PATH",
        help="latest counters as JSON (default /run/l4lb/lb-IFACE.json; '-' for none)",
    )
    p.add_argument("--cpu", type=int, metavar="N", help="pin the forwarding loop to CPU N")
    p.add_argument(
        "--rps-cpus",
        metavar="auto|off|HEXMASK",
        default="auto",
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
        default=256,
        metavar="N",
        help="frames per receive/send batch (default 256, at most 256)",
    )
    add_busy_poll_option(p)
    p.add_argument(
        "--ring-frames",
        type=positive_int,
        default=16384,
        metavar="N",
        help="receive ring size in frames, 2 KiB each (default 16384: 32 MiB, about 55 ms of "
        "traffic at 300,000 frames/s to ride out a pause of the loop)",
    )
    p.add_argument(
        "--conn-capacity",
        type=positive_int,
        metavar="N",
        help="most tracked flows (default 1,000,000)",
    )
    p.add_argument(
        "--conn-timeout",
        type=positive_float,
        metavar="S",
        help="idle seconds before a tracked flow may be forgotten (default 60)",
    )
    p.add_argument(
        "--keep-offloads", action="store_true", help="leave IFACE's offloads as they are"
    )
    p.add_argument(
        "--no-nft",
        action="store_true",
        help="do not install the nftables ingress drop of VIP traffic",
    )
    return p


def resolve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """VIPs, backends and hash seed from the arguments over the deployment defaults."""
    from controller.deployment import load_deployment

    try:
        dep = load_deployment(args.config)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load deployment {args.config or '(default)'}: {exc}") from None
    vips = args.vip or (
        [(dep.vip, port) for port in dep.vip_ports] if dep.vip_ports else [(dep.vip, None)]
    )
    backends = []
    for name, weight in args.backend or dep.backend_ips():
        try:
            ipaddress.IPv4Address(name)
            ip = name
        except ValueError:
            try:
                ip = dep.topology.host_ip(name)
            except (KeyError, ValueError):
                raise UsageError(
                    f"--backend {name!r} is neither an IPv4 address nor a host of the topology"
                ) from None
        backends.append((ip, weight))
    return {"vips": tuple(vips), "backends": tuple(backends), "hash_seed": dep.hash_seed}


def check_forwarding_off() -> None:
    try:
        on = IP_FORWARD.read_text().strip() != "0"
    except OSError:
        return
    if on:
        raise UsageError(
            "refusing to start: net.ipv4.ip_forward is 1 in this namespace, so the host would "
            "also route VIP packets back into the fabric (run `sysctl -w net.ipv4.ip_forward=0`)"
        )


def socket_if_nametoindex(ifname: str) -> int:
    try:
        return socket.if_nametoindex(ifname)
    except OSError:
        raise UsageError(f"no interface {ifname!r} in this namespace") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UsageError as exc:
        print(f"fastpath.lb: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, L4lbError, RuntimeError) as exc:
        print(f"fastpath.lb: {exc}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace) -> int:
    if args.batch > 256:
        raise UsageError(f"--batch {args.batch}: at most 256")
    if why := busy_poll_error(args.busy_poll_us):
        raise UsageError(why)
    ifname = args.iface
    ifindex = socket_if_nametoindex(ifname)
    settings = resolve_settings(args)
    check_forwarding_off()
    local_mac, if_ip, mtu = interface_info(ifname)
    local_ip = args.local_ip or if_ip
    if local_ip is None:
        raise UsageError(f"{ifname} has no IPv4 address; give --local-ip")
    next_hop: NextHop | None = None
    if args.next_hop_mac:
        try:
            nh_mac = parse_mac(args.next_hop_mac)
        except ConfigError as exc:
            raise UsageError(f"--next-hop-mac: {exc}") from None
    else:
        if not settings["backends"]:
            raise UsageError("no backends: give --next-hop-mac or at least one --backend")
        next_hop = NextHop(settings["backends"][0][0], ifname)
        nh_mac = next_hop.resolve()
    extra: dict[str, Any] = {}
    if args.conn_capacity:
        extra["conn_capacity"] = args.conn_capacity
    if args.conn_timeout:
        extra["conn_idle_timeout"] = args.conn_timeout
    try:
        cfg = BalancerConfig(
            vips=settings["vips"],
            backends=settings["backends"],
            local_ip=local_ip,
            local_mac=local_mac,
            next_hop_mac=nh_mac,
            hash_seed=settings["hash_seed"],
            mtu=mtu,
            **extra,
        )
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    balancer = Balancer(cfg)
    if args.stats_file == "-":
        stats_path = None
    else:
        stats_path = Path(args.stats_file) if args.stats_file else default_path("lb", ifname)
    writer = StatsWriter(stats_path, "fastpath.lb")

    forwarder: Forwarder | None = None

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if forwarder is not None:
            forwarder.stop()
        else:
            raise Stop

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    if args.cpu is not None:
        try:
            os.sched_setaffinity(0, {args.cpu})
        except (OSError, ValueError) as exc:
            raise UsageError(f"--cpu {args.cpu}: {exc}") from None

    offloads = Offloads(ifname)
    vip_drop = VipDrop(ifname, [ip for ip, _ in cfg.vips])
    steer: rps.Rps | None = None
    ring = RxRing(args.ring_frames)
    sock = txsock = None
    started = time.monotonic()
    kdrops = 0
    try:
        mask = rps.parse_mask(args.rps_cpus, "--rps-cpus")
        if args.rps_cpus == "auto" and not (mask and rps.sys_matches(ifname, ifindex)):
            mask = None  # auto: only where it can be done (pinned, /sys showing this namespace)
        if mask is not None:
            try:
                steer = rps.Rps(ifname, mask, ifindex)
            except UsageError as exc:
                raise UsageError(f"--rps-cpus: {exc}") from None
        if not args.keep_offloads:
            offloads.apply()
        if not args.no_nft:
            vip_drop.install()
        sock = bpf.open_filtered(ifname, bpf.ipv4_dst_filter(cfg.vips), setup=ring.setup)
        txsock = open_tx_socket(ifname)
        sender = ZeroCopySender(txsock, ring.slots)
        forwarder = Forwarder(
            ring.slots, sock.fileno(), sender, balancer, args.batch, args.busy_poll_us
        )
        last = [started, 0, 0]

        def snapshot(now: float, final: bool = False) -> dict[str, Any]:
            nonlocal kdrops
            assert forwarder is not None and sock is not None
            io = forwarder.io
            kdrops += kernel_drops(sock)[1]
            dt = max(now - last[0], 1e-9)
            snap = LbStats(
                time=round(time.time(), 3),
                iface=ifname,
                pid=os.getpid(),
                uptime_s=round(now - started, 3),
                final=final,
                rx_pps=round((io.rx_frames - last[1]) / dt),
                tx_pps=round((io.tx_frames - last[2]) / dt),
                core=CoreStats.of(balancer.counters),
                io=io,
                kernel_drops=kdrops,
                tracked_flows=len(balancer.conntrack),
                next_hop_mac=format_mac(next_hop.mac if next_hop else nh_mac),
                rps_cpus=steer.mask if steer is not None else None,
                nft_dropped=vip_drop.dropped() if vip_drop.installed and final else None,
            )
            last[:] = [now, io.rx_frames, io.tx_frames]
            return snap.as_dict()

        warned = False

        def tick(now: float) -> None:
            nonlocal warned
            if next_hop is not None:
                mac = next_hop.refresh(now)
                if mac is not None:
                    balancer.set_next_hop_mac(mac)
            writer.emit(snapshot(now))
            if forwarder is not None and forwarder.rx_truncated and not warned:
                warned = True  # once: the counter keeps the count
                print(
                    f"fastpath.lb: warning: {forwarder.rx_truncated} frames larger than a "
                    f"ring slot arrived on {ifname} (dropped, counted as io.rx_truncated). "
                    "Segmentation offload upstream hands the tap unsegmented TCP super-frames: "
                    f"turn off tso and gso on the interface at the other end of {ifname}.",
                    file=sys.stderr,
                    flush=True,
                )

        vip_text = ", ".join(f"{ip}:{p or '*'}" for ip, p in cfg.vips)
        backend_text = ", ".join(f"{ip}={w}" for ip, w in cfg.backends)
        print(
            f"fastpath.lb: {ifname} {local_ip} -> next hop {format_mac(nh_mac)}; "
            f"VIPs {vip_text}; backends {backend_text}",
            file=sys.stderr,
            flush=True,
        )
        writer.emit(snapshot(time.monotonic()))
        forwarder.run(tick, args.stats_interval)
        writer.emit(snapshot(time.monotonic(), final=True))
    except Stop:
        pass
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        errors = _cleanup(ring, sock, txsock, vip_drop, offloads, steer)
    for err in errors:
        print(f"fastpath.lb: cleanup: {err}", file=sys.stderr)
    return 1 if errors else 0


def _cleanup(
    ring: RxRing,
    sock: Any,
    txsock: Any,
    vip_drop: VipDrop,
    offloads: Offloads,
    steer: rps.Rps | None,
) -> list[str]:
    """Undo everything, each step even if an earlier one failed; returns the failures."""
    errors: list[str] = []
    steps = [
        ring.close,
        *(s.close for s in (sock, txsock) if s is not None),
        vip_drop.remove,
        offloads.restore,
        *((steer.restore,) if steer is not None else ()),
    ]
    for step in steps:
        try:
            step()
        except Exception as exc:
            errors.append(str(exc))
    return errors


if __name__ == "__main__":
    sys.exit(main())
