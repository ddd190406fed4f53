"""From raw per-round measurements to the benchmark's figures: ratios are computed within each
round (both sides saw the same machine state), then the median over rounds is reported. Pure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Round = Mapping[str, Any]

# Figures of one round, in the order the summary line prints them.
FIGURES = (
    "fastpath_pps",
    "scapy_pps",
    "kernel_pps",
    "ratio_to_kernel",
    "ratio_to_scapy",
    "loss_at_paced",
    "agent_pps",
    "latency_ratio",
    "scapy_sendp_pps",
)


def median(values: Sequence[float]) -> float | None:
    """The median, or None for no values."""
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        return None
    mid = n // 2
    return float(xs[mid]) if n % 2 else (xs[mid - 1] + xs[mid]) / 2.0


def best_delivered(by_placement: Mapping[str, Mapping[str, Any]] | None) -> float | None:
    """A system's rate in one round: the best of the CPU placements measured (None if none)."""
    if not by_placement:
        return None
    rates = [
        m["delivered_pps"]
        for m in by_placement.values()
        if isinstance(m, Mapping) and m.get("delivered_pps")
    ]
    return max(rates) if rates else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def round_figures(r: Round) -> dict[str, float | None]:
    """The headline figures of one round (None where that phase did not run or failed)."""
    fastpath = best_delivered(r.get("fastpath"))
    kernel = best_delivered(r.get("kernel"))
    scapy = (r.get("scapy") or {}).get("delivered_pps")
    paced = r.get("paced") or {}
    latency = r.get("latency") or {}
    return {
        "fastpath_pps": fastpath,
        "scapy_pps": scapy,
        "kernel_pps": kernel,
        "ratio_to_kernel": _ratio(fastpath, kernel),
        "ratio_to_scapy": _ratio(fastpath, scapy),
        "loss_at_paced": paced.get("loss"),
        "agent_pps": (r.get("agent") or {}).get("delivered_pps"),
        "latency_ratio": _ratio(latency.get("lb_rps"), latency.get("kernel_rps")),
        "scapy_sendp_pps": (r.get("scapy_sendp") or {}).get("delivered_pps"),
    }


def workers_figures(rounds: Sequence[Round], counts: Sequence[int]) -> dict[str, Any]:
    """Per worker count: the median delivered rate (each round's best placement; 1 worker is
    the `fastpath` phase, N the `workers<N>` phase) and the median of the per-round ratios N
    workers / 1 worker (paired within each round)."""
    pps: dict[str, float | None] = {}
    scaling: dict[str, float | None] = {}
    for n in counts:
        key = "fastpath" if n == 1 else f"workers{n}"
        ones = [best_delivered(r.get("fastpath")) for r in rounds]
        ns = [best_delivered(r.get(key)) for r in rounds]
        pps[str(n)] = median([v for v in ns if v is not None])
        ratios = [v / o for v, o in zip(ns, ones, strict=True) if v is not None and o]
        scaling[str(n)] = median(ratios)
    return {"workers_pps": pps, "workers_scaling": scaling}


def placement_medians(rounds: Sequence[Round], system: str) -> dict[str, float | None]:
    """A system's median delivered rate per CPU placement, over the rounds."""
    by: dict[str, list[float]] = {}
    for r in rounds:
        for placement, m in (r.get(system) or {}).items():
            if isinstance(m, Mapping) and m.get("delivered_pps"):
                by.setdefault(placement, []).append(m["delivered_pps"])
    return {p: median(v) for p, v in by.items()}


def summarize(rounds: Sequence[Round]) -> dict[str, Any]:
    """Medians over rounds of every figure, and the per-round figures they came from."""
    per_round = [round_figures(r) for r in rounds]
    out: dict[str, Any] = {}
    for key in FIGURES:
        values = [v for f in per_round if (v := f[key]) is not None]
        out[key] = median(values)
    out["rounds"] = len(rounds)
    out["by_placement"] = {s: placement_medians(rounds, s) for s in ("fastpath", "kernel")}
    out["per_round"] = per_round
    return out


def loss(offered: int, delivered: int) -> float:
    """Fraction of offered packets not delivered (0 when nothing was offered; never negative)."""
    if offered <= 0:
        return 0.0
    return max(0.0, 1.0 - delivered / offered)


def parse_proc_stat(text: str) -> dict[str, list[int]]:
    """Per-core jiffies from /proc/stat: {"cpu0": [user, nice, system, idle, iowait, irq,
    softirq, steal], ...} (the all-cores line is left out)."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0].startswith("cpu") and parts[0] != "cpu":
            out[parts[0]] = [int(x) for x in parts[1:9]]
    return out


def cpu_shares(before: Mapping[str, list[int]], after: Mapping[str, list[int]]) -> dict[str, Any]:
    """Per core over an interval: busy and softirq shares of its time (0..1), from two
    parse_proc_stat snapshots."""
    out: dict[str, Any] = {}
    for cpu, b in before.items():
        a = after.get(cpu)
        if a is None:
            continue
        d = [x - y for x, y in zip(a, b, strict=True)]
        total = sum(d)
        if total <= 0:
            continue
        idle = d[3] + d[4]
        out[cpu] = {"busy": round(1 - idle / total, 3), "softirq": round(d[6] / total, 3)}
    return out
