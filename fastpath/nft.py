"""An nftables netdev-ingress rule that drops VIP traffic on the LB interface.

Why: the LB host's own kernel also receives every frame the LB taps; it must never answer
(ICMP, RST, or forwarding). AF_PACKET taps (ptype_all) run in __netif_receive_skb_core before
tc and netfilter ingress, so a netdev ingress drop hides the packets from the host's stack but
not from the LB's ring (checked by tests/netns/test_lb.py, which forwards with the rule in).
One table per interface, named for it, created at start and deleted at exit.

Every frame the rule drops is counted, by reason, in a named counter of the table: TCP/UDP to a
VIP on a port it does not serve (`filtered_wrong_port`: the LB's BPF filter keeps these from its
ring too, so no other counter sees them), and everything else to a VIP (`vip_tapped`: the frames
the LB's ring also received and counted itself). `read_counters` reads them (`nft -j`), for the
exporter beside the LB (controller.exporter.exporter), never from the packet loop.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Sequence

from l4lb.errors import L4lbError


class NftError(L4lbError, RuntimeError):
    """nft is missing or refused the rules; the message carries its output."""


FILTERED_WRONG_PORT = "filtered_wrong_port"
"""Counter (and drop reason) of TCP/UDP first fragments to a VIP on a port it does not serve."""
VIP_TAPPED = "vip_tapped"
"""Counter of the other VIP frames: hidden from the host's stack after the LB's tap saw them."""
FILTERED_REASONS = (FILTERED_WRONG_PORT,)
"""The counters that are drops no other counter sees (exported as drop reasons)."""


def table_name(ifname: str) -> str:
    return "l4lb_" + re.sub(r"[^A-Za-z0-9_]", "_", ifname)


def _nft(args: Sequence[str], script: str | None = None) -> str:
    try:
        res = subprocess.run(
            ["nft", *args], input=script, capture_output=True, text=True, timeout=10
        )
    except FileNotFoundError:
        raise NftError("nft not found (apt-get install nftables)") from None
    if res.returncode != 0:
        raise NftError(f"nft {' '.join(args)}: {res.stderr.strip()}")
    return res.stdout


def ruleset(ifname: str, vips: Sequence[str | tuple[str, int | None]]) -> str:
    """The nft script that (re)creates the drop table for `ifname`.

    `vips` holds addresses or (address, port or None) pairs, as the BPF filter takes them
    (l4lb.bpf.ipv4_dst_filter): an address listed only with ports gets a rule counting its
    TCP/UDP frames to other ports apart. nft's `th dport` does not match non-first fragments
    (they carry no port), which the filter passes too: both see the same wrong-port frames."""
    ports: dict[str, set[int] | None] = {}
    for item in vips:
        addr, port = (item, None) if isinstance(item, str) else item
        if port is None:
            ports[addr] = None
        elif (known := ports.setdefault(addr, set())) is not None:
            known.add(port)
    name = table_name(ifname)
    wrong_port = [
        f"    ip daddr {addr} meta l4proto {{ tcp, udp }} th dport != {{ "
        f"{', '.join(map(str, sorted(p)))} }} counter name {FILTERED_WRONG_PORT} drop\n"
        for addr, p in sorted(ports.items())
        if p is not None
    ]
    return (
        f"table netdev {name} {{}}\n"
        f"delete table netdev {name}\n"
        f"table netdev {name} {{\n"
        f"  counter {FILTERED_WRONG_PORT} {{ }}\n"
        f"  counter {VIP_TAPPED} {{ }}\n"
        f"  chain ingress {{\n"
        f'    type filter hook ingress device "{ifname}" priority 0; policy accept;\n'
        + "".join(wrong_port)
        + f"    ip daddr {{ {', '.join(sorted(ports))} }} counter name {VIP_TAPPED} drop\n"
        f"  }}\n"
        f"}}\n"
    )


def parse_counters(text: str) -> dict[str, int]:
    """`nft -j list counters ...` output -> {counter name: packets}."""
    out: dict[str, int] = {}
    for item in json.loads(text).get("nftables", []):
        counter = item.get("counter") if isinstance(item, dict) else None
        if isinstance(counter, dict) and isinstance(counter.get("packets"), int):
            out[str(counter["name"])] = counter["packets"]
    return out


def read_counters(ifname: str) -> dict[str, int]:
    """The packets each named counter of `ifname`'s table counted (NftError if unreadable)."""
    text = _nft(["-j", "list", "counters", "table", "netdev", table_name(ifname)])
    try:
        return parse_counters(text)
    except ValueError as exc:
        raise NftError(f"nft -j list counters: not JSON: {exc}") from None


class VipDrop:
    """Install on `install()`, remove on `remove()` (idempotent)."""

    def __init__(self, ifname: str, vips: Sequence[str | tuple[str, int | None]]) -> None:
        self.ifname = ifname
        self.vips = tuple(vips)
        self.installed = False

    def install(self) -> None:
        _nft(["-f", "-"], ruleset(self.ifname, self.vips))
        self.installed = True

    def dropped(self) -> int | None:
        """Packets the table dropped so far, every reason (None if unreadable)."""
        try:
            return sum(read_counters(self.ifname).values())
        except NftError:
            return None

    def remove(self) -> None:
        if self.installed:
            _nft(["delete", "table", "netdev", table_name(self.ifname)])
            self.installed = False
