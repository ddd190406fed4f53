"""What a backend change costs the packet loop: the lookup table and templates updated by
fastpath.backends.Backends (the path a control request takes), per kind of change, against
the full rendezvous build of the same set in the same run (the baseline). No root, no I/O.

Usage: .venv/bin/python -m bench.table_changes [--rounds N] [--size 65537]
Prints one line per change (median ms over the rounds, slots moved) and a JSON object last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

from fastpath.backends import Backends, BackendSpec
from fastpath.balancer import Balancer
from fastpath.config import BalancerConfig
from fastpath.lookup_table import rendezvous_table

FOUR = ("10.2.3.2", "10.4.7.2", "10.6.11.2", "10.8.15.2")
FIFTH = "10.8.16.2"


def fresh(size: int) -> Backends:
    cfg = BalancerConfig(
        vips=(("20.0.0.1", 80),), backends=tuple((ip, 1) for ip in FOUR), local_ip="10.1.1.2",
        local_mac=bytes(6), next_hop_mac=bytes(6), table_size=size,
    )  # fmt: skip
    return Backends(Balancer(cfg), (BackendSpec(ip) for ip in FOUR))


def changes(bk: Backends) -> list[tuple[str, Callable[[], object]]]:
    """The changes in the order they run; each starts from the set the one before left."""
    a, b = FOUR[0], FOUR[1]
    return [
        ("drain one of four (weight 1 -> 0)", lambda: bk.plan_weight(b, 0)),
        ("undrain it (0 -> 1)", lambda: bk.plan_weight(b, 1)),
        ("remove one of four", lambda: bk.plan_remove(b)),
        ("add it back (scores kept)", lambda: bk.plan_add(b)),
        ("add a fifth never seen", lambda: bk.plan_add(FIFTH)),
        ("remove the fifth", lambda: bk.plan_remove(FIFTH)),
        ("weight 1 -> 3", lambda: bk.plan_weight(a, 3)),
        ("weight 3 -> 1", lambda: bk.plan_weight(a, 1)),
        ("administratively down", lambda: bk.plan_admin(a, "down")),
        ("administratively up", lambda: bk.plan_admin(a, "up")),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--size", type=int, default=65537)
    a = ap.parse_args()
    took: dict[str, list[float]] = {}
    moved: dict[str, int] = {}
    full: list[float] = []
    for _ in range(a.rounds):
        t0 = time.perf_counter()
        rendezvous_table([(ip, 1) for ip in FOUR], a.size)
        full.append((time.perf_counter() - t0) * 1000)
        bk = fresh(a.size)  # a new process's LB: the fifth's scores are computed when it joins
        for name, plan in changes(bk):
            specs = plan()
            t0 = time.perf_counter()
            applied = bk.apply(specs, 0.0)  # type: ignore[arg-type]
            took.setdefault(name, []).append((time.perf_counter() - t0) * 1000)
            moved[name] = applied.slots_moved
    base = statistics.median(full)
    print(f"full build of four backends (baseline): {base:.1f} ms")
    res = {}
    for name, ms in took.items():
        med = statistics.median(ms)
        res[name] = {"ms": round(med, 1), "slots_moved": moved[name]}
        print(f"{name:36s} {med:6.1f} ms  {moved[name]:6d} slots moved")
    print(json.dumps({"size": a.size, "full_build_ms": round(base, 1), "changes": res}))


if __name__ == "__main__":
    main()
