"""The backend set of one load balancer: what the operator set, what health checks say, and the
effective state the lookup table is built from. Pure: `now` is passed in, nothing here does I/O.

Per backend: its IPv4 and host name, the configured weight (0..MAX_WEIGHT), the administrative
state (`up`/`down`) and the health (`up`/`down`/`unknown`, since when, failed checks, the last
reason), set by a health checker through `set_health`. From these, one rule (`effective`):

| the backend is                      | new flows              | its tracked flows                 |
|-------------------------------------|------------------------|-----------------------------------|
| up, weight w > 0, health not down   | ~ w / sum of weights   | stay                              |
| drained (weight 0)                  | none                   | stay until they end or idle out   |
| administratively down               | none                   | re-hashed at their next packet    |
| health down                         | none                   | re-hashed at their next packet    |
| removed from the set                | none                   | forgotten (re-hashed, never back) |
| added                               | ~ w / sum (1/(N+1))    | (the others' tracked flows stay)  |

Re-hashing a down backend's flows is Maglev's rule (a tracked flow is reused only while its
backend is healthy): its connections are broken anyway, and waiting for them would only
black-hole their retries. Fail open: when no backend is usable *because of health* (every one
that is administratively up with weight > 0 is health-down), the table is built from those
ignoring health, and `fail_open` says so (in `show`, the stats and `backend list`). A fault of
the health checks themselves (a probe path broken, a checker bug) then does not take the
whole service down; Envoy's panic threshold makes the same choice. Backends the operator
drained or took down stay out: fail open never overrides the operator.

`Backends` is the object the LB process keeps: it owns this state and drives the packet core
(fastpath.balancer.Balancer.set_backends) with it. Changes are planned first (`plan_*`:
every check, nothing changed, a BackendError saying why) and then applied (`apply`), so a
control request can be checked alone (dry run) and a refused one changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from fastpath.config import MAX_BACKENDS, MAX_WEIGHT
from fastpath.counters import Counters
from fastpath.stats import BackendStats, TableStats
from l4lb.errors import L4lbError
from l4lb.wire import parse_ipv4


class PacketCore(Protocol):
    """What `Backends` drives and reads: a fastpath.balancer.Balancer, or the workers of a
    multi-process LB together (fastpath.workers.WorkerPool)."""

    @property
    def table_size(self) -> int: ...

    @property
    def table_digest(self) -> str: ...

    @property
    def counters(self) -> Counters: ...

    def set_backends(
        self, backends: Sequence[tuple[str, int]], down: Collection[str] = ()
    ) -> int: ...

    def slots_owned(self) -> dict[str, int]: ...

    def tracked(self, ip: str) -> int: ...


ADMIN = ("up", "down")
HEALTH = ("up", "down", "unknown")


class BackendError(L4lbError):
    """A change refused before anything changed; the message says why."""


@dataclass(frozen=True)
class BackendSpec:
    """One backend as the operator sets it (what the controller records)."""

    ip: str
    weight: int = 1
    """0..MAX_WEIGHT; 0 drains it."""
    admin: str = "up"
    """`up` or `down` (administratively: no new flows, tracked flows re-hashed)."""


@dataclass
class Health:
    """What the health checker last said about one backend."""

    state: str = "unknown"
    """`up`, `down`, or `unknown` (no verdict yet: usable)."""
    since: float = 0.0
    """The `now` of the last change of state (of joining the set while unknown)."""
    failures: int = 0
    """Checks reported failed (set_health with healthy False), since it joined the set."""
    reason: str = ""
    """The last check's reason, as the checker gave it."""


@dataclass(frozen=True)
class Effective:
    """What the packet core is given: the set, the backends that serve nothing, fail open."""

    backends: tuple[tuple[str, int], ...]
    """(ip, weight) of every backend in the set, in the set's order."""
    down: frozenset[str]
    """In the set but serving nothing (administratively down, or health down unless failing
    open): no new flows, tracked flows re-hashed."""
    fail_open: bool
    """No backend was usable because of health: health is ignored."""

    def state(self, spec: BackendSpec, health: Health) -> str:
        """One word for what a backend does now: active, draining, admin_down, unhealthy,
        fail_open (health down but used, failing open)."""
        if spec.admin == "down":
            return "admin_down"
        if health.state == "down":
            return "fail_open" if self.fail_open else "unhealthy"
        return "draining" if spec.weight == 0 else "active"


def effective(specs: Sequence[BackendSpec], health: Mapping[str, Health]) -> Effective:
    """The rule of the module docstring, as data."""

    def sick(s: BackendSpec) -> bool:
        return health[s.ip].state == "down"

    wanted = [s for s in specs if s.admin == "up" and s.weight > 0]
    fail_open = bool(wanted) and all(sick(s) for s in wanted)
    down = frozenset(s.ip for s in specs if s.admin == "down" or (sick(s) and not fail_open))
    return Effective(tuple((s.ip, s.weight) for s in specs), down, fail_open)


