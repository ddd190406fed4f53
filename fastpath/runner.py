"""One load-balancer process, from an LbConfig to exit: what `python -m fastpath.lb` runs.

`run(cfg)` learns the interface (MAC, address, MTU, next hop), builds the Balancer, and owns
until exit, restoring at exit (also on SIGINT/SIGTERM) what it changed: IFACE's offloads
(GRO/LRO/TSO/GSO off: fastpath.offload), an nftables netdev ingress table dropping VIP traffic
on IFACE so the host's own stack never answers it (fastpath.nft; the tap still sees the
frames), RPS of IFACE's receive queue (l4lb.rps), the receive ring and sockets, and the control
socket. Refuses to start (UsageError) when IPv4 forwarding is on in its namespace: the host
would route the VIP packets back into the fabric as well.

The receive loop (fastpath.forward over l4lb.rxloop) forwards; the control plane
(l4lb.plane) runs from the same loop: the control channel (l4lb.control, commands below), the
health probes of the backends (fastpath.healthsvc, when `health` is configured), the VIP
announcement (`announce`: fastpath.announce, made once forwarding works, just before the loop
runs, so BIRD exports the VIP only from an LB that forwards; its BFD answers come from this
loop, so a hung loop is withdrawn), and the stats tick (a JSON line and the stats file every
`stats_interval`).

Signals: SIGTERM or SIGINT, while announcing, is a graceful stop (fastpath.drain): withdraw,
keep forwarding until the ToR has moved the traffic away, then stop; a second one stops at
once. Without the announcement the first one stops at once. At cleanup the announcement goes
first (its TUN is deleted: BIRD withdraws at once, whatever else is still to undo).

Control commands: `show` (the stats snapshot, fastpath.stats.LbStats, live), `health` (its
health part), `ping`, and the backend set's (fastpath.backend_commands: `backends`,
`backends.replace`, `backend.add`, ...), applied through the `Backends` object this process
keeps (fastpath.backends), which is also what the health probes report to (`set_health`,
`probe_targets`).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any

from fastpath import bfd
from fastpath.announce import AnnounceConfig, Announcer, tun_name
from fastpath.backend_commands import backend_commands
from fastpath.backends import BackendError, Backends, BackendSpec
from fastpath.balancer import Balancer
from fastpath.config import BalancerConfig, LbConfig
from fastpath.drain import DrainService
from fastpath.flow_commands import flow_commands
from fastpath.forward import Forwarder
from fastpath.healthsvc import LbHealth
from fastpath.neigh import NextHop, interface_info
from fastpath.nft import VipDrop
from fastpath.offload import Offloads
from fastpath.stats import CoreStats, FlowStats, LbStats
from l4lb import bpf, rps
from l4lb.control import Command, ControlServer, default_socket
from l4lb.errors import ConfigError, UsageError
from l4lb.plane import Plane
from l4lb.ring import RxRing, kernel_drops
from l4lb.statsfile import StatsWriter, default_path
from l4lb.tx import ZeroCopySender, open_tx_socket
from l4lb.wire import format_mac, parse_mac

IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
CONTROL_EVERY = 0.005
"""Seconds between two looks at the control socket while forwarding (requests wait at most
this long under load; idle, the loop wakes for them at once)."""


class Stop(Exception):
    """SIGINT/SIGTERM arrived before the forwarding loop started."""


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


def if_index(ifname: str) -> int:
    try:
        return socket.if_nametoindex(ifname)
    except OSError:
        raise UsageError(f"no interface {ifname!r} in this namespace") from None


class ControlService:
    """The control channel as a plane service: looked at every CONTROL_EVERY while busy."""

    def __init__(self, server: ControlServer) -> None:
        self.server = server

    def fds(self) -> Sequence[int]:
        return self.server.fds()

    def service(self, now: float) -> float:
        self.server.service()
        return now + CONTROL_EVERY


def balancer_config(cfg: LbConfig) -> tuple[BalancerConfig, NextHop | None]:
    """The core's configuration, with what the interface says (MAC, address, MTU, next hop)."""
    local_mac, if_ip, mtu = interface_info(cfg.iface)
    local_ip = cfg.local_ip or if_ip
    if local_ip is None:
        raise UsageError(f"{cfg.iface} has no IPv4 address; give --local-ip")
    next_hop: NextHop | None = None
    if cfg.next_hop_mac:
        nh_mac = parse_mac(cfg.next_hop_mac)
    else:
        if not cfg.backends:
            raise UsageError("no backends: give --next-hop-mac or at least one --backend")
        next_hop = NextHop(cfg.backends[0][0], cfg.iface)
        nh_mac = next_hop.resolve()
    try:
        core = BalancerConfig(
            vips=cfg.vips,
            backends=cfg.backends,
            local_ip=local_ip,
            local_mac=local_mac,
            next_hop_mac=nh_mac,
            hash_seed=cfg.hash_seed,
            conn_capacity=cfg.conn_capacity,
            conn_idle_timeout=cfg.conn_idle_timeout,
            conn_half_open_capacity=cfg.conn_half_open_capacity,
            conn_half_open_timeout=cfg.conn_half_open_timeout,
            conn_insert_rate=cfg.conn_insert_rate,
            mtu=mtu,
        )
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    return core, next_hop


