"""A veth testbed in four network namespaces for the forwarding benchmark.

    gen  (traffic generator, and the router in front of the backends; plays t1)
     | g0 10.201.1.2  <->  d0 10.201.1.1
    dut  (the device under test: the LB host, or a plain kernel router)
    gen
     | gs 10.201.2.1  <->  s0 10.201.2.2
    sink (the backend: counts, drops or serves what reaches it; 10.201.2.3-5 are extra
          backend addresses on its link, so the LB spreads over four)
    gen
     | gc 10.201.3.1  <->  c0 10.201.3.2
    cli  (the latency client: its packets must not carry an address of gen, which would drop
          them as martians when the kernel-router DUT hands them back)

fastpath receives on its interface and sends the encapsulated frame back out of the same
interface to the next hop's MAC, exactly as h1 does toward t1 in the fat tree; so the DUT has
one interface and its next hop is `gen`, which routes to the sink. For the kernel baseline the
DUT forwards the same VIP packets as a router (ip_forward=1), out of the same interface to the
same next hop: both cases cross the same links and hops, only the DUT's work differs. `gen`
tells traffic it routes for the DUT (arriving on g0) from its own traffic by a policy rule.

The namespaces are made and removed by bench.netns (names carry the creating process id, so
parallel runs do not collide, and `remove_stale()` deletes testbeds whose creator is gone). Use
it as a context manager: it is removed on exit, failure and Ctrl-C (SIGTERM is turned into
KeyboardInterrupt by `install_signal_handlers`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from bench.netns import Netns, TestbedError, install_signal_handlers, remove_stale, sh

__all__ = ["TestbedError", "install_signal_handlers", "remove_stale"]

VIP = "20.0.0.1"
GEN_IP = "10.201.1.2"  # g0: generator, client, and the DUT's next hop
DUT_IP = "10.201.1.1"  # d0: the LB host's address (outer source of IP-in-IP)
GEN_SINK_IP = "10.201.2.1"  # gs: gen's side of the sink link
SINK_IP = "10.201.2.2"  # s0: the backend
GEN_CLI_IP = "10.201.3.1"  # gc: gen's side of the client link
CLI_IP = "10.201.3.2"  # c0: the latency client
# Backends for the forwarding runs: all reach the sink's link (the LB spreads over four).
BACKEND_IPS = (SINK_IP, "10.201.2.3", "10.201.2.4", "10.201.2.5")
GEN_MAC = "02:b0:00:01:01:02"
DUT_MAC = "02:b0:00:01:01:01"
GEN_SINK_MAC = "02:b0:00:01:02:01"
SINK_MAC = "02:b0:00:01:02:02"
GEN_CLI_MAC = "02:b0:00:01:03:01"
CLI_MAC = "02:b0:00:01:03:02"
NOBODY_MAC = "02:b0:00:01:02:99"  # the counting sink's "other host"
GEN_SNDBUF = 4 << 20
ROUTED_TABLE = 100  # gen's table for packets it routes on behalf of the DUT
NEXT_HOP_TABLE = "lbb_next_hop"  # gen's nftables table of the next-hop counting mode


@dataclass
class Testbed:
    """The four namespaces; `up()` builds them, `down()` removes them (idempotent). By hand:
    `python -m bench.testbed [--remove-stale]`."""

    tag: str = ""
    """Empty, or "t" + hex digits: tells several testbeds of one process apart."""

    def __post_init__(self) -> None:
        self.netns = Netns(self.tag)
        base = self.netns.base
        self.gen = f"{base}-gen"
        self.dut = f"{base}-dut"
        self.sink = f"{base}-sink"
        self.cli = f"{base}-cli"

    # -- building -------------------------------------------------------------------------
    def up(self) -> Testbed:
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        return self

    def _build(self) -> None:
        for role in ("gen", "dut", "sink", "cli"):
            ns = self.netns.add(role)
            # A packet forwarded out of the interface it came in on is the design here.
            for key in ("all", "default"):
                self.sysctl(ns, f"net.ipv4.conf.{key}.rp_filter", "0")
                self.sysctl(ns, f"net.ipv4.conf.{key}.send_redirects", "0")
        self._veth(self.gen, "g0", GEN_MAC, self.dut, "d0", DUT_MAC)
        self._veth(self.gen, "gs", GEN_SINK_MAC, self.sink, "s0", SINK_MAC)
        self._veth(self.gen, "gc", GEN_CLI_MAC, self.cli, "c0", CLI_MAC)
        self._addr(self.gen, "gc", GEN_CLI_IP, 24)
        self._addr(self.cli, "c0", CLI_IP, 24)
        self._neigh(self.gen, "gc", CLI_IP, CLI_MAC)
        self._neigh(self.cli, "c0", GEN_CLI_IP, GEN_CLI_MAC)
        self.ns(self.cli, "ip", "route", "add", "default", "via", GEN_CLI_IP)
        self._addr(self.gen, "g0", GEN_IP, 24)
        self._addr(self.dut, "d0", DUT_IP, 24)
        self._addr(self.gen, "gs", GEN_SINK_IP, 24)
        self._addr(self.sink, "s0", SINK_IP, 24)
        # Static neighbours: nothing depends on ARP timing.
        self._neigh(self.gen, "g0", DUT_IP, DUT_MAC)
        self._neigh(self.dut, "d0", GEN_IP, GEN_MAC)
        self.set_sink_drop(False)
        self._neigh(self.sink, "s0", GEN_SINK_IP, GEN_SINK_MAC)
        # gen: its own traffic to the VIP goes to the DUT; what the DUT sends back (arriving on
        # g0) is routed to the sink, plain VIP packets (kernel mode) and IP-in-IP alike.
        self.sysctl(self.gen, "net.ipv4.ip_forward", "1")
        # trafgen's TX ring socket gets this send buffer (per namespace on this kernel): with
        # 212992 bytes it stalls with EAGAIN (fatal to trafgen) once frames queue behind RPS.
        self.sysctl(self.gen, "net.core.wmem_max", str(GEN_SNDBUF))
        self.sysctl(self.gen, "net.core.wmem_default", str(GEN_SNDBUF))
        self.ns(self.gen, "ip", "route", "add", f"{VIP}/32", "via", DUT_IP)
        self.ns(
            self.gen, "ip", "route", "add", "10.201.2.0/24", "dev", "gs", "table", str(ROUTED_TABLE)
        )
        self.ns(
            self.gen, "ip", "route", "add", f"{VIP}/32", "via", SINK_IP, "table", str(ROUTED_TABLE)
        )
        self.ns(
            self.gen, "ip", "route", "add", "10.201.1.0/24", "dev", "g0", "table", str(ROUTED_TABLE)
        )
        self.ns(self.gen, "ip", "rule", "add", "iif", "g0", "lookup", str(ROUTED_TABLE))
        # dut and sink: everything else via gen.
        self.ns(self.dut, "ip", "route", "add", "default", "via", GEN_IP)
        self.ns(self.sink, "ip", "route", "add", "default", "via", GEN_SINK_IP)
        self.set_dut_forwarding(False)

    def _veth(self, ns_a: str, a: str, mac_a: str, ns_b: str, b: str, mac_b: str) -> None:
        self.netns.veth(ns_a, a, ns_b, b, mac_a=mac_a, mac_b=mac_b)
        for ns, dev in ((ns_a, a), (ns_b, b)):
            self.sysctl(ns, f"net.ipv4.conf.{dev}.rp_filter", "0")
            self.sysctl(ns, f"net.ipv4.conf.{dev}.send_redirects", "0")

    def _addr(self, ns: str, dev: str, ip: str, plen: int) -> None:
        self.ns(ns, "ip", "addr", "add", f"{ip}/{plen}", "dev", dev)

    def _neigh(self, ns: str, dev: str, ip: str, mac: str) -> None:
        self.ns(ns, "ip", "neigh", "replace", ip, "lladdr", mac, "dev", dev, "nud", "permanent")

    # -- modes ----------------------------------------------------------------------------
    def set_dut_forwarding(self, on: bool) -> None:
        """Kernel-router mode (on) or LB-host mode (off: an LB host must never forward)."""
        self.sysctl(self.dut, "net.ipv4.ip_forward", "1" if on else "0")

    def set_sink_drop(self, on: bool) -> None:
        """Counting-sink mode: gen addresses the sink's frames to a MAC nobody owns, so the sink
        counts them on s0 (rx) and its IP layer discards them at once as meant for another host:
        almost free, and never answered with ICMP. Off: the real MAC, for served traffic."""
        for ip in BACKEND_IPS:
            self._neigh(self.gen, "gs", ip, NOBODY_MAC if on or ip != SINK_IP else SINK_MAC)

    def set_next_hop_drop(self, on: bool) -> None:
        """Next-hop counting mode: gen drops what the DUT sends it at g0's ingress (an nftables
        netdev rule), so g0's rx counter counts the DUT's output and gen's core spends nothing
        on routing it on to the sink. Off: gen routes it to the sink (served traffic)."""
        table = f"table netdev {NEXT_HOP_TABLE}"
        script = f"{table} {{}}\ndelete {table}\n"
        if on:
            script += (
                f"{table} {{\n  chain in {{\n"
                f'    type filter hook ingress device "g0" priority 0; policy accept;\n'
                f"    ether saddr {DUT_MAC} drop\n  }}\n}}\n"
            )
        sh("nft", "-f", "-", ns=self.gen, input_text=script)

    def set_rps(self, ns: str, dev: str, cpus: Sequence[int]) -> None:
        """Steers the receive processing of `dev` to `cpus` (empty: process where it arrives)."""
        mask = sum(1 << c for c in cpus)
        self.ns(ns, "sh", "-c", f"echo {mask:x} > /sys/class/net/{dev}/queues/rx-0/rps_cpus")

    # -- helpers --------------------------------------------------------------------------
    def ns(self, ns: str, *argv: str, check: bool = True, timeout: float = 30.0) -> str:
        return sh(*argv, ns=ns, check=check, timeout=timeout)

    def sysctl(self, ns: str, key: str, value: str) -> None:
        self.netns.sysctl(ns, key, value)

    def link_stats(self, ns: str, dev: str) -> dict[str, int]:
        """rx/tx packet and drop counters of one interface (64-bit, from the kernel)."""
        out = sh("ip", "-n", ns, "-s", "-j", "link", "show", "dev", dev)
        stats = json.loads(out)[0]["stats64"]
        return {
            "rx_packets": stats["rx"]["packets"],
            "rx_dropped": stats["rx"]["dropped"],
            "tx_packets": stats["tx"]["packets"],
            "tx_dropped": stats["tx"]["dropped"],
        }

    def snmp(self, ns: str, proto: str = "Udp") -> dict[str, int]:
        """One protocol's counters from the namespace's /proc/net/snmp."""
        lines = [ln.split() for ln in self.ns(ns, "cat", "/proc/net/snmp").splitlines()]
        rows = [ln for ln in lines if ln and ln[0] == f"{proto}:"]
        return {k: int(v) for k, v in zip(rows[0][1:], rows[1][1:], strict=True)}

    def down(self) -> None:
        self.netns.close()

    def __enter__(self) -> Testbed:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build the benchmark testbed, print its namespace names, and keep it until "
        "Ctrl-C (or remove the testbeds of dead runs with --remove-stale)."
    )
    parser.add_argument("--remove-stale", action="store_true")
    parser.add_argument("--hold", type=float, default=3600.0, help="seconds to keep it (3600)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces)")
    if args.remove_stale:
        print("removed:", " ".join(remove_stale()) or "nothing")
        return 0
    install_signal_handlers()
    remove_stale()
    try:
        with Testbed() as tb:
            names = {"gen": tb.gen, "dut": tb.dut, "sink": tb.sink, "cli": tb.cli}
            print(json.dumps(names), flush=True)
            time.sleep(args.hold)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
