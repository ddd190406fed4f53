"""agent.host and agent.decap without root: the nft script, names, undo order, CLI errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import decap, host
from agent.config import AgentConfig
from agent.host import HostError, HostPlan, HostSetup
from l4lb import cfgfile, rps
from l4lb.wire import IPPROTO_UDP, Encap

PLAN = HostPlan("h3-eth0", "10.2.3.2", ("20.0.0.1", "20.0.0.2"), "l4a-h3-eth0", 1440)


def test_names_fit_nft_and_ifnamsiz() -> None:
    assert host.table_name("h3-eth0") == "l4lb_agent_h3_eth0"
    assert host.tun_name("h3-eth0") == "l4a-h3-eth0"
    assert len(host.tun_name("a-very-long-interface")) == 15


def test_ruleset_replaces_a_stale_table_then_installs_both_chains() -> None:
    text = PLAN.nft_ruleset()
    lines = text.splitlines()
    # create-then-delete first: `nft -f` applies it atomically, stale table or not
    assert lines[0] == "table inet l4lb_agent_h3_eth0 {}"
    assert lines[1] == "delete table inet l4lb_agent_h3_eth0"
    assert 'hook ingress device "h3-eth0"' in text
    assert "ip daddr 10.2.3.2 ip protocol 4 counter drop" in text
    assert "ip saddr { 20.0.0.1, 20.0.0.2 }" in text
    assert "tcp option maxseg size > 1440 tcp option maxseg size set 1440" in text


def test_ruleset_drops_the_encapsulation_it_is_given() -> None:
    udp_tunnel = Encap("udp-test", IPPROTO_UDP, 42)
    plan = HostPlan("h3-eth0", "10.2.3.2", ("20.0.0.1",), "", 1440, encap=udp_tunnel)
    assert "ip daddr 10.2.3.2 ip protocol 17 counter drop" in plan.nft_ruleset()


def test_sysctl_path_keeps_dotted_interface_names() -> None:
    assert host.sysctl_path("net.ipv4.conf.eth0.10.rp_filter") == Path(
        "/proc/sys/net/ipv4/conf/eth0.10/rp_filter"
    )
    assert host.sysctl_path("net.ipv4.ip_forward") == Path("/proc/sys/net/ipv4/ip_forward")


class FakeHost:
    """Records commands; fails the one matching `fail_on`."""

    def __init__(self, fail_on: str = "") -> None:
        self.calls: list[str] = []
        self.fail_on = fail_on

    def __call__(self, argv: list[str], stdin: str | None) -> None:
        line = " ".join(argv)
        self.calls.append(line)
        if self.fail_on and self.fail_on in line:
            raise HostError(f"{line}: refused")


@pytest.fixture
def fake_proc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A /proc/sys stand-in holding the sysctls the plan touches, all 0."""
    monkeypatch.setattr(host, "SYSCTL_ROOT", tmp_path)
    for key in (
        "net.ipv4.conf.h3-eth0.arp_ignore",
        "net.ipv4.conf.h3-eth0.arp_announce",
        "net.ipv6.conf.l4a-h3-eth0.disable_ipv6",
        "net.ipv4.conf.l4a-h3-eth0.rp_filter",
    ):
        p = host.sysctl_path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("0\n")
    monkeypatch.setattr(host.HostSetup, "_gro_off", lambda self: None)
    return tmp_path


def test_apply_then_undo_restores_everything_newest_first(fake_proc: Path) -> None:
    fake = FakeHost()
    setup = HostSetup(PLAN, runner=fake)
    setup.apply()
    conf = fake_proc / "net/ipv4/conf"
    assert (conf / "h3-eth0/arp_ignore").read_text() == "1"
    assert (conf / "h3-eth0/arp_announce").read_text() == "2"
    assert (conf / "l4a-h3-eth0/rp_filter").read_text() == "2"
    assert "nft -f -" in fake.calls
    fake.calls.clear()
    assert setup.undo() == []
    assert fake.calls == [
        "nft delete table inet l4lb_agent_h3_eth0",
        "ip addr del 20.0.0.2/32 dev l4a-h3-eth0",
        "ip addr del 20.0.0.1/32 dev l4a-h3-eth0",
    ]
    assert (conf / "h3-eth0/arp_ignore").read_text() == "0"
    assert (conf / "h3-eth0/arp_announce").read_text() == "0"


