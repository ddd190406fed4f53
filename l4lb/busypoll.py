"""Busy-polling a ring slot after traffic (`--busy-poll-us` of fastpath.lb and agent.decap): a
frame that follows within the window skips the sleep and the wake-up (10-20 us on this VM)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

from l4lb.ring import READY

BUSY_POLL_MAX_US = 1_000_000


def add_busy_poll_option(parser: argparse.ArgumentParser, default: int | None = 0) -> None:
    """The shared `--busy-poll-us US` option (checked by busy_poll_error); default None lets a
    configuration file's value stand when the option is not given."""
    parser.add_argument(
        "--busy-poll-us",
        type=int,
        default=default,
        metavar="US",
        help="after traffic, spin this many microseconds for the next frame before sleeping "
        "(lower latency for sparse requests, at the cost of CPU; default 0: sleep at once)",
    )


def busy_poll_error(us: int) -> str | None:
    """Why `us` is not a valid --busy-poll-us, or None."""
    if 0 <= us <= BUSY_POLL_MAX_US:
        return None
    return f"--busy-poll-us {us}: expected 0..{BUSY_POLL_MAX_US}"


def spin_for_frame(status: memoryview, i: int, until: float, clock: Callable[[], float]) -> None:
    """Poll slot i's status word until the kernel hands it over or `clock()` passes `until`.
    Yields the CPU on each turn, so others runnable on this core go first."""
    sched_yield = os.sched_yield
    while not status[i] & READY and clock() < until:
        sched_yield()
