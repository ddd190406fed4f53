"""Configuration: of the packet core (`BalancerConfig`, what the core reads) and of the process
(`LbConfig`, what `python -m fastpath.lb` runs with: the file the controller renders, or the
command line). Both are frozen dataclasses validated on construction; each rule is one
function here, used by both and, through `LbConfig`, by the controller's deployment check."""

from __future__ import annotations

from dataclasses import dataclass

from fastpath.conntrack import HALF_OPEN_CAPACITY, HALF_OPEN_TIMEOUT, INSERT_RATE
from l4lb.busypoll import busy_poll_error
from l4lb.errors import ConfigError
from l4lb.healthcfg import HealthConfig
from l4lb.wire import parse_ipv4, parse_mac


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


def check_vips(vips: tuple[tuple[str, int | None], ...]) -> None:
    """Raise ConfigError unless there is a VIP and each is (IPv4 text, port 1..65535 or None)."""
    if not vips:
        raise ConfigError("vips: at least one VIP is needed")
    for entry in vips:
        if not (isinstance(entry, tuple) and len(entry) == 2):
            raise ConfigError(f"vips: {entry!r} is not an (ip, port or None) pair")
        ip, port = entry
        parse_ipv4("vips", ip)
        if port is not None and not (
            isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536
        ):
            raise ConfigError(f"vips: port of {ip} must be 1..65535 or None, not {port!r}")


def check_hash_seed(seed: int) -> None:
    """The seed is shifted left 8 bits and or-ed with the IP protocol, inside xxh3's 64 bits."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**56:
        raise ConfigError(f"hash_seed: must be an integer 0 <= seed < 2**56, not {seed!r}")


MAX_INSERT_RATE = 10_000_000
"""Largest conn_insert_rate: far beyond what one Python loop can insert (a bound that catches a
typo; 0 turns the cap off)."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_conn(
    capacity: int,
    idle_timeout: float,
    half_open_capacity: int = HALF_OPEN_CAPACITY,
    half_open_timeout: float = HALF_OPEN_TIMEOUT,
    insert_rate: int = INSERT_RATE,
) -> None:
    """Raise ConfigError unless the connection table's settings (fastpath.conntrack) hold."""
    if not _is_int(capacity) or capacity < 2:
        raise ConfigError(f"conn_capacity: must be an integer >= 2, not {capacity!r}")
    if not _is_number(idle_timeout) or not idle_timeout > 0:
        raise ConfigError(f"conn_idle_timeout: must be > 0, not {idle_timeout!r}")
    if not _is_int(half_open_capacity) or half_open_capacity < 2:
        raise ConfigError(
            f"conn_half_open_capacity: must be an integer >= 2, not {half_open_capacity!r}"
        )
    if not _is_number(half_open_timeout) or not 0 < half_open_timeout <= idle_timeout:
        raise ConfigError(
            f"conn_half_open_timeout: must be > 0 and at most conn_idle_timeout "
            f"({idle_timeout}), not {half_open_timeout!r}"
        )
    if not _is_int(insert_rate) or not 0 <= insert_rate <= MAX_INSERT_RATE:
        raise ConfigError(
            f"conn_insert_rate: must be an integer 0..{MAX_INSERT_RATE} (0: no cap), "
            f"not {insert_rate!r}"
        )


BFD_INTERVAL_MS = (10, 10000)
"""Bounds of the announcement's BFD interval (ms): BIRD's and the deployment's."""
BFD_MULTIPLIER = (1, 255)
"""Bounds of the BFD detect multiplier (RFC 5880 4.1: one byte, not 0)."""


