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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any

from fastpath import bfd
from fastpath.announce import AnnounceConfig, Announcer, tun_name
from fastpath.backend_commands import backend_commands
from fastpath.backends import BackendError, Backends, BackendSpec, PacketCore
from fastpath.balancer import Balancer
from fastpath.config import BalancerConfig, LbConfig
from fastpath.drain import DrainService
from fastpath.flow_commands import flow_commands
from fastpath.forward import Forwarder
from fastpath.healthsvc import LbHealth
from fastpath.neigh import NextHop, interface_info
from fastpath.nft import VipDrop
from fastpath.offload import Offloads
from fastpath.stats import CoreStats, FlowStats, IoStats, LbStats
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


def make_backends(
    cfg: LbConfig, core: BalancerConfig, balancer: PacketCore, now: float
) -> Backends:
    """The backend set at start (the configuration's, administrative states included)."""
    down = set(cfg.backends_down)
    specs = [BackendSpec(ip, w, "down" if ip in down else "up") for ip, w in cfg.backends]
    forbidden = {ip: "a VIP" for ip, _ in cfg.vips}
    forbidden[core.local_ip] = "this load balancer's own address"
    try:
        return Backends(balancer, specs, now, dict(cfg.names), forbidden)
    except BackendError as exc:
        raise UsageError(f"backends: {exc}") from None


def steer_rps(cfg: LbConfig, ifindex: int) -> rps.Rps | None:
    """RPS of cfg.iface's receive queue as cfg.rps_cpus says (restored by Rps.restore), or
    None when it is left alone."""
    mask = rps.parse_mask(cfg.rps_cpus, "--rps-cpus")
    if cfg.rps_cpus == "auto" and not (mask and rps.sys_matches(cfg.iface, ifindex)):
        mask = None  # auto: only where it can be done (pinned, /sys showing this namespace)
    if mask is None:
        return None
    try:
        return rps.Rps(cfg.iface, mask, ifindex)
    except UsageError as exc:
        raise UsageError(f"--rps-cpus: {exc}") from None


