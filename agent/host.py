"""Host settings the agent needs while it runs, each undone at exit (in reverse order).

Where the VIP lives: on the agent's TUN device (agent.deliver), as a /32. The kernel treats it as
a local address (a server binds it), the device is point-to-point without ARP, and the device
(with the VIP) disappears by itself when the agent dies, even by SIGKILL; `lo` would need an
explicit delete that a crash skips. Linux answers ARP on any interface for any local address, so
the fabric interface still gets arp_ignore=1 (answer only for addresses on that interface) and
arp_announce=2 (never use the VIP as an ARP source); both are per-interface (the kernel uses the
max of `all` and the interface) and restored at exit.

rp_filter: the TUN gets rp_filter=2 (loose). The effective value is max(all, device), so the
inner packets (client source, arriving on the TUN) pass whatever `all` says; loose mode needs
an IPv4 address on the device, which the VIP is. The fabric interface is left alone: the outer
source (a load balancer) is routed through it.

One nftables table, `inet l4lb_agent_<iface>`, holds the rest, so removal is one exact delete:
- ingress on the fabric interface: drop IP-in-IP to this host. This kernel has no ipip module,
  so without it every tunnel packet earns an ICMP protocol-unreachable. AF_PACKET taps see the
  frame before the ingress hook, so the agent still gets its copy, and the kernel skips the IP
  input path for it. (A raw socket bound to protocol 4 also silences the ICMP, checked here; the
  ingress drop is cheaper: the packet never reaches ip_rcv.)
- output: SYN-ACKs from a VIP get MSS <= server_mss, so clients send segments that still fit the
  MTU once the load balancer adds its 20-byte header. A route `advmss` would not do: the MSS of
  a SYN-ACK comes from the route back to the client (the default route), not from the VIP's.
The ruleset starts by creating and deleting the table, so a table left by a killed agent is
replaced atomically.

RPS on the TUN (`rps_cpus`): a write to a TUN runs the whole IP/UDP/TCP receive path in the
writer's system call. With RPS the writer only queues the packet for another CPU. Measured with
`bench/pps.sh --rounds 1 --duration 3 --phases agent` (agent pinned to CPU 0, 64-byte frames,
4096 flows; machine busy with other benchmarks): 252,000 packets/s delivered with `--rps auto`
(the other core), 103,000 with `--rps off`.

GRO off on the fabric interface while the agent runs (restored at exit): with GRO the receive
ring could get merged frames larger than its slots.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from l4lb import rps
from l4lb.errors import L4lbError
from l4lb.wire import IPIP, Encap

SYSCTL_ROOT = Path("/proc/sys")


def table_name(iface: str) -> str:
    """The agent's nftables table for `iface` ('h3-eth0' -> 'l4lb_agent_h3_eth0')."""
    return "l4lb_agent_" + re.sub(r"[^A-Za-z0-9_]", "_", iface)


def tun_name(iface: str) -> str:
    """The agent's TUN device for `iface` (at most 15 characters)."""
    return ("l4a-" + iface)[:15]


@dataclass(frozen=True)
class HostPlan:
    """What to install for one agent."""

    iface: str
    """Fabric interface the tunnels arrive on."""
    local_ip: str
    """This host's address on it (outer destination)."""
    vips: tuple[str, ...]
    """Addresses put on the TUN device."""
    tun: str
    """TUN device that carries the VIPs ('' when delivering through a raw socket)."""
    server_mss: int
    """Largest MSS a SYN-ACK from a VIP may advertise."""
    rps_cpus: int = 0
    """CPU mask for RPS on the TUN (0: the writing CPU does the stack's work itself)."""
    encap: Encap = IPIP
    """The tunnel whose outer packets the ingress rule drops."""

    @property
    def table(self) -> str:
        return table_name(self.iface)

    def nft_ruleset(self) -> str:
        """The `nft -f` script: replace any stale table, then install ours."""
        t = self.table
        vips = ", ".join(self.vips)
        mss = self.server_mss
        return (
            f"table inet {t} {{}}\n"
            f"delete table inet {t}\n"
            f"table inet {t} {{\n"
            f"  chain ipip_in {{\n"
            f'    type filter hook ingress device "{self.iface}" priority filter; policy accept;\n'
            f"    meta protocol ip ip daddr {self.local_ip} ip protocol {self.encap.ip_proto}"
            " counter drop\n"
            f"  }}\n"
            f"  chain mss_out {{\n"
            f"    type filter hook output priority mangle; policy accept;\n"
            f"    ip saddr {{ {vips} }} tcp flags & (syn | ack) == syn | ack"
            f" tcp option maxseg size > {mss} tcp option maxseg size set {mss} counter\n"
            f"  }}\n"
            f"}}\n"
        )


