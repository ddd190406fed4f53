"""controller.exporter's scrape without root: the real schema objects (LbStats, AgentStats) of a
real packet core, through the view and the table, rendered by prometheus_client and parsed
back with its own text parser."""

from __future__ import annotations

import os
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.config import AgentConfig
from agent.counters import DecapCounters, DecapDrop
from agent.stats import AgentStats
from bench.frames import udp_frames
from controller.exporter import exporter, mapping
from controller.exporter.config import ExporterConfig
from controller.exporter.sources import SourceError
from fastpath.balancer import Balancer
from fastpath.config import BalancerConfig, LbConfig
from fastpath.counters import DropReason
from fastpath.runner import make_backends
from fastpath.stats import CoreStats, FlowStats, IoStats, LbStats
from l4lb.errors import ConfigError

VIP = "20.0.0.1"
BACKENDS = (("10.2.3.2", 1), ("10.4.7.2", 0))
LB_CFG = LbConfig(
    iface="h1-eth0", vips=((VIP, 80),), backends=BACKENDS, conn_capacity=5000,
    names=(("10.2.3.2", "h3"), ("10.4.7.2", "h7")),
)  # fmt: skip
AGENT_CFG = AgentConfig(vips=(VIP,), allowed_lbs=("10.1.1.2",), iface="h3-eth0")


def to_vip(n: int) -> list[bytes]:
    """n UDP frames to VIP:80, each of its own flow."""
    return udp_frames(n, "00:00:0a:09:00:02", "00:00:0a:01:01:02", VIP, dport=80)


def lb_show(frames: int) -> dict[str, Any]:
    """A real LbStats of a Balancer that handled `frames` UDP frames to VIP:80 and 3 with TTL 1."""
    core = BalancerConfig(
        vips=LB_CFG.vips, backends=BACKENDS, local_ip="10.1.1.2",
        local_mac=bytes(6), next_hop_mac=bytes.fromhex("00010a010101"),
    )  # fmt: skip
    bal = Balancer(core)
    model = make_backends(LB_CFG, core, bal, 1.0)  # the LB's backend set, as at its start
    out = memoryview(bytearray(2048))
    batch = to_vip(frames)
    for f in batch:
        bal.process(f, out, 1.0)
    for f in batch[:3]:
        expired = bytearray(f)
        expired[22] = 1  # TTL
        bal.process(bytes(expired), out, 1.0)
    return LbStats(
        time=1.0, iface="h1-eth0", pid=os.getpid(), uptime_s=2.5, final=False, rx_pps=0,
        tx_pps=0, core=CoreStats.of(bal.counters), io=IoStats(rx_frames=frames + 3),
        kernel_drops=4, tracked_flows=len(bal.conntrack), next_hop_mac="00:01:0a:01:01:01",
        rps_cpus=None, nft_dropped=None, backends=model.stats(1.0, 1.0), table=model.table,
        flows=FlowStats.of(bal.conntrack),
    ).as_dict()  # fmt: skip


def agent_show(delivered: int, spoofed: int) -> dict[str, Any]:
    c = DecapCounters()
    c.delivered = delivered
    c.drops[DecapDrop.SPOOFED_SOURCE] = spoofed
    return AgentStats.of(c, "show", "h3-eth0", 1.0, 3.0, 2, None).as_dict()


class FakeSources:
    def __init__(self, show: dict[str, Any] | None, nft: dict[str, int] | None = None) -> None:
        self.show = show
        self.nft_counts = nft
        self.listening = True

    def control(self) -> tuple[dict[str, Any], dict[str, Any]]:
        if self.show is None:
            raise SourceError("control", "no control socket")
        return self.show, {"pid": os.getpid()}

    def nft(self) -> dict[str, int]:
        if self.nft_counts is None:
            raise SourceError("nft", "nft refused")
        return self.nft_counts

    def netdev(self) -> dict[str, dict[str, int]]:
        return {"lo": {"rx_bytes": 1, "tx_bytes": 1}, "h1-eth0": {"rx_bytes": 10, "tx_bytes": 20}}

    def servers(self, vips: Any, ports: Any) -> list[tuple[str, int, bool]]:
        return [(v, p, self.listening) for v in vips for p in ports]


