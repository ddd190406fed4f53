"""The next hop's MAC address, from the kernel's routing and neighbour tables (`ip -j`).

The LB sends every encapsulated frame to one next hop: the gateway of its route to the
backends (`ip route get <backend>`). Its MAC comes from the neighbour table; when the kernel
has no usable entry, one ping to the gateway makes it resolve one (ARP), else the caller gets a
clear error. `NextHop.refresh` re-reads both tables periodically, so a changed gateway or MAC
is picked up while running.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from l4lb.errors import L4lbError
from l4lb.wire import parse_mac

# Neighbour states whose lladdr can be used (FAILED/INCOMPLETE carry none that is valid).
USABLE_STATES = frozenset({"REACHABLE", "STALE", "DELAY", "PROBE", "PERMANENT", "NOARP"})


class NeighError(L4lbError, RuntimeError):
    """No route or no MAC for the next hop; the message says which and what was tried."""


def _ip_json(args: list[str]) -> list[dict[str, Any]]:
    try:
        res = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, timeout=10)
    except FileNotFoundError:
        raise NeighError("the `ip` command (iproute2) is missing") from None
    if res.returncode != 0:
        raise NeighError(f"ip {' '.join(args)}: {res.stderr.strip()}")
    data = json.loads(res.stdout or "[]")
    return data if isinstance(data, list) else []


def route_to(dst: str) -> tuple[str, str]:
    """(next hop IP, device) of the route to `dst`; the next hop is `dst` on a direct route."""
    routes = _ip_json(["route", "get", dst])
    if not routes:
        raise NeighError(f"no route to {dst}")
    r = routes[0]
    return str(r.get("gateway", dst)), str(r.get("dev", ""))


def lookup_mac(ip: str, dev: str) -> bytes | None:
    """The MAC the neighbour table holds for `ip` on `dev`, if usable."""
    for entry in _ip_json(["neigh", "show", ip, "dev", dev]):
        states = set(entry.get("state", []))
        if "lladdr" in entry and states & USABLE_STATES:
            return parse_mac(entry["lladdr"])
    return None


def resolve_mac(ip: str, dev: str, ping_timeout_s: int = 1) -> bytes:
    """The MAC of `ip` on `dev`; pings it once if the neighbour table has no usable entry."""
    mac = lookup_mac(ip, dev)
    if mac is not None:
        return mac
    cmd = ["ping", "-c", "1", "-W", str(ping_timeout_s), "-I", dev, ip]
    with contextlib.suppress(FileNotFoundError, subprocess.TimeoutExpired):
        subprocess.run(cmd, capture_output=True, timeout=ping_timeout_s + 5)
    mac = lookup_mac(ip, dev)
    if mac is None:
        raise NeighError(
            f"no MAC for next hop {ip} on {dev}: not in the neighbour table and "
            f"`{' '.join(cmd)}` did not resolve it (give --next-hop-mac)"
        )
    return mac


def interface_info(dev: str) -> tuple[bytes, str | None, int]:
    """(MAC, first IPv4 address or None, MTU) of `dev`."""
    links = _ip_json(["addr", "show", "dev", dev])
    if not links:
        raise NeighError(f"no interface {dev!r}")
    link = links[0]
    ip = next((a["local"] for a in link.get("addr_info", []) if a.get("family") == "inet"), None)
    return parse_mac(link["address"]), ip, int(link.get("mtu", 1500))


@dataclass
class NextHop:
    """The next hop toward `target` (a backend) via `dev`, re-read every `period` seconds."""

    target: str
    dev: str
    period: float = 5.0
    ip: str = ""
    mac: bytes = b""
    next_refresh: float = 0.0
    errors: int = 0

    def resolve(self) -> bytes:
        """First resolution (may ping); raises NeighError with the reason."""
        ip, dev = route_to(self.target)
        if dev != self.dev:
            raise NeighError(f"the route to {self.target} leaves via {dev}, not {self.dev}")
        self.ip = ip
        self.mac = resolve_mac(ip, dev)
        self.next_refresh = time.monotonic() + self.period
        return self.mac

    def refresh(self, now: float) -> bytes | None:
        """The new MAC if the route or neighbour changed since the last look, else None.

        Never pings and never raises: a failed look is counted in `errors` and the old MAC
        stays in use.
        """
        if now < self.next_refresh:
            return None
        self.next_refresh = now + self.period
        try:
            ip, dev = route_to(self.target)
            mac = lookup_mac(ip, dev) if dev == self.dev else None
        except (NeighError, ValueError):
            mac = None
        if mac is None:
            self.errors += 1
            return None
        self.ip = ip
        if mac == self.mac:
            return None
        self.mac = mac
        return mac
