"""The exporter's configuration: what `python -m controller.exporter --config FILE` runs with.

The controller renders one per load balancer and agent into
`<state dir>/config/exporter-<kind>-<host>.json` (controller.render); the rest (control socket,
interface, VIPs, backends, table capacity) the exporter reads from the process's own
configuration file, named here, so each value is defined once.
"""

from __future__ import annotations

from dataclasses import dataclass

from l4lb.errors import ConfigError
from l4lb.wire import parse_ipv4

KINDS = ("lb", "agent")
DEFAULT_PORT = 9180


def check_port(name: str, port: int) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ConfigError(f"{name}: must be a port 1..65535, not {port!r}")


@dataclass(frozen=True)
class ExporterConfig:
    kind: str
    """"lb" (beside a fastpath.lb) or "agent" (beside an agent.decap)."""
    process_config: str
    """The process's own configuration file (fastpath.config.LbConfig / agent.config.AgentConfig):
    its control socket, interface, VIPs and, for an LB, its backends."""
    listen: str
    """The address /metrics is served on: the host's own."""
    port: int = DEFAULT_PORT
    """The TCP port /metrics is served on."""
    server_ports: tuple[int, ...] = ()
    """Agent: the VIP's ports whose local listener is reported (l4lb_agent_server_listening)."""
    control_timeout: float = 1.0
    """Seconds a scrape waits for the process's control channel."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"kind: must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if not self.process_config:
            raise ConfigError("process_config: the process's configuration file is needed")
        parse_ipv4("listen", self.listen)
        check_port("port", self.port)
        for p in self.server_ports:
            check_port("server_ports", p)
        if not 0 < self.control_timeout <= 30:
            raise ConfigError(f"control_timeout: must be 0 < s <= 30, not {self.control_timeout}")
