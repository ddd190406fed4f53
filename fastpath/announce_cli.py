"""`python -m fastpath.announce_cli IFACE`: hold the VIP announcement in a process of its own.

A stand-in for the LB process wherever the announcement must live outside fastpath.lb's loop:
the netns tests (a harness that can be killed, stopped and signalled) and, until fastpath.lb
calls fastpath.announce itself, the emulation (`controller up --services`), where it follows
the LB's health through its stats file (`--health-file`): announced while the file is
rewritten (fastpath.lb does so every --stats-interval) and not marked final (written at exit),
withdrawn otherwise; and the moment the process that wrote it (its `pid`) dies, watched through
a pidfd, so a killed LB is withdrawn in milliseconds, not after --max-age.

Signals: SIGUSR1 withdraws, SIGUSR2 announces again; SIGTERM/SIGINT withdraw, wait until BIRD
has seen it (at most --drain-timeout seconds), then exit 0, the TUN going with the process.
A status file (`--status-file`, JSON, replaced atomically at every change and every second)
says what fastpath.announce.Status says, with wall-clock times. Exit status: 0 after a signal,
1 when the TUN cannot be made, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
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
from fastpath.announce import (
    HOST_ADDR,
    LB_ADDR,
    AnnounceConfig,
    AnnounceError,
    Announcer,
    Status,
    tun_name,
)

HEALTH_POLL = 0.05  # seconds between looks at the health file
STATUS_EVERY = 1.0  # seconds between status-file rewrites when nothing changes


def _positive(kind: type, low: float) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected a number >= {low}, not {text!r}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastpath.announce_cli",
        description="Hold the VIP announcement: a TUN device and a BFD responder for BIRD.",
    )
    p.add_argument("iface", metavar="IFACE", help="the LB's interface (names the TUN device)")
    p.add_argument("--tun", help="TUN device name (default: l4an-IFACE, cut to 15 characters)")
    p.add_argument("--host-addr", default=HOST_ADDR, help="the host's end (default %(default)s)")
    p.add_argument("--lb-addr", default=LB_ADDR, help="the far end (default %(default)s)")
    p.add_argument(
        "--interval-ms", type=_positive(int, 1), default=100, help="BFD interval (default 100)"
    )
    p.add_argument(
        "--multiplier", type=_positive(int, 1), default=3, help="BFD detect multiplier (3)"
    )
    p.add_argument("--withdrawn", action="store_true", help="start withdrawn (BFD AdminDown)")
    p.add_argument("--health-file", type=Path, help="announce only while this stats file is fresh")
    p.add_argument(
        "--max-age",
        type=_positive(float, 0.05),
        default=1.5,
        help="seconds after which --health-file counts as stale (default %(default)s)",
    )
    p.add_argument("--status-file", type=Path, help="write the status here (JSON)")
    p.add_argument(
        "--drain-timeout",
        type=_positive(float, 0),
        default=1.0,
        help="on SIGTERM, seconds to wait for BIRD to see the withdraw (default %(default)s)",
    )
    return p


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` in one rename (a reader sees the old file or the new one)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def healthy(path: Path, max_age: float, now_wall: float) -> bool:
    """An LB stats file rewritten within `max_age` seconds and not the final snapshot."""
    return _read_health(path, max_age, now_wall)[0]


def _read_health(path: Path, max_age: float, now_wall: float) -> tuple[bool, int | None]:
    try:
        age = now_wall - path.stat().st_mtime
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False, None
    if not isinstance(data, dict):
        return False, None
    pid = data.get("pid")
    ok = age <= max_age and not data.get("final", False)
    return ok, pid if isinstance(pid, int) and not isinstance(pid, bool) else None


class LbWatch:
    """The LB behind a stats file: fresh and not final, and its writer (`pid`) alive. The
    writer is watched through a pidfd, readable the moment it exits."""

    def __init__(self, path: Path, max_age: float) -> None:
        self.path, self.max_age = path, max_age
        self.pid: int | None = None
        self.pidfd = -1
        self.dead: int | None = None  # the writer seen to exit: its file says nothing more

    def check(self, now_wall: float) -> bool:
        ok, pid = _read_health(self.path, self.max_age, now_wall)
        if pid is not None and pid != self.pid and pid != self.dead:
            self._close()
            with contextlib.suppress(OSError):  # gone already: the next look sees it stale
                self.pidfd = os.pidfd_open(pid)
                self.pid = pid
        return ok and pid is not None and pid != self.dead

    def fds(self) -> list[int]:
        return [self.pidfd] if self.pidfd >= 0 else []

    def exited(self) -> None:
        """The pidfd turned readable: the LB process is gone."""
        self.dead = self.pid
        self._close()

    def _close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
        self.pidfd, self.pid = -1, None


def status_json(st: Status, tun: str, healthy_now: bool | None, mono_to_wall: float) -> str:
    d = asdict(st)
    d["since"] = round(st.since + mono_to_wall, 3)
    d.update(time=round(time.time(), 3), pid=os.getpid(), tun=tun, healthy=healthy_now)
    return json.dumps(d, sort_keys=True) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = AnnounceConfig(
            tun=args.tun or tun_name(args.iface),
            host_addr=args.host_addr,
            lb_addr=args.lb_addr,
            bfd=bfd.SessionConfig(
                desired_min_tx=args.interval_ms / 1000,
                required_min_rx=args.interval_ms / 1000,
                detect_mult=args.multiplier,
            ),
            announced=not args.withdrawn and args.health_file is None,
        )
    except ValueError as e:
        print(f"fastpath.announce_cli: error: {e}", file=sys.stderr)
        return 2
    return run(args, config)


def run(args: argparse.Namespace, config: AnnounceConfig) -> int:
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    requests: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        requests.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, on_signal)
    signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    try:
        ann = Announcer(config, time.monotonic())
    except AnnounceError as e:
        print(f"fastpath.announce_cli: {e}", file=sys.stderr)
        return 1
    mono_to_wall = time.time() - time.monotonic()
    print(
        f"fastpath.announce_cli: {ann.tun} {config.host_addr} -> {config.lb_addr}, BFD "
        f"{args.interval_ms} ms x {args.multiplier}, "
        f"{'withdrawn' if not config.announced else 'announcing'}",
        flush=True,
    )
    wanted = not args.withdrawn  # the operator's (signals') wish; health may overrule it
    watch = LbWatch(args.health_file, args.max_age) if args.health_file is not None else None
    is_healthy: bool | None = None
    last_written, last_status = 0.0, None
    next_health = 0.0
    stopping_since: float | None = None
    try:
        while True:
            now = time.monotonic()
            for signum in requests:
                if signum == signal.SIGUSR1:
                    wanted = False
                elif signum == signal.SIGUSR2:
                    wanted = True
                elif stopping_since is None:
                    stopping_since = now
            requests.clear()
            if watch is not None and now >= next_health:
                is_healthy = watch.check(time.time())
                next_health = now + HEALTH_POLL
            want = wanted and stopping_since is None and is_healthy is not False
            if want and not ann.status().wanted:
                ann.announce(now)
            elif not want and ann.status().wanted:
                ann.withdraw(now)
            deadline = ann.service(now)
            st = ann.status()
            if st != last_status or now - last_written >= STATUS_EVERY:
                if last_status is None or st.bfd_state != last_status.bfd_state:
                    print(f"fastpath.announce_cli: BFD {st.bfd_state}", flush=True)
                if args.status_file is not None:
                    text = status_json(st, ann.tun, is_healthy, mono_to_wall)
                    write_atomic(args.status_file, text)
                last_written, last_status = now, st
            if stopping_since is not None and (
                st.withdraw_confirmed or now - stopping_since >= args.drain_timeout
            ):
                return 0
            timeout = min(max(deadline - now, 0.0), STATUS_EVERY)
            if watch is not None:
                timeout = min(timeout, max(next_health - now, 0.0))
            lb_fds = watch.fds() if watch is not None else []
            with contextlib.suppress(InterruptedError):
                readable, _, _ = select.select(
                    [*ann.fds(), *lb_fds, wake_r.fileno()], [], [], timeout
                )
                if watch is not None and set(lb_fds) & set(readable):
                    watch.exited()
                    next_health = 0.0  # withdraw now
                if wake_r.fileno() in readable:
                    with contextlib.suppress(BlockingIOError):
                        wake_r.recv(64)
    finally:
        ann.close()
        if watch is not None:
            watch.exited()
        signal.set_wakeup_fd(-1)
        wake_r.close()
        wake_w.close()


if __name__ == "__main__":
    sys.exit(main())