class Reporter:
    """The LbStats snapshot from what the process keeps (one definition for the single process
    and the supervisor of workers, fastpath.workers); the caller gives the packet counters."""

    def __init__(
        self,
        ifname: str,
        backends: Backends,
        steer: rps.Rps | None,
        vip_drop: VipDrop,
        started: float,
    ) -> None:
        self.ifname, self.backends, self.steer, self.vip_drop = ifname, backends, steer, vip_drop
        self.started = started
        self.mono_to_wall = time.time() - time.monotonic()  # not `started`: time has passed
        self.last = (started, 0, 0)
        self.health: LbHealth | None = None
        self.announcer: Announcer | None = None
        self.drainer: DrainService | None = None

    def snapshot(
        self,
        now: float,
        final: bool,
        advance: bool,
        *,
        core: CoreStats,
        io: IoStats,
        kernel_drops: int,
        tracked_flows: int,
        next_hop_mac: str,
        flows: FlowStats,
        workers: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """The stats now; `advance` starts the next rate interval (the stats tick does)."""
        t0, rx0, tx0 = self.last
        dt = max(now - t0, 1e-9)
        if advance:
            self.backends.tick(now)
        vip_drop, mono_to_wall = self.vip_drop, self.mono_to_wall
        announcer, drainer, health = self.announcer, self.drainer, self.health
        snap = LbStats(
            time=round(time.time(), 3),
            iface=self.ifname,
            pid=os.getpid(),
            uptime_s=round(now - self.started, 3),
            final=final,
            rx_pps=round((io.rx_frames - rx0) / dt),
            tx_pps=round((io.tx_frames - tx0) / dt),
            core=core,
            io=io,
            kernel_drops=kernel_drops,
            tracked_flows=tracked_flows,
            backends=self.backends.stats(now, time.time()),
            fail_open=self.backends.fail_open,
            table=self.backends.table,
            next_hop_mac=next_hop_mac,
            rps_cpus=self.steer.mask if self.steer is not None else None,
            nft_dropped=vip_drop.dropped() if vip_drop.installed and final else None,
            announce=announcer.stats(mono_to_wall) if announcer is not None else None,
            drain=drainer.drain.stats(mono_to_wall) if drainer is not None else None,
            health=health.stats(now) if health is not None else None,
            workers=workers,
            flows=flows,
        )
        if advance:
            self.last = (now, io.rx_frames, io.tx_frames)
        return snap.as_dict()


def stats_writer(cfg: LbConfig) -> StatsWriter:
    """The JSON line on stdout and the stats file (cfg.stats_file: "" none, None default)."""
    if cfg.stats_file == "":
        return StatsWriter(None, "fastpath.lb")
    path = Path(cfg.stats_file) if cfg.stats_file else default_path("lb", cfg.iface)
    return StatsWriter(path, "fastpath.lb")


def warn_truncated(n: int, ifname: str) -> None:
    log(
        f"warning: {n} frames larger than a ring slot arrived on {ifname} (dropped, counted "
        "as io.rx_truncated). Segmentation offload upstream hands the tap unsegmented TCP "
        f"super-frames: turn off tso and gso on the interface at the other end of {ifname}."
    )


def lb_commands(
    snapshot: Callable[..., dict[str, Any]],
    reporter: Reporter,
    backends: Backends,
    ping_extra: Mapping[str, Any],
) -> dict[str, Command]:
    """The control requests of an LB process (the module docstring's list)."""

    def health(req: Mapping[str, Any]) -> Any:
        h = reporter.health
        return asdict(h.stats(time.monotonic())) if h is not None else None

    def ping(req: Mapping[str, Any]) -> dict[str, Any]:
        up = round(time.monotonic() - reporter.started, 3)
        return {"pid": os.getpid(), "uptime_s": up, **ping_extra}

    return {
        "show": Command(
            lambda req: snapshot(time.monotonic(), advance=False),
            "counters, rates and state now (the stats file's fields)",
        ),
        "health": Command(
            health, "the backends' health as this LB sees it (null without health checks)"
        ),
        "ping": Command(ping, "is the process alive and its loop turning"),
        **backend_commands(backends, time.monotonic),
    }


def control_plane(
    cfg: LbConfig,
    core: BalancerConfig,
    backends: Backends,
    commands: Mapping[str, Command],
    reporter: Reporter,
    plane: Plane,
) -> tuple[ControlServer | None, LbHealth | None]:
    """The health probes (when configured) and the control socket (unless "") on `plane`."""
    health = control = None
    if cfg.health is not None:
        health = LbHealth(cfg.health, backends, core.local_ip, cfg.vips[0][0], time.monotonic())
        plane.add(health)
        reporter.health = health
    if cfg.control_socket != "":
        control = ControlServer(cfg.control_socket or default_socket("lb", cfg.iface), commands)
        plane.add(ControlService(control))
    return control, health


def vip_text(cfg: LbConfig) -> str:
    return ", ".join(f"{ip}:{p or '*'}" for ip, p in cfg.vips)


def start_line(cfg: LbConfig, core: BalancerConfig, control: ControlServer | None) -> None:
    """The line on stderr saying what runs."""
    backend_text = ", ".join(
        f"{cfg.name_of(ip) or ip}={w}" if cfg.name_of(ip) else f"{ip}={w}" for ip, w in cfg.backends
    )
    log(
        f"{cfg.iface} {core.local_ip} -> next hop {format_mac(core.next_hop_mac)}; "
        f"VIPs {vip_text(cfg)}; backends {backend_text}"
        + (f"; control {control.path}" if control else "")
        + (f"; {cfg.workers} workers" if cfg.workers > 1 else "")
    )


def start_announcing(
    cfg: LbConfig,
    plane: Plane,
    reporter: Reporter,
    frames: Callable[[], int],
    stop: Callable[[], None],
) -> tuple[Announcer, DrainService]:
    """Announce the VIPs from now on; the first SIGTERM/SIGINT then drains (fastpath.drain),
    counting the VIP frames with `frames()` and ending the loop with `stop()`."""
    announcer = Announcer(announce_config(cfg), time.monotonic())
    drainer = DrainService(announcer, frames, stop, log)
    plane.add(announcer)
    plane.add(drainer)
    reporter.announcer, reporter.drainer = announcer, drainer
    signal.set_wakeup_fd(drainer.wakeup_fd, warn_on_full_buffer=False)
    log(f"announcing {vip_text(cfg)} through {announcer.tun} (BFD {cfg.bfd_interval_ms} ms "
        f"x {cfg.bfd_multiplier})")  # fmt: skip
    return announcer, drainer


def run(cfg: LbConfig) -> int:
    """Run the load balancer until SIGINT/SIGTERM; 0, or 1 when the cleanup failed."""
    if cfg.workers > 1:
        from fastpath.workers import run_workers  # it builds on this module

        return run_workers(cfg)
    ifname = cfg.iface
    ifindex = if_index(ifname)
    check_forwarding_off()
    core, next_hop = balancer_config(cfg)
    balancer = Balancer(core)
    backends = make_backends(cfg, core, balancer, time.monotonic())
    writer = stats_writer(cfg)

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
    kdrops = 0
    try:
        steer = steer_rps(cfg, ifindex)
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
        reporter = Reporter(ifname, backends, steer, vip_drop, started)

        def snapshot(now: float, final: bool = False, advance: bool = True) -> dict[str, Any]:
            """The stats; `advance` starts the next rate interval (the stats tick does)."""
            nonlocal kdrops
            assert forwarder is not None and sock is not None
            kdrops += kernel_drops(sock)[1]
            return reporter.snapshot(
                now,
                final,
                advance,
                core=CoreStats.of(balancer.counters),
                io=forwarder.io,
                kernel_drops=kdrops,
                tracked_flows=len(balancer.conntrack),
                next_hop_mac=format_mac(next_hop.mac if next_hop else core.next_hop_mac),
                flows=FlowStats.of(balancer.conntrack),
            )

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
                warn_truncated(forwarder.rx_truncated, ifname)

        commands = {
            **lb_commands(snapshot, reporter, backends, {}),
            **flow_commands(balancer.flow),
        }
        plane = Plane(name="fastpath.lb")
        control, health = control_plane(cfg, core, backends, commands, reporter, plane)
        start_line(cfg, core, control)
        writer.emit(snapshot(time.monotonic()))
        if cfg.announce:  # forwarding works: announce from now on
            announcer, drainer = start_announcing(
                cfg, plane, reporter, lambda: balancer.counters.total, forwarder.stop
            )
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
    ring: RxRing | None,
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
        *((ring.close,) if ring is not None else ()),
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
