"""`python -m controller lb list|drain|undrain` without a network: bad input refused with the
right exit status and message, changing nothing; the table rendered from a report."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller import lbctl
from controller.__main__ import main


@pytest.mark.parametrize(
    ("argv", "status", "message"),
    [
        (["lb", "drain", "h99"], 2, "unknown host 'h99' (hosts: h1 h2 h3"),
        (["lb", "drain", "h3"], 2, "h3 is not a load balancer (load balancers: h1, h2)"),
        (["lb", "undrain", "t1"], 2, "unknown host 't1'"),
        (["lb", "drain", "h1"], 1, "no network is up; start one with"),
        (["lb", "undrain", "h2"], 1, "no network is up"),
        (["lb", "list"], 1, "no network is up"),
        (["lb", "list", "--json"], 1, "no network is up"),
    ],
)
def test_bad_input_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], status: int, message: str
) -> None:
    assert main([*argv, "--state-dir", str(tmp_path)]) == status
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [], "nothing was made"


def test_lb_needs_a_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["lb"])
    assert exc.value.code == 2 and "list|drain|undrain" in capsys.readouterr().err


REPORT = {
    "vip": "20.0.0.1",
    "time": 0.0,
    "tors": {"t1": {"protocol": "bird", "next_hops": ["10.1.2.2"]}},
    "lbs": [
        {
            "host": "h1", "address": "10.1.1.2", "announced": False, "drained": True,
            "since": 1796166484.1, "bgp": "Established", "bfd": "Up", "in_ecmp": False,
            "tor": "t1", "forwarded_pps": 0, "tracked_flows": 12, "stats_age": 0.3, "error": None,
        },
        {
            "host": "h2", "address": "10.1.2.2", "announced": True, "drained": False,
            "since": 1796166400.0, "bgp": "Established", "bfd": "Up", "in_ecmp": True,
            "tor": "t1", "forwarded_pps": 1200, "tracked_flows": 345, "stats_age": 9.0,
            "error": None,
        },
    ],
}  # fmt: skip


def test_render_shows_each_lb_and_the_tor_route() -> None:
    lines = lbctl.render(REPORT).splitlines()
    assert lines[0].split() == [
        "LB", "address", "announced", "since", "BGP", "BFD", "in", "ECMP", "pkt/s", "flows"
    ]  # fmt: skip
    h1, h2 = lines[1].split(), lines[2].split()
    assert h1[:3] == ["h1", "10.1.1.2", "drained"] and h1[-1] == "12" and "no" in h1
    assert h2[2] == "yes" and "(stale" in lines[2] and h2[-1] == "345"
    assert lines[3] == "t1 routes 20.0.0.1 via 10.1.2.2 (proto bird)"


def test_render_says_when_the_vip_is_unrouted_and_why_a_lb_is_unknown() -> None:
    r = dict(REPORT, tors={"t1": {"protocol": None, "next_hops": []}})
    r["lbs"] = [dict(REPORT["lbs"][0], error="h1 runs no BIRD (...)", bgp="-", bfd=None)]
    out = lbctl.render(r)
    assert "t1 routes 20.0.0.1 via nothing (the VIP is unrouted there)" in out
    assert out.splitlines()[-1] == "h1: h1 runs no BIRD (...)"
