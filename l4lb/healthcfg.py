"""The health checks' settings, one frozen dataclass shared by every LB and agent.

The deployment's `health` object is this dataclass (controller.deployment reads it with
l4lb.cfgfile, so each rule below is checked once, naming the field) and the controller renders
it into every LbConfig and AgentConfig: the LBs and the agents always agree on the port, the
timing and the thresholds.

Who uses what: the agent checks its local server (agent.health: interval, fast_interval,
timeout, fall, rise, path, http_port and the dampening); the LBs probe the agents through the
tunnel (fastpath.health: interval, fast_interval, timeout, fall, rise, port).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from l4lb.errors import ConfigError


@dataclass(frozen=True)
class HealthConfig:
    """Health-check timing, thresholds and dampening (defaults: issue 8's)."""

    interval: float = 0.5
    """Seconds between two checks (agent) or two probes (LB) while nothing is failing."""
    fast_interval: float = 0.1
    """Seconds between checks or probes while a state is changing (after a failure, or a
    success while down): haproxy's `fastinter`, so a death is confirmed in well under 1 s."""
    timeout: float = 0.4
    """Seconds an HTTP check waits for the status line, and an LB for a probe's reply."""
    fall: int = 3
    """Consecutive failures that make a server down (agent) or an agent unreachable (LB)."""
    rise: int = 3
    """Consecutive successes that make it up or reachable again."""
    port: int = 9181
    """UDP port on the VIP where the agent answers the LBs' tunnelled probes."""
    path: str = ""
    """HTTP check: "" sends `HEAD / HTTP/1.0`; a path such as "/health" sends a GET of it."""
    http_port: int = 80
    """The server's port on the VIP that the agent checks."""
    half_life: float = 10.0
    """Dampening: seconds for a flap penalty to halve (each up->down change adds 1)."""
    suppress: float = 2.0
    """Dampening: a penalty at or above this holds the server down whatever its checks say
    (with a half-life of 10 s: the third death within ~7 s of each other)."""
    reuse: float = 1.0
    """Dampening: a held server is released once its penalty decays below this."""
    max_suppress: float = 30.0
    """Dampening: the longest a server is held (bounds the penalty at
    reuse * 2 ** (max_suppress / half_life))."""

    def __post_init__(self) -> None:
        for name in ("interval", "fast_interval", "timeout", "half_life", "suppress", "reuse"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name}: must be a number > 0, not {value!r}")
        if self.fast_interval > self.interval:
            raise ConfigError(
                f"fast_interval: must be <= interval ({self.interval}), not {self.fast_interval}"
            )
        if self.timeout > self.interval:
            raise ConfigError(
                f"timeout: must be <= interval ({self.interval}: one probe at a time), "
                f"not {self.timeout}"
            )
        for name in ("fall", "rise"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100:
                raise ConfigError(f"{name}: must be an integer 1..100, not {value!r}")
        for name in ("port", "http_port"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
                raise ConfigError(f"{name}: must be a port 1..65535, not {value!r}")
        if self.path and not (
            self.path.startswith("/")
            and self.path.isascii()
            and self.path.isprintable()
            and " " not in self.path
            and len(self.path) <= 256
        ):
            raise ConfigError(
                f"path: must be empty or an absolute URL path without spaces, not {self.path!r}"
            )
        if not self.reuse < self.suppress:
            raise ConfigError(f"reuse: must be below suppress ({self.suppress}), not {self.reuse}")
        if not (math.isfinite(self.max_suppress) and 0 <= self.max_suppress <= 3600):
            raise ConfigError(f"max_suppress: must be 0..3600 s, not {self.max_suppress}")

    @property
    def ceiling(self) -> float:
        """The largest flap penalty: it decays to `reuse` in `max_suppress` seconds."""
        return self.reuse * 2.0 ** (self.max_suppress / self.half_life)

    @property
    def push_window(self) -> float:
        """An agent pushes a changed verdict to every LB that probed it within this time."""
        return max(10 * self.interval, 2.0)

    def request(self) -> bytes:
        """The HTTP check's request."""
        if self.path:
            return f"GET {self.path} HTTP/1.0\r\nConnection: close\r\n\r\n".encode()
        return b"HEAD / HTTP/1.0\r\n\r\n"
