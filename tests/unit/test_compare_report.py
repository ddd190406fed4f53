"""bench/compare_report.py: merging counters, the issue's targets, the table and the chart."""

from __future__ import annotations

from pathlib import Path

from bench.compare_report import add, chart, check_targets, markdown_table, targets_markdown


def result(rps: float, mbit: float, lb_bytes: int, cpu: float = 1.0) -> dict:
    return {
        "small": {"rps": rps, "p50_ms": 10.0, "p99_ms": 30.0, "lb_host_bytes": lb_bytes,
                  "client_bytes": 10_000, "lb_cpu_s": cpu, "failed": 0, "ok": 100},
        "large": {"mbit_s": mbit, "lb_host_bytes": lb_bytes * 10, "client_bytes": 10**7,
                  "lb_cpu_s": cpu, "failed": 0},
    }  # fmt: skip


RES = {
    "fastpath": result(800, 950, 1_000),
    "scapy": {
        "small": {
            "rps": 4,
            "p50_ms": 900.0,
            "p99_ms": 3000.0,
            "lb_host_bytes": 50,
            "client_bytes": 100,
            "lb_cpu_s": 9.0,
            "failed": 0,
        }
    },
    "haproxy": result(500, 700, 1_000_000),
    "none": result(1000, 1000, 0, cpu=0.0),
}


def test_add_sums_nested_counters() -> None:
    a = {"h1": {"tx": 1, "name": "x"}, "n": 2}
    b = {"h1": {"tx": 5, "name": "y"}, "h2": {"tx": 1}}
    assert add(a, b) == {"h1": {"tx": 6, "name": "y"}, "n": 2, "h2": {"tx": 1}}
    assert add({}, {"n": 3}) == {"n": 3}


def test_targets_compare_fastpath_with_each_alternative() -> None:
    rows = {r["target"]: r for r in check_targets(RES)}
    none_rps = rows["requests/s (1 KB, wget) >= 70% of none"]
    assert none_rps["ratio"] == 0.8 and none_rps["met"] is True
    scapy = rows["requests/s (1 KB, wget) >= 100 x scapy"]
    assert scapy["ratio"] == 200 and scapy["met"] is True
    assert rows["10 MB throughput >= 90% of none"]["met"] is True
    lb = rows["LB-host bytes >= 20 x fewer than haproxy"]
    assert lb["fastpath"] == 11_000 and lb["other"] == 11_000_000 and lb["met"] is True


def test_targets_not_met_or_not_measured_are_said_so() -> None:
    res = {"fastpath": result(100, 500, 1_000), "none": result(1000, 1000, 0)}
    rows = {r["target"]: r for r in check_targets(res)}
    assert rows["requests/s (1 KB, wget) >= 70% of none"]["met"] is False
    assert rows["requests/s (1 KB, wget) >= 100 x scapy"]["met"] is None
    md = targets_markdown(list(rows.values()))
    assert "**no**" in md and "not measured" in md


def test_table_has_a_row_per_mode_in_order() -> None:
    md = markdown_table(RES, ["fastpath", "scapy", "haproxy", "none"])
    rows = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split("|")[1].strip() for r in rows] == ["fastpath", "scapy", "haproxy", "none"]
    assert "| 800.0 |" in rows[0] and "| - |" in rows[1]  # scapy has no 10 MB figure
    assert "| 10.000 |" in rows[0]  # 1 CPU s over 100 downloads: 10 ms each
    assert rows[3].split("|")[-3].strip() == "-"  # no LB, no LB CPU


def test_chart_writes_a_png(tmp_path: Path) -> None:
    out = tmp_path / "c.png"
    chart(RES, ["fastpath", "scapy", "haproxy", "none"], out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_main_redraws_chart_and_table_from_json(tmp_path: Path, capsys) -> None:
    import json

    from bench.compare_report import main

    src = tmp_path / "c.json"
    src.write_text(json.dumps({"results": RES, "targets": []}))
    assert main([str(src), "--png", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert "| fastpath | 800.0 |" in out and "LB-host bytes" in out
    assert (tmp_path / "c.png").stat().st_size > 10_000
