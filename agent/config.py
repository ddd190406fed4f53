"""Configuration of the decapsulating agent: one frozen dataclass, validated on construction."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from l4lb.errors import ConfigError
from l4lb.wire import parse_ipv4


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
