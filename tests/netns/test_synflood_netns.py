"""A SYN flood against the real LB while long downloads run (bench.synflood at CI size):
every download completes with the right sha256 and its flow stays tracked as established;
the flood goes over the insert cap (flood_bypass) and never shrinks the established table."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.synflood import Options, run

pytestmark = [pytest.mark.netns, pytest.mark.needs("curl", "ethtool", tun=True)]

SYNS = 50_000
CAP = 2_000  # far below the flood's rate (the flooder sends > 100,000/s here)


def test_downloads_survive_a_syn_flood(netns, tmp_path: Path) -> None:
    res = run(
        Options(syns=SYNS, downloads=3, conn_capacity=5_000, half_open_capacity=2_000,
                insert_rate=CAP, timeout=180),
        tmp_path,
        netns=netns,
    )  # fmt: skip
    assert res["syns_sent"] == SYNS
    assert res["failed_downloads"] == [] and res["downloads_ok"] == 3
    assert res["download_flows_tracked_after"] == 3 and res["download_backends_kept"]
    # The flood was over the cap: most SYNs forwarded untracked; at most ~CAP per second
    # inserted, and the half-open table held no more than its capacity.
    assert res["flood_bypass"] > 0
    assert res["new_flows"] <= CAP * (res["syn_seconds"] + 3)
    assert res["half_open_after"] <= 2_000
    # The established table never shrank because of the SYNs.
    assert res["established_min_during"] >= res["established_before"] >= 3
    assert res["rotations_during"] == 0 and res["samples"] > 0
    assert res["lb_internal_errors"] == 0
