"""The packet core: Ethernet frame in, encapsulated frame (or ICMP reply, or a counted drop) out.

Skeleton committed first so the I/O edge can import the API; the implementation follows.
"""

from __future__ import annotations

from collections.abc import Sequence

from fastpath.config import BalancerConfig
from fastpath.counters import Counters, DropReason


class Balancer:
    """Pure packet core: knows no sockets and no clock (`now` is passed in)."""

    def __init__(self, cfg: BalancerConfig) -> None:
        self.cfg = cfg
        self.counters = Counters()

    def process(self, frame: memoryview, out: memoryview, now: float) -> int:
        """Handle one Ethernet frame. Returns the length of the frame written to `out` (>= mtu +
        34 bytes) to send on the same interface, or 0 if dropped (counted by reason). Never raises.
        """
        self.counters.drops[DropReason.NO_BACKEND] += 1
        return 0

    def process_batch(
        self,
        frames: Sequence[memoryview],
        outs: Sequence[memoryview],
        lens: list[int],
        n: int,
        now: float,
    ) -> int:
        """Handle frames[0:n]; the k frames to send are written to outs[0:k] with their lengths
        in lens[0:k] (compacted, ready for sendmmsg). Returns k."""
        k = 0
        for i in range(n):
            m = self.process(frames[i], outs[k], now)
            if m:
                lens[k] = m
                k += 1
        return k

    def set_next_hop_mac(self, mac: bytes) -> None:
        """Ethernet destination of frames sent from now on."""

    def set_backends(self, backends: tuple[tuple[str, int], ...]) -> None:
        """Replace the backend set (ip, weight) and rebuild Maglev; tracked flows stay put."""
