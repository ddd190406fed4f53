"""bench/wget_summary.py: percentiles, verdicts, load time and the result object (pure)."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.wget_summary import (
    Fetch,
    format_summary,
    load_seconds,
    percentile,
    summarize,
    verdict,
)

GOOD = hashlib.sha256(b"x" * 1024).hexdigest()
EXPECTED = {"1k.bin": GOOD, "index.html": hashlib.sha256(b"<html>").hexdigest()}


URL = "http://20.0.0.1/1k.bin"


def fetch(
    t0: float,
    ms: float,
    *,
    rnd: int = 1,
    sha: str = GOOD,
    rc: int = 0,
    url: str = URL,
    n: int = 1024,
    client: str = "h16",
    error: str = "",
) -> Fetch:
    return Fetch(client, url, rnd, t0, t0 + ms / 1000, n, sha, rc, error)


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([10.0], 99) == 10.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile(list(map(float, range(1, 101))), 99) == pytest.approx(99.01)
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1.0], 101)


@given(st.lists(st.floats(0, 1e6), min_size=1, max_size=200), st.floats(0, 100))
def test_percentile_is_bounded_and_monotone(values: list[float], q: float) -> None:
    p = percentile(values, q)
    assert min(values) <= p <= max(values)
    assert percentile(values, 0) == min(values) and percentile(values, 100) == max(values)
    assert percentile(values, min(100.0, q + 1)) >= p - 1e-9


def test_verdict_names_the_problem() -> None:
    assert verdict(fetch(0, 1), EXPECTED) == ""
    assert verdict(fetch(0, 1, rc=4), EXPECTED) == "wget exit 4"
    assert "sha256 mismatch for 1k.bin" in verdict(fetch(0, 1, sha="0" * 64), EXPECTED)
    assert verdict(fetch(0, 1, url="http://20.0.0.1/nope"), EXPECTED).startswith("no expected")
    # `wget 20.0.0.1` fetches the index page.
    assert verdict(fetch(0, 1, url="http://20.0.0.1/", sha=EXPECTED["index.html"]), EXPECTED) == ""
    assert verdict(fetch(0, 1, error="wget did not exit"), EXPECTED) == "wget did not exit"


def test_load_seconds_sums_rounds_and_skips_gaps() -> None:
    fs = [fetch(100.0, 500), fetch(100.2, 1000), fetch(200.0, 250, rnd=2)]
    assert load_seconds(fs) == pytest.approx(1.2 + 0.25)
    assert load_seconds([]) == 0


def test_summarize_has_the_issue_keys_and_counts() -> None:
    fs = [fetch(10.0 + i * 0.01, 10.0 + i, client=f"h{i}") for i in range(9)]
    fs.append(fetch(10.0, 5.0, sha="0" * 64))
    res = summarize(fs, EXPECTED, lb="fastpath", per_backend={"h3": {"requests": 9}},
                    per_lb={"h1": {"packets": 40}}, lb_host_bytes=5000)  # fmt: skip
    for key in ("requests", "ok", "failed", "rps", "p50_ms", "p99_ms", "per_backend", "per_lb",
                "lb_host_bytes", "client_bytes", "seconds", "lb"):  # fmt: skip
        assert key in res
    assert (res["requests"], res["ok"], res["failed"]) == (10, 9, 1)
    assert res["client_bytes"] == 9 * 1024  # the bad download does not count as delivered
    assert res["p50_ms"] == pytest.approx(14.0)  # latencies 10..18 ms over good fetches only
    assert res["seconds"] == pytest.approx(0.08 + 0.018, abs=1e-3)
    assert res["rps"] == pytest.approx(9 / res["seconds"], rel=1e-2)
    assert res["errors"] == {"sha256 mismatch for 1k.bin (1024 bytes)": 1}
    json.dumps(res)  # the last line of the run is this object as JSON
    text = format_summary(res)
    assert "9/10 ok, 1 failed" in text and "h3(requests=9)" in text


def test_summarize_empty_run_has_no_nan() -> None:
    res = summarize([], EXPECTED, lb="none", per_backend={}, per_lb={}, lb_host_bytes=0)
    assert res["rps"] == 0 and res["p50_ms"] is None and res["lb_to_client_ratio"] is None
    json.loads(json.dumps(res, allow_nan=False))


def test_fetch_from_worker_json_roundtrip() -> None:
    rec = {"client": "h4", "url": "http://20.0.0.1/1k.bin", "round": 2, "t0": 1.0, "t1": 1.5,
           "bytes": 1024, "sha256": GOOD, "rc": 0, "error": ""}  # fmt: skip
    f = Fetch.from_json(rec)
    assert f.ms == pytest.approx(500) and f.round == 2
