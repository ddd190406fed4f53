"""An nftables netdev-ingress rule that drops VIP traffic on the LB interface.

Why: the LB host's own kernel also receives every frame the LB taps; it must never answer
(ICMP, RST, or forwarding). AF_PACKET taps (ptype_all) run in __netif_receive_skb_core before
tc and netfilter ingress, so a netdev ingress drop hides the packets from the host's stack but
not from the LB's ring (checked by tests/netns/test_lb.py, which forwards with the rule in).
One table per interface, named for it, created at start and deleted at exit.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence

from l4lb.errors import L4lbError


class NftError(L4lbError, RuntimeError):
    """nft is missing or refused the rules; the message carries its output."""


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


def ruleset(ifname: str, vips: Sequence[str]) -> str:
    """The nft script that (re)creates the drop table for `ifname`."""
    name = table_name(ifname)
    addrs = ", ".join(sorted(set(vips)))
    return (
        f"table netdev {name} {{}}\n"
        f"delete table netdev {name}\n"
        f"table netdev {name} {{\n"
        f"  chain ingress {{\n"
        f'    type filter hook ingress device "{ifname}" priority 0; policy accept;\n'
        f"    ip daddr {{ {addrs} }} counter drop\n"
        f"  }}\n"
        f"}}\n"
    )


class VipDrop:
    """Install on `install()`, remove on `remove()` (idempotent)."""

    def __init__(self, ifname: str, vips: Sequence[str]) -> None:
        self.ifname = ifname
        self.vips = tuple(vips)
        self.installed = False

    def install(self) -> None:
        _nft(["-f", "-"], ruleset(self.ifname, self.vips))
        self.installed = True

    def dropped(self) -> int | None:
        """Packets the rule dropped so far (None if unreadable)."""
        try:
            out = _nft(["list", "table", "netdev", table_name(self.ifname)])
        except NftError:
            return None
        m = re.search(r"counter packets (\d+)", out)
        return int(m.group(1)) if m else None

    def remove(self) -> None:
        if self.installed:
            _nft(["delete", "table", "netdev", table_name(self.ifname)])
            self.installed = False