def test_a_failed_step_undoes_the_earlier_ones(fake_proc: Path) -> None:
    fake = FakeHost(fail_on="nft -f")
    setup = HostSetup(PLAN, runner=fake)
    with pytest.raises(HostError, match="nft -f -: refused"):
        setup.apply()
    assert fake.calls[-2:] == [
        "ip addr del 20.0.0.2/32 dev l4a-h3-eth0",
        "ip addr del 20.0.0.1/32 dev l4a-h3-eth0",
    ]
    assert (fake_proc / "net/ipv4/conf/h3-eth0/arp_ignore").read_text() == "0"
    assert setup.undo_steps == []


def test_rps_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    assert decap.rps_mask("off") == 0
    assert decap.rps_mask("6") == 6
    monkeypatch.setattr(rps.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(rps.os, "sched_getaffinity", lambda pid: {1})  # pinned to CPU 1
    assert decap.rps_mask("auto") == 0b1101
    monkeypatch.setattr(rps.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert decap.rps_mask("auto") == 0  # may run anywhere: no core to spare
    with pytest.raises(decap.UsageError, match="--rps"):
        decap.rps_mask("cpu1")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--vip", "20.0.0.300"], "vips: '20.0.0.300' is not an IPv4 address"),
        (["--allow-lb", "10.1.1.2/40"], "allowed_lbs: '10.1.1.2/40'"),
        (["--allow-lb", "10.1.1.2/16"], "allowed_lbs: '10.1.1.2/16'"),
        (["--stats-interval", "-2"], "stats_interval: must be >= 0"),
        (["--server-mss", "100"], "server_mss: must be 536..1440"),
        (["--server-mss", "1460"], "MSS + 60 <= MTU 1500"),
        (["--ring-frames", "2"], "ring_frames: must be >= 16"),
        (["--busy-poll-us", "-1"], "busy_poll_us:"),
        (["--rps", "cpu1"], "--rps"),
        (["--iface", "no-such-if9"], "no interface"),
        (["--config", "/nonexistent/agent.json"], "--config: /nonexistent/agent.json: cannot read"),
    ],
)
def test_bad_cli_input_exits_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--iface", "lo", "--vip", "20.0.0.1", "--allow-lb", "10.1.1.2", "--server-mss", "1440"]
    assert decap.main([*base, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "agent.decap:" in err


def test_without_a_configuration_vips_and_lbs_are_needed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert decap.main(["--iface", "lo", "--vip", "20.0.0.1"]) == 2
    assert "no configuration: give --config FILE" in capsys.readouterr().err


def test_options_override_the_configuration_file(tmp_path: Path) -> None:
    cfg = AgentConfig(vips=("20.0.0.1",), allowed_lbs=("10.1.1.2", "10.1.2.2"), iface="h3-eth0")
    path = tmp_path / "agent-h3-eth0.json"
    path.write_text(cfgfile.dump(cfg))
    got = decap.resolve_config(decap.parse_args(["--config", str(path)]))
    assert got == cfg
    got = decap.resolve_config(
        decap.parse_args(["--config", str(path), "--allow-lb", "10.9.0.0/16", "--stats-file", "-"])
    )
    assert (got.allowed_lbs, got.stats_file, got.vips) == (("10.9.0.0/16",), "", ("20.0.0.1",))
    with pytest.raises(decap.UsageError, match="is for h3-eth0, not h7-eth0"):
        decap.resolve_config(decap.parse_args(["--config", str(path), "--iface", "h7-eth0"]))
