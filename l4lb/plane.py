"""What a packet process does besides packets, run from its own receive loop.

The load balancer and the agent each run one thread: the receive loop (l4lb.rxloop). Their
control work (the control socket, health probes, BFD, stats) is a set of `PlaneService`s
that the loop calls between batches, so no lock, thread or second process sits beside the
packet path. Each service says when it wants to be called next (`service(now) -> due`) and
which sockets should wake the loop while it sleeps (`fds()`): the loop sleeps no longer than
the earliest due time, and calls the plane when that time comes or one of those sockets is
readable. While busy the loop checks the due time once per batch (one float comparison).

A service must not block: it does what is ready and returns. An exception from one is a bug,
not an input: it is counted in `Plane.errors`, reported once on stderr with its traceback,
and the loop goes on forwarding.
"""

from __future__ import annotations

import math
import sys
import traceback
from collections.abc import Sequence
from typing import Protocol


class PlaneService(Protocol):
    def fds(self) -> Sequence[int]:
        """Sockets whose input should wake the loop while it is idle."""
        ...

    def service(self, now: float) -> float:
        """Do what is pending without blocking; return when to be called again (monotonic)."""
        ...


class Plane:
    """The services of one process, called together by its receive loop."""

    def __init__(self, services: Sequence[PlaneService] = (), name: str = "plane") -> None:
        self.services: list[PlaneService] = list(services)
        self.name = name
        self.due = -math.inf
        """The earliest time a service wants to run (the loop calls `run` from then on)."""
        self.errors = 0
        """Exceptions raised by services (bugs; each also reported on stderr, the first time)."""
        self._reported: set[str] = set()

    def add(self, service: PlaneService) -> None:
        self.services.append(service)
        self.due = -math.inf  # let the new service run at the next turn

    def fds(self) -> list[int]:
        return [fd for s in self.services for fd in s.fds()]

    def run(self, now: float) -> float:
        """Call every service; returns (and keeps in `due`) the earliest next due time."""
        due = math.inf
        for s in self.services:
            try:
                when = s.service(now)
            except Exception as exc:  # a bug: keep forwarding, say it once
                self.errors += 1
                when = now + 0.1
                key = f"{type(s).__name__}:{type(exc).__name__}"
                if key not in self._reported:
                    self._reported.add(key)
                    print(
                        f"{self.name}: {type(s).__name__} failed (counted, loop goes on):",
                        file=sys.stderr,
                    )
                    traceback.print_exc(file=sys.stderr)
            if when < due:
                due = when
        self.due = due
        return due