class HostError(L4lbError, RuntimeError):
    """A host setting could not be applied; the message names the command and its error."""


Runner = Callable[[list[str], str | None], None]


def run(argv: list[str], stdin: str | None = None) -> None:
    """Run a command; HostError with its stderr when it fails."""
    try:
        res = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HostError(f"{' '.join(argv)}: {exc}") from None
    if res.returncode != 0:
        raise HostError(f"{' '.join(argv)}: {res.stderr.strip() or f'exit {res.returncode}'}")


def sysctl_path(key: str) -> Path:
    """'net.ipv4.conf.h3-eth0.arp_ignore' -> /proc/sys/net/ipv4/conf/h3-eth0/arp_ignore."""
    parts = key.split(".")
    # Interface names may contain dots; only the first three and the last part are path levels.
    if len(parts) > 5 and parts[2] == "conf":
        parts = [*parts[:3], ".".join(parts[3:-1]), parts[-1]]
    return SYSCTL_ROOT.joinpath(*parts)


class HostSetup:
    """Applies a HostPlan step by step, remembering how to undo each step that succeeded."""

    def __init__(self, plan: HostPlan, runner: Runner = run) -> None:
        self.plan = plan
        self.run = runner
        self.undo_steps: list[tuple[str, Callable[[], None]]] = []

    def apply(self) -> None:
        """Install everything; on failure, undo what was done and raise HostError."""
        p = self.plan
        try:
            conf = f"net.ipv4.conf.{p.iface}"
            self._sysctl(f"{conf}.arp_ignore", "1")
            self._sysctl(f"{conf}.arp_announce", "2")
            self._gro_off()
            if p.tun:
                self._sysctl(f"net.ipv6.conf.{p.tun}.disable_ipv6", "1")
                self._sysctl(f"net.ipv4.conf.{p.tun}.rp_filter", "2")
                for vip in p.vips:
                    self._step(
                        ["ip", "addr", "add", f"{vip}/32", "dev", p.tun],
                        ["ip", "addr", "del", f"{vip}/32", "dev", p.tun],
                    )
                self.run(["ip", "link", "set", p.tun, "up"], None)
                if p.rps_cpus:  # no undo: the setting goes with the device
                    rps.set_mask(p.tun, p.rps_cpus)
            self.run(["nft", "-f", "-"], p.nft_ruleset())
            self.undo_steps.append(
                (
                    f"nft delete table inet {p.table}",
                    self._cmd(["nft", "delete", "table", "inet", p.table]),
                )
            )
        except (HostError, OSError) as exc:
            self.undo()
            raise HostError(str(exc)) from None

    def undo(self) -> list[str]:
        """Undo every applied step, newest first; never raises. Returns the errors met."""
        errors = []
        while self.undo_steps:
            what, fn = self.undo_steps.pop()
            try:
                fn()
            except (HostError, OSError) as exc:
                errors.append(f"undo {what}: {exc}")
                print(f"agent: undo {what} failed: {exc}", file=sys.stderr)
        return errors

    def _cmd(self, argv: list[str]) -> Callable[[], None]:
        return lambda: self.run(argv, None)

    def _step(self, do: list[str], undo: list[str]) -> None:
        self.run(do, None)
        self.undo_steps.append((" ".join(undo), self._cmd(undo)))

    def _sysctl(self, key: str, value: str) -> None:
        path = sysctl_path(key)
        old = path.read_text().strip()
        if old == value:
            return
        path.write_text(value)

        def restore() -> None:
            path.write_text(old)

        self.undo_steps.append((f"sysctl {key}={old}", restore))

    def _gro_off(self) -> None:
        iface = self.plan.iface
        try:
            res = subprocess.run(
                ["ethtool", "-k", iface], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            print(f"agent: ethtool -k {iface}: {exc}; GRO left as is", file=sys.stderr)
            return
        for feature, short in (
            ("generic-receive-offload", "gro"),
            ("large-receive-offload", "lro"),
        ):
            m = re.search(rf"^{feature}: on(?! \[fixed\])", res.stdout, re.M)
            if m:
                self._step(
                    ["ethtool", "-K", iface, short, "off"], ["ethtool", "-K", iface, short, "on"]
                )
