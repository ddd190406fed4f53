"""What the status page shows, computed from two samples of the fabric: pure (the sampler,
controller.dashboard.sample, reads the samples; the page, static/dashboard.js, draws the
result). A sample is every node's interface counters and every exporter's parsed metrics at one
time; the state is rates between two samples, with a short history of each.

Backend state on the page, most severe first: AGENT DOWN (its exporter or agent does not
answer), NO SERVER (nothing listens on the VIP's port on the host), then the LBs' view (DOWN,
MAINT, DRAIN, UP from l4lb_backend_status; the most severe any LB reports).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from controller.targets import MonitorConfig

Labels = frozenset[tuple[str, str]]
Metrics = dict[str, dict[Labels, float]]
"""Sample name -> {labels: value}, as prometheus_client's parser gives them."""
HISTORY = 120  # points kept (a minute at two samples a second)
SEVERITY = ("AGENT DOWN", "NO SERVER", "DOWN", "MAINT", "DRAIN", "UP")


@dataclass
class Sample:
    time: float
    netdev: dict[str, dict[str, dict[str, int]]]
    """Node -> interface -> counters (l4lb.procnet.net_dev)."""
    metrics: dict[str, Metrics | None]
    """Exporter host -> its metrics, None when it did not answer."""
    errors: dict[str, str] = field(default_factory=dict)
    """What could not be read this time (node or exporter -> why)."""


def labels(**kv: str) -> Labels:
    return frozenset(kv.items())


def total(m: Metrics | None, name: str, **match: str) -> float | None:
    """The sum of a metric's samples whose labels include `match` (None if it has none)."""
    if m is None or name not in m:
        return None
    want = set(match.items())
    values = [v for k, v in m[name].items() if want <= k]
    return sum(values) if values else None


def by_label(m: Metrics | None, name: str, label: str, **match: str) -> dict[str, float]:
    """{value of `label`: sum of the samples with it}, for the samples matching `match`."""
    out: dict[str, float] = {}
    if m is None or name not in m:
        return out
    want = set(match.items())
    for k, v in m[name].items():
        d = dict(k)
        if want <= k and label in d:
            out[d[label]] = out.get(d[label], 0.0) + v
    return out


def rate(prev: float | None, cur: float | None, dt: float) -> float | None:
    """Per second between two counter readings; None when one is missing or it went back (a
    restarted process starts its counters again)."""
    if prev is None or cur is None or dt <= 0 or cur < prev:
        return None
    return (cur - prev) / dt


