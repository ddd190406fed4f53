"""RPS steering: which CPUs run an interface's receive softirq (rx-0's `rps_cpus`).

Receive livelock (DESIGN.md): when the softirq that feeds a ring runs on the core of the
Python loop that drains it, overload collapses throughput; a pinned process sends that work to
the CPUs it may not run on. fastpath.lb steers its tapped interface (restored at exit),
agent.decap its TUN device (the setting goes with the device).
"""

from __future__ import annotations

import os
from collections.abc import Set
from pathlib import Path

from l4lb.errors import UsageError


def spare_cpus(affinity: Set[int] | None = None, online: Set[int] | None = None) -> int:
    """Mask of the online CPUs outside `affinity` (default: this process's), or 0 when it may
    run on all of them (then there is no core to spare)."""
    mine = set(os.sched_getaffinity(0) if affinity is None else affinity)
    cpus = set(range(os.cpu_count() or 1) if online is None else online)
    return sum(1 << c for c in cpus - mine) if mine < cpus else 0


def parse_mask(text: str, option: str) -> int | None:
    """An RPS option's value: 'off' -> None, 'auto' -> spare_cpus(), else a hex CPU mask."""
    if text == "off":
        return None
    if text == "auto":
        return spare_cpus()
    try:
        mask = int(text, 16)
    except ValueError:
        raise UsageError(f"{option} {text!r}: auto, off or a hex CPU mask") from None
    if mask < 0:
        raise UsageError(f"{option} {text!r}: a mask must be >= 0")
    return mask


def queue_path(ifname: str) -> Path:
    return Path(f"/sys/class/net/{ifname}/queues/rx-0/rps_cpus")


def sys_matches(ifname: str, ifindex: int) -> bool:
    """Whether /sys/class/net/IFNAME is this namespace's interface (mininet hosts share the
    root mount namespace, so /sys may show another namespace's devices)."""
    idx = Path(f"/sys/class/net/{ifname}/ifindex")
    try:
        return int(idx.read_text()) == ifindex
    except (OSError, ValueError):
        return False


def set_mask(ifname: str, mask: int) -> None:
    """Write rx-0's rps_cpus of `ifname`."""
    queue_path(ifname).write_text(f"{mask:x}")


class Rps:
    """rx-0's rps_cpus of an interface of this namespace set to `mask`; `restore()` puts the
    old mask back."""

    def __init__(self, ifname: str, mask: int, ifindex: int) -> None:
        if not sys_matches(ifname, ifindex):
            raise UsageError(
                f"/sys/class/net/{ifname} is not this namespace's {ifname} "
                "(run under `ip netns exec`, which mounts a matching /sys)"
            )
        self.path = queue_path(ifname)
        self.old = self.path.read_text().strip()
        set_mask(ifname, mask)
        self.mask = f"{mask:x}"

    def restore(self) -> None:
        self.path.write_text(self.old)