def scrape(kind: str, process: Any, src: FakeSources, ports: tuple[int, ...] = ()) -> dict:
    """name -> {frozenset(labels.items()): value}, as a Prometheus server would parse it."""
    cfg = ExporterConfig(kind, "unused.json", "10.1.1.2", server_ports=ports)
    text = generate_latest(exporter.registry(exporter.Collector(cfg, process, src), kind))
    out: dict[str, dict[frozenset, float]] = {}
    for fam in text_string_to_metric_families(text.decode()):
        for s in fam.samples:
            out.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return out


def one(metrics: dict, name: str, **labels: str) -> float:
    return metrics[name][frozenset(labels.items())]


def test_lb_metrics_carry_the_core_counters_and_the_filtered_drops() -> None:
    show = lb_show(200)
    m = scrape("lb", LB_CFG, FakeSources(show, {"filtered_wrong_port": 1000}))
    assert one(m, "l4lb_up") == 1
    assert one(m, "l4lb_rx_packets_total") == 203
    assert one(m, "l4lb_forwarded_packets_total") == 200
    assert one(m, "l4lb_kernel_drops_total") == 4
    assert one(m, "l4lb_conntrack_flows") == 200 and one(m, "l4lb_conntrack_capacity") == 5000
    # 200 UDP flows: new and established at once; no SYN, so nothing half-open or bypassed.
    assert one(m, "l4lb_new_flows_total") == 200
    assert one(m, "l4lb_conntrack_half_open_flows") == 0
    assert one(m, "l4lb_conntrack_flood_bypass_total") == 0
    assert one(m, "l4lb_conntrack_nonsyn_miss_total") == 0
    assert one(m, "l4lb_conntrack_half_open_evictions_total") == 0
    assert one(m, "l4lb_drops_total", reason="filtered_wrong_port") == 1000
    assert one(m, "l4lb_drops_total", reason="ttl_expired") == 3
    reasons = {dict(k)["reason"] for k in m["l4lb_drops_total"]}
    assert reasons == {r.name.lower() for r in DropReason} | {"filtered_wrong_port"}
    # Per backend: every frame went to h3 (h7 drains), labels as haproxy's exporter has them.
    h3 = {"vip": VIP, "backend": "10.2.3.2", "server": "h3"}
    h7 = {"vip": VIP, "backend": "10.4.7.2", "server": "h7"}
    assert one(m, "l4lb_backend_packets_total", **h3) == 200
    assert one(m, "l4lb_backend_packets_total", **h7) == 0
    assert one(m, "l4lb_backend_weight", **h3) == 1 and one(m, "l4lb_backend_weight", **h7) == 0
    status = {
        dict(k)["state"]: v for k, v in m["l4lb_backend_status"].items() if ("server", "h7") in k
    }
    assert status == {"UP": 0, "DRAIN": 1, "DOWN": 0, "MAINT": 0}
    # The LB's backend model: its flows, bytes (inner IPv4 total length) and table share.
    assert one(m, "l4lb_backend_active_flows", **h3) == 200
    assert one(m, "l4lb_backend_connections_total", **h3) == 200
    assert one(m, "l4lb_backend_active_flows", **h7) == 0
    assert one(m, "l4lb_backend_bytes_total", **h3) == sum(len(f) - 14 for f in to_vip(200))
    assert one(m, "l4lb_backend_table_slots", **h3) == show["table"]["size"]
    assert one(m, "l4lb_backend_table_slots", **h7) == 0
    assert one(m, "l4lb_fail_open") == 0 and one(m, "l4lb_vip_announced") == 0
    assert one(m, "l4lb_host_network_transmit_bytes_total", device="h1-eth0") == 20
    assert "lo" not in {dict(k).get("device") for k in m["l4lb_host_network_transmit_bytes_total"]}
    # The LB's own process (here: this test's), through ProcessCollector on the PID it gave.
    assert one(m, "l4lb_process_resident_memory_bytes") > 0
    assert "l4lb_process_cpu_seconds_total" in m
    assert one(m, "l4lb_exporter_errors_total", reason="control") == 0


