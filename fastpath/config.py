"""Configuration of the packet core: one frozen dataclass, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass

from l4lb.errors import ConfigError
from l4lb.wire import parse_ipv4


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


def check_backends(backends: tuple[tuple[str, int], ...]) -> None:
    """Raise ConfigError unless every backend is (IPv4 text, weight >= 0), each IP once."""
    seen: set[str] = set()
    for entry in backends:
        if not (isinstance(entry, tuple) and len(entry) == 2):
            raise ConfigError(f"backends: {entry!r} is not an (ip, weight) pair")
        ip, weight = entry
        parse_ipv4("backends", ip)
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
            raise ConfigError(f"backends: weight of {ip} must be an integer >= 0, not {weight!r}")
        if ip in seen:
            raise ConfigError(f"backends: {ip} listed twice")
        seen.add(ip)


@dataclass(frozen=True)
class BalancerConfig:
    """Everything the packet core needs; the CLI builds it, the core only reads it."""

    vips: tuple[tuple[str, int | None], ...]
    """Virtual services: (IPv4, TCP/UDP port or None for any port)."""
    backends: tuple[tuple[str, int], ...]
    """Real servers: (IPv4, weight). Weight 0 drains: no new flows, tracked flows stay."""
    local_ip: str
    """Source address of the outer IP-in-IP header (this load balancer)."""
    local_mac: bytes
    """Ethernet source of every frame sent (the interface's MAC)."""
    next_hop_mac: bytes
    """Ethernet destination of every frame sent (the gateway's MAC)."""
    hash_seed: int = 2026
    """Seed of the flow hash; every LB instance must share it to agree on backends."""
    table_size: int = 65537
    """Lookup table size (fastpath.lookup_table); a prime well over 100 x the backends."""
    conn_capacity: int = 1_000_000
    """Most flows the connection table holds (bounds its memory)."""
    conn_idle_timeout: float = 60.0
    """Seconds a flow stays tracked without packets (kept at least this long, gone by 2x)."""
    mtu: int = 1500
    """MTU of the outgoing link: encapsulated packets (inner + 20) must fit in it."""
    verify_checksum: bool = False
    """Drop inner packets whose IPv4 header checksum is wrong (the backend checks it anyway)."""

    def __post_init__(self) -> None:
        if not self.vips:
            raise ConfigError("vips: at least one VIP is needed")
        for entry in self.vips:
            if not (isinstance(entry, tuple) and len(entry) == 2):
                raise ConfigError(f"vips: {entry!r} is not an (ip, port or None) pair")
            ip, port = entry
            parse_ipv4("vips", ip)
            if port is not None and not (isinstance(port, int) and 0 < port < 65536):
                raise ConfigError(f"vips: port of {ip} must be 1..65535 or None, not {port!r}")
        check_backends(self.backends)
        parse_ipv4("local_ip", self.local_ip)
        for name in ("local_mac", "next_hop_mac"):
            mac = getattr(self, name)
            if not isinstance(mac, bytes | bytearray) or len(mac) != 6:
                raise ConfigError(f"{name}: must be 6 bytes, not {mac!r}")
        if not 0 <= self.hash_seed < 2**56:
            raise ConfigError(f"hash_seed: must be 0 <= seed < 2**56, not {self.hash_seed}")
        if not _is_prime(self.table_size):
            raise ConfigError(f"table_size: must be a prime, not {self.table_size}")
        if self.conn_capacity < 2:
            raise ConfigError(f"conn_capacity: must be >= 2, not {self.conn_capacity}")
        if not self.conn_idle_timeout > 0:
            raise ConfigError(f"conn_idle_timeout: must be > 0, not {self.conn_idle_timeout}")
        if not 68 + 20 <= self.mtu <= 65535:
            raise ConfigError(f"mtu: must be 88..65535, not {self.mtu}")
