"""`python -m controller p4-follow`: where the switches are bmv2 (p4run), the ToR of the load
balancers runs no BGP daemon, so the controller follows the announcements itself.

Each LB host runs the same BIRD as in the Linux emulation (controller.bgp: the VIP as a static
route valid while the LB process holds its TUN and answers BFD; `disable vip` drains). Its
control socket is a unix socket file, reachable from the root namespace because mininet and
p4run hosts share the mount namespace. Every --interval the follower asks each LB's BIRD
whether the VIP route is there (`show route <vip>/32 protocol vip`); a BIRD that does not
answer counts as not announcing. When the set of live LBs on a ToR changes, the ToR's VIP
entries are rewritten through the p4 driver's API:

- the `ipv4_lpm` entry of <vip>/32: `ecmp_group(gid, n)` over the n live LBs, `set_nhop` to
  the one live LB, or `drop` when none is left (as the Linux ToR without a BGP route drops);
- the group's `ecmp_group_to_nhop` members 0..n-1, in port order (the group id is the one the
  static program gives the VIP, or the ToR's next free one if the VIP had a single next hop).

Changes are ordered so that no lookup finds a missing member: new members are added first,
kept ones rewritten, then the VIP entry, and members past the new size deleted last.

p4-utils' `table_modify_match`/`table_delete_match` know only the handles of entries added
through the same API object (tests/unit/fake_p4utils.py says why), so at start the follower
programs each LB ToR afresh through its own API object (the p4 driver's clear-and-add, as
`p4-program` does, including the identity check), then changes only what it added. A refused
change is an error; `table_delete` reports nothing, so entry counts are read back after each
change. On exit the entries stay as last written. Every other switch keeps routing the VIP
toward the LBs' ToR, as in the Linux emulation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

from controller import birdctl
from controller.drivers.p4 import (
    ApiFactory,
    P4DriverError,
    ThriftAPI,
    check_identity,
    program_switch,
    thrift_port,
)
from controller.routes import (
    DROP,
    ECMP_GROUP,
    ECMP_GROUP_TO_NHOP,
    IPV4_LPM,
    SET_NHOP,
    SwitchProgram,
    TableEntry,
)
from controller.topology import Topology, natural_key


class EntryAPI(ThriftAPI, Protocol):
    """The calls that change single entries (p4utils/utils/thrift_API.py)."""

    def get_handle_from_match(
        self, table_name: str, match_keys: list[str], pop: bool = ...
    ) -> Any: ...

    def table_modify(
        self,
        table_name: str,
        action_name: str,
        entry_handle: int,
        action_params: list[str] = ...,
    ) -> Any: ...

    def table_delete_match(self, table_name: str, match_keys: list[str]) -> Any: ...


@dataclass(frozen=True)
class VipEntries:
    """A ToR's entries for the VIP: its ipv4_lpm entry and its group's members."""

    route: TableEntry
    members: tuple[TableEntry, ...]


def _group_ids(program: SwitchProgram) -> set[int]:
    return {int(e.match[0]) for e in program.entries if e.table == ECMP_GROUP_TO_NHOP}


def static_vip(program: SwitchProgram, vip: str) -> VipEntries:
    """The VIP's entries in the static program (every LB live)."""
    prefix = f"{vip}/32"
    route = next(e for e in program.entries if e.table == IPV4_LPM and e.match == (prefix,))
    gid = route.params[0] if route.action == ECMP_GROUP else None
    members = tuple(
        e for e in program.entries if e.table == ECMP_GROUP_TO_NHOP and e.match[0] == gid
    )
    return VipEntries(route, members)


def vip_group_id(program: SwitchProgram, vip: str) -> int:
    """The group the VIP uses when it has several next hops: the static one, else a free one."""
    route = static_vip(program, vip).route
    if route.action == ECMP_GROUP:
        return int(route.params[0])
    return max(_group_ids(program), default=0) + 1


def vip_entries(
    topo: Topology, program: SwitchProgram, vip: str, live: Sequence[str]
) -> VipEntries:
    """The ToR's VIP entries with only the `live` load balancers attached to it. Pure."""
    tor = program.switch
    ports = sorted(
        (topo.gateway(h).port, topo.host_interface(h).mac)
        for h in live
        if topo.gateway(h).node == tor
    )
    prefix = (f"{vip}/32",)
    if not ports:
        return VipEntries(TableEntry(IPV4_LPM, DROP, prefix, ()), ())
    if len(ports) == 1:
        port, mac = ports[0]
        return VipEntries(TableEntry(IPV4_LPM, SET_NHOP, prefix, (mac, str(port))), ())
    gid = str(vip_group_id(program, vip))
    members = tuple(
        TableEntry(ECMP_GROUP_TO_NHOP, SET_NHOP, (gid, str(i)), (mac, str(port)))
        for i, (port, mac) in enumerate(ports)
    )
    return VipEntries(TableEntry(IPV4_LPM, ECMP_GROUP, prefix, (gid, str(len(ports)))), members)


@dataclass(frozen=True)
class Change:
    kind: str  # "add" | "modify" | "delete"
    entry: TableEntry

    def cli(self) -> str:
        e = self.entry
        if self.kind == "add":
            return e.cli()
        if self.kind == "delete":
            return " ".join(["table_delete", e.table, *e.match])
        return " ".join(["table_modify", e.table, e.action, *e.match, "=>", *e.params])