def check_bfd(interval_ms: int, multiplier: int) -> None:
    """Raise ConfigError unless the BFD timers are integers within their bounds."""
    for name, value, (low, high) in (
        ("bfd_interval_ms", interval_ms, BFD_INTERVAL_MS),
        ("bfd_multiplier", multiplier, BFD_MULTIPLIER),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(f"{name}: must be an integer in {low}..{high}, not {value!r}")


MAX_WEIGHT = 1000
"""Largest backend weight. The table has 65,537 slots: at 1000:1 the lightest backend still owns
~65 of them, so its share follows its weight to about 12% (binomial spread); past that the
share stops meaning what the weight says. (haproxy stops at 256; 1000 allows per-mille.) A
bound also catches a typo such as 10000 for 100."""
MAX_BACKENDS = 64
"""Most backends in a set: each owns ~1000 slots at 64, and each address an LB has never seen
costs ~15-20 ms of its loop to score once (fastpath.lookup_table.raw_scores), so a whole new
set of 64 pauses forwarding for about a second, the most we allow."""


def check_weight(ip: str, weight: object) -> None:
    if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= MAX_WEIGHT:
        raise ConfigError(
            f"backends: weight of {ip} must be an integer 0..{MAX_WEIGHT}, not {weight!r}"
        )


def check_backends(backends: tuple[tuple[str, int], ...]) -> None:
    """Raise ConfigError unless every backend is (IPv4 text, weight 0..MAX_WEIGHT), each IP
    once, at most MAX_BACKENDS."""
    if len(backends) > MAX_BACKENDS:
        raise ConfigError(f"backends: at most {MAX_BACKENDS}, not {len(backends)}")
    seen: set[str] = set()
    for entry in backends:
        if not (isinstance(entry, tuple) and len(entry) == 2):
            raise ConfigError(f"backends: {entry!r} is not an (ip, weight) pair")
        ip, weight = entry
        parse_ipv4("backends", ip)
        check_weight(ip, weight)
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
    conn_half_open_capacity: int = HALF_OPEN_CAPACITY
    """Most half-open flows (bare SYNs seen, nothing else yet), held apart from the rest."""
    conn_half_open_timeout: float = HALF_OPEN_TIMEOUT
    """Seconds a half-open flow stays tracked without packets (<= conn_idle_timeout)."""
    conn_insert_rate: int = INSERT_RATE
    """Most new flows tracked per second (0: no cap); more are forwarded by the table only."""
    mtu: int = 1500
    """MTU of the outgoing link: encapsulated packets (inner + 20) must fit in it."""
    verify_checksum: bool = False
    """Drop inner packets whose IPv4 header checksum is wrong (the backend checks it anyway)."""

    def __post_init__(self) -> None:
        check_vips(self.vips)
        check_backends(self.backends)
        parse_ipv4("local_ip", self.local_ip)
        for name in ("local_mac", "next_hop_mac"):
            mac = getattr(self, name)
            if not isinstance(mac, bytes | bytearray) or len(mac) != 6:
                raise ConfigError(f"{name}: must be 6 bytes, not {mac!r}")
        check_hash_seed(self.hash_seed)
        if not _is_prime(self.table_size):
            raise ConfigError(f"table_size: must be a prime, not {self.table_size}")
        check_conn(
            self.conn_capacity,
            self.conn_idle_timeout,
            self.conn_half_open_capacity,
            self.conn_half_open_timeout,
            self.conn_insert_rate,
        )
        if not 68 + 20 <= self.mtu <= 65535:
            raise ConfigError(f"mtu: must be 88..65535, not {self.mtu}")


BATCH_MAX = 256  # the sender's and the loop's largest batch
MAX_WORKERS = 64
"""Most forwarding processes of one LB (`--workers`): far more than the cores of any machine it
is meant for; a fanout group takes up to 256 sockets (PACKET_FANOUT_MAX on older kernels)."""


def check_workers(workers: object, name: str = "workers") -> None:
    """`name`: the field's name where it was given (the deployment's is lb_workers)."""
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= MAX_WORKERS:
        raise ConfigError(f"{name}: must be an integer 1..{MAX_WORKERS}, not {workers!r}")


@dataclass(frozen=True)
class LbConfig:
    """What one `python -m fastpath.lb` process runs with.

    The controller renders it per load balancer from the deployment into
    `<state dir>/config/lb-<iface>.json` (controller.render); `--config FILE` reads it, and
    command-line options override single fields. Values learned from the interface at start
    (its MAC, address, MTU, the next hop) are not here: see BalancerConfig."""

    iface: str
    """The interface tapped and sent on, e.g. h1-eth0."""
    vips: tuple[tuple[str, int | None], ...]
    """Virtual services: (IPv4, TCP/UDP port or None for every port)."""
    backends: tuple[tuple[str, int], ...]
    """Real servers at start: (IPv4, weight); weight 0 drains."""
    backends_down: tuple[str, ...] = ()
    """Backends of `backends` administratively down at start (the controller's record says so)."""
    hash_seed: int = 2026
    """Seed of the flow hash; every LB instance must share it to agree on backends."""
    names: tuple[tuple[str, str], ...] = ()
    """(IPv4, host name) of known hosts, for messages and for `--backend h3`."""
    local_ip: str | None = None
    """Outer source address (default: the interface's)."""
    next_hop_mac: str | None = None
    """Ethernet destination (default: learned from the neighbour table and refreshed)."""
    conn_capacity: int = 1_000_000
    """Most tracked flows."""
    conn_idle_timeout: float = 60.0
    """Idle seconds before a tracked flow may be forgotten."""
    conn_half_open_capacity: int = HALF_OPEN_CAPACITY
    """Most half-open flows (a SYN seen, nothing else yet), apart from the established ones."""
    conn_half_open_timeout: float = HALF_OPEN_TIMEOUT
    """Idle seconds before a half-open flow may be forgotten (<= conn_idle_timeout)."""
    conn_insert_rate: int = INSERT_RATE
    """Most new flows tracked per second (0: no cap); those over it are forwarded by the
    lookup table without being tracked (SYN flood defence, fastpath.conntrack)."""
    stats_file: str | None = None
    """Latest counters as JSON (default /run/l4lb/lb-IFACE.json; "" for none)."""
    stats_interval: float = 1.0
    """Seconds between JSON counter lines on stdout and stats-file rewrites."""
    control_socket: str | None = None
    """The control channel (l4lb.control; default /run/l4lb/lb-IFACE.ctl; "" for none)."""
    cpu: int | None = None
    """Pin the forwarding loop to this CPU."""
    rps_cpus: str = "auto"
    """RPS CPUs for IFACE's receive softirq: auto, off or a hex mask (l4lb.rps)."""
    batch: int = BATCH_MAX
    """Frames per receive/send batch."""
    busy_poll_us: int = 0
    """After traffic, spin this long for the next frame before sleeping."""
    ring_frames: int = 16384
    """Receive ring size in frames (2 KiB each)."""
    keep_offloads: bool = False
    """Leave IFACE's offloads as they are (GRO/LRO/TSO/GSO are turned off otherwise)."""
    nft: bool = True
    """Install the nftables ingress drop of VIP traffic on IFACE."""
    health: HealthConfig | None = None
    """Probe every backend's agent through the tunnel and apply its health (fastpath.health);
    None: no health checks (every backend counts as healthy)."""
    announce: bool = False
    """Announce the VIPs by BGP once forwarding: hold the TUN `l4an-IFACE` and answer the host
    BIRD's BFD on it (fastpath.announce); SIGTERM withdraws, drains, then stops."""
    bfd_interval_ms: int = 100
    """The announcement's BFD interval: BIRD withdraws a hung LB after multiplier x this."""
    bfd_multiplier: int = 3
    """The announcement's BFD detect multiplier."""
    workers: int = 1
    """Forwarding processes (fastpath.workers): 1 forwards in this process; N > 1 makes it a
    supervisor of N worker processes in one PACKET_FANOUT group on IFACE, each on its core."""

    def __post_init__(self) -> None:
        if not self.iface or "/" in self.iface or len(self.iface) > 15:
            raise ConfigError(f"iface: {self.iface!r} is not an interface name")
        check_vips(self.vips)
        check_backends(self.backends)
        listed = {ip for ip, _ in self.backends}
        for ip in self.backends_down:
            if ip not in listed:
                raise ConfigError(f"backends_down: {ip} is not one of the backends")
        check_hash_seed(self.hash_seed)
        for ip, name in self.names:
            parse_ipv4("names", ip)
            if not name:
                raise ConfigError(f"names: empty host name for {ip}")
        if self.local_ip is not None:
            parse_ipv4("local_ip", self.local_ip)
        if self.next_hop_mac is not None:
            parse_mac(self.next_hop_mac)
        check_conn(
            self.conn_capacity,
            self.conn_idle_timeout,
            self.conn_half_open_capacity,
            self.conn_half_open_timeout,
            self.conn_insert_rate,
        )
        if not self.stats_interval > 0:
            raise ConfigError(f"stats_interval: must be > 0, not {self.stats_interval}")
        if not 1 <= self.batch <= BATCH_MAX:
            raise ConfigError(f"batch: must be 1..{BATCH_MAX}, not {self.batch}")
        if why := busy_poll_error(self.busy_poll_us):
            raise ConfigError(f"busy_poll_us: {why}")
        if self.ring_frames < 16:
            raise ConfigError(f"ring_frames: must be >= 16, not {self.ring_frames}")
        check_bfd(self.bfd_interval_ms, self.bfd_multiplier)
        check_workers(self.workers)
        if self.workers > 1 and self.cpu is not None:
            raise ConfigError(
                "cpu: pins the single forwarding process; with workers > 1 each worker is "
                "pinned to its own CPU (leave cpu unset, or taskset the supervisor)"
            )

    def name_of(self, ip: str) -> str | None:
        """The host name of an address, if the configuration knows it."""
        return dict(self.names).get(ip)
