"""Configuration of the agent: of its packet core (`DecapConfig`) and of the process
(`AgentConfig`, what `python -m agent.decap` runs with: the file the controller renders, or the
command line). Frozen dataclasses validated on construction; the controller's deployment check
builds AgentConfig too, so each rule lives here once."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from l4lb.busypoll import busy_poll_error
from l4lb.errors import ConfigError
from l4lb.healthcfg import HealthConfig
from l4lb.wire import IPV4_HLEN, TCP_HLEN, parse_ipv4


def parse_network(field: str, text: str) -> ipaddress.IPv4Network:
    """'10.1.1.2' or '10.1.0.0/16' -> a network; host bits set in a CIDR are an error."""
    try:
        return ipaddress.IPv4Network(text, strict=True)
    except ValueError as exc:
        raise ConfigError(f"{field}: {text!r} is not an IPv4 address or CIDR ({exc})") from None


@dataclass(frozen=True)
class DecapConfig:
    """What the agent accepts; the CLI builds it, `Decapsulator` reads it."""

    local_ip: str
    """This host's address on the fabric: the outer destination of every tunnel to it."""
    vips: tuple[str, ...]
    """Virtual IPs served here: the only inner destinations delivered."""
    allowed_lbs: tuple[str, ...]
    """Outer sources allowed to tunnel to this host (addresses or CIDRs): the load balancers."""

    def __post_init__(self) -> None:
        parse_ipv4("local_ip", self.local_ip)
        if not self.vips:
            raise ConfigError("vips: at least one VIP is needed")
        for vip in self.vips:
            parse_ipv4("vips", vip)
        if not self.allowed_lbs:
            raise ConfigError("allowed_lbs: at least one load balancer address is needed")
        for lb in self.allowed_lbs:
            parse_network("allowed_lbs", lb)


DELIVERY = ("tun", "raw")
MSS_MIN = 536  # RFC 879's default MSS: below it, common stacks misbehave


def check_mss(server_mss: int, mtu: int) -> None:
    """A full segment from a client (MSS + TCP + IPv4 headers) plus the tunnel's outer header
    must fit the fabric's MTU, or the load balancer cannot forward it."""
    most = mtu - TCP_HLEN - IPV4_HLEN - IPV4_HLEN
    if not MSS_MIN <= server_mss <= most:
        raise ConfigError(
            f"server_mss: must be {MSS_MIN}..{most} (MSS + 60 <= MTU {mtu}: TCP and IPv4 "
            f"headers and the 20-byte tunnel header), not {server_mss}"
        )


@dataclass(frozen=True)
class AgentConfig:
    """What one `python -m agent.decap` process runs with.

    The controller renders it per backend into `<state dir>/config/agent-<iface>.json`
    (controller.render); `--config FILE` reads it and options override single fields."""

    vips: tuple[str, ...]
    """Virtual IPs served here (put on the agent's TUN device, delivered to)."""
    allowed_lbs: tuple[str, ...]
    """Tunnel sources allowed (addresses or CIDRs): the load balancers."""
    iface: str | None = None
    """The fabric interface (default: the host's only one besides lo)."""
    server_mss: int = 1440
    """MSS cap on SYN-ACKs from the VIP, so clients send segments the LB can encapsulate."""
    mtu: int = 1500
    """The fabric's MTU (checks server_mss)."""
    deliver: str = "tun"
    """How inner packets reach the stack: tun (the VIP's TUN device) or raw."""
    stats_file: str | None = None
    """Latest counters as JSON (default /run/l4lb/agent-IFACE.json; "" for none)."""
    stats_interval: float = 5.0
    """Seconds between JSON counter lines and stats-file rewrites (0: at start and exit)."""
    control_socket: str | None = None
    """The control channel (l4lb.control; default /run/l4lb/agent-IFACE.ctl; "" for none)."""
    ring_frames: int = 4096
    """Receive ring size in frames."""
    rps: str = "auto"
    """CPUs for the stack's receive work of delivered packets: auto, off or a hex mask."""
    busy_poll_us: int = 0
    """After traffic, spin this long for the next frame before sleeping."""
    health: HealthConfig | None = None
    """Check the local server and answer the LBs' probes on VIP:port (agent.health); None:
    neither (an LB probing this agent then finds it unreachable)."""

    def __post_init__(self) -> None:
        if not self.vips:
            raise ConfigError("vips: at least one VIP is needed")
        for vip in self.vips:
            parse_ipv4("vips", vip)
        if not self.allowed_lbs:
            raise ConfigError("allowed_lbs: at least one load balancer address is needed")
        for lb in self.allowed_lbs:
            parse_network("allowed_lbs", lb)
        if self.iface is not None and (not self.iface or len(self.iface) > 15):
            raise ConfigError(f"iface: {self.iface!r} is not an interface name")
        check_mss(self.server_mss, self.mtu)
        if self.deliver not in DELIVERY:
            raise ConfigError(
                f"deliver: must be one of {', '.join(DELIVERY)}, not {self.deliver!r}"
            )
        if self.stats_interval < 0:
            raise ConfigError(f"stats_interval: must be >= 0, not {self.stats_interval}")
        if self.ring_frames < 16:
            raise ConfigError(f"ring_frames: must be >= 16, not {self.ring_frames}")
        if why := busy_poll_error(self.busy_poll_us):
            raise ConfigError(f"busy_poll_us: {why}")
