"""The LB's side of the health checks: probe every backend's agent through the tunnel and apply
the result. Pure: `now` comes in, the probes to send go out, replies come in as bytes; the
sockets are fastpath.healthsvc's.

A backend is healthy when its agent is reachable through the tunnel and the agent's verdict on
its server is not down (the agent judges its server, agent.health: one decision per backend,
which every LB applies alike). Per backend:
- a probe every `interval` (every `fast_interval` while reachability is changing); a probe
  not answered within `timeout` is missed;
- unreachable after `fall` consecutive misses (an agent killed, its host's link down), and
  reachable again after `rise` consecutive replies;
- every reply and every push carries the agent's verdict; an UNKNOWN verdict (the agent just
  started) leaves the previous one. A push (sent by the agent the moment its verdict
  changes) updates the verdict, not the reachability: it did not cross the tunnel.
- At the LB's start every backend is taken as healthy and reachable (so a restarted LB
  forwards as the other LB does until its first replies), like haproxy's servers at start.
Changes go to the backend state through `HealthTarget.set_health`; a reply that is malformed,
not an answer to this LB (token), late, or about a backend not probed is counted and ignored.
"""

from __future__ import annotations

import ipaddress
import secrets
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from fastpath.stats import BackendHealthStats, ProberStats
from l4lb.healthcfg import HealthConfig
from l4lb.healthwire import (
    BadMessage,
    Kind,
    Probe,
    Verdict,
    WireError,
    decode_reply,
    encode_probe,
)


@runtime_checkable
class HealthTarget(Protocol):
    """The backend state the prober feeds (the object fastpath.runner keeps)."""

    def set_health(self, ip: str, healthy: bool, now: float, reason: str) -> bool:
        """Record a backend's health; True if the effective lookup table changed (when no
        backend is healthy the state model fails open)."""
        ...

    def probe_targets(self) -> list[str]:
        """IPs of the backends in the set, in a stable order."""
        ...


@dataclass
class BackendProbe:
    """What one LB knows about one backend's health."""

    ip: str
    packed: bytes
    next_at: float
    reachable: bool = True
    oks: int = 0
    """Consecutive replies."""
    misses: int = 0
    """Consecutive missed probes."""
    outstanding: int | None = None
    """Sequence number of the probe awaiting its reply."""
    sent_at: float = 0.0
    verdict: Verdict = Verdict.UP
    healthy: bool = True
    changed_at: float = 0.0
    reason: str = "assumed healthy at start"
    probes: int = 0
    replies: int = 0
    missed: int = 0
    late: int = 0
    pushes: int = 0
    suppressed: bool = False
    check_failures: int = 0
    detail: str = ""
    agent_since: float | None = None
    instance: int | None = None
    restarts: int = 0
    """Changes of the agent's instance id seen (agent restarts)."""
    rtt_ms: float | None = None
    table_changes: int = 0
    changes: list[tuple[float, bool]] = field(default_factory=list)
    """Recent (time, healthy) changes, at most CHANGES_KEPT."""


CHANGES_KEPT = 16
SEQ_MOD = 1 << 32


