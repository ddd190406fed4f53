"""A node's kernel route to one prefix: its next hops, read from `ip -j route show PREFIX`.

`next_hops(json_text)` is pure; `python -m controller.fib wait PREFIX --via IP ...` runs inside
a node (controller.services runs it in each LB ToR after BGP's start) and returns once the
kernel routes PREFIX over exactly those gateways, all alive, or fails after --timeout seconds
saying what it saw.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class NextHop:
    gateway: str
    dev: str
    weight: int
    dead: bool  # the kernel marks a next hop over a down link "dead" / "linkdown"


@dataclass(frozen=True)
class FibRoute:
    prefix: str
    protocol: str  # "bird", "boot" (the Linux driver's `ip route replace`), ...
    next_hops: tuple[NextHop, ...]

    def live_gateways(self) -> list[str]:
        return sorted(h.gateway for h in self.next_hops if not h.dead)


def _hop(d: dict) -> NextHop:
    flags = d.get("flags", [])
    return NextHop(
        str(d.get("gateway", "")),
        str(d.get("dev", "")),
        int(d.get("weight", 1)),
        "dead" in flags or "linkdown" in flags,
    )


def parse_routes(text: str) -> list[FibRoute]:
    """`ip -j route show ...` output -> routes (a multipath route lists `nexthops`)."""
    data = json.loads(text or "[]")
    if not isinstance(data, list):
        raise ValueError("ip -j route: not a list")
    out = []
    for r in data:
        if not isinstance(r, dict) or r.get("type", "unicast") != "unicast":
            continue
        hops = r.get("nexthops")
        nh = tuple(_hop(h) for h in hops) if isinstance(hops, list) else (_hop(r),)
        out.append(FibRoute(str(r.get("dst", "")), str(r.get("protocol", "boot")), nh))
    return out


def read_route(prefix: str, argv_prefix: Sequence[str] = ()) -> FibRoute | None:
    """The route to `prefix` in the namespace `argv_prefix` enters (`mnexec -a PID`), if any."""
    res = subprocess.run(
        [*argv_prefix, "ip", "-j", "route", "show", prefix],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    if res.returncode != 0:
        raise RuntimeError(f"ip route show {prefix}: {res.stderr.strip()}")
    routes = parse_routes(res.stdout)
    return routes[0] if routes else None


def describe(route: FibRoute | None) -> str:
    if route is None:
        return "no route"
    hops = ", ".join(f"{h.gateway}{' (dead)' if h.dead else ''}" for h in route.next_hops)
    return f"proto {route.protocol} via {hops}"


def wait(prefix: str, gateways: Sequence[str], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    want = sorted(gateways)
    while True:
        route = read_route(prefix)
        if route is not None and route.live_gateways() == want:
            return 0
        if time.monotonic() >= deadline:
            print(
                f"{prefix}: wanted via {', '.join(want)} within {timeout:.0f} s; "
                f"the kernel has {describe(route)}",
                file=sys.stderr,
            )
            return 1
        time.sleep(0.05)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m controller.fib")
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wait", help="wait until the kernel routes PREFIX over exactly --via")
    w.add_argument("prefix")
    w.add_argument("--via", action="append", default=[], metavar="IP", required=True)
    w.add_argument("--timeout", type=float, default=15.0)
    args = p.parse_args(argv)
    return wait(args.prefix, args.via, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
