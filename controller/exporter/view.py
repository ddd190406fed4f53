"""A scrape's view of one process: its `show` reply and what the exporter adds, as the plain dict
`mapping`'s tables read. Pure: the sources (`sources`) are read by the caller.

    up       1 if the process answered on its control channel, else 0
    show     the `show` reply (fastpath.stats.LbStats / agent.stats.AgentStats), absent if down
    config   fields of the process's configuration file that it does not report itself
    backends (LB) one dict per backend: vip, backend (its IP), server (its host name, haproxy's
             label for a server's name; the IP when the configuration names none), weight,
             state, packets
    nft      (LB) the nftables counters of drops nothing else counts: {reason: packets}
    servers  (agent) one dict per VIP port: vip, port, listening (1 or 0)
    netdev   one dict per interface but lo: device, rx_bytes, tx_bytes, rx_packets, tx_packets
    errors   the exporter's own counts of sources it could not read, by reason

The LB's set of backends cannot change while it runs yet (its control channel has `show` and
`ping` only), so each backend's weight and state come from its configuration file; the packets
from its counters (which also keep backends that left the set: state absent).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fastpath.config import LbConfig

NETDEV_FIELDS = ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets")


def netdev_rows(counters: Mapping[str, Mapping[str, int]]) -> list[dict[str, Any]]:
    """Interface counters (l4lb.procnet.net_dev) as rows, lo left out."""
    return [
        {"device": dev, **{k: c[k] for k in NETDEV_FIELDS if k in c}}
        for dev, c in sorted(counters.items())
        if dev != "lo"
    ]


def vip_label(vips: Sequence[tuple[str, int | None]] | Sequence[str]) -> str:
    """The VIP addresses a process serves, as one label value ("20.0.0.1"; several joined by
    commas: an LB's backends serve all of its VIPs alike)."""
    addrs = [v if isinstance(v, str) else v[0] for v in vips]
    return ",".join(dict.fromkeys(addrs))


def lb_backends(show: Mapping[str, Any] | None, cfg: LbConfig) -> list[dict[str, Any]]:
    vip = vip_label(cfg.vips)
    names = dict(cfg.names)
    weights = dict(cfg.backends)
    core = show.get("core") if show else None
    packets = core.get("backends") if isinstance(core, Mapping) else None
    packets = packets if isinstance(packets, Mapping) else {}
    health = show.get("health") if show else None  # fastpath.stats.ProberStats, or None
    checked = health.get("backends") if isinstance(health, Mapping) else None
    checked = checked if isinstance(checked, Mapping) else {}
    rows = []
    for ip in dict.fromkeys([*weights, *packets]):
        row: dict[str, Any] = {"vip": vip, "backend": ip, "server": names.get(ip, ip)}
        h = checked.get(ip)
        if isinstance(h, Mapping):
            row["healthy"] = int(bool(h.get("healthy")))
            row["health_missed"] = h.get("missed", 0)
        if ip in weights:
            row["weight"] = weights[ip]
            row["state"] = "UP" if weights[ip] > 0 else "DRAIN"
            if row.get("healthy") == 0:
                row["state"] = "DOWN"  # failed health checks (fastpath.health)
        if show is not None:
            row["packets"] = packets.get(ip, 0)
        rows.append(row)
    return rows


def lb_view(
    show: Mapping[str, Any] | None,
    cfg: LbConfig,
    nft: Mapping[str, int] | None,
    netdev: Mapping[str, Mapping[str, int]] | None,
    errors: Mapping[str, int],
) -> dict[str, Any]:
    view: dict[str, Any] = {
        "up": 0 if show is None else 1,
        "config": {"conn_capacity": cfg.conn_capacity},
        "backends": lb_backends(show, cfg),
        "errors": dict(errors),
    }
    if show is not None:
        view["show"] = show
    if nft is not None:
        view["nft"] = dict(nft)
    if netdev is not None:
        view["netdev"] = netdev_rows(netdev)
    return view


def agent_view(
    show: Mapping[str, Any] | None,
    servers: Sequence[tuple[str, int, bool]] | None,
    netdev: Mapping[str, Mapping[str, int]] | None,
    errors: Mapping[str, int],
) -> dict[str, Any]:
    view: dict[str, Any] = {"up": 0 if show is None else 1, "errors": dict(errors)}
    if show is not None:
        view["show"] = show
    if servers is not None:
        view["servers"] = [
            {"vip": vip, "port": port, "listening": int(up)} for vip, port, up in servers
        ]
    if netdev is not None:
        view["netdev"] = netdev_rows(netdev)
    return view
