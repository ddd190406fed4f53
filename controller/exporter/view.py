"""A scrape's view of one process: its `show` reply and what the exporter adds, as the plain dict
`mapping`'s tables read. Pure: the sources (`sources`) are read by the caller.

    up       1 if the process answered on its control channel, else 0
    show     the `show` reply (fastpath.stats.LbStats / agent.stats.AgentStats), absent if down
    config   fields of the process's configuration file that it does not report itself
    backends (LB) one dict per backend: vip, backend (its IP), server (its host name, haproxy's
             label for a server's name; the IP when the configuration names none), weight,
             state, healthy, health_missed, packets, bytes, active_flows, connections, slots
    nft      (LB) the nftables counters of drops nothing else counts: {reason: packets}
    servers  (agent) one dict per VIP port: vip, port, listening (1 or 0)
    netdev   one dict per interface but lo: device, rx_bytes, tx_bytes, rx_packets, tx_packets
    errors   the exporter's own counts of sources it could not read, by reason

Each backend's weight, state and counts come from the LB's `show` (fastpath.stats.BackendStats:
the set as it is now, backend control and health included); a backend that left the set keeps
its packet count (the core's counters), without a state. An LB reply without the backend list
(an older LB) falls back to the configuration file's weights.
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


STATE_NAMES = {
    "active": "UP",
    "draining": "DRAIN",
    "admin_down": "MAINT",
    "unhealthy": "DOWN",
    "fail_open": "DOWN",  # down, but used because none is healthy: l4lb_fail_open says so
}
"""fastpath.backends' effective states in haproxy's names (mapping.BACKEND_STATES)."""
MODEL_FIELDS = ("weight", "packets", "bytes", "active_flows", "connections", "slots")


def lb_backends(show: Mapping[str, Any] | None, cfg: LbConfig) -> list[dict[str, Any]]:
    vip = vip_label(cfg.vips)
    names = dict(cfg.names)
    model = show.get("backends") if show else None
    if isinstance(model, list):
        return _model_backends(vip, names, model, show)
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


def _model_backends(
    vip: str, names: Mapping[str, str], model: list[Any], show: Mapping[str, Any] | None
) -> list[dict[str, Any]]:
    """Rows from the LB's backend model (its `show`), plus the backends that left the set."""
    rows = []
    for b in model:
        if not isinstance(b, Mapping) or not isinstance(b.get("ip"), str):
            continue
        ip = b["ip"]
        server = b.get("name") or names.get(ip, ip)
        row: dict[str, Any] = {"vip": vip, "backend": ip, "server": server}
        row.update({k: b[k] for k in MODEL_FIELDS if isinstance(b.get(k), int | float)})
        row["state"] = STATE_NAMES.get(str(b.get("state")), "DOWN")
        row["healthy"] = int(b.get("health") != "down")
        rows.append(row)
    core = show.get("core") if show else None
    packets = core.get("backends") if isinstance(core, Mapping) else None
    seen = {r["backend"] for r in rows}
    for ip, n in packets.items() if isinstance(packets, Mapping) else ():
        if ip not in seen:  # left the set: its count stays, it has no state
            rows.append({"vip": vip, "backend": ip, "server": names.get(ip, ip), "packets": n})
    health = show.get("health") if show else None
    checked = health.get("backends") if isinstance(health, Mapping) else None
    for row in rows:
        h = checked.get(row["backend"]) if isinstance(checked, Mapping) else None
        if isinstance(h, Mapping):
            row["health_missed"] = h.get("missed", 0)
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
        ann = show.get("announce")
        view["announce"] = {
            "announced": int(bool(isinstance(ann, Mapping) and ann.get("announced"))),
            "wanted": int(bool(isinstance(ann, Mapping) and ann.get("wanted"))),
        }
        view["fail_open"] = int(bool(show.get("fail_open")))
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