def changes(old: VipEntries, new: VipEntries) -> list[Change]:
    """From `old` to `new` without a lookup ever missing a member: adds, rewrites of kept
    members, the VIP entry, then deletes. Pure."""
    before = {e.match: e for e in old.members}
    after = {e.match: e for e in new.members}
    out = [Change("add", e) for m, e in after.items() if m not in before]
    out += [Change("modify", e) for m, e in after.items() if m in before and before[m] != e]
    if new.route != old.route:
        out.append(Change("modify", new.route))
    out += [Change("delete", e) for m, e in before.items() if m not in after]
    return out


def apply_changes(api: EntryAPI, switch: str, todo: Sequence[Change]) -> None:
    """Send the changes; raises P4DriverError naming the one refused."""
    for c in todo:
        e = c.entry
        if c.kind == "add":
            ok = api.table_add(e.table, e.action, list(e.match), list(e.params)) is not None
        elif c.kind == "modify":
            handle = api.get_handle_from_match(e.table, list(e.match))
            ok = handle is not None and (
                api.table_modify(e.table, e.action, handle, list(e.params)) is not None
            )
        else:
            try:
                api.table_delete_match(e.table, list(e.match))
                ok = True
            except Exception:  # p4-utils' UIn_Error: a handle this API object does not know
                ok = False
        if not ok:
            raise P4DriverError(f"{switch}: refused `{c.cli()}`")


def bird_announces(ctl: Path, vip: str, timeout: float = 1.0) -> bool:
    """True when the LB host's BIRD has the VIP route of its `vip` static protocol (valid: the
    LB holds the announcement and BFD is up, and it is not drained). A BIRD that cannot be
    reached announces nothing."""
    try:
        lines = birdctl.query(ctl, f"show route {vip}/32 protocol vip", timeout)
    except birdctl.BirdError:
        return False  # 8001 "Network not found", or no BIRD at all
    return any(r.network == f"{vip}/32" for r in birdctl.parse_routes(lines))


class Follower:
    """Keeps the LB ToRs' VIP entries in step with `announces(host)`."""

    def __init__(
        self,
        topo: Topology,
        programs: Mapping[str, SwitchProgram],
        vip: str,
        load_balancers: Sequence[str],
        announces: Callable[[str], bool],
        api_factory: ApiFactory,
    ) -> None:
        self.topo = topo
        self.vip = vip
        self.lbs = sorted(load_balancers, key=natural_key)
        self.announces = announces
        tors = sorted({topo.gateway(h).node for h in self.lbs}, key=natural_key)
        self.programs = {t: programs[t] for t in tors}
        self.factory = api_factory
        self.apis: dict[str, EntryAPI] = {}
        self.current: dict[str, VipEntries] = {}
        self.members: dict[str, int] = {}  # ecmp_group_to_nhop entries on each ToR
        self.live: list[str] = list(self.lbs)

    def start(self) -> list[str]:
        """Program each LB ToR afresh through an API object of our own."""
        self.topo.require_pinned()
        out = []
        for tor, program in self.programs.items():
            port = thrift_port(self.topo, tor)
            api = cast(EntryAPI, self.factory(tor, port))
            device_id = self.topo.node(tor).device_id
            assert device_id is not None
            check_identity(api, tor, device_id, port)
            n = program_switch(api, program)
            self.apis[tor] = api
            self.current[tor] = static_vip(program, self.vip)
            self.members[tor] = sum(1 for e in program.entries if e.table == ECMP_GROUP_TO_NHOP)
            out.append(f"{tor}: programmed ({n} entries), VIP via {', '.join(self._on(tor))}")
        return out

    def _on(self, tor: str, hosts: Sequence[str] | None = None) -> list[str]:
        hosts = self.lbs if hosts is None else hosts
        return [h for h in hosts if self.topo.gateway(h).node == tor] or ["nothing (drop)"]

    def step(self) -> list[str]:
        """Ask every LB, rewrite the ToRs whose live set changed; one message per rewrite."""
        live = [h for h in self.lbs if self.announces(h)]
        out = []
        for tor, program in self.programs.items():
            new = vip_entries(self.topo, program, self.vip, live)
            old = self.current[tor]
            if new == old:
                continue
            t0 = time.monotonic()
            todo = changes(old, new)
            apply_changes(self.apis[tor], tor, todo)
            want = self.members[tor] - len(old.members) + len(new.members)
            got = self.apis[tor].table_num_entries(ECMP_GROUP_TO_NHOP)
            if got != want:
                raise P4DriverError(
                    f"{tor}: table {ECMP_GROUP_TO_NHOP} holds {got} entries after the change, "
                    f"not {want}"
                )
            self.current[tor], self.members[tor] = new, want
            gone = sorted(set(self.live) - set(live), key=natural_key)
            came = sorted(set(live) - set(self.live), key=natural_key)
            what = "; ".join([*(f"{h} withdrawn" for h in gone), *(f"{h} announced" for h in came)])
            out.append(
                f"{tor}: VIP via {', '.join(self._on(tor, live))} ({what}; {len(todo)} "
                f"changes in {(time.monotonic() - t0) * 1000:.0f} ms)"
            )
        self.live = live
        return out
