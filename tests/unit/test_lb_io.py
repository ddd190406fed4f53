"""The LB's I/O edge without root: CLI argument errors, ethtool/nft/ip parsing, stats file, RPS
masks, ring geometry and slot layout."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import pytest

from fastpath import lb, neigh, nft, offload
from fastpath.config import LbConfig
from l4lb import cfgfile, ring, rps, statsfile


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eth0", "--vip", "20.0.0"], "bad --vip '20.0.0'"),
        (["eth0", "--vip", "20.0.0.1:0"], "bad --vip '20.0.0.1:0'"),
        (["eth0", "--vip", "20.0.0.1:http"], "bad --vip"),
        (["eth0", "--backend", "10.2.3.2=-1"], "weight must be an integer >= 0"),
        (["eth0", "--stats-interval", "0"], "expected a number > 0"),
        (["eth0", "--batch", "x"], "argument --batch: must be an integer > 0"),
        ([], "the following arguments are required: IFACE"),
    ],
)
def test_bad_arguments_exit_2_with_a_reason(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        lb.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


BASE = ["--vip", "20.0.0.1:80", "--backend", "10.2.3.2"]


def test_unknown_interface_and_batch_limit_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert lb.main(["nosuchif0x", *BASE]) == 2
    assert "no interface 'nosuchif0x'" in capsys.readouterr().err
    assert lb.main(["lo", *BASE, "--batch", "1000"]) == 2
    assert "batch: must be 1..256, not 1000" in capsys.readouterr().err


def test_without_a_configuration_vips_and_backends_are_needed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert lb.main(["lo", "--config", "/nonexistent/lb.json"]) == 2
    assert "--config: /nonexistent/lb.json: cannot read" in capsys.readouterr().err
    assert lb.main(["lo9x"]) == 2
    err = capsys.readouterr().err
    assert "no configuration for lo9x: give --config FILE" in err and "--vip and --backend" in err


def write_config(tmp_path: Path, **fields: object) -> Path:
    cfg = LbConfig(
        iface="h1-eth0",
        vips=(("20.0.0.1", 80),),
        backends=(("10.2.3.2", 1), ("10.4.7.2", 1)),
        names=(("10.2.3.2", "h3"), ("10.4.7.2", "h7")),
        hash_seed=77,
    )
    path = tmp_path / "lb-h1-eth0.json"
    path.write_text(cfgfile.dump(dataclasses.replace(cfg, **fields)))
    return path


def test_options_override_the_configuration_file(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    args = lb.build_parser().parse_args(["h1-eth0", "--config", str(path), "--backend", "h7=3"])
    cfg = lb.resolve_config(args)
    assert cfg.backends == (("10.4.7.2", 3),)  # by the name the file knows
    assert (cfg.vips, cfg.hash_seed, cfg.batch) == ((("20.0.0.1", 80),), 77, 256)
    args = lb.build_parser().parse_args(
        ["h1-eth0", "--config", str(path), "--batch", "64", "--stats-file", "-", "--no-nft"]
    )
    cfg = lb.resolve_config(args)
    assert (cfg.batch, cfg.stats_file, cfg.nft, cfg.backends[0]) == (64, "", False, ("10.2.3.2", 1))


def test_a_bad_configuration_file_names_the_file_and_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path)
    data = json.loads(path.read_text())
    data["hash_seed"] = 2**60
    path.write_text(json.dumps(data))
    assert lb.main(["h1-eth0", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: hash_seed: must be an integer 0 <= seed < 2**56" in err
    data["hash_seed"] = 1
    data["backlog"] = 5
    path.write_text(json.dumps(data))
    assert lb.main(["h1-eth0", "--config", str(path)]) == 2
    assert "unknown key(s) 'backlog'" in capsys.readouterr().err
    assert lb.main(["h2-eth0", "--config", str(write_config(tmp_path))]) == 2
    assert "is for h1-eth0, not h2-eth0" in capsys.readouterr().err


def test_the_announcement_settings_come_from_the_file_and_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, announce=True, bfd_interval_ms=50, bfd_multiplier=5)
    cfg = lb.resolve_config(lb.build_parser().parse_args(["h1-eth0", "--config", str(path)]))
    assert (cfg.announce, cfg.bfd_interval_ms, cfg.bfd_multiplier) == (True, 50, 5)
    args = lb.build_parser().parse_args(["h1-eth0", "--config", str(path), "--no-announce"])
    assert lb.resolve_config(args).announce is False
    args = lb.build_parser().parse_args(["lo", "--vip", "20.0.0.1", "--backend", "10.2.3.2"])
    assert lb.resolve_config(args).announce is False  # by hand, without a file: not announced
    for field, value, why in (
        ("bfd_interval_ms", 5, "bfd_interval_ms: must be an integer in 10..10000, not 5"),
        ("bfd_multiplier", 0, "bfd_multiplier: must be an integer in 1..255, not 0"),
        ("bfd_multiplier", True, "bfd_multiplier: must be an integer, not True"),  # cfgfile
    ):
        data = json.loads(write_config(tmp_path).read_text())
        data[field] = value
        path.write_text(json.dumps(data))
        assert lb.main(["h1-eth0", "--config", str(path)]) == 2
        assert why in capsys.readouterr().err


def test_unknown_backend_host_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert lb.main(["lo", "--vip", "20.0.0.1", "--backend", "h99"]) == 2
    assert "'h99' is neither an IPv4 address nor a host" in capsys.readouterr().err
    path = write_config(tmp_path)
    assert lb.main(["h1-eth0", "--config", str(path), "--backend", "h99"]) == 2
    assert "(h3, h7)" in capsys.readouterr().err


def test_parse_vip_and_backend() -> None:
    assert lb.parse_vip("20.0.0.1") == ("20.0.0.1", None)
    assert lb.parse_vip("20.0.0.1:443") == ("20.0.0.1", 443)
    assert lb.parse_backend("10.2.3.2") == ("10.2.3.2", 1)
    assert lb.parse_backend("10.2.3.2=0") == ("10.2.3.2", 0)


ETHTOOL_K = """Features for veth0:
rx-checksumming: on
tx-checksumming: on
tcp-segmentation-offload: on
\ttx-tcp-segmentation: on
generic-segmentation-offload: on
generic-receive-offload: off
large-receive-offload: off [fixed]
"""


def test_parse_ethtool_features() -> None:
    feats = offload.parse_features(ETHTOOL_K)
    assert feats["generic-receive-offload"] == (False, False)
    assert feats["large-receive-offload"] == (False, True)
    assert feats["tx-tcp-segmentation"] == (True, False)


def test_offloads_change_only_what_is_on_and_restore_it(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def fake(args: list[str]) -> str:
        calls.append(list(args))
        return ETHTOOL_K

    monkeypatch.setattr(offload, "_ethtool", fake)
    o = offload.Offloads("veth0")
    assert o.apply() == {"tso": True, "gso": True}
    assert calls[1:] == [["-K", "veth0", "tso", "off"], ["-K", "veth0", "gso", "off"]]
    calls.clear()
    o.restore()
    assert sorted(calls) == [["-K", "veth0", "gso", "on"], ["-K", "veth0", "tso", "on"]]
    calls.clear()
    o.restore()  # twice: nothing left to do
    assert calls == []


def test_nft_ruleset_names_the_device_and_vips() -> None:
    text = nft.ruleset("h1-eth0", ["20.0.0.1", "20.0.0.3", "20.0.0.1"])
    assert nft.table_name("h1-eth0") == "l4lb_h1_eth0"
    assert 'hook ingress device "h1-eth0"' in text
    assert "ip daddr { 20.0.0.1, 20.0.0.3 } counter name vip_tapped drop" in text
    assert "th dport" not in text  # every port served: no frame to a VIP is filtered
    assert text.index("delete table netdev l4lb_h1_eth0") < text.rindex("table netdev")


def test_nft_ruleset_counts_wrong_ports_apart_as_the_bpf_filter_drops_them() -> None:
    vips = [("20.0.0.1", 80), ("20.0.0.1", 443), ("20.0.0.2", None), ("20.0.0.3", 53)]
    vips.append(("20.0.0.3", None))  # any port wins over a port list, as in the BPF filter
    text = nft.ruleset("h1-eth0", vips)
    wrong = [line.strip() for line in text.splitlines() if "th dport" in line]
    assert wrong == [
        "ip daddr 20.0.0.1 meta l4proto { tcp, udp } th dport != { 80, 443 } "
        "counter name filtered_wrong_port drop"
    ]
    assert "counter filtered_wrong_port { }" in text and "counter vip_tapped { }" in text
    # The wrong-port rule comes first: the catch-all would otherwise count those frames.
    assert text.index("filtered_wrong_port drop") < text.index("vip_tapped drop")
    assert "ip daddr { 20.0.0.1, 20.0.0.2, 20.0.0.3 } counter name vip_tapped drop" in text


def test_nft_counters_parse_from_nft_json() -> None:
    text = (
        '{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}}, '
        '{"counter": {"family": "netdev", "name": "filtered_wrong_port", "table": "l4lb_v0", '
        '"handle": 2, "packets": 1000, "bytes": 60000}}, {"counter": {"family": "netdev", '
        '"name": "vip_tapped", "table": "l4lb_v0", "handle": 3, "packets": 7, "bytes": 420}}]}'
    )
    assert nft.parse_counters(text) == {"filtered_wrong_port": 1000, "vip_tapped": 7}
    assert nft.parse_counters('{"nftables": []}') == {}
    with pytest.raises(ValueError):
        nft.parse_counters("not json")


def test_neighbour_lookup_uses_usable_states(monkeypatch: pytest.MonkeyPatch) -> None:
    tables = {
        ("route", "get", "10.2.3.2"): [{"dst": "10.2.3.2", "gateway": "10.1.1.1", "dev": "h1"}],
        ("neigh", "show", "10.1.1.1", "dev", "h1"): [
            {"dst": "10.1.1.1", "lladdr": "00:01:0a:01:01:02", "state": ["STALE"]}
        ],
        ("neigh", "show", "10.9.9.9", "dev", "h1"): [{"dst": "10.9.9.9", "state": ["FAILED"]}],
    }
    monkeypatch.setattr(neigh, "_ip_json", lambda args: tables.get(tuple(args), []))
    assert neigh.route_to("10.2.3.2") == ("10.1.1.1", "h1")
    assert neigh.lookup_mac("10.1.1.1", "h1") == bytes.fromhex("00010a010102")
    assert neigh.lookup_mac("10.9.9.9", "h1") is None
    nh = neigh.NextHop("10.2.3.2", "h1", period=5.0)
    assert nh.resolve() == bytes.fromhex("00010a010102")
    assert nh.refresh(nh.next_refresh + 1) is None  # unchanged
    tables[("neigh", "show", "10.1.1.1", "dev", "h1")][0]["lladdr"] = "00:01:0a:01:01:99"
    assert nh.refresh(nh.next_refresh + 1) == bytes.fromhex("00010a010199")
    with pytest.raises(neigh.NeighError, match="leaves via h1, not h2"):
        neigh.NextHop("10.2.3.2", "h2").resolve()


def test_stats_line_and_atomic_file(tmp_path: Path) -> None:
    out = io.StringIO()
    path = tmp_path / "sub" / "lb-x.json"
    w = statsfile.StatsWriter(path, "test", out)
    w.emit({"a": 1})
    w.emit({"a": 2, "final": True})
    lines = out.getvalue().splitlines()
    assert [json.loads(x)["a"] for x in lines] == [1, 2]
    assert statsfile.read_stats(path) == {"a": 2, "final": True}
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind
    assert statsfile.default_path("lb", "h1-eth0") == Path("/run/l4lb/lb-h1-eth0.json")


def test_an_unwritable_stats_file_is_reported_once_and_the_lines_go_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = io.StringIO()
    w = statsfile.StatsWriter(blocker / "lb.json", "test", out)  # a file as its directory
    for a in (1, 2):
        w.emit({"a": a})
    assert [json.loads(x)["a"] for x in out.getvalue().splitlines()] == [1, 2]
    assert capsys.readouterr().err.count("test: stats file") == 1
    with pytest.raises(OSError):
        statsfile.write_atomic(blocker / "lb.json", "{}")


def test_ring_geometry() -> None:
    assert ring.ring_geometry(4096, 2048) == (4096, 2048, 2048, 4096)
    bs, bn, fs, fn = ring.ring_geometry(10, 2048)
    assert fs == 2048 and fn >= 10 and bs % fs == 0 and fn == bn * (bs // fs)
    with pytest.raises(ValueError, match="multiple of 16"):
        ring.ring_geometry(10, 1000)


def test_spare_cpus_are_the_online_cpus_outside_the_affinity() -> None:
    four = {0, 1, 2, 3}
    assert rps.spare_cpus({0}, four) == 0b1110
    assert rps.spare_cpus({1, 2}, four) == 0b1001
    assert rps.spare_cpus(four, four) == 0  # may run anywhere: no core to spare
    assert rps.spare_cpus({0}, {0, 2}) == 0b100  # CPU 1 offline


def test_rps_option_values() -> None:
    assert rps.parse_mask("off", "--rps-cpus") is None
    assert rps.parse_mask("6", "--rps-cpus") == 6
    with pytest.raises(rps.UsageError, match="--rps-cpus 'cpu1': auto, off or a hex"):
        rps.parse_mask("cpu1", "--rps-cpus")


def test_slot_layout_keeps_the_header_off_the_status_words() -> None:
    lay = ring.SlotLayout()
    assert (lay.stride, lay.mac, lay.headroom, lay.out) == (2048, 66, 20, 46)
    assert lay.out >= ring.TPACKET2_HDR.size  # the outer header never reaches tp_status
    with pytest.raises(ValueError, match="headroom 40"):
        ring.SlotLayout(headroom=40)
    with pytest.raises(ValueError, match="stride 1000"):
        ring.SlotLayout(stride=1000)


def test_fake_ring_slots_are_laid_out_as_the_kernel_lays_them() -> None:
    """A FakeRing slot, read through the kernel's struct tpacket2_hdr."""
    fake = ring.FakeRing(3)
    fake.put(1, b"x" * 3000, csum_not_ready=True)  # longer than a slot: cut, as the kernel cuts
    status, wire_len, snap, mac, net = ring.TPACKET2_HDR.unpack_from(fake.mem, 2048)[:5]
    assert status == ring.READY | ring.CSUM_NOT_READY
    assert (wire_len, snap, mac, net) == (3000, 2048 - 66, 66, 80)
    slots = fake.slots
    assert (slots.status[1], slots.wire_len[1], slots.snap[1]) == (status, 3000, 2048 - 66)
    assert bytes(slots.frames[1][:4]) == b"xxxx" and slots.starts[1] == 2048 + 66
    assert slots.status[0] == slots.status[2] == ring.KERNEL
