"""fastpath I/O edge without root: CLI argument errors, ethtool/nft/ip parsing, stats file."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from fastpath import lb, neigh, nft, offload, ring, stats


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eth0", "--vip", "20.0.0"], "bad --vip '20.0.0'"),
        (["eth0", "--vip", "20.0.0.1:0"], "bad --vip '20.0.0.1:0'"),
        (["eth0", "--vip", "20.0.0.1:http"], "bad --vip"),
        (["eth0", "--backend", "10.2.3.2=-1"], "weight must be an integer >= 0"),
        (["eth0", "--stats-interval", "0"], "expected a number > 0"),
        (["eth0", "--batch", "x"], "expected an integer > 0"),
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


def test_unknown_interface_and_batch_limit_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert lb.main(["nosuchif0x"]) == 2
    assert "no interface 'nosuchif0x'" in capsys.readouterr().err
    assert lb.main(["lo", "--batch", "1000"]) == 2
    assert "--batch 1000: at most 256" in capsys.readouterr().err


def test_unknown_backend_host_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert lb.main(["lo", "--backend", "h99"]) == 2
    assert "'h99' is neither an IPv4 address nor a host" in capsys.readouterr().err


def test_defaults_come_from_the_deployment() -> None:
    args = lb.build_parser().parse_args(["h1-eth0", "--backend", "h3=2"])
    s = lb.resolve_settings(args)
    assert s["vips"] == (("20.0.0.1", 80),)
    assert s["backends"] == (("10.2.3.2", 2),)
    s = lb.resolve_settings(lb.build_parser().parse_args(["h1-eth0"]))
    assert [ip for ip, _ in s["backends"]] == ["10.2.3.2", "10.4.7.2", "10.6.11.2", "10.8.15.2"]


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
    assert "ip daddr { 20.0.0.1, 20.0.0.3 } counter drop" in text
    assert text.index("delete table netdev l4lb_h1_eth0") < text.rindex("table netdev")


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
    w = stats.StatsWriter(path, out)
    w.emit({"a": 1})
    w.emit({"a": 2, "final": True})
    lines = out.getvalue().splitlines()
    assert [json.loads(x)["a"] for x in lines] == [1, 2]
    assert stats.read_stats(path) == {"a": 2, "final": True}
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind
    assert stats.default_stats_path("h1-eth0") == Path("/run/l4lb/lb-h1-eth0.json")


def test_ring_geometry() -> None:
    assert ring.ring_geometry(4096, 2048) == (4096, 2048, 2048, 4096)
    bs, bn, fs, fn = ring.ring_geometry(10, 2048)
    assert fs == 2048 and fn >= 10 and bs % fs == 0 and fn == bn * (bs // fs)
    with pytest.raises(ValueError, match="multiple of 16"):
        ring.ring_geometry(10, 1000)


def test_auto_rps_mask_is_the_cpus_outside_the_affinity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lb.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(lb.os, "sched_getaffinity", lambda pid: {0})
    assert lb.auto_rps_mask() == 0b1110
    monkeypatch.setattr(lb.os, "sched_getaffinity", lambda pid: {1, 2})
    assert lb.auto_rps_mask() == 0b1001
    monkeypatch.setattr(lb.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert lb.auto_rps_mask() == 0  # may run anywhere: no core to spare
