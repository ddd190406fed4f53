"""The benchmark's pure parts: per-round ratios and medians, and the frames it offers."""

from __future__ import annotations

import struct

import pytest

from bench import frames, stats
from bench.scapy_lb import five_tuple_backend
from l4lb.checksum import checksum
from l4lb.wire import IPPROTO_IPIP, parse_mac


def rnd(fast: float, kernel: float, scapy: float, **extra: object) -> dict[str, object]:
    r: dict[str, object] = {
        "fastpath": {"split": {"delivered_pps": fast}, "dut-core": {"delivered_pps": fast / 2}},
        "kernel": {"split": {"delivered_pps": kernel / 3}, "dut-core": {"delivered_pps": kernel}},
        "scapy": {"delivered_pps": scapy},
    }
    r.update(extra)
    return r


def test_median_odd_even_empty() -> None:
    assert stats.median([3.0, 1.0, 2.0]) == 2.0
    assert stats.median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert stats.median([]) is None


def test_ratios_are_per_round_then_median() -> None:
    # Per-round ratios 0.5, 0.75, 0.444: median 0.5; the ratio of the medians (400 / 900) would
    # be 0.444, so the test tells the two computations apart.
    rounds = [rnd(500, 1000, 2), rnd(300, 400, 1), rnd(400, 900, 4)]
    s = stats.summarize(rounds)
    assert s["ratio_to_kernel"] == pytest.approx(0.5)
    assert s["fastpath_pps"] == 400  # best placement per round, then the median
    assert s["kernel_pps"] == 900
    assert [f["ratio_to_scapy"] for f in s["per_round"]] == pytest.approx([250, 300, 100])
    assert s["ratio_to_scapy"] == pytest.approx(250.0)
    assert s["by_placement"]["fastpath"] == {"split": 400, "dut-core": 200}
    assert s["by_placement"]["kernel"] == {"split": 300, "dut-core": 900}


def test_missing_phases_give_none_not_zero() -> None:
    rounds = [
        {"kernel": {"split": {"delivered_pps": 10}}, "fastpath": {"split": {"error": "x"}}},
        {"kernel": {"error": "crashed", "traceback": "..."}, "scapy": {"error": "x"}},
    ]
    s = stats.summarize(rounds)
    assert s["kernel_pps"] == 10
    assert s["fastpath_pps"] is None
    assert s["ratio_to_kernel"] is None
    assert s["latency_ratio"] is None


def test_latency_ratio_and_paced_loss() -> None:
    r = rnd(1, 1, 1, latency={"lb_rps": 3000.0, "kernel_rps": 4000.0}, paced={"loss": 0.001})
    f = stats.round_figures(r)
    assert f["latency_ratio"] == pytest.approx(0.75)
    assert f["loss_at_paced"] == 0.001


def test_loss() -> None:
    assert stats.loss(1000, 900) == pytest.approx(0.1)
    assert stats.loss(0, 5) == 0.0
    assert stats.loss(10, 12) == 0.0  # late arrivals from before the window never go negative


def test_udp_frames_are_64_bytes_distinct_flows_valid_checksums() -> None:
    out = frames.udp_frames(1000, "02:00:00:00:00:01", "02:00:00:00:00:02", "20.0.0.1", 9)
    assert len(out) == 1000
    assert {len(f) for f in out} == {60}  # + 4 bytes FCS on the wire
    tuples = {(f[26:30], f[34:36]) for f in out}
    assert len(tuples) == 1000
    for f in out[:50]:
        assert checksum(f[14:34]) == 0  # a valid header sums to 0xffff
        assert f[23] == 17 and f[30:34] == bytes([20, 0, 0, 1])
        assert struct.unpack("!H", f[36:38])[0] == 9


def test_ipip_frames_wrap_the_same_flows() -> None:
    out = frames.ipip_frames(300, "02:00:00:00:00:01", "02:00:00:00:00:02", "10.0.0.2",
                             "10.0.0.1", "20.0.0.1")  # fmt: skip
    f = out[0]
    assert f[23] == IPPROTO_IPIP and len(f) == 14 + 20 + 46
    assert checksum(f[14:34]) == 0 and checksum(f[34:54]) == 0
    assert f[50:54] == bytes([20, 0, 0, 1])


def test_trafgen_config_one_block_per_frame() -> None:
    text = frames.trafgen_config([b"\x01\x02", b"\xff"])
    blocks = [ln for ln in text.splitlines() if ln.startswith("{")]
    assert blocks == ["{ 0x01, 0x02 }", "{ 0xff }"]


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError):
        parse_mac("02:00:00")
    with pytest.raises(ValueError):
        list(frames.flows(0))


def test_scapy_baseline_hash_is_consistent_and_spreads() -> None:
    backends = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]
    picks = [five_tuple_backend(backends, "1.1.1.1", "20.0.0.1", 6, p, 80) for p in range(4000)]
    again = [five_tuple_backend(backends, "1.1.1.1", "20.0.0.1", 6, p, 80) for p in range(4000)]
    assert picks == again
    assert all(800 < picks.count(b) < 1200 for b in backends)


def test_packed_frames_round_trip_and_bad_blobs() -> None:
    fr = [b"\x01" * 60, b"\x02" * 80]
    assert frames.unpack_frames(frames.pack_frames(fr)) == fr
    for bad in (b"", b"\x00", b"\x00\x05abc", b"\x00\x00"):
        with pytest.raises(ValueError):
            frames.unpack_frames(bad)


def test_cpu_shares_from_proc_stat() -> None:
    before = stats.parse_proc_stat(
        "cpu  1 2 3 4 5 6 7 8 0 0\ncpu0 100 0 100 700 0 0 100 0 0 0\ncpu1 0 0 0 1000 0 0 0 0 0 0\n"
    )
    after = stats.parse_proc_stat(
        "cpu  9 9 9 9 9 9 9 9 0 0\ncpu0 150 0 150 700 0 0 200 0 0 0\ncpu1 0 0 0 1200 0 0 0 0 0 0\n"
    )
    shares = stats.cpu_shares(before, after)
    assert shares["cpu0"] == {"busy": 1.0, "softirq": 0.5}
    assert shares["cpu1"] == {"busy": 0.0, "softirq": 0.0}
    assert "cpu" not in shares


def test_workers_figures_pair_each_round_with_its_one_worker_run() -> None:
    def rnd(one: int, two: int | None) -> dict:
        r: dict = {"fastpath": {"split": {"delivered_pps": one}, "gen-core": {"delivered_pps": 1}}}
        if two is not None:
            r["workers2"] = {"split": {"delivered_pps": two}}
        return r

    rounds = [rnd(100, 150), rnd(200, 200), rnd(50, 100), rnd(80, None)]
    out = stats.workers_figures(rounds, [1, 2, 4])
    assert out["workers_pps"] == {"1": 90.0, "2": 150.0, "4": None}
    # per round 1.5, 1.0, 2.0 (the round without a 2-worker run has no ratio): median 1.5
    assert out["workers_scaling"] == {"1": 1.0, "2": 1.5, "4": None}


def test_pps_puts_workers_off_the_generator_core_when_there_are_more_than_two() -> None:
    from bench.pps import worker_cpus

    assert worker_cpus(2, gen_cpu=1) == "0,1"  # two CPUs: nowhere else to go
    assert worker_cpus(4, gen_cpu=1) == "0,2,3"