def _sum(values: Iterable[float | None]) -> float | None:
    """The sum of the known values; None when none is known."""
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def _r(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(x, nd)


class Model:
    """Turns successive samples into page states; keeps the history."""

    def __init__(self, cfg: MonitorConfig) -> None:
        self.cfg = cfg
        self.prev: Sample | None = None
        self.history: dict[str, deque[float | None]] = {}
        self.times: deque[float] = deque(maxlen=HISTORY)

    def hosts(self, kind: str) -> list[str]:
        return [t.host for t in self.cfg.targets if t.kind == kind]

    def _tx_bytes(self, s: Sample, node: str) -> float | None:
        ifaces = s.netdev.get(node)
        if not ifaces:
            return None
        link = next((ln for ln in self.cfg.links if node in (ln.a, ln.b)), None)
        name = link.a_if if link and link.a == node else link.b_if if link else None
        return ifaces.get(name or "", {}).get("tx_bytes")

    def _push(self, key: str, value: float | None) -> None:
        series = self.history.get(key)
        if series is None:
            series = self.history[key] = deque([None] * (len(self.times) - 1), maxlen=HISTORY)
        series.append(value)

    def update(self, cur: Sample) -> dict[str, Any]:
        """The page's state after `cur` (rates against the sample before it)."""
        prev, self.prev = self.prev, cur
        dt = cur.time - prev.time if prev is not None else 0.0
        self.times.append(round(cur.time, 2))

        def counter(host: str, name: str, **match: str) -> float | None:
            if prev is None:
                return None
            return rate(
                total(prev.metrics.get(host), name, **match),
                total(cur.metrics.get(host), name, **match),
                dt,
            )

        links: list[dict[str, Any]] = []
        for ln in self.cfg.links:
            ab = ba = None
            if prev is not None:
                a0, a1 = (s.netdev.get(ln.a, {}).get(ln.a_if, {}) for s in (prev, cur))
                b0, b1 = (s.netdev.get(ln.b, {}).get(ln.b_if, {}) for s in (prev, cur))
                ab = rate(a0.get("tx_bytes"), a1.get("tx_bytes"), dt)
                ba = rate(b0.get("tx_bytes"), b1.get("tx_bytes"), dt)
            links.append(
                {
                    "a": ln.a,
                    "b": ln.b,
                    "ab_bps": _r(ab and ab * 8, 0),
                    "ba_bps": _r(ba and ba * 8, 0),
                }
            )

        lbs: list[dict[str, Any]] = []
        for h in self.hosts("lb"):
            m = cur.metrics.get(h)
            fwd = counter(h, "l4lb_forwarded_packets_total")
            cpu = counter(h, "l4lb_process_cpu_seconds_total")
            dropped = counter(h, "l4lb_drops_total")
            lbs.append({
                "host": h,
                "up": bool(total(m, "l4lb_up")),
                # None: the LB does not announce (no BGP); 0: up but withdrawn (drain, BFD down)
                "announced": total(m, "l4lb_vip_announced"),
                "fwd_pps": _r(fwd), "rx_pps": _r(counter(h, "l4lb_rx_packets_total")),
                "drop_pps": _r(dropped), "flows": total(m, "l4lb_conntrack_flows"),
                "cpu": _r(cpu and cpu * 100), "rss_mb": _r(
                    (total(m, "l4lb_process_resident_memory_bytes") or 0) / 2**20 or None),
            })  # fmt: skip
            self._push(f"lb:{h}", _r(fwd))
        vip_total = sum(row["fwd_pps"] or 0 for row in lbs)
        for row in lbs:
            row["share"] = _r((row["fwd_pps"] or 0) / vip_total, 3) if vip_total else None

        backends: list[dict[str, Any]] = []
        agents = {t.host: t for t in self.cfg.targets if t.kind == "agent"}
        for h in self.hosts("agent"):
            ip = agents[h].addr
            am = cur.metrics.get(h)
            per_lb = {lb: counter(lb, "l4lb_backend_packets_total", backend=ip)
                      for lb in self.hosts("lb")}  # fmt: skip
            pps = _sum(per_lb.values())
            states = []
            weight = None
            for lb in self.hosts("lb"):
                st = by_label(cur.metrics.get(lb), "l4lb_backend_status", "state", backend=ip)
                states += [s for s, v in st.items() if v == 1]
                w = total(cur.metrics.get(lb), "l4lb_backend_weight", backend=ip)
                weight = w if weight is None else weight
            agent_up = bool(total(am, "l4lb_agent_up"))
            listening = total(am, "l4lb_agent_server_listening")
            lb_state = min(states, key=SEVERITY.index) if states else "UP"
            state = "AGENT DOWN" if not agent_up else "NO SERVER" if listening == 0 else lb_state
            flows = [total(cur.metrics.get(lb), "l4lb_backend_active_flows", backend=ip)
                     for lb in self.hosts("lb")]  # fmt: skip
            backends.append({
                "host": h, "ip": ip, "state": state, "weight": weight,
                "active_flows": _sum(flows),  # each LB tracks its own flows
                "pps": _r(pps), "per_lb": {k: _r(v) for k, v in per_lb.items()},
                "decap_pps": _r(counter(h, "l4lb_agent_decap_total")),
                "cpu": _r((c := counter(h, "l4lb_agent_process_cpu_seconds_total")) and c * 100),
            })  # fmt: skip
            self._push(f"backend:{h}", _r(pps))

        lb_tx = [rate(self._tx_bytes(prev, h), self._tx_bytes(cur, h), dt) if prev else None
                 for h in self.hosts("lb")]  # fmt: skip
        bk_tx = [rate(self._tx_bytes(prev, h), self._tx_bytes(cur, h), dt) if prev else None
                 for h in self.hosts("agent")]  # fmt: skip
        lb_bps, bk_bps = (None if (x := _sum(tx)) is None else x * 8 for tx in (lb_tx, bk_tx))
        dsr = {
            "lb_bps": _r(lb_bps, 0), "backend_bps": _r(bk_bps, 0),
            "ratio": _r(lb_bps / bk_bps, 4) if lb_bps is not None and bk_bps else None,
        }  # fmt: skip
        self._push("dsr:lb", dsr["lb_bps"])
        self._push("dsr:backend", dsr["backend_bps"])

        drops: list[dict[str, Any]] = []
        for where, name, hosts in (
            ("lb", "l4lb_drops_total", self.hosts("lb")),
            ("agent", "l4lb_agent_drops_total", self.hosts("agent")),
        ):
            reasons: dict[str, list[float]] = {}
            for h in hosts:
                for reason, v in by_label(cur.metrics.get(h), name, "reason").items():
                    r = counter(h, name, reason=reason)
                    reasons.setdefault(reason, [0.0, 0.0])
                    reasons[reason][0] += v
                    reasons[reason][1] += r or 0.0
            for reason, (tot, rt) in sorted(reasons.items()):
                if tot or rt:
                    drops.append({"where": where, "reason": reason, "total": tot,
                                  "rate": _r(rt)})  # fmt: skip
        drop_rate = sum(d["rate"] or 0 for d in drops) if prev is not None else None
        self._push("drops", _r(drop_rate))
        for key in self.history:
            if len(self.history[key]) < len(self.times):
                self.history[key].append(None)  # a series not updated this time

        return {
            "time": cur.time,
            "interval": _r(dt, 3),
            "vip": self.cfg.vip,
            "errors": cur.errors,
            "links": links,
            "lbs": lbs,
            "backends": backends,
            "dsr": dsr,
            "drops": drops,
            "history": {"t": list(self.times), **{k: list(v) for k, v in self.history.items()}},
        }


def topology(cfg: MonitorConfig) -> dict[str, Any]:
    """What the page draws once: nodes with their roles, links, exporters."""
    return {
        "vip": cfg.vip,
        "nodes": [{"name": n.name, "kind": n.kind, "role": n.role} for n in cfg.nodes],
        "links": [{"a": ln.a, "b": ln.b} for ln in cfg.links],
        "lbs": [t.host for t in cfg.targets if t.kind == "lb"],
        "backends": [{"host": t.host, "ip": t.addr} for t in cfg.targets if t.kind == "agent"],
    }


def parse_metrics(text: str) -> Metrics:
    """An exporter's /metrics text, by prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    out: Metrics = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return out
