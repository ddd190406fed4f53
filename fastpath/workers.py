"""`python -m fastpath.lb IFACE --workers N` with N > 1: this process supervises N forwarding
workers (fastpath.worker), one per core.

The supervisor keeps what there is once per LB, as the single process does (fastpath.runner,
whose pieces it reuses): the backend set and its health (fastpath.backends, healthsvc), the
control socket, the VIP announcement and graceful drain, nftables, offloads, RPS, the stats.
It forwards nothing. Each worker is a process (forwarding is pure Python: the GIL would
serialise threads) forked after the interface is set up and before any control socket is
opened, so it holds only its own: an AF_PACKET socket with its TPACKET ring in one
PACKET_FANOUT group (hash mode: a flow always reaches the same worker; l4lb.fanout), its TX
socket, its Balancer (connection table and counters), pinned to CPU i % n of the CPUs the
supervisor may use.

`WorkerPool` (fastpath.workerpool) is the packet core `Backends` drives: a backend change
goes to every worker over its socket pair (fastpath.workerproto) and is answered only
when all have applied it and their lookup tables have the digest of the supervisor's own
(a `shadow` Balancer that sees no packets, for the table's digest and slots); if one refuses,
the previous set goes back to all and the request is refused. The counters `show` and the
stats report are the workers' sums (workerproto.merge), with each worker's own in `workers`.

Lifecycle: SIGTERM/SIGINT stops as the single process does (drain first when announcing),
then each worker is sent SIGTERM by PID and waited for (SIGKILL after 5 s). A worker
that dies is reported with its exit status and the supervisor stops the others, cleans up and
exits 1: the fanout group shrank, flows moved between the survivors and lost their tracked
state, which a restart would not undo, so the service manager (controller.services) restarts
the LB whole. A supervisor that dies takes its workers along (PR_SET_PDEATHSIG, and EOF on
their socket pairs).
"""

from __future__ import annotations

import math
import os
import select
import signal
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from fastpath.announce import Announcer
from fastpath.config import LbConfig
from fastpath.drain import DrainService
from fastpath.flow_commands import flow_commands
from fastpath.nft import VipDrop
from fastpath.offload import Offloads
from fastpath.runner import (
    Reporter,
    Stop,
    _cleanup,
    balancer_config,
    check_forwarding_off,
    control_plane,
    if_index,
    lb_commands,
    log,
    make_backends,
    start_announcing,
    start_line,
    stats_writer,
    steer_rps,
    warn_truncated,
)
from fastpath.workerpool import WorkerFailed, WorkerPool, worker_cpus
from l4lb.control import CommandError, ControlServer
from l4lb.plane import Plane
from l4lb.wire import format_mac

IDLE_MAX = 0.05
"""Longest sleep of the supervisor's loop (bounds its reaction to a signal's stop)."""


class Running:
    """The supervisor loop's flag (stop() is safe in a signal handler)."""

    def __init__(self) -> None:
        self.on = True

    def stop(self) -> None:
        self.on = False


