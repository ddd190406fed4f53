"""The `p4` driver: send the canonical entries to bmv2 switches through p4-utils' thrift API.

For anyone running the topology under `p4run` with `p4src/ecmp.p4`. p4-utils is imported only
by `thrift_api_factory`, so this module (and the tests with a recording fake) need neither
p4-utils nor a switch. The calls are those of `p4utils.utils.sswitch_thrift_API.
SimpleSwitchThriftAPI` (from `thrift_API.ThriftAPI`):
`table_set_default(table_name, action_name, action_params=[])` and
`table_add(table_name, action_name, match_keys, action_params=[], prio=None)`; both swallow
errors (printing them) and return None then, while a successful `table_add` returns the entry
handle, so a None from `table_add` is treated as a failure here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from controller.routes import SwitchProgram
from controller.topology import Topology, TopologyError

THRIFT_BASE_PORT = 9090  # p4-utils: the lowest free port from 9090, switches in file order


class P4DriverError(RuntimeError):
    """A switch refused an entry, or cannot be reached."""


class ThriftAPI(Protocol):
    """The subset of SimpleSwitchThriftAPI this driver uses."""

    def table_set_default(
        self, table_name: str, action_name: str, action_params: list[str] = ...
    ) -> Any: ...

    def table_add(
        self,
        table_name: str,
        action_name: str,
        match_keys: list[str],
        action_params: list[str] = ...,
        prio: int | None = ...,
    ) -> Any: ...


ApiFactory = Callable[[str, int], ThriftAPI]  # (switch name, thrift port) -> API


def thrift_port(topo: Topology, switch: str) -> int:
    """The switch's thrift port as p4run assigns it: 9090 + device_id - 1."""
    node = topo.node(switch)
    if node.device_id is None:
        raise TopologyError(f"{topo.source}: {switch!r} is not a switch")
    return THRIFT_BASE_PORT + node.device_id - 1


def thrift_api_factory(switch: str, port: int) -> ThriftAPI:
    """Connect to a running bmv2 switch with p4-utils (imported here, and only here)."""
    try:
        from p4utils.utils.sswitch_thrift_API import SimpleSwitchThriftAPI
    except ImportError as e:
        raise P4DriverError(f"the p4 driver needs p4-utils (nsg-ethz/p4-utils): {e}") from None
    try:
        api: ThriftAPI = SimpleSwitchThriftAPI(port)
    except Exception as e:  # thrift raises its own transport exceptions
        raise P4DriverError(f"{switch}: cannot connect to thrift port {port}: {e}") from None
    return api


def program_switch(api: ThriftAPI, program: SwitchProgram) -> int:
    """Set the defaults, then add every entry, in order. Returns the number of entries added."""
    for d in program.defaults:
        api.table_set_default(d.table, d.action, list(d.params))
    for e in program.entries:
        handle = api.table_add(e.table, e.action, list(e.match), list(e.params))
        if handle is None:
            raise P4DriverError(f"{program.switch}: refused `{e.cli()}`")
    return len(program.entries)


def program_all(
    topo: Topology,
    programs: Mapping[str, SwitchProgram],
    api_factory: ApiFactory = thrift_api_factory,
) -> dict[str, int]:
    """Program every switch of `programs`, in the topology's switch order.

    Returns entries added per switch.
    """
    unknown = set(programs) - set(topo.switches())
    if unknown:
        raise TopologyError(f"{topo.source}: programs for unknown switches {sorted(unknown)}")
    added: dict[str, int] = {}
    for sw in topo.switches():
        if sw in programs:
            added[sw] = program_switch(api_factory(sw, thrift_port(topo, sw)), programs[sw])
    return added
