"""Pure summary of a wget load: fetch records in, figures and text out (no I/O, no root).

A fetch record is what bench/wget_worker.py prints per download, one JSON object a line:
{"client", "url", "round", "t0", "t1", "bytes", "sha256", "rc", "error"}; times are the wall
clock (CLOCK_REALTIME, shared by every network namespace), so records from all clients combine.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Fetch:
    client: str
    url: str
    round: int
    t0: float  # wall-clock seconds when wget was started
    t1: float  # ... and when its output ended
    bytes: int  # bytes received
    sha256: str  # of the bytes received
    rc: int  # wget's exit status
    error: str = ""

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Fetch:
        return cls(
            client=str(obj["client"]),
            url=str(obj["url"]),
            round=int(obj["round"]),
            t0=float(obj["t0"]),
            t1=float(obj["t1"]),
            bytes=int(obj["bytes"]),
            sha256=str(obj["sha256"]),
            rc=int(obj["rc"]),
            error=str(obj.get("error", "")),
        )

    @property
    def ms(self) -> float:
        return (self.t1 - self.t0) * 1000.0


def verdict(fetch: Fetch, expected: Mapping[str, str]) -> str:
    """'' when the download is good, else why not. `expected` maps file name -> sha256."""
    name = fetch.url.rsplit("/", 1)[-1] or "index.html"
    if fetch.error:
        return fetch.error
    if fetch.rc != 0:
        return f"wget exit {fetch.rc}"
    want = expected.get(name)
    if want is None:
        return f"no expected sha256 for {name}"
    if fetch.sha256 != want:
        return f"sha256 mismatch for {name} ({fetch.bytes} bytes)"
    return ""


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks; NaN if empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside 0..100")
    if not values:
        return math.nan
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def load_seconds(fetches: Iterable[Fetch]) -> float:
    """Seconds the load ran: per round, first start to last end, summed over rounds.

    Rounds are barriers (every client finishes a round before the next starts), so the gaps
    between rounds (spawning workers, reading counters) are not load time.
    """
    spans: dict[int, tuple[float, float]] = {}
    for f in fetches:
        lo, hi = spans.get(f.round, (f.t0, f.t1))
        spans[f.round] = (min(lo, f.t0), max(hi, f.t1))
    return sum(hi - lo for lo, hi in spans.values())


def summarize(
    fetches: Sequence[Fetch],
    expected: Mapping[str, str],
    *,
    lb: str,
    per_backend: Mapping[str, Any],
    per_lb: Mapping[str, Any],
    lb_host_bytes: int,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The result object: the keys the issue asks for, then anything in `extra`."""
    failures = [(f, why) for f in fetches if (why := verdict(f, expected))]
    good = [f for f in fetches if not verdict(f, expected)]
    seconds = load_seconds(fetches)
    lat = [f.ms for f in good]
    client_bytes = sum(f.bytes for f in good)
    out: dict[str, Any] = {
        "lb": lb,
        "requests": len(fetches),
        "ok": len(good),
        "failed": len(failures),
        "rps": round(len(good) / seconds, 2) if seconds > 0 else 0.0,
        "p50_ms": _r(percentile(lat, 50)),
        "p99_ms": _r(percentile(lat, 99)),
        "per_backend": dict(per_backend),
        "per_lb": dict(per_lb),
        "lb_host_bytes": int(lb_host_bytes),
        "client_bytes": client_bytes,
        "seconds": round(seconds, 3),
        "mbit_s": round(client_bytes * 8 / seconds / 1e6, 2) if seconds > 0 else 0.0,
        "lb_to_client_ratio": round(lb_host_bytes / client_bytes, 5) if client_bytes else None,
        "errors": _error_counts(why for _f, why in failures),
    }
    if extra:
        out.update(extra)
    return out


def _r(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 2)


def _error_counts(reasons: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for why in reasons:
        out[why] = out.get(why, 0) + 1
    return out


def progress_line(rounds_done: int, rounds: int, fetches: Sequence[Fetch], failed: int) -> str:
    return f"round {rounds_done}/{rounds}: {len(fetches)} requests, {failed} failed so far"


def format_summary(res: Mapping[str, Any]) -> str:
    """A few readable lines for people; the JSON line after it is for programs."""

    def mb(n: int) -> str:
        return f"{n / 1e6:.2f} MB"

    lines = [
        f"wget load through {res['lb']}: {res['ok']}/{res['requests']} ok, {res['failed']} failed"
        f" in {res['seconds']:.2f} s",
        f"  requests/s {res['rps']:.1f}   latency p50 {res['p50_ms']} ms   p99 {res['p99_ms']} ms"
        f"   goodput {res['mbit_s']} Mbit/s",
        f"  bytes to clients {mb(res['client_bytes'])}   sent by LB hosts "
        f"{mb(res['lb_host_bytes'])}"
        + (
            f" ({100 * res['lb_to_client_ratio']:.2f}% of client bytes)"
            if res.get("lb_to_client_ratio") is not None
            else ""
        ),
        f"  per backend: {_compact(res['per_backend'])}",
        f"  per LB:      {_compact(res['per_lb'])}",
    ]
    if res.get("errors"):
        lines.append("  failures: " + "; ".join(f"{n} x {why}" for why, n in res["errors"].items()))
    return "\n".join(lines)


def _compact(d: Mapping[str, Any]) -> str:
    parts = []
    for k, v in d.items():
        if isinstance(v, Mapping):
            inner = ", ".join(f"{ik}={iv}" for ik, iv in v.items() if not isinstance(iv, Mapping))
            parts.append(f"{k}({inner})")
        else:
            parts.append(f"{k}={v}")
    return "  ".join(parts) or "-"