class Prober:
    """Probe state of every backend (see the module docstring)."""

    def __init__(
        self, cfg: HealthConfig, target: HealthTarget, now: float, token: int | None = None
    ) -> None:
        self.cfg = cfg
        self.target = target
        self.token = secrets.randbits(32) if token is None else token
        self.backends: dict[str, BackendProbe] = {}
        self.by_seq: dict[int, BackendProbe] = {}
        self.seq = secrets.randbits(31)
        self.malformed: dict[str, int] = {r.value: 0 for r in BadMessage}
        self.unknown_seq = 0
        """Replies with this LB's token but no probe awaiting them (late or duplicated)."""
        self.sync(now)

    def sync(self, now: float) -> None:
        """Follow the backend set: new backends start healthy, their first probes spread
        over one interval; removed ones are forgotten."""
        ips = self.target.probe_targets()
        for i, ip in enumerate(ips):
            if ip not in self.backends:
                spread = self.cfg.interval * i / max(len(ips), 1)
                self.backends[ip] = BackendProbe(
                    ip, ipaddress.IPv4Address(ip).packed, now + spread, changed_at=now
                )
        for ip in set(self.backends) - set(ips):
            b = self.backends.pop(ip)
            if b.outstanding is not None:
                self.by_seq.pop(b.outstanding, None)

    def due(self, now: float) -> list[tuple[str, bytes]]:
        """Judge the probes whose time ran out and make the probes due now: (backend IP,
        probe payload) to send, tunnelled, to VIP:port."""
        self.sync(now)
        out: list[tuple[str, bytes]] = []
        for b in self.backends.values():
            if b.outstanding is not None and now >= b.sent_at + self.cfg.timeout:
                self.by_seq.pop(b.outstanding, None)
                b.outstanding = None
                b.missed += 1
                b.misses += 1
                b.oks = 0
                if b.reachable and b.misses >= self.cfg.fall:
                    b.reachable = False
                self._judge(b, now, f"unreachable: {b.misses} probes unanswered")
                b.next_at = b.sent_at + self._gap(b)  # fast after a miss: at once, here
            if b.outstanding is None and now >= b.next_at:
                self.seq = (self.seq + 1) % SEQ_MOD
                b.outstanding, b.sent_at = self.seq, now
                b.next_at = now + self._gap(b)
                b.probes += 1
                self.by_seq[self.seq] = b
                out.append((b.ip, encode_probe(Probe(self.token, self.seq, b.packed))))
        return out

    def _gap(self, b: BackendProbe) -> float:
        """Seconds from one probe to the next: fast while reachability is changing."""
        changing = (b.reachable and b.misses > 0) or (not b.reachable and b.oks > 0)
        return self.cfg.fast_interval if changing else self.cfg.interval

    def next_due(self) -> float:
        when = [b.next_at for b in self.backends.values() if b.outstanding is None]
        when += [
            b.sent_at + self.cfg.timeout
            for b in self.backends.values()
            if b.outstanding is not None
        ]
        return min(when, default=float("inf"))

    def on_reply(self, data: bytes, now: float) -> None:
        """A datagram from a VIP's health port (the source is the caller's to check)."""
        try:
            r = decode_reply(data)
            if r.token != self.token:
                raise WireError(BadMessage.WRONG_TOKEN)
            ip = str(ipaddress.IPv4Address(r.backend))
            b = self.backends.get(ip)
            if b is None:
                raise WireError(BadMessage.WRONG_BACKEND)
        except WireError as exc:
            self.malformed[exc.reason.value] += 1
            return
        if r.kind == Kind.REPLY:
            if self.by_seq.get(r.seq) is not b:
                self.unknown_seq += 1
                b.late += 1
                return
            del self.by_seq[r.seq]
            b.outstanding = None
            b.replies += 1
            b.rtt_ms = round((now - b.sent_at) * 1000, 3)
            b.oks += 1
            b.misses = 0
            if not b.reachable and b.oks >= self.cfg.rise:
                b.reachable = True
            b.next_at = b.sent_at + self._gap(b)
        else:
            b.pushes += 1
        if b.instance is not None and r.instance != b.instance:
            b.restarts += 1
        b.instance = r.instance
        if r.verdict != Verdict.UNKNOWN:
            b.verdict = r.verdict
            b.agent_since = now - r.age_ms / 1000
        b.suppressed = r.suppressed
        b.check_failures = r.check_failures
        b.detail = r.detail
        why = "held down: flapping" if r.suppressed else r.detail
        self._judge(b, now, f"agent: {b.verdict.name.lower()} ({why})")

    def _judge(self, b: BackendProbe, now: float, reason: str) -> None:
        healthy = b.reachable and b.verdict != Verdict.DOWN
        if healthy == b.healthy:
            return
        if healthy:
            reason = f"reachable, agent up ({b.detail})"
        b.healthy, b.changed_at, b.reason = healthy, now, reason
        b.changes = [*b.changes[-(CHANGES_KEPT - 1) :], (now, healthy)]
        if self.target.set_health(b.ip, healthy, now, reason):
            b.table_changes += 1

    def stats(self, now: float, wall: float) -> ProberStats:
        """The snapshot for `show` and the stats file (times as Unix time)."""

        def unix(t: float | None) -> float | None:
            return None if t is None else round(wall - (now - t), 3)

        def one(b: BackendProbe) -> BackendHealthStats:
            return BackendHealthStats(
                healthy=b.healthy, reachable=b.reachable, verdict=b.verdict.name.lower(),
                suppressed=b.suppressed, since=unix(b.changed_at) or 0.0, reason=b.reason,
                agent_since=unix(b.agent_since), check_failures=b.check_failures,
                last_check=b.detail, probes=b.probes, replies=b.replies, missed=b.missed,
                late=b.late, pushes=b.pushes, rtt_ms=b.rtt_ms, agent_restarts=b.restarts,
                table_changes=b.table_changes,
            )  # fmt: skip

        return ProberStats(
            token=f"{self.token:08x}",
            backends={b.ip: one(b) for b in self.backends.values()},
            malformed={k: v for k, v in self.malformed.items() if v},
            unknown_seq=self.unknown_seq,
        )
