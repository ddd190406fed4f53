"""What the exporters publish: one table per process kind, from the process's *view* (its `show`
reply and what the exporter adds to it, controller.exporter.view) to Prometheus metric families.

A row names a metric, its type and help, and where its value sits in the view (a dotted path):
- a number: one sample;
- a {key: number} dict, with one label: one sample per key, the key the label's value (drops by
  reason);
- a list of dicts (`field` set): one sample per dict, the labels from its fields `labels`, the
  value from its field `field` (per backend, per interface).
A "state" row reads a string field and emits one sample per state in `states`: 1 for the row's
state, 0 for the others (haproxy_server_status's shape: `== 1` selects the current one).
Rows sharing a name make one family (the core's drops and the nftables drops). A path missing
from the view is no error: the process does not report that (yet). A value of the wrong type is
counted in the returned `bad` list and left out.

Names follow Prometheus' conventions: base units, `_total` on counters, one prefix per kind
(`l4lb_` for the load balancer, `l4lb_agent_` for the agent); labels as haproxy's exporter
shapes them (`vip`, `backend`, `state`; `reason` as Cilium's drop counters). Extending the
exporter is adding a row (and, for a new source, its entry in the view).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

Kind = Literal["counter", "gauge", "state"]
BACKEND_STATES = ("UP", "DRAIN", "DOWN", "MAINT")
"""haproxy's names. An LB's backend is UP (taking new flows), DRAIN (weight 0: tracked flows
stay), MAINT (taken out by an operator: `backend down`) or DOWN (failed health checks; also
while the LB fails open, which l4lb_fail_open says)."""


@dataclass(frozen=True)
class Row:
    name: str
    kind: Kind
    help: str
    path: str
    labels: tuple[str, ...] = ()
    field: str = ""
    states: tuple[str, ...] = ()


BACKEND_LABELS = ("vip", "backend", "server")
DEVICE = ("device",)

COMMON = (
    Row("l4lb_host_network_receive_bytes_total", "counter",
        "Bytes received by the host's interface (its /proc/net/dev).", "netdev", DEVICE,
        "rx_bytes"),
    Row("l4lb_host_network_transmit_bytes_total", "counter",
        "Bytes sent by the host's interface (its /proc/net/dev).", "netdev", DEVICE, "tx_bytes"),
    Row("l4lb_host_network_receive_packets_total", "counter",
        "Packets received by the host's interface.", "netdev", DEVICE, "rx_packets"),
    Row("l4lb_host_network_transmit_packets_total", "counter",
        "Packets sent by the host's interface.", "netdev", DEVICE, "tx_packets"),
)  # fmt: skip
ERRORS = Row(
    "l4lb_exporter_errors_total", "counter",
    "Sources the exporter could not read, by reason (control, nft, netdev, listeners; "
    "bad_value: a value of the wrong type, left out).", "errors", ("reason",),
)  # fmt: skip
"""Rendered last, after every other row of a scrape (so its bad values are counted in it)."""

LB = (
    Row("l4lb_up", "gauge", "1 if the load balancer answered this scrape on its control channel.",
        "up"),
    Row("l4lb_uptime_seconds", "gauge", "Seconds since the load balancer started.",
        "show.uptime_s"),
    Row("l4lb_rx_packets_total", "counter",
        "Frames taken from the receive ring (forwarded + dropped by the packet core).",
        "show.core.frames"),
    Row("l4lb_rx_batches_total", "counter",
        "Non-empty receive batches (rx packets / batches is the mean batch).", "show.io.batches"),
    Row("l4lb_tx_packets_total", "counter", "Frames handed to the kernel by sendmmsg.",
        "show.io.tx_frames"),
    Row("l4lb_tx_errors_total", "counter", "Frames sendmmsg refused (lost).",
        "show.io.tx_errors"),
    Row("l4lb_forwarded_packets_total", "counter", "Frames sent IP-in-IP to a backend.",
        "show.core.forwarded"),
    Row("l4lb_icmp_frag_needed_sent_total", "counter",
        "ICMP fragmentation-needed replies sent to senders of too big DF packets.",
        "show.core.icmp_frag_needed_sent"),
    Row("l4lb_drops_total", "counter",
        "Frames to a VIP not forwarded, by reason: the packet core's (fastpath.counters."
        "DropReason) and those dropped before it (filtered_wrong_port: the BPF filter and the "
        "nftables ingress rule).", "show.core.drops", ("reason",)),
    Row("l4lb_drops_total", "counter", "", "nft", ("reason",)),
    Row("l4lb_kernel_drops_total", "counter",
        "Frames the kernel could not put in the full receive ring.", "show.kernel_drops"),
    Row("l4lb_conntrack_flows", "gauge", "Established flows in the connection table.",
        "show.tracked_flows"),
    Row("l4lb_conntrack_capacity", "gauge", "Most flows the connection table holds.",
        "config.conn_capacity"),
    Row("l4lb_conntrack_half_open_flows", "gauge",
        "Half-open flows tracked (a bare SYN seen, nothing else yet).", "show.flows.half_open"),
    Row("l4lb_new_flows_total", "counter",
        "New flows inserted into the connection table (under the insert cap).",
        "show.flows.new_flows"),
    Row("l4lb_conntrack_nonsyn_miss_total", "counter",
        "TCP packets not a bare SYN of untracked flows, forwarded by the lookup table.",
        "show.flows.nonsyn_miss"),
    Row("l4lb_conntrack_flood_bypass_total", "counter",
        "New flows over the insert cap: forwarded by the lookup table, not tracked.",
        "show.flows.flood_bypass"),
    Row("l4lb_conntrack_half_open_evictions_total", "counter",
        "Half-open flows dropped without promotion (for room or aged out).",
        "show.flows.evictions"),
    Row("l4lb_backend_packets_total", "counter", "Frames forwarded to the backend.",
        "backends", BACKEND_LABELS, "packets"),
    Row("l4lb_backend_bytes_total", "counter",
        "Bytes of the inner IPv4 packets forwarded to the backend.", "backends", BACKEND_LABELS,
        "bytes"),
    Row("l4lb_backend_active_flows", "gauge",
        "Flows the connection table tracks to the backend now (each until it idles out).",
        "backends", BACKEND_LABELS, "active_flows"),
    Row("l4lb_backend_connections_total", "counter",
        "Flows the connection table started tracking to the backend (new connections).",
        "backends", BACKEND_LABELS, "connections"),
    Row("l4lb_backend_table_slots", "gauge",
        "Lookup-table slots the backend owns: its share of new flows is slots / 65537.",
        "backends", BACKEND_LABELS, "slots"),
    Row("l4lb_backend_weight", "gauge", "The backend's weight (0: draining, no new flows).",
        "backends", BACKEND_LABELS, "weight"),
    Row("l4lb_backend_status", "state",
        "The backend's state on this load balancer: 1 for the current one.", "backends",
        BACKEND_LABELS, "state", BACKEND_STATES),
    Row("l4lb_backend_healthy", "gauge",
        "1 if the backend passes its health checks on this LB (its agent answers through the "
        "tunnel and says its server is up), 0 if not.", "backends", BACKEND_LABELS, "healthy"),
    Row("l4lb_backend_health_probes_missed_total", "counter",
        "Health probes to the backend's agent not answered in time.", "backends",
        BACKEND_LABELS, "health_missed"),
    Row("l4lb_fail_open", "gauge",
        "1 while no backend is healthy and the LB uses the unhealthy ones (fail open).",
        "fail_open"),
    Row("l4lb_vip_announced", "gauge",
        "1 while this LB's VIP announcement is up (its BFD session to the host's BIRD is Up).",
        "announce.announced"),
    *COMMON,
)  # fmt: skip

AGENT = (
    Row("l4lb_agent_up", "gauge", "1 if the agent answered this scrape on its control channel.",
        "up"),
    Row("l4lb_agent_uptime_seconds", "gauge", "Seconds since the agent started.", "show.uptime"),
    Row("l4lb_agent_frames_total", "counter", "Tunnel frames received (decapsulated + dropped).",
        "show.frames"),
    Row("l4lb_agent_decap_total", "counter",
        "Inner packets decapsulated and handed to the local stack.", "show.delivered"),
    Row("l4lb_agent_drops_total", "counter",
        "Tunnel frames not delivered, by reason (agent.counters.DecapDrop).", "show.drops",
        ("reason",)),
    Row("l4lb_agent_kernel_drops_total", "counter",
        "Frames the kernel could not put in the full receive ring.", "show.ring_drops"),
    Row("l4lb_agent_partial_checksums_total", "counter",
        "Delivered packets whose TCP/UDP checksum the client left partial (offload).",
        "show.partial_checksums"),
    Row("l4lb_agent_server_listening", "gauge",
        "1 if a TCP socket listens on the VIP's port on this host (the local server is there; "
        "not a proof that it answers).", "servers", ("vip", "port"), "listening"),
    Row("l4lb_agent_health_checks_total", "counter",
        "HTTP checks of the local server finished (agent.health).", "show.health.checks"),
    Row("l4lb_agent_health_check_failures_total", "counter",
        "HTTP checks of the local server that failed.", "show.health.check_failures"),
    Row("l4lb_agent_health_probes_total", "counter",
        "LB health probes answered (delivered through the tunnel, not client traffic).",
        "show.health.probes"),
    *COMMON,
)  # fmt: skip

TABLES: dict[str, tuple[Row, ...]] = {"lb": LB, "agent": AGENT}


def lookup(view: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted path, or None where a step is missing."""
    value: Any = view
    for step in path.split("."):
        if not isinstance(value, Mapping) or step not in value:
            return None
        value = value[step]
    return value


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def samples(row: Row, value: Any) -> tuple[list[tuple[list[str], float]], int]:
    """(label values, value) pairs of one row's value, and how many values were malformed."""
    out: list[tuple[list[str], float]] = []
    bad = 0
    if row.field:
        if not isinstance(value, Sequence) or isinstance(value, str):
            return out, 1
        for item in value:
            if not isinstance(item, Mapping):
                bad += 1
                continue
            labels = [str(item.get(name, "")) for name in row.labels]
            raw = item.get(row.field)
            if raw is None:
                continue  # this row does not report the field
            if row.kind == "state":
                if raw not in row.states:
                    bad += 1
                    continue
                out += [([*labels, s], 1.0 if s == raw else 0.0) for s in row.states]
            elif (v := _number(raw)) is not None:
                out.append((labels, v))
            else:
                bad += 1
        return out, bad
    if row.labels:
        if not isinstance(value, Mapping):
            return out, 1
        for key, raw in value.items():
            if (v := _number(raw)) is None:
                bad += 1
            else:
                out.append(([str(key)], v))
        return out, bad
    v = _number(value)
    return ([([], v)], 0) if v is not None else (out, 1)


def families(rows: Iterable[Row], view: Mapping[str, Any]) -> tuple[list[Metric], list[str]]:
    """The metric families of a view, and the paths whose values were malformed."""
    made: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
    bad: list[str] = []
    for row in rows:
        value = lookup(view, row.path)
        if value is None:
            continue
        pairs, malformed = samples(row, value)
        if malformed:
            bad.append(row.path)
        family = made.get(row.name)
        if family is None:
            labels = [*row.labels, "state"] if row.kind == "state" else list(row.labels)
            cls = CounterMetricFamily if row.kind == "counter" else GaugeMetricFamily
            family = made[row.name] = cls(row.name, row.help, labels=labels)
        assert family is not None
        for labels, v in pairs:
            family.add_metric(labels, v)
    return list(made.values()), bad
