"""The benchmark's testbed and tools on real namespaces: the kernel-router path delivers every
frame the generator sends to the counting sink, the course-style scapy LB encapsulates to a
backend with the inner packet unchanged, and nothing is left behind."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import frames, netns
from bench import testbed as tbm

pytestmark = pytest.mark.netns
REPO = Path(__file__).resolve().parents[2]
PY = sys.executable


@pytest.fixture
def bed() -> Iterator[tbm.Testbed]:
    if why := netns.missing("tcpdump"):
        pytest.skip(why)
    tb = tbm.Testbed(tag="t" + secrets.token_hex(2)).up()
    try:
        yield tb
    finally:
        tb.down()
    assert not {tb.gen, tb.dut, tb.sink, tb.cli} & set(netns.list_netns())


def blast(tb: tbm.Testbed, blob: Path, count: int) -> None:
    argv = [PY, "-m", "bench.blast", "g0", "--frames", str(blob), "--rate", "2000"]
    tb.ns(tb.gen, *argv, "--count", str(count), "--duration", "10", timeout=30)


def rx(tb: tbm.Testbed, ns: str, dev: str) -> int:
    return tb.link_stats(ns, dev)["rx_packets"]


def wait_rx(tb: tbm.Testbed, ns: str, dev: str, before: int, n: int) -> None:
    """Waits until `dev` counted `n` frames since `before`, then a little longer, and checks
    that it counted exactly n (nothing else arrived)."""
    deadline = time.monotonic() + 5
    while rx(tb, ns, dev) - before < n:
        assert time.monotonic() < deadline, f"{dev} counted {rx(tb, ns, dev) - before} of {n}"
        time.sleep(0.05)
    time.sleep(0.2)
    assert rx(tb, ns, dev) - before == n


def test_kernel_router_path_delivers_every_frame(bed: tbm.Testbed, tmp_path: Path) -> None:
    blob = tmp_path / "udp.frames"
    sent = frames.udp_frames(200, tbm.GEN_MAC, tbm.DUT_MAC, tbm.VIP)
    blob.write_bytes(frames.pack_frames(sent))
    bed.set_sink_drop(True)
    bed.set_dut_forwarding(True)
    before = rx(bed, bed.sink, "s0")
    blast(bed, blob, 200)
    wait_rx(bed, bed.sink, "s0", before, 200)
    # With forwarding off (LB-host mode) the DUT's kernel forwards nothing.
    bed.set_dut_forwarding(False)
    before = rx(bed, bed.sink, "s0")
    blast(bed, blob, 50)
    time.sleep(0.3)
    assert rx(bed, bed.sink, "s0") == before


def test_next_hop_counting_counts_at_g0_and_discards(bed: tbm.Testbed, tmp_path: Path) -> None:
    """pps.sh's default counting point: what the DUT sends is counted on g0 and dropped
    there; switched off, gen routes it on to the sink again."""
    blob = tmp_path / "udp.frames"
    blob.write_bytes(frames.pack_frames(frames.udp_frames(100, tbm.GEN_MAC, tbm.DUT_MAC, tbm.VIP)))
    bed.set_sink_drop(True)
    bed.set_dut_forwarding(True)
    bed.set_next_hop_drop(True)
    g0, s0 = rx(bed, bed.gen, "g0"), rx(bed, bed.sink, "s0")
    blast(bed, blob, 100)
    wait_rx(bed, bed.gen, "g0", g0, 100)
    assert rx(bed, bed.sink, "s0") == s0  # dropped at the next hop
    bed.set_next_hop_drop(False)
    blast(bed, blob, 100)
    wait_rx(bed, bed.sink, "s0", s0, 100)
    bed.set_next_hop_drop(False)  # idempotent


def test_scapy_lb_encapsulates_to_a_backend(bed: tbm.Testbed, tmp_path: Path) -> None:
    from scapy.layers.inet import IP
    from scapy.utils import rdpcap

    blob = tmp_path / "udp.frames"
    sent = frames.udp_frames(5, tbm.GEN_MAC, tbm.DUT_MAC, tbm.VIP)
    blob.write_bytes(frames.pack_frames(sent))
    pcap = tmp_path / "sink.pcap"
    bed.set_sink_drop(False)
    log = (tmp_path / "scapy_lb.log").open("w")
    lb = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            bed.dut,
            PY,
            "-m",
            "bench.scapy_lb",
            "d0",
            "--vip",
            tbm.VIP,
            "--backend",
            tbm.SINK_IP,
            "--next-hop-mac",
            tbm.GEN_MAC,
            "--persistent-socket",
            "--duration",
            "40",
        ],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    dump = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            bed.sink,
            "tcpdump",
            "-i",
            "s0",
            "-c",
            "5",
            "-w",
            str(pcap),
            "ip proto 4",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while "ready" not in (tmp_path / "scapy_lb.log").read_text():
            assert lb.poll() is None, (tmp_path / "scapy_lb.log").read_text()
            assert time.monotonic() < deadline, "scapy_lb never became ready"
            time.sleep(0.1)
        time.sleep(0.5)  # tcpdump attached
        blast(bed, blob, 5)
        dump.wait(timeout=20)
    finally:
        for proc in (dump, lb):
            if proc.poll() is None:
                os.killpg(proc.pid, 15)
                proc.wait(timeout=10)
        log.close()
    got = rdpcap(str(pcap))
    assert len(got) == 5
    inner_sent = sorted(f[14:] for f in sent)
    inner_got = sorted(bytes(p[IP].payload) for p in got)
    assert inner_got == inner_sent  # the inner packet travels byte for byte
    for p in got:
        assert p[IP].src == tbm.DUT_IP and p[IP].dst == tbm.SINK_IP and p[IP].proto == 4
