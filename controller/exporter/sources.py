"""What an exporter reads on each scrape, from inside its host's namespace: the process's
control channel, the LB's nftables counters, the host's interface counters and TCP listeners.
Each reader raises SourceError saying what failed; the exporter counts it by reason and serves
what the other sources gave."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastpath import nft
from l4lb import control, procnet
from l4lb.errors import L4lbError


class SourceError(L4lbError):
    """A source could not be read; `reason` names it in l4lb_exporter_errors_total."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Sources:
    """The real sources (tests pass a fake with the same methods)."""

    def __init__(self, socket: str, timeout: float, iface: str | None = None) -> None:
        self.socket = socket
        self.timeout = timeout
        self.iface = iface
        """The LB's interface, whose nftables table holds the filtered-drop counters."""

    def control(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The process's `show` and `ping` replies, asked on one connection."""
        try:
            show, ping = control.requests(
                self.socket, [{"cmd": "show"}, {"cmd": "ping"}], self.timeout
            )
        except (control.ControlUnavailable, control.RequestRefused, ValueError) as exc:
            raise SourceError("control", str(exc)) from None
        if not isinstance(show, dict) or not isinstance(ping, dict):
            raise SourceError("control", f"{self.socket}: show/ping replies are not objects")
        return show, ping

    def nft(self) -> dict[str, int]:
        """The LB table's counters of drops no other counter sees: {reason: packets}."""
        if self.iface is None:
            raise SourceError("nft", "no interface to read the nftables counters of")
        try:
            counters = nft.read_counters(self.iface)
        except nft.NftError as exc:
            raise SourceError("nft", str(exc)) from None
        return {r: counters[r] for r in nft.FILTERED_REASONS if r in counters}

    def netdev(self) -> dict[str, dict[str, int]]:
        try:
            return procnet.net_dev("self")
        except OSError as exc:
            raise SourceError("netdev", f"/proc/self/net/dev: {exc}") from None

    def servers(self, vips: Sequence[str], ports: Sequence[int]) -> list[tuple[str, int, bool]]:
        """(vip, port, a TCP socket listens there) for every VIP and port."""
        return [(v, p, procnet.tcp_listening("self", v, p)) for v in vips for p in ports]