def serve(
    plane: Plane,
    tick: Callable[[float], None],
    tick_every: float,
    running: Running,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """The supervisor's loop: the plane's services when due or woken by their sockets, and
    `tick` every `tick_every` seconds, until `running.stop()`."""
    poller = select.poll()
    watched: set[int] = set()
    next_tick = clock() + tick_every
    due = plane.run(clock())
    while running.on:
        fds = set(plane.fds())
        for fd in watched - fds:
            poller.unregister(fd)
        for fd in fds - watched:
            poller.register(fd, select.POLLIN | select.POLLERR)
        watched = fds
        now = clock()
        wait = min(due, next_tick, now + IDLE_MAX) - now
        events = poller.poll(max(0, math.ceil(wait * 1000)))
        now = clock()
        if events or now >= due:
            due = plane.run(now)
        if running.on and now >= next_tick:
            tick(now)
            next_tick = now + tick_every


def run_workers(cfg: LbConfig) -> int:
    """fastpath.runner.run for cfg.workers > 1: 0 after a signal, 1 when a worker failed or
    the cleanup did."""
    ifname = cfg.iface
    ifindex = if_index(ifname)
    check_forwarding_off()
    core, next_hop = balancer_config(cfg)
    running = Running()
    pool = WorkerPool(cfg, core, worker_cpus(cfg.workers, os.sched_getaffinity(0)), running.stop)
    backends = make_backends(cfg, core, pool, time.monotonic())
    writer = stats_writer(cfg)
    started = time.monotonic()
    forwarding = False
    announcer: Announcer | None = None
    drainer: DrainService | None = None

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if not forwarding:
            raise Stop
        if drainer is not None and drainer.request():
            return  # the first: withdraw and drain, the workers forwarding on
        running.stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    offloads = Offloads(ifname)
    vip_drop = VipDrop(ifname, cfg.vips)
    steer = None
    control: ControlServer | None = None
    health = None
    failed = False
    stop_errors: list[str] = []
    try:
        steer = steer_rps(cfg, ifindex)
        if not cfg.keep_offloads:
            offloads.apply()
        if cfg.nft:
            vip_drop.install()
        pool.start()  # before any socket of the control plane exists: workers inherit none
        forwarding = True
        reporter = Reporter(ifname, backends, steer, vip_drop, started)

        def snapshot(now: float, final: bool = False, advance: bool = True) -> dict[str, Any]:
            results = pool.results if final else pool.poll()
            core_stats, io, kdrops, tracked = pool.summed()
            return reporter.snapshot(
                now,
                final,
                advance,
                core=core_stats,
                io=io,
                kernel_drops=kdrops,
                tracked_flows=tracked,
                flows=pool.flows(),
                next_hop_mac=format_mac(next_hop.mac if next_hop else core.next_hop_mac),
                workers=results,
            )

        warned = False

        def tick(now: float) -> None:
            nonlocal warned
            if next_hop is not None:
                mac = next_hop.refresh(now)
                if mac is not None:
                    pool.set_next_hop_mac(mac)
            snap = snapshot(now)
            writer.emit(snap)
            if snap["io"]["rx_truncated"] and not warned:
                warned = True
                warn_truncated(snap["io"]["rx_truncated"], ifname)

        def show(now: float, advance: bool = True) -> dict[str, Any]:
            try:
                return snapshot(now, advance=advance)
            except WorkerFailed as exc:  # the loop is stopping: say why, not a traceback
                raise CommandError(f"workers: {exc}") from None

        pids = {"workers": [w.pid for w in pool.workers]}

        def flow(src: str, sport: int, dst: str, dport: int, proto: int) -> dict[str, Any]:
            try:
                return pool.flow(src, sport, dst, dport, proto)
            except WorkerFailed as exc:
                raise CommandError(f"workers: {exc}") from None

        commands = {**lb_commands(show, reporter, backends, pids), **flow_commands(flow)}
        plane = Plane([pool], name="fastpath.lb")
        control, health = control_plane(cfg, core, backends, commands, reporter, plane)
        start_line(cfg, core, control)
        log("workers " + ", ".join(f"{w.index}: pid {w.pid} cpu {w.cpu}" for w in pool.workers))
        writer.emit(snapshot(time.monotonic()))
        if cfg.announce:
            announcer, drainer = start_announcing(cfg, plane, reporter, pool.frames, running.stop)
        serve(plane, tick, cfg.stats_interval, running)
        stop_errors = pool.stop()  # first, so that the final counters are the workers' last
        if pool.failed is None:
            writer.emit(snapshot(time.monotonic(), final=True))
    except Stop:
        pass
    except WorkerFailed as exc:
        pool.fail(str(exc))
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if drainer is not None:
            signal.set_wakeup_fd(-1)
        errors = stop_errors + pool.stop()
        errors += _cleanup(None, None, None, vip_drop, offloads, steer, control, health, announcer)
        if drainer is not None:
            drainer.close()
        failed = pool.failed is not None
    for err in errors:
        log(f"cleanup: {err}")
    if failed:
        log(f"stopped because {pool.failed}")
    return 1 if errors or failed else 0