def test_lb_down_serves_up_0_and_counts_the_error_and_the_rest_still_comes() -> None:
    m = scrape("lb", LB_CFG, FakeSources(None, None))
    assert one(m, "l4lb_up") == 0
    assert one(m, "l4lb_exporter_errors_total", reason="control") == 1
    assert one(m, "l4lb_exporter_errors_total", reason="nft") == 1
    assert "l4lb_rx_packets_total" not in m and "l4lb_process_cpu_seconds_total" not in m
    # What does not depend on the process: its configured backends and the host's counters.
    assert one(m, "l4lb_backend_weight", vip=VIP, backend="10.2.3.2", server="h3") == 1
    assert "l4lb_backend_packets_total" not in m
    assert one(m, "l4lb_host_network_receive_bytes_total", device="h1-eth0") == 10


def test_a_value_of_the_wrong_type_is_left_out_and_counted() -> None:
    show = lb_show(5)
    show["kernel_drops"] = "many"
    show["core"]["drops"]["ttl_expired"] = None
    m = scrape("lb", LB_CFG, FakeSources(show, {}))
    assert "l4lb_kernel_drops_total" not in m
    assert ("reason", "ttl_expired") not in {p for k in m["l4lb_drops_total"] for p in k}
    assert one(m, "l4lb_exporter_errors_total", reason="bad_value") == 2
    assert one(m, "l4lb_rx_packets_total") == 8


def test_agent_metrics_and_the_local_server() -> None:
    src = FakeSources(agent_show(delivered=77, spoofed=5))
    m = scrape("agent", AGENT_CFG, src, ports=(80,))
    assert one(m, "l4lb_agent_up") == 1
    assert one(m, "l4lb_agent_decap_total") == 77
    assert one(m, "l4lb_agent_frames_total") == 82
    assert one(m, "l4lb_agent_drops_total", reason="spoofed_source") == 5
    assert {dict(k)["reason"] for k in m["l4lb_agent_drops_total"]} == {
        r.name.lower() for r in DecapDrop
    }
    assert one(m, "l4lb_agent_kernel_drops_total") == 2
    assert one(m, "l4lb_agent_server_listening", vip=VIP, port="80") == 1
    assert one(m, "l4lb_agent_process_resident_memory_bytes") > 0
    src.listening = False
    m = scrape("agent", AGENT_CFG, src, ports=(80,))
    assert one(m, "l4lb_agent_server_listening", vip=VIP, port="80") == 0


def test_every_row_names_a_metric_once_per_type_and_counters_end_in_total() -> None:
    for rows in mapping.TABLES.values():
        kinds: dict[str, str] = {}
        for row in [*rows, mapping.ERRORS]:
            assert kinds.setdefault(row.name, row.kind) == row.kind, row.name
            assert row.name.endswith("_total") == (row.kind == "counter"), row.name
            assert row.name.startswith("l4lb_")
            assert not row.states or row.kind == "state"


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"kind": "nginx"}, "kind: must be one of lb, agent"),
        ({"listen": "h1"}, "listen: 'h1' is not an IPv4 address"),
        ({"port": 0}, "port: must be a port 1..65535"),
        ({"server_ports": (80, 70000)}, "server_ports: must be a port"),
    ],
)
def test_bad_exporter_configuration_is_refused_naming_the_field(fields: dict, why: str) -> None:
    base: dict[str, Any] = {"kind": "lb", "process_config": "x.json", "listen": "10.1.1.2"}
    with pytest.raises(ConfigError, match=why):
        ExporterConfig(**{**base, **fields})
