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

Tracked flows per backend are counted as the table changes, not by walking it (a walk of
1,000,000 entries, even copying the values out first, is a 10-40 ms pause): `young_n[v]` and
`old_n[v]` are the entries of value v in each generation, kept in step by every method here
and by the packet core's inline insert (fastpath.kernel's `miss`); a rotation shifts the
counts with the entries. So `tracked(v)` is exact and costs nothing to read, and what it costs
the packet path is one list increment per new flow (two for a promotion). Values must be
registered first with `add_value` (the Balancer does, per backend id). `rotations` counts the
generation changes: an entry older than two rotations is gone.
"""

from __future__ import annotations

import math


class ConnTable:
    __slots__ = ("half", "old", "old_n", "period", "rotate_at", "rotations", "young", "young_n")

    def __init__(self, capacity: int, idle_timeout: float) -> None:
        self.half = max(1, capacity // 2)
        self.period = idle_timeout
        self.young: dict[int, int] = {}
        self.old: dict[int, int] = {}
        self.young_n: list[int] = []
        """Entries per value in `young` (changed in place: the packet core holds the list)."""
        self.old_n: list[int] = []
        """Entries per value in `old` (changed in place)."""
        self.rotate_at = -math.inf  # the first tick starts the clock
        self.rotations = 0

    def __len__(self) -> int:
        return len(self.young) + len(self.old)

    def add_value(self) -> int:
        """Register the next value (0, 1, ...) for counting; returns it."""
        self.young_n.append(0)
        self.old_n.append(0)
        return len(self.young_n) - 1

    def tracked(self, value: int) -> int:
        """Entries with this value (flows tracked to one backend id)."""
        return self.young_n[value] + self.old_n[value]

    def _rotate(self, both: bool) -> None:
        """The young generation becomes the old one; `both`: drop it as well."""
        self.old = {} if both else self.young
        self.old_n[:] = [0] * len(self.old_n) if both else self.young_n
        self.young = {}
        self.young_n[:] = [0] * len(self.young_n)
        self.rotations += 1

    def tick(self, now: float) -> None:
        """Expire by time; the hot path calls it only when now >= rotate_at."""
        if now >= self.rotate_at:
            # Idle for a whole extra period: the young generation is stale as well.
            self._rotate(both=now >= self.rotate_at + self.period)
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
                self.old_n[value] -= 1
                self.insert(key, value)
        return value

    def insert(self, key: int, value: int) -> None:
        """Track `key` -> `value` in the young generation, rotating first when it is full.
        `key` must not be in the young generation (`forget` it first)."""
        if len(self.young) >= self.half:
            self._rotate(both=False)
        self.young[key] = value
        self.young_n[value] += 1

    def forget(self, key: int) -> None:
        """Stop tracking `key` (in either generation)."""
        value = self.young.pop(key, None)
        if value is not None:
            self.young_n[value] -= 1
        value = self.old.pop(key, None)
        if value is not None:
            self.old_n[value] -= 1

    def clear(self) -> None:
        self.young = {}
        self.old = {}
        self.young_n[:] = [0] * len(self.young_n)
        self.old_n[:] = [0] * len(self.old_n)
