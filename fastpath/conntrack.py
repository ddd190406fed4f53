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

SYN flood defence (the rule itself is fastpath.kernel's `miss`, the one place both packet
paths call for a flow the young generation does not hold):
- Half-open flows (a TCP flow whose only packets so far are bare SYNs: SYN set, ACK, FIN and
  RST clear) live apart, in two generations of their own (`syn_young`, `syn_old`) with their
  own, shorter period (`half_open_timeout`) and bound (`half_open_capacity`). Their next
  packet that is not a bare SYN promotes them to the established generations. A half-open
  insert only ever rotates the half-open generations, so no SYN can push an established flow
  out. Half-open entries are not in `young_n`/`old_n`: a backend's active flows are
  established ones (a flood of spoofed SYNs would make them meaningless otherwise).
- New flows (half-open, a non-SYN miss, a UDP or ICMP flow) are inserted at most
  `insert_rate` per second of `now` (0: no cap): a budget refilled when the second changes,
  so the check costs a compare per new flow and no clock call. A new flow over the budget is
  still forwarded by the lookup table, which gives the same backend, only not tracked
  (`FlowEvent.FLOOD_BYPASS`); it loses only the protection against backend-set changes.
- `events` counts per FlowEvent. EVICTIONS are half-open entries dropped without being
  promoted: the old half-open generation when it is dropped, for room or for age (both
  generations after a whole idle period).
"""

from __future__ import annotations

import math
from enum import IntEnum

HALF_OPEN_CAPACITY = 131072
"""Default most half-open flows (two generations of 65,536)."""
HALF_OPEN_TIMEOUT = 4.0
"""Default seconds a half-open flow is kept without packets (at least this, gone by 2x): a
SYN retransmits after 1 s, then 3 s; a handshake that takes longer is lost or hostile."""
INSERT_RATE = 16384
"""Default most new flows inserted per second. With the default half-open generation of
65,536 flows, a flood at the cap fills it in 4 s = HALF_OPEN_TIMEOUT: a real client's
half-open entry lives its whole timeout even under flood, so its ACK finds it. The Python LB
takes about 300,000 frames/s on one core (README); 16,384 new flows/s is several times the
fat tree's wget load, well inside what the loop can insert, and leaves the loop for the
established flows. (Katran's 125,000/s per core is for a C data path 10x faster.)"""


class FlowEvent(IntEnum):
    """Per-flow events of the connection table (fastpath.stats.FlowStats shows them)."""

    NEW = 0
    """New flows inserted (half-open, non-SYN misses, UDP/ICMP/fragment flows), under the cap."""
    NONSYN_MISS = 1
    """TCP packets not a bare SYN of a flow not tracked: forwarded by the lookup table (the
    backend any LB with the same seed and set picks), tracked as established. An LB that
    restarted, or that ECMP just moved flows to, sees these."""
    FLOOD_BYPASS = 2
    """New flows over the insert cap: forwarded by the lookup table, not tracked."""
    EVICTIONS = 3
    """Half-open entries dropped without promotion (for room or aged out)."""
    PROMOTED = 4
    """Half-open flows promoted to established by their first packet not a bare SYN."""


class ConnTable:
    __slots__ = (
        "budget", "events", "half", "insert_rate", "old", "old_n", "period", "refill_at",
        "rotate_at", "rotations", "syn_half", "syn_old", "syn_period", "syn_rotate_at",
        "syn_young", "young", "young_n",
    )  # fmt: skip

    def __init__(
        self,
        capacity: int,
        idle_timeout: float,
        half_open_capacity: int = HALF_OPEN_CAPACITY,
        half_open_timeout: float = HALF_OPEN_TIMEOUT,
        insert_rate: int = INSERT_RATE,
    ) -> None:
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
        self.syn_young: dict[int, int] = {}
        """Half-open flows, young generation: key -> backend id."""
        self.syn_old: dict[int, int] = {}
        self.syn_half = max(1, half_open_capacity // 2)
        self.syn_period = half_open_timeout
        self.syn_rotate_at = -math.inf
        self.insert_rate = insert_rate
        self.budget = 0
        """New-flow inserts left in the current second of `now`."""
        self.refill_at = -math.inf
        self.events: list[int] = [0] * len(FlowEvent)
        """Counts per FlowEvent (changed in place: the packet core holds the list)."""

    def __len__(self) -> int:
        """Established flows tracked (half-open ones: `half_open`)."""
        return len(self.young) + len(self.old)

    @property
    def half_open(self) -> int:
        """Half-open flows tracked."""
        return len(self.syn_young) + len(self.syn_old)

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
        """Read only (no promotion), e.g. for ICMP errors about a flow; half-open included."""
        for gen in (self.young, self.old, self.syn_young, self.syn_old):
            value = gen.get(key)
            if value is not None:
                return value
        return None

    def _rotate_half_open(self, both: bool) -> None:
        """The young half-open generation becomes the old one; the old one is dropped
        (`both`: the young one too), its entries counted as evictions."""
        dropped = len(self.syn_old) + (len(self.syn_young) if both else 0)
        self.events[FlowEvent.EVICTIONS] += dropped
        self.syn_old = {} if both else self.syn_young
        self.syn_young = {}

    def tick_half_open(self, now: float) -> None:
        """Expire half-open flows by time; the packet core calls it on a miss only when
        now >= syn_rotate_at."""
        if now >= self.syn_rotate_at:
            self._rotate_half_open(both=now >= self.syn_rotate_at + self.syn_period)
            self.syn_rotate_at = now + self.syn_period

    def insert_half_open(self, key: int, value: int) -> None:
        """Track `key` as half-open (in the young half-open generation, rotating only the
        half-open generations when it is full). `key` must be in no generation."""
        if len(self.syn_young) >= self.syn_half:
            self._rotate_half_open(both=False)
        self.syn_young[key] = value

    def pop_half_open(self, key: int) -> int | None:
        """Remove `key` from the half-open generations; its value, or None."""
        value = self.syn_young.pop(key, None)
        return self.syn_old.pop(key, None) if value is None else value

    def refill(self, now: float) -> None:
        """A new second of `now`: the insert budget is whole again (no cap: unbounded)."""
        self.budget = self.insert_rate if self.insert_rate else 1 << 62
        self.refill_at = math.floor(now) + 1

    def lookup(self, key: int, now: float) -> int | None:
        """The backend tracked for `key` as established (refreshing it), or None: the plain
        table operation. The packet core does this and the SYN flood rules in `miss`."""
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
        """Stop tracking `key` (in either established generation or as half-open)."""
        self.pop_half_open(key)
        value = self.young.pop(key, None)
        if value is not None:
            self.young_n[value] -= 1
        value = self.old.pop(key, None)
        if value is not None:
            self.old_n[value] -= 1

    def clear(self) -> None:
        self.young = {}
        self.old = {}
        self.syn_young = {}
        self.syn_old = {}
        self.young_n[:] = [0] * len(self.young_n)
        self.old_n[:] = [0] * len(self.old_n)
