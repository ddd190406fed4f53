"""bench/wget_load.py option checking: bad input is refused with exit 2 and a reason (no root)."""

from __future__ import annotations

import pytest

from bench import wget_load as wl


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lb", "nginx"], "--lb 'nginx': choose one of fastpath, scapy, haproxy, none"),
        (["--rounds", "0"], "--rounds 0: must be between 1 and 10000"),
        (["--rounds", "two"], "--rounds 'two': not a whole number"),
        (["--clients", "h1"], "--clients: h1 not a client; clients are h4, h5"),
        (["--clients", "11"], "--clients 11: must be between 1 and 10"),
        (["--file", "2k.bin"], "--file: 2k.bin not in"),
        (["--concurrency", "-1"], "--concurrency -1: must be between 1 and 64"),
        (["--timeout", "x"], "--timeout 'x': not a number"),
        (["--lb", "haproxy", "--dashboard"], "--dashboard reads the fastpath LBs'"),
    ],
)
def test_bad_option_exits_2_with_reason(argv, message, capsys) -> None:
    assert wl.main(argv) == 2
    assert message in capsys.readouterr().err


def test_environment_gives_defaults(monkeypatch) -> None:
    monkeypatch.setenv("WGET_LB", "haproxy")
    monkeypatch.setenv("WGET_CLIENTS", "3")
    monkeypatch.setenv("WGET_FILE", "1k.bin")
    opts, _ = wl.parse_options([])
    assert opts.lb == "haproxy" and opts.clients == ["h4", "h5", "h6"] and opts.files == ["1k.bin"]
    opts, _ = wl.parse_options(["--lb", "none", "--clients", "h16,h4"])  # flags win
    assert opts.lb == "none" and opts.clients == ["h16", "h4"]


def test_help_documents_environment_variables(capsys) -> None:
    with pytest.raises(SystemExit):
        wl.main(["--help"])
    out = capsys.readouterr().out
    for var in ("WGET_LB", "WGET_CLIENTS", "WGET_ROUNDS", "WGET_FILE", "WGET_CONCURRENCY"):
        assert var in out


def test_urls_go_to_vip_or_spread_over_backends() -> None:
    opts, _ = wl.parse_options(["--file", "index.html,1k.bin", "--repeat", "2"])
    assert wl.client_urls(opts, 0) == ["http://20.0.0.1/"] * 2 + ["http://20.0.0.1/1k.bin"] * 2
    opts, _ = wl.parse_options(["--lb", "none", "--file", "1k.bin"])
    bases = {wl.client_urls(opts, i)[0] for i in range(4)}
    ips = {ip for ip, _ in opts.deployment.backend_ips()}
    assert bases == {f"http://{ip}/1k.bin" for ip in ips}


def test_counters_are_deltas_and_lb_bytes_sum_lb_interfaces() -> None:
    opts, _ = wl.parse_options([])
    dep = opts.deployment
    zero = {"rx_bytes": 0, "rx_packets": 0, "tx_bytes": 0, "tx_packets": 0}

    def snap(n: int, agent: int) -> wl.Snapshot:
        ifaces = {f"{h}-eth0": {k: v + n for k, v in zero.items()} for h in ["h1", "h2", "h3",
                  "h7", "h11", "h15"]}  # fmt: skip
        stats = {f"agent-{h}": {"delivered": agent, "event": "stats", "drops": {"x": agent - 5}}
                 for h, _ in dep.backends}  # fmt: skip
        return wl.Snapshot(0.0, ifaces, {"h1": n / 100, "h2": 0.0}, {"h3": n}, stats)

    per_backend, per_lb, lb_bytes = wl.counters(dep, "fastpath", snap(10, 5), snap(110, 25))
    assert lb_bytes == 200  # 100 from each of h1-eth0 and h2-eth0
    assert per_backend["h3"]["requests"] == 100 and per_backend["h7"]["requests"] == 0
    assert per_backend["h11"]["agent"] == {"delivered": 20, "drops": {"x": 20}}
    assert per_lb["h1"]["cpu_s"] == 1.0 and per_lb["h2"]["tx_packets"] == 100


def test_wait_fresh_stats_waits_for_a_rewrite_and_reports_stale(tmp_path) -> None:
    import os
    import threading
    import time

    fresh, stale = tmp_path / "lb-h1.json", tmp_path / "agent-h3.json"
    fresh.write_text("{}")
    stale.write_text("{}")
    os.utime(stale, (1, 1))
    recs = [
        {"role": "lb", "stats": str(fresh)},
        {"role": "agent", "stats": str(stale)},
        {"role": "haproxy", "stats": str(tmp_path / "x.sock")},  # not a file it rewrites
    ]
    since = time.time() + 0.2
    threading.Timer(0.3, lambda: fresh.write_text("{}")).start()
    t0 = time.monotonic()
    left = wl.wait_fresh_stats(recs, since, timeout=0.5)
    assert left == [str(stale)]  # the rewritten one counts as fresh, the other is reported
    assert time.monotonic() - t0 < 2
