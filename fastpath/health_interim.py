"""Interim backend health over `Balancer.set_backends`, until the backend state model lands.

The backend state model (another branch: weights, drain, administrative state, health and
fail-open in one place) implements fastpath.health.HealthTarget on the Balancer itself; once
it has, fastpath.runner uses it and this module goes. Until then the LB applies health here,
with the same behaviour the state model promises: the lookup table holds the healthy
backends; when none is healthy it fails open to all of them (a guess that some still serve
beats dropping every new flow); tracked flows of a backend that left the table move to the
healthy ones (Balancer.set_backends forgets them), flows of the others stay where they are.
"""

from __future__ import annotations

from fastpath.balancer import Balancer
from fastpath.health import HealthTarget


class SetBackendsHealth:
    """set_health / probe_targets (fastpath.health.HealthTarget) over a fixed backend set."""

    def __init__(self, balancer: Balancer, backends: tuple[tuple[str, int], ...]) -> None:
        self.balancer = balancer
        self.backends = backends
        self.healthy = {ip for ip, _ in backends}
        self.in_table = self._table()

    def probe_targets(self) -> list[str]:
        return [ip for ip, _ in self.backends]

    def _table(self) -> tuple[tuple[str, int], ...]:
        up = tuple((ip, w) for ip, w in self.backends if ip in self.healthy)
        return up if any(w for _, w in up) else self.backends  # fail open

    def set_health(self, ip: str, healthy: bool, now: float, reason: str) -> bool:
        if ip not in dict(self.backends):
            return False
        if healthy:
            self.healthy.add(ip)
        else:
            self.healthy.discard(ip)
        table = self._table()
        if table == self.in_table:
            return False
        self.balancer.set_backends(table)
        self.in_table = table
        return True

    @property
    def fail_open(self) -> bool:
        """True while no backend is healthy and the table holds them all."""
        return not any(w for ip, w in self.backends if ip in self.healthy)


def health_target(balancer: Balancer, backends: tuple[tuple[str, int], ...]) -> HealthTarget:
    """The Balancer itself once it implements HealthTarget, else the interim one above."""
    if isinstance(balancer, HealthTarget):
        return balancer
    return SetBackendsHealth(balancer, backends)
