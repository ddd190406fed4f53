"""The `p4` driver: send the canonical entries to bmv2 switches through p4-utils' thrift API.

For anyone running the topology under `p4run` with `p4src/ecmp.p4`. p4-utils is imported only
by `thrift_api_factory`, so this module (and the tests with a recording fake) need neither
p4-utils nor a switch. What it relies on, read in nsg-ethz/p4-utils:

- `p4utils/utils/sswitch_thrift_API.py`: `SimpleSwitchThriftAPI(thrift_port, thrift_ip=
  'localhost', json_path=None)`; its base `p4utils/utils/thrift_API.py` (`ThriftAPI`) connects
  in the constructor through bmv2's `bmpy_utils.thrift_connect`, which prints "Could not
  connect to thrift client on port N" and calls `sys.exit(1)` when no switch listens: a
  `SystemExit`, not an `Exception`, caught here and turned into this driver's error.
- Every table method is wrapped in `handle_bad_input`, which prints an error and returns None:
  `table_add` returns the entry handle on success (so None is a refusal, e.g.
  DUPLICATE_ENTRY); `table_set_default` and `table_clear` return None either way, so their
  effect is checked by reading `table_num_entries` back.
- `api.client` is the bmv2 `Standard` thrift client; `bm_mgmt_get_info()` returns bmv2's
  `BmConfig` (`device_id`, `thrift_port`), and p4-utils starts each switch with
  `--device-id <device_id>` (`p4utils/mininetlib/node.py`, `P4Switch.add_arguments`). The
  driver checks that the switch on a thrift port is the one it means before writing to it.

A run is rerunnable: the tables a program owns are cleared first, then filled, then their
entry counts read back and compared.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from controller.routes import SwitchProgram
from controller.topology import Topology, TopologyError


class P4DriverError(RuntimeError):
    """A switch refused an entry, cannot be reached, or is not the switch expected."""


class ThriftAPI(Protocol):
    """The subset of SimpleSwitchThriftAPI this driver uses."""

    client: Any  # bmv2's Standard client: bm_mgmt_get_info()

    def table_set_default(
        self, table_name: str, action_name: str, action_params: list[str] = ...
    ) -> Any: ...

    def table_add(
        self,
        table_name: str,
        action_name: str,
        match_keys: list[str],
        action_params: list[str] = ...,
        prio: int = ...,
    ) -> Any: ...

    def table_clear(self, table_name: str) -> Any: ...

    def table_num_entries(self, table_name: str) -> Any: ...


ApiFactory = Callable[[str, int], ThriftAPI]  # (switch name, thrift port) -> API


def thrift_port(topo: Topology, switch: str) -> int:
    """The switch's thrift port: pinned in the topology file (or p4-utils' own rule)."""
    node = topo.node(switch)
    if node.kind != "switch" or node.thrift_port is None:
        raise TopologyError(f"{topo.source}: {switch!r} is not a switch")
    return node.thrift_port


def thrift_api_factory(switch: str, port: int) -> ThriftAPI:
    """Connect to a running bmv2 switch with p4-utils (imported here, and only here)."""
    try:
        from p4utils.utils.sswitch_thrift_API import SimpleSwitchThriftAPI
    except ImportError as e:
        raise P4DriverError(f"the p4 driver needs p4-utils (nsg-ethz/p4-utils): {e}") from None
    try:
        api: ThriftAPI = SimpleSwitchThriftAPI(port)
    except SystemExit:  # bmpy_utils.thrift_connect: nothing listens on the port
        raise P4DriverError(
            f"{switch}: cannot connect to thrift port {port}: no switch listens there "
            "(is the network up under p4run?)"
        ) from None
    except Exception as e:  # thrift raises its own transport exceptions
        raise P4DriverError(f"{switch}: cannot connect to thrift port {port}: {e}") from None
    return api


def check_identity(api: ThriftAPI, switch: str, device_id: int, port: int) -> None:
    """Refuse to write to a switch whose bmv2 device id is not the expected one."""
    try:
        found = api.client.bm_mgmt_get_info().device_id
    except Exception as e:
        raise P4DriverError(f"{switch}: thrift port {port}: cannot read its device id: {e}") from e
    if found != device_id:
        raise P4DriverError(
            f"{switch}: thrift port {port} answers as device {found}, not {device_id}: the "
            "switches' thrift ports are not the ones in the topology file; pin `thrift_port` "
            "on every switch (see controller/topologies/README.md)"
        )


def program_switch(api: ThriftAPI, program: SwitchProgram) -> int:
    """Clear the program's tables, set the defaults, add every entry in order, then read the
    entry counts back. Returns the number of entries added."""
    tables = sorted({d.table for d in program.defaults} | {e.table for e in program.entries})
    for table in tables:
        api.table_clear(table)
    for d in program.defaults:
        api.table_set_default(d.table, d.action, list(d.params))
    for e in program.entries:
        handle = api.table_add(e.table, e.action, list(e.match), list(e.params))
        if handle is None:
            raise P4DriverError(f"{program.switch}: refused `{e.cli()}`")
    for table in tables:
        want = sum(1 for e in program.entries if e.table == table)
        got = api.table_num_entries(table)
        if got != want:
            raise P4DriverError(
                f"{program.switch}: table {table} holds {got} entries after programming, not {want}"
            )
    return len(program.entries)


def program_all(
    topo: Topology,
    programs: Mapping[str, SwitchProgram],
    api_factory: ApiFactory = thrift_api_factory,
) -> dict[str, int]:
    """Program every switch of `programs`, in the topology's switch order; each switch's
    identity is checked before anything is written to it.

    Returns entries added per switch.
    """
    topo.require_pinned()
    unknown = set(programs) - set(topo.switches())
    if unknown:
        raise TopologyError(f"{topo.source}: programs for unknown switches {sorted(unknown)}")
    added: dict[str, int] = {}
    for sw in topo.switches():
        if sw not in programs:
            continue
        port = thrift_port(topo, sw)
        api = api_factory(sw, port)
        device_id = topo.node(sw).device_id
        assert device_id is not None  # every switch has one (checked at load)
        check_identity(api, sw, device_id, port)
        added[sw] = program_switch(api, programs[sw])
    return added