def check_specs(specs: Sequence[BackendSpec], forbidden: Mapping[str, str]) -> None:
    """Raise BackendError unless `specs` is a set the LB can run with: valid addresses (none
    of them in `forbidden`, address -> why), each once, weights 0..MAX_WEIGHT, admin up or
    down, at most MAX_BACKENDS, and at least one backend that can take new flows."""
    if len(specs) > MAX_BACKENDS:
        raise BackendError(f"at most {MAX_BACKENDS} backends, not {len(specs)}")
    seen: set[str] = set()
    for s in specs:
        try:
            parse_ipv4("backend", s.ip)
        except L4lbError as exc:
            raise BackendError(str(exc)) from None
        if s.ip in forbidden:
            raise BackendError(f"{s.ip} cannot be a backend: it is {forbidden[s.ip]}")
        if s.ip in seen:
            raise BackendError(f"{s.ip} listed twice")
        seen.add(s.ip)
        w = s.weight
        if isinstance(w, bool) or not isinstance(w, int) or not 0 <= w <= MAX_WEIGHT:
            raise BackendError(f"weight of {s.ip} must be an integer 0..{MAX_WEIGHT}, not {w!r}")
        if s.admin not in ADMIN:
            raise BackendError(f"admin state of {s.ip} must be up or down, not {s.admin!r}")
    if not any(s.admin == "up" and s.weight > 0 for s in specs):
        raise BackendError(
            "no backend would take new flows (every one removed, drained or down): refused, "
            "new connections would all be dropped"
        )


@dataclass(frozen=True)
class Applied:
    """What one `apply` did."""

    changed: bool
    """The set, or what the packet core serves, changed."""
    slots_moved: int
    """Lookup-table slots that changed backend."""
    build_ms: float
    """Time the packet core spent on the change (table update and templates)."""


class Rates:
    """Packets/s and bytes/s per backend between two stats snapshots (`update` at each)."""

    def __init__(self) -> None:
        self._last: tuple[float, dict[str, tuple[int, int]]] | None = None
        self.rates: dict[str, tuple[float, float]] = {}

    def update(self, now: float, counts: Mapping[str, tuple[int, int]]) -> None:
        """`counts`: ip -> (packets, bytes) now."""
        if self._last is not None and now > self._last[0]:
            t0, before = self._last
            dt = now - t0
            rates = {}
            for ip, (p, b) in counts.items():
                p0, b0 = before.get(ip, (p, b))  # new since: no rate yet
                rates[ip] = ((p - p0) / dt, (b - b0) / dt)
            self.rates = rates
        self._last = (now, dict(counts))


