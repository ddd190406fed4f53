"""Interface offloads (`ethtool -k/-K`): turned off at start, restored exactly at exit.

Why: with GRO/LRO the kernel hands AF_PACKET taps merged frames far above the MTU, which the
balancer cannot encapsulate; with TSO/GSO on the LB's interface, locally built super-frames
would be segmented after the tap. The LB wants one wire frame per packet in both directions.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence

from l4lb.errors import L4lbError

# ethtool -K short name -> the feature name `ethtool -k` prints.
FEATURES: Mapping[str, str] = {
    "gro": "generic-receive-offload",
    "lro": "large-receive-offload",
    "tso": "tcp-segmentation-offload",
    "gso": "generic-segmentation-offload",
}
DEFAULT_OFF: tuple[str, ...] = ("gro", "lro", "tso", "gso")


class OffloadError(L4lbError, RuntimeError):
    """ethtool is missing or refused a change; the message carries its output."""


def _ethtool(args: Sequence[str]) -> str:
    try:
        res = subprocess.run(["ethtool", *args], capture_output=True, text=True, timeout=10)
    except FileNotFoundError:
        raise OffloadError("ethtool not found (apt-get install ethtool)") from None
    if res.returncode != 0:
        msg = (res.stderr or res.stdout).strip()
        raise OffloadError(f"ethtool {' '.join(args)} failed: {msg}")
    return res.stdout


def parse_features(text: str) -> dict[str, tuple[bool, bool]]:
    """`ethtool -k` output -> {feature name: (on, fixed)}."""
    out: dict[str, tuple[bool, bool]] = {}
    for line in text.splitlines():
        name, sep, rest = line.strip().partition(":")
        words = rest.split()
        if not sep or not words or words[0] not in ("on", "off"):
            continue
        out[name] = (words[0] == "on", "[fixed]" in rest)
    return out


class Offloads:
    """Switch features off on `ifname`; `restore()` puts back exactly what was changed."""

    def __init__(self, ifname: str, off: Sequence[str] = DEFAULT_OFF) -> None:
        self.ifname = ifname
        self.off = tuple(off)
        self.changed: dict[str, bool] = {}  # short name -> original state

    def apply(self) -> dict[str, bool]:
        """Turn the features off; returns the original states of those that were changed.

        Fixed features that are on are left (and reported by name in the error, if any remain
        on that matter); features the driver lacks are skipped.
        """
        feats = parse_features(_ethtool(["-k", self.ifname]))
        for short in self.off:
            state = feats.get(FEATURES[short])
            if state is None or not state[0] or state[1]:
                continue  # unknown, already off, or fixed
            _ethtool(["-K", self.ifname, short, "off"])
            self.changed[short] = True
        return dict(self.changed)

    def restore(self) -> None:
        """Put back the original states; safe to call twice."""
        errors = []
        for short, on in list(self.changed.items()):
            try:
                _ethtool(["-K", self.ifname, short, "on" if on else "off"])
            except OffloadError as exc:
                errors.append(str(exc))
            del self.changed[short]
        if errors:
            raise OffloadError("; ".join(errors))
