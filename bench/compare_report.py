"""The comparison's figures: merge per-round results, check the issue's targets, render the
markdown table and the PNG chart. Pure except `chart`, which writes the PNG (matplotlib, Agg).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# The benchmark targets: (description, fastpath figure / other figure, minimum).
TARGETS = (
    ("requests/s (1 KB, wget) >= 70% of none", "small", "rps", "none", 0.70),
    ("requests/s (1 KB, wget) >= 100 x scapy", "small", "rps", "scapy", 100.0),
    ("requests/s (1 KB, python client) >= 70% of none", "small_py", "rps", "none", 0.70),
    ("requests/s (1 KB, python client) >= 100 x scapy", "small_py", "rps", "scapy", 100.0),
    ("10 MB throughput >= 90% of none", "large", "mbit_s", "none", 0.90),
)


def add(a: Any, b: Any) -> Any:
    """a + b for nested counters (dicts of numbers); anything else: b wins."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return {k: add(a.get(k), b.get(k)) for k in {**a, **b}}
    num = (int, float)
    if isinstance(a, num) and isinstance(b, num) and not isinstance(a, bool):
        return a + b
    return b if b is not None else a


def check_targets(res: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """res[mode][workload] -> result object. One row per target: figures, ratio, met or not.

    Also LB-host bytes: fastpath at least 20 x fewer than haproxy over the same workloads.
    """
    rows: list[dict[str, Any]] = []
    fp = res.get("fastpath", {})
    for desc, wl, key, other, need in TARGETS:
        a = fp.get(wl, {}).get(key)
        b = res.get(other, {}).get(wl, {}).get(key)
        ratio = a / b if a is not None and b else None
        rows.append(_row(desc, a, b, ratio, need))
    fp_bytes = _lb_bytes(fp)
    ha_bytes = _lb_bytes(res.get("haproxy", {}))
    ratio = ha_bytes / fp_bytes if fp_bytes and ha_bytes is not None else None
    rows.append(_row("LB-host bytes >= 20 x fewer than haproxy", fp_bytes, ha_bytes, ratio, 20.0))
    return rows


def _row(desc: str, a: Any, b: Any, ratio: float | None, need: float) -> dict[str, Any]:
    return {
        "target": desc,
        "fastpath": a,
        "other": b,
        "ratio": None if ratio is None else round(ratio, 3),
        "need": need,
        "met": None if ratio is None else ratio >= need,
    }


def _lb_bytes(by_workload: Mapping[str, Mapping[str, Any]]) -> int | None:
    vals = [r["lb_host_bytes"] for r in by_workload.values() if "lb_host_bytes" in r]
    return sum(vals) if vals else None


def _fmt(x: Any, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def cpu_ms_per_request(r: Mapping[str, Any]) -> float | None:
    """LB CPU (both hosts) per good download of a workload, in ms; None without an LB."""
    if not r.get("ok") or not r.get("lb_cpu_s"):
        return None
    return 1000.0 * r["lb_cpu_s"] / r["ok"]


def markdown_table(res: Mapping[str, Mapping[str, Mapping[str, Any]]], modes: Sequence[str]) -> str:
    head = (
        "| load balancer | req/s 1 KB wget | p50 ms | p99 ms | req/s 1 KB python client "
        "| p50 ms | 10 MB Mbit/s | sent by LB hosts MB | delivered to clients MB "
        "| LB CPU ms per 1 KB req | failed |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for m in modes:
        wl = res.get(m, {})
        s, py, big = wl.get("small", {}), wl.get("small_py", {}), wl.get("large", {})
        lb_bytes = _lb_bytes(wl)
        client = sum(r.get("client_bytes", 0) for r in wl.values())
        failed = sum(r.get("failed", 0) for r in wl.values())
        lb_mb = None if lb_bytes is None else lb_bytes / 1e6
        lines.append(
            f"| {m} | {_fmt(s.get('rps'))} | {_fmt(s.get('p50_ms'))} | {_fmt(s.get('p99_ms'))} "
            f"| {_fmt(py.get('rps'))} | {_fmt(py.get('p50_ms'))} "
            f"| {_fmt(big.get('mbit_s'))} | {_fmt(lb_mb, '.2f')} "
            f"| {client / 1e6:.1f} | {_fmt(cpu_ms_per_request(s), '.3f')} | {failed} |"
        )
    return head + "\n".join(lines) + "\n"


def targets_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    out = ["| target | fastpath | other | ratio | met |", "|---|---:|---:|---:|---|"]
    for r in rows:
        met = {True: "yes", False: "**no**", None: "not measured"}[r["met"]]
        out.append(
            f"| {r['target']} | {_fmt(r['fastpath'], '.6g')} | {_fmt(r['other'], '.6g')} "
            f"| {_fmt(r['ratio'], '.3g')} | {met} |"
        )
    return "\n".join(out) + "\n"


def chart(
    res: Mapping[str, Mapping[str, Mapping[str, Any]]], modes: Sequence[str], path: Path
) -> None:
    """Four panels: requests/s, latency, bytes sent by the LB hosts, LB CPU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"fastpath": "#1b9e77", "scapy": "#d95f02", "haproxy": "#7570b3", "none": "#999999"}
    cs = [colors.get(m, "#333333") for m in modes]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    ax = axes[0][0]
    x = range(len(modes))
    rps = [res.get(m, {}).get("small", {}).get("rps") or 0 for m in modes]
    rps_py = [res.get(m, {}).get("small_py", {}).get("rps") or 0 for m in modes]
    ax.bar([i - 0.2 for i in x], rps, width=0.4, color=cs)
    ax.bar([i + 0.2 for i in x], rps_py, width=0.4, color=cs, alpha=0.5, hatch="//")
    ax.set_xticks(list(x), list(modes))
    ax.set_yscale("log")
    ax.set_title("requests/s, 1 KB (log; solid wget, hatched python client)")
    for i, (v, w) in enumerate(zip(rps, rps_py, strict=True)):
        ax.annotate(f"{v:.0f}", (i - 0.2, v), ha="center", va="bottom", fontsize=8)
        if w:
            ax.annotate(f"{w:.0f}", (i + 0.2, w), ha="center", va="bottom", fontsize=8)

    ax = axes[0][1]
    p50 = [res.get(m, {}).get("small", {}).get("p50_ms") or 0 for m in modes]
    p99 = [res.get(m, {}).get("small", {}).get("p99_ms") or 0 for m in modes]
    ax.bar([i - 0.2 for i in x], p50, width=0.4, label="p50", color=cs)
    ax.bar([i + 0.2 for i in x], p99, width=0.4, label="p99", color=cs, alpha=0.5)
    ax.set_xticks(list(x), list(modes))
    ax.set_yscale("log")
    ax.set_title("latency per 1 KB download, ms (log; solid p50, light p99)")

    ax = axes[1][0]
    lb_mb = [(_lb_bytes(res.get(m, {})) or 0) / 1e6 for m in modes]
    cl_mb = [sum(r.get("client_bytes", 0) for r in res.get(m, {}).values()) / 1e6 for m in modes]
    ax.bar([i - 0.2 for i in x], lb_mb, width=0.4, color=cs, label="sent by LB hosts")
    ax.bar([i + 0.2 for i in x], cl_mb, width=0.4, color="#cccccc", label="delivered to clients")
    ax.set_xticks(list(x), list(modes))
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_ylim(0, max([*lb_mb, *cl_mb, 1.0]) * 4)
    ax.set_title("MB sent by h1+h2 vs MB delivered (DSR keeps replies off the LBs)")
    ax.legend(fontsize=8)

    ax = axes[1][1]
    cpu = [cpu_ms_per_request(res.get(m, {}).get("small", {})) or 0 for m in modes]
    ax.bar(modes, cpu, color=cs)
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_title("LB CPU ms per 1 KB download (h1+h2 LB processes)")
    for i, v in enumerate(cpu):
        ax.annotate(f"{v:.2f}", (i, v), ha="center", va="bottom", fontsize=8)
    fig.suptitle("wget load over the k=4 fat tree, same machine, interleaved rounds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Redraw the chart and table from a compare-<time>.json (no network, no root)."""
    ap = argparse.ArgumentParser(prog="python -m bench.compare_report", description=main.__doc__)
    ap.add_argument("json", type=Path, help="a bench/results/compare-<time>.json")
    ap.add_argument("--png", type=Path, required=True, help="chart to write")
    ap.add_argument("--modes", default="fastpath,scapy,haproxy,none")
    args = ap.parse_args(argv)
    res = json.loads(args.json.read_text())["results"]
    modes = [m for m in args.modes.split(",") if m in res]
    chart(res, modes, args.png)
    print(markdown_table(res, modes))
    print(targets_markdown(check_targets(res)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