class Backends:
    """The backend set of a running LB and the packet core it drives (module docstring).

    `set_health` and `probe_targets` are the health checker's interface."""

    def __init__(
        self,
        balancer: PacketCore,
        specs: Iterable[BackendSpec],
        now: float = 0.0,
        names: Mapping[str, str] | None = None,
        forbidden: Mapping[str, str] | None = None,
        perf: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.balancer = balancer
        self.names: dict[str, str] = dict(names or {})
        """Host name per address, for people (LbConfig.names, and names given on add)."""
        self.forbidden = dict(forbidden or {})
        """Addresses that can never be backends -> why (the VIPs, the LB's own address)."""
        self._perf = perf
        self.specs: tuple[BackendSpec, ...] = ()
        self.health: dict[str, Health] = {}
        self.health_ignored = 0
        """set_health calls for an address not in the set (a checker behind a change)."""
        self.table = TableStats(size=balancer.table_size, digest="")
        self.slots: dict[str, int] = {}
        """Lookup-table slots per backend (updated with each change)."""
        self.rates = Rates()
        """Packets/s and bytes/s per backend, between the last two `tick`s."""
        self._effective = Effective((), frozenset(), False)
        specs = tuple(specs)
        check_specs(specs, self.forbidden)
        self.apply(specs, now)
        self.table.changes = 0

    # --- planning: every check, nothing changed -------------------------------------------

    def spec(self, ip: str) -> BackendSpec:
        for s in self.specs:
            if s.ip == ip:
                return s
        known = ", ".join(s.ip for s in self.specs) or "none"
        raise BackendError(f"{ip} is not a backend of this LB (backends: {known})")

    def plan_replace(self, specs: Iterable[BackendSpec]) -> tuple[BackendSpec, ...]:
        new = tuple(specs)
        check_specs(new, self.forbidden)
        return new

    def plan_add(self, ip: str, weight: int = 1, admin: str = "up") -> tuple[BackendSpec, ...]:
        if any(s.ip == ip for s in self.specs):
            raise BackendError(f"{ip} is already a backend (change it with weight or admin)")
        return self.plan_replace((*self.specs, BackendSpec(ip, weight, admin)))

    def plan_remove(self, ip: str) -> tuple[BackendSpec, ...]:
        self.spec(ip)
        return self.plan_replace(s for s in self.specs if s.ip != ip)

    def plan_weight(self, ip: str, weight: int) -> tuple[BackendSpec, ...]:
        self.spec(ip)
        return self.plan_replace(replace(s, weight=weight) if s.ip == ip else s for s in self.specs)

    def plan_admin(self, ip: str, admin: str) -> tuple[BackendSpec, ...]:
        self.spec(ip)
        return self.plan_replace(replace(s, admin=admin) if s.ip == ip else s for s in self.specs)

    # --- applying -------------------------------------------------------------------------

    def apply(self, specs: tuple[BackendSpec, ...], now: float) -> Applied:
        """Make `specs` (checked by a plan_* call) the set: health is kept for backends that
        stay, `unknown` since `now` for new ones, forgotten for those that leave."""
        health = {s.ip: self.health.get(s.ip) or Health(since=now) for s in specs}
        changed = specs != self.specs
        old = self.specs, self.health
        self.specs = specs
        self.health = health
        try:
            return self._drive(changed)
        except BackendError:  # the core refused it and changed nothing (fastpath.workers)
            self.specs, self.health = old
            raise

    def set_health(self, ip: str, healthy: bool, now: float, reason: str) -> bool:
        """The health checker's verdict on backend `ip`; True if the effective table changed
        (an address not in the set is ignored, and counted in `health_ignored`)."""
        h = self.health.get(ip)
        if h is None:
            self.health_ignored += 1
            return False
        state = "up" if healthy else "down"
        if not healthy:
            h.failures += 1
        h.reason = reason
        if state == h.state:
            return False
        h.state, h.since = state, now
        return self._drive(False).changed

    def probe_targets(self) -> list[str]:
        """Addresses of the backends in the set (down and drained included), in address
        order, so every LB probes the same list in the same order."""
        return sorted((s.ip for s in self.specs), key=lambda ip: parse_ipv4("ip", ip))

    @property
    def fail_open(self) -> bool:
        return self._effective.fail_open

    def state(self, ip: str) -> str:
        """The effective state word of a backend in the set (Effective.state)."""
        return self._effective.state(self.spec(ip), self.health[ip])

    def _drive(self, changed: bool) -> Applied:
        """Give the packet core the effective state, if what it serves changed (fail open
        turning on with one backend, say, changes nothing it serves)."""
        eff, old = effective(self.specs, self.health), self._effective
        changed = changed or (eff.backends, eff.down) != (old.backends, old.down)
        if not changed:
            self._effective = eff
            return Applied(False, 0, 0.0)
        t0 = self._perf()
        moved = self.balancer.set_backends(eff.backends, eff.down)
        took = (self._perf() - t0) * 1000.0
        self._effective = eff
        t = self.table
        t.digest = self.balancer.table_digest
        self.slots = self.balancer.slots_owned()
        t.changes += 1
        t.last_build_ms, t.last_slots_moved = round(took, 2), moved
        return Applied(changed, moved, round(took, 2))

    # --- what it looks like ---------------------------------------------------------------

    def counts(self) -> dict[str, tuple[int, int]]:
        """(packets, bytes) forwarded per backend in the set, since start (for Rates)."""
        c = self.balancer.counters
        packets, nbytes = c.per_backend(c.forwarded), c.per_backend(c.forwarded_bytes)
        return {s.ip: (packets.get(s.ip, 0), nbytes.get(s.ip, 0)) for s in self.specs}

    def tick(self, now: float) -> None:
        """A stats interval ends: the rates are those since the last tick."""
        self.rates.update(now, self.counts())

    def stats(self, now: float, wall: float) -> list[BackendStats]:
        """The set as the stats schema has it; `wall` is the Unix time at `now`."""
        c = self.balancer.counters
        packets, nbytes = c.per_backend(c.forwarded), c.per_backend(c.forwarded_bytes)
        conns = c.per_backend(c.connections)
        rows = []
        for s in self.specs:
            h = self.health[s.ip]
            pps, bps = self.rates.rates.get(s.ip, (0.0, 0.0))
            rows.append(
                BackendStats(
                    ip=s.ip,
                    name=self.names.get(s.ip),
                    weight=s.weight,
                    admin=s.admin,
                    health=h.state,
                    health_since=round(wall - (now - h.since), 3),
                    health_for_s=round(now - h.since, 3),
                    check_failures=h.failures,
                    last_reason=h.reason,
                    state=self._effective.state(s, h),
                    slots=self.slots.get(s.ip, 0),
                    active_flows=self.balancer.tracked(s.ip),
                    connections=conns.get(s.ip, 0),
                    packets=packets.get(s.ip, 0),
                    bytes=nbytes.get(s.ip, 0),
                    pps=round(pps, 1),
                    bps=round(bps, 1),
                )
            )
        return rows