def announce_config(cfg: LbConfig) -> AnnounceConfig:
    """The announcement of an LB on cfg.iface, with the configuration's BFD timers."""
    interval = cfg.bfd_interval_ms / 1000
    timers = bfd.SessionConfig(interval, interval, cfg.bfd_multiplier)
    return AnnounceConfig(tun=tun_name(cfg.iface), bfd=timers)


def log(message: str) -> None:
    print(f"fastpath.lb: {message}", file=sys.stderr, flush=True)


def make_backends(cfg: LbConfig, core: BalancerConfig, balancer: Balancer, now: float) -> Backends:
    """The backend set at start (the configuration's, administrative states included)."""
    down = set(cfg.backends_down)
    specs = [BackendSpec(ip, w, "down" if ip in down else "up") for ip, w in cfg.backends]
    forbidden = {ip: "a VIP" for ip, _ in cfg.vips}
    forbidden[core.local_ip] = "this load balancer's own address"
    try:
        return Backends(balancer, specs, now, dict(cfg.names), forbidden)
    except BackendError as exc:
        raise UsageError(f"backends: {exc}") from None


def run(cfg: LbConfig) -> int:
    """Run the load balancer until SIGINT/SIGTERM; 0, or 1 when the cleanup failed."""
    ifname = cfg.iface
    ifindex = if_index(ifname)
    check_forwarding_off()
    core, next_hop = balancer_config(cfg)
    balancer = Balancer(core)
    backends = make_backends(cfg, core, balancer, time.monotonic())
    if cfg.stats_file == "":
        stats_path = None
    else:
        stats_path = Path(cfg.stats_file) if cfg.stats_file else default_path("lb", ifname)
    writer = StatsWriter(stats_path, "fastpath.lb")

    forwarder: Forwarder | None = None
    announcer: Announcer | None = None
    drainer: DrainService | None = None

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if forwarder is None:
            raise Stop
        if drainer is not None and drainer.request():
            return  # the first: withdraw and drain (the plane's DrainService)
        forwarder.stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    if cfg.cpu is not None:
        try:
            os.sched_setaffinity(0, {cfg.cpu})
        except (OSError, ValueError) as exc:
            raise UsageError(f"--cpu {cfg.cpu}: {exc}") from None

    offloads = Offloads(ifname)
    vip_drop = VipDrop(ifname, cfg.vips)
    steer: rps.Rps | None = None
    ring = RxRing(cfg.ring_frames)
    sock = txsock = None
    control: ControlServer | None = None
    health: LbHealth | None = None
    started = time.monotonic()
    mono_to_wall = time.time() - started
    kdrops = 0
    try:
        mask = rps.parse_mask(cfg.rps_cpus, "--rps-cpus")
        if cfg.rps_cpus == "auto" and not (mask and rps.sys_matches(ifname, ifindex)):
            mask = None  # auto: only where it can be done (pinned, /sys showing this namespace)
        if mask is not None:
            try:
                steer = rps.Rps(ifname, mask, ifindex)
            except UsageError as exc:
                raise UsageError(f"--rps-cpus: {exc}") from None
        if not cfg.keep_offloads:
            offloads.apply()
        if cfg.nft:
            vip_drop.install()
        sock = bpf.open_filtered(ifname, bpf.ipv4_dst_filter(cfg.vips), setup=ring.setup)
        txsock = open_tx_socket(ifname)
        sender = ZeroCopySender(txsock, ring.slots)
        forwarder = Forwarder(
            ring.slots, sock.fileno(), sender, balancer, cfg.batch, cfg.busy_poll_us
        )
        last = [started, 0, 0]

        def snapshot(now: float, final: bool = False, advance: bool = True) -> dict[str, Any]:
            """The stats; `advance` starts the next rate interval (the stats tick does)."""
            nonlocal kdrops
            assert forwarder is not None and sock is not None
            io = forwarder.io
            kdrops += kernel_drops(sock)[1]
            dt = max(now - last[0], 1e-9)
            if advance:
                backends.tick(now)
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
                backends=backends.stats(now, time.time()),
                fail_open=backends.fail_open,
                table=backends.table,
                next_hop_mac=format_mac(next_hop.mac if next_hop else core.next_hop_mac),
                rps_cpus=steer.mask if steer is not None else None,
                nft_dropped=vip_drop.dropped() if vip_drop.installed and final else None,
                announce=announcer.stats(mono_to_wall) if announcer is not None else None,
                drain=drainer.drain.stats(mono_to_wall) if drainer is not None else None,
                health=health.stats(now) if health is not None else None,
                flows=FlowStats.of(balancer.conntrack),
            )
            if advance:
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

        commands: dict[str, Command] = {
            "show": Command(
                lambda req: snapshot(time.monotonic(), advance=False),
                "counters, rates and state now (the stats file's fields)",
            ),
            "health": Command(
                lambda req: asdict(health.stats(time.monotonic())) if health else None,
                "the backends' health as this LB sees it (null without health checks)",
            ),
            "ping": Command(
                lambda req: {"pid": os.getpid(), "uptime_s": round(time.monotonic() - started, 3)},
                "is the process alive and its loop turning",
            ),
            **backend_commands(backends, time.monotonic),
            **flow_commands(balancer),
        }
        plane = Plane(name="fastpath.lb")
        if cfg.health is not None:
            health = LbHealth(cfg.health, backends, core.local_ip, cfg.vips[0][0], time.monotonic())
            plane.add(health)
        if cfg.control_socket != "":
            control = ControlServer(cfg.control_socket or default_socket("lb", ifname), commands)
            plane.add(ControlService(control))

        vip_text = ", ".join(f"{ip}:{p or '*'}" for ip, p in cfg.vips)
        backend_text = ", ".join(
            f"{cfg.name_of(ip) or ip}={w}" if cfg.name_of(ip) else f"{ip}={w}"
            for ip, w in cfg.backends
        )
        print(
            f"fastpath.lb: {ifname} {core.local_ip} -> next hop {format_mac(core.next_hop_mac)}; "
            f"VIPs {vip_text}; backends {backend_text}"
            + (f"; control {control.path}" if control else ""),
            file=sys.stderr,
            flush=True,
        )
        writer.emit(snapshot(time.monotonic()))
        if cfg.announce:  # forwarding works: announce from now on
            announcer = Announcer(announce_config(cfg), time.monotonic())
            drainer = DrainService(announcer, lambda: balancer.counters.total, forwarder.stop, log)
            plane.add(announcer)
            plane.add(drainer)
            signal.set_wakeup_fd(drainer.wakeup_fd, warn_on_full_buffer=False)
            log(f"announcing {vip_text} through {announcer.tun} (BFD {cfg.bfd_interval_ms} ms "
                f"x {cfg.bfd_multiplier})")  # fmt: skip
        forwarder.run(tick, cfg.stats_interval, plane)
        writer.emit(snapshot(time.monotonic(), final=True))
    except Stop:
        pass
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if drainer is not None:
            signal.set_wakeup_fd(-1)
        errors = _cleanup(ring, sock, txsock, vip_drop, offloads, steer, control, health, announcer)
        if drainer is not None:
            drainer.close()
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
    control: ControlServer | None,
    health: LbHealth | None = None,
    announcer: Announcer | None = None,
) -> list[str]:
    """Undo everything, each step even if an earlier one failed; returns the failures."""
    errors: list[str] = []
    steps = [
        *((announcer.close,) if announcer is not None else ()),
        *((control.close,) if control is not None else ()),
        *((health.close,) if health is not None else ()),
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
