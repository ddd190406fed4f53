"""The `linux` driver: realise a switch's canonical P4 table entries as kernel routes.

Each switch is a Linux router in its own network namespace. The mapping is:

- `set_nhop(dstAddr, port)`: a route via the IP of the interface facing `port`, plus a
  permanent neighbour entry that gives that IP the MAC `dstAddr`, so the frame goes to exactly
  the MAC the P4 entry names and nothing waits for ARP;
- `ecmp_group(id, n)`: one multipath route whose nexthops are the group's
  `ecmp_group_to_nhop` buckets 0..n-1 (repeats become weights, as repeated buckets would);
  the kernel hashes L4 ports when `net.ipv4.fib_multipath_hash_policy=1`;
- `drop`: a blackhole route; `table_set_default ipv4_lpm drop` is a blackhole default route.

Routes are `onlink`: the next hop is the MAC behind a port, whatever the interface's subnet.

The source guard (`src_guard`, BCP 38) becomes one nftables table per switch, `ip
l4lb_src_guard`, a prerouting chain with a rule per entry, each port's entries longest prefix
first (the LPM's order): `iifname "t8-eth2" ip saddr 10.8.16.2 accept`, then `iifname "t8-eth2"
counter name "denied_t8_eth2" drop` for its 0.0.0.0/0; a named counter per host port counts
what it drops (`nft list counters` in the switch). It goes with the switch's namespace.

`program_commands` and `guard_ruleset` are pure (a program in, `ip` argv lists or an nft
script out); `run_batch` runs such lists in a node's namespaces through one `ip -batch -`,
`run_nft` the scripts through `nft -f -`.
"""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Mapping, Sequence

from controller.routes import SRC_ALLOW, SRC_DENY, SRC_GUARD, SwitchProgram, TableEntry
from controller.topology import Topology

Command = list[str]
GUARD_TABLE = "l4lb_src_guard"


class DriverError(ValueError):
    """An entry the driver cannot realise, or a batch the kernel refused; says which and why."""


class _Compiler:
    """Turns one switch's entries into neighbour and route commands."""

    def __init__(self, program: SwitchProgram, topo: Topology) -> None:
        self.sw = program.switch
        self.topo = topo
        self.neigh_mac: dict[tuple[str, str], str] = {}  # (gateway IP, dev) -> MAC
        self.groups: dict[str, dict[int, tuple[str, ...]]] = {}  # group -> bucket -> params

    def hop(self, params: tuple[str, ...], where: str) -> tuple[str, str]:
        """`set_nhop(dstAddr, port)` -> (gateway IP, dev); records the neighbour entry."""
        if len(params) != 2:
            raise DriverError(f"{where}: set_nhop takes (dstAddr, port), got {params}")
        mac, port_s = params
        port = _int(port_s, "port", where)
        iface = self.topo.node(self.sw).interfaces.get(port)
        if iface is None:
            raise DriverError(f"{where}: {self.sw} has no port {port}")
        peer = self.topo.peer(iface)
        if peer.ip is None:
            raise DriverError(f"{where}: {peer.name} (behind {iface.name}) has no IP to route via")
        key = (peer.ip.split("/")[0], iface.name)
        known = self.neigh_mac.setdefault(key, mac.lower())
        if known != mac.lower():
            raise DriverError(f"{where}: {key[0]} on {key[1]} would get two MACs ({known}, {mac})")
        return key

    def add_bucket(self, e: TableEntry, where: str) -> None:
        if e.action != "set_nhop" or len(e.match) != 2:
            raise DriverError(f"{where}: expected set_nhop on (group, index)")
        buckets = self.groups.setdefault(e.match[0], {})
        index = _int(e.match[1], "bucket index", where)
        if index in buckets:
            raise DriverError(f"{where}: duplicate bucket {e.match[0]} {index}")
        buckets[index] = e.params

    def multipath(self, params: tuple[str, ...], where: str) -> list[str]:
        """`ecmp_group(id, n)` -> the nexthop arguments of one route."""
        if len(params) != 2:
            raise DriverError(f"{where}: ecmp_group takes (ecmp_group_id, num_nhops)")
        gid, n = params[0], _int(params[1], "num_nhops", where)
        buckets = self.groups.get(gid, {})
        missing = [i for i in range(n) if i not in buckets]
        if n < 1 or missing:
            raise DriverError(f"{where}: group {gid} lacks ecmp_group_to_nhop bucket(s) {missing}")
        weights: dict[tuple[str, str], int] = {}
        for i in range(n):
            nh = self.hop(buckets[i], where)
            weights[nh] = weights.get(nh, 0) + 1
        if len(weights) == 1:
            ((gw, dev),) = weights
            return ["via", gw, "dev", dev, "onlink"]
        out: list[str] = []
        for (gw, dev), w in weights.items():
            out += ["nexthop", "via", gw, "dev", dev, "weight", str(w), "onlink"]
        return out


