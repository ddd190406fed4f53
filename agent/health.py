"""The agent's judgment of its own server: one decision per backend, made in one place, which
every LB applies (Ananta's split: the host agent judges its server, the LBs only check that
they reach the agent). Pure: results and `now` come in, the verdict goes out; the checks
themselves are agent.healthsvc's.

Rules (timing in l4lb.healthcfg.HealthConfig):
- A check every `interval`; while the state is changing (a failure while up, a success while
  down) every `fast_interval` instead, as haproxy's `fastinter`: a killed server, refused at
  once, is down `fall` checks later, at most interval + (fall - 1) * fast_interval (0.7 s).
- Down after `fall` consecutive failures, up after `rise` consecutive successes. Before the
  first result the verdict is UNKNOWN (the LBs keep what they believe: healthy at their
  start); the first success makes it UP at once (a restarted agent does not disturb a
  server that works), failures need `fall` as always.
- Dampening, as BGP's route-flap damping (RFC 2439): every up->down change of the checks adds
  a penalty of 1, which halves every `half_life`; at `suppress` the server is held down
  whatever the checks say, until the penalty decays below `reuse` (at most `max_suppress`).
  A single death and recovery are therefore never delayed (penalty 1 < suppress 2), while a
  server that flaps every second is held down from its third death on: a few table changes
  instead of two per flap. GLB's fixed hold-down would delay every recovery instead.
"""

from __future__ import annotations

import math

from l4lb.healthcfg import HealthConfig
from l4lb.healthwire import Verdict


class Dampening:
    """The flap penalty of one server, decaying with time."""

    def __init__(self, cfg: HealthConfig, now: float) -> None:
        self.cfg = cfg
        self.penalty = 0.0
        self.at = now
        """When `penalty` was last brought up to date."""
        self.suppressed = False

    def _decay(self, now: float) -> None:
        if now > self.at:
            self.penalty *= 2.0 ** (-(now - self.at) / self.cfg.half_life)
            self.at = now

    def went_down(self, now: float) -> None:
        """The checks turned an up server down: one more flap."""
        self._decay(now)
        self.penalty = min(self.penalty + 1.0, self.cfg.ceiling)
        if self.penalty >= self.cfg.suppress:
            self.suppressed = True

    def update(self, now: float) -> bool:
        """Decay to `now`; True while the server is held down."""
        self._decay(now)
        if self.suppressed and self.penalty < self.cfg.reuse:
            self.suppressed = False
        return self.suppressed

    def release_at(self) -> float:
        """When a held server is released (inf when it is not held)."""
        if not self.suppressed:
            return math.inf
        return self.at + self.cfg.half_life * math.log2(self.penalty / self.cfg.reuse)


class Checker:
    """The verdict on one server from its check results (see the module docstring)."""

    def __init__(self, cfg: HealthConfig, now: float) -> None:
        self.cfg = cfg
        self.up: bool | None = None
        """What the checks say (None before the first result), before dampening."""
        self.successes = 0
        """Consecutive successful checks."""
        self.failures = 0
        """Consecutive failed checks."""
        self.dampening = Dampening(cfg, now)
        self.verdict = Verdict.UNKNOWN
        self.since = now
        """When the verdict last changed."""
        self.changes = 0
        """Verdict changes (UNKNOWN to UP or DOWN included)."""
        self.checks = 0
        self.check_failures = 0
        self.detail = "no check yet"
        """The last check's outcome."""

    def result(self, now: float, ok: bool, detail: str) -> bool:
        """One check's outcome; True when the verdict changed."""
        self.checks += 1
        self.detail = detail
        if ok:
            self.successes += 1
            self.failures = 0
            if self.up is None or (not self.up and self.successes >= self.cfg.rise):
                self.up = True
        else:
            self.check_failures += 1
            self.failures += 1
            self.successes = 0
            if self.failures >= self.cfg.fall and self.up is not False:
                if self.up:
                    self.dampening.went_down(now)
                self.up = False
        return self.tick(now)

    def tick(self, now: float) -> bool:
        """Re-derive the verdict at `now` (a held server may be released without a check);
        True when it changed."""
        held = self.dampening.update(now)
        if self.up is None:
            verdict = Verdict.UNKNOWN
        elif self.up and not held:
            verdict = Verdict.UP
        else:
            verdict = Verdict.DOWN
        if verdict == self.verdict:
            return False
        self.verdict = verdict
        self.since = now
        self.changes += 1
        return True

    def next_check(self, now: float) -> float:
        """When to check next, after a check that finished at `now`."""
        changing = (
            self.up is None
            or (self.up and self.failures > 0)
            or (not self.up and self.successes > 0)
        )
        return now + (self.cfg.fast_interval if changing else self.cfg.interval)

    @property
    def suppressed(self) -> bool:
        return self.dampening.suppressed

    def wake_at(self) -> float:
        """When `tick` may change the verdict without a check (a held server's release)."""
        return self.dampening.release_at()