def _int(text: str, what: str, where: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise DriverError(f"{where}: {what} {text!r} is not a number") from None


def _prefix(entry: TableEntry, where: str) -> str:
    if len(entry.match) != 1:
        raise DriverError(f"{where}: ipv4_lpm match must be one prefix, got {entry.match}")
    try:
        return str(ipaddress.IPv4Network(entry.match[0], strict=True))
    except ValueError as e:
        raise DriverError(f"{where}: bad prefix {entry.match[0]!r}: {e}") from None


def program_commands(program: SwitchProgram, topo: Topology) -> list[Command]:
    """The `ip` commands (argv lists) that realise `program` on its switch. Pure.

    Neighbour entries first, then routes, each in entry order; all idempotent (`replace`).
    """
    c = _Compiler(program, topo)
    routes: list[Command] = []
    for d in program.defaults:
        if (d.table, d.action, d.params) == ("ipv4_lpm", "drop", ()):
            routes.append(["ip", "route", "replace", "blackhole", "default"])
        elif (d.table, d.action, d.params) not in (
            ("ecmp_group_to_nhop", "drop", ()),
            (SRC_GUARD, SRC_ALLOW, ()),  # the guard's chain accepts by default (guard_ruleset)
        ):
            # (a multipath route has no bucket to miss, so that default needs nothing)
            raise DriverError(f"{c.sw}: {d.cli()}: unsupported default action")
    for e in program.entries:
        if e.table == "ecmp_group_to_nhop":
            c.add_bucket(e, f"{c.sw}: {e.cli()}")
    for e in program.entries:
        where = f"{c.sw}: {e.cli()}"
        if e.table in ("ecmp_group_to_nhop", SRC_GUARD):
            continue
        if e.table != "ipv4_lpm":
            raise DriverError(f"{where}: unknown table {e.table!r}")
        prefix = _prefix(e, where)
        if e.action == "set_nhop":
            gw, dev = c.hop(e.params, where)
            routes.append(["ip", "route", "replace", prefix, "via", gw, "dev", dev, "onlink"])
        elif e.action == "ecmp_group":
            routes.append(["ip", "route", "replace", prefix, *c.multipath(e.params, where)])
        elif e.action == "drop" and not e.params:
            routes.append(["ip", "route", "replace", "blackhole", prefix])
        else:
            raise DriverError(f"{where}: unsupported action {e.action!r}")
    neighbours = [
        ["ip", "neigh", "replace", gw, "lladdr", mac, "dev", dev, "nud", "permanent"]
        for (gw, dev), mac in c.neigh_mac.items()
    ]
    return neighbours + routes


def counter_name(iface: str) -> str:
    """The guard's counter of drops from one port: "t8-eth2" -> "denied_t8_eth2"."""
    return "denied_" + iface.replace("-", "_")


def guard_ruleset(program: SwitchProgram, topo: Topology) -> str | None:
    """The nft script realising the program's src_guard entries; None if it has none. Pure.

    The script deletes any table of the same name first (`table` then `delete table`, in one
    transaction), so it can be applied again.
    """
    ports: dict[int, list[tuple[int, str, str]]] = {}  # port -> (prefix length, prefix, action)
    for e in program.entries:
        if e.table != SRC_GUARD:
            continue
        where = f"{program.switch}: {e.cli()}"
        if len(e.match) != 2 or e.params or e.action not in (SRC_ALLOW, SRC_DENY):
            raise DriverError(f"{where}: expected src_allow|src_deny on (port, prefix)")
        port = _int(e.match[0], "port", where)
        if port not in topo.node(program.switch).interfaces:
            raise DriverError(f"{where}: {program.switch} has no port {port}")
        try:
            net = ipaddress.IPv4Network(e.match[1], strict=True)
        except ValueError as exc:
            raise DriverError(f"{where}: bad prefix {e.match[1]!r}: {exc}") from None
        ports.setdefault(port, []).append((net.prefixlen, str(net), e.action))
    if not ports:
        return None
    counters, rules = [], []
    for port in sorted(ports):
        dev = topo.node(program.switch).interfaces[port].name
        counters.append(f"  counter {counter_name(dev)} {{ }}")
        # longest prefix first (LPM); equal lengths are disjoint, ordered by address
        by_lpm = sorted(ports[port], key=lambda x: (-x[0], ipaddress.IPv4Network(x[1])))
        for plen, prefix, action in by_lpm:
            match = f'iifname "{dev}"' + (f" ip saddr {prefix}" if plen else "")
            verdict = (
                "accept" if action == SRC_ALLOW else f'counter name "{counter_name(dev)}" drop'
            )
            rules.append(f"    {match} {verdict}")
    return "\n".join(
        [
            f"table ip {GUARD_TABLE}",
            f"delete table ip {GUARD_TABLE}",
            f"table ip {GUARD_TABLE} {{",
            *counters,
            "  chain prerouting {",
            "    type filter hook prerouting priority raw; policy accept;",
            *rules,
            "  }",
            "}",
            "",
        ]
    )


def run_nft(scripts: Mapping[str, tuple[int, str]], timeout: float = 30.0) -> None:
    """Apply one nft script per node, all at once: {label: (pid, script)}."""
    jobs = {
        label: (["mnexec", "-a", str(pid), "nft", "-f", "-"], script)
        for label, (pid, script) in scripts.items()
    }
    _run_fed(jobs, "nft", timeout)


def batch_text(commands: Sequence[Sequence[str]]) -> str:
    """`ip -batch` input for argv lists that all start with "ip". Pure."""
    lines = []
    for argv in commands:
        if not argv or argv[0] != "ip":
            raise DriverError(f"not an ip command: {list(argv)}")
        for word in argv[1:]:
            # ip's batch tokenizer splits on blanks and knows quotes and comments
            if not word or not word.isprintable() or any(ch in word for ch in " \t\"'#\\"):
                raise DriverError(f"unsafe word {word!r} in {list(argv)}")
        lines.append(" ".join(argv[1:]))
    return "".join(line + "\n" for line in lines)


def _batch_argv(pid: int) -> list[str]:
    return ["mnexec", "-a", str(pid), "ip", "-batch", "-"]


def run_batch(pid: int, commands: Sequence[Sequence[str]], where: str = "") -> None:
    """Run `ip` commands in the network and mount namespaces of process `pid`, in one batch."""
    run_batches({where or str(pid): (pid, commands)})


def run_batches(
    batches: Mapping[str, tuple[int, Sequence[Sequence[str]]]], timeout: float = 30.0
) -> None:
    """Run one `ip -batch` per node, all at once: {label: (pid, commands)}."""
    jobs = {
        label: (_batch_argv(pid), batch_text(commands))
        for label, (pid, commands) in batches.items()
        if commands
    }
    _run_fed(jobs, "ip -batch", timeout)


def _run_fed(jobs: Mapping[str, tuple[list[str], str]], what: str, timeout: float) -> None:
    """Run every {label: (argv, stdin text)} at once; one DriverError naming each failure."""
    procs = {
        label: (
            subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            ),
            text,
        )
        for label, (argv, text) in jobs.items()
    }
    errors = []
    for label, (p, text) in procs.items():
        try:
            out, _ = p.communicate(text, timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            errors.append(f"{label}: {what} timed out after {timeout:.0f} s")
            continue
        if p.returncode != 0:
            errors.append(f"{label}: {out.strip()}".replace("\n", "; "))
    if errors:
        raise DriverError(f"{what} failed: " + " | ".join(errors))


def apply_program(pid: int, program: SwitchProgram, topo: Topology) -> int:
    """Program one switch node; returns the number of commands run."""
    commands = program_commands(program, topo)
    run_batch(pid, commands, program.switch)
    return len(commands)
