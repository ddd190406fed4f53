"""A stand-in for the switches p4run starts and for p4-utils' SimpleSwitchThriftAPI.

Its behaviour is copied from their code (nsg-ethz/p4-utils and p4lang/behavioral-model), not
from ours:

- `p4utils/utils/sswitch_thrift_API.py`: `SimpleSwitchThriftAPI(thrift_port, thrift_ip=
  'localhost', json_path=None)`; the constructor connects through bmv2's
  `bmpy_utils.thrift_connect`, which prints "Could not connect to thrift client on port N"
  and calls `sys.exit(1)` when nothing listens (so: SystemExit, not an Exception).
- `p4utils/utils/thrift_API.py` (`ThriftAPI`): `table_set_default(table_name, action_name,
  action_params=[])`, `table_add(table_name, action_name, match_keys, action_params=[],
  prio=0)`, `table_clear(table_name)`, `table_num_entries(table_name)`. All are wrapped in
  `handle_bad_input`, which prints the error and returns None: `table_add` returns the entry
  handle on success and None when bmv2 refuses (DUPLICATE_ENTRY, TABLE_FULL, bad name);
  `table_set_default` and `table_clear` return None whether or not they worked.
- `api.client.bm_mgmt_get_info()` returns bmv2's `BmConfig` (`device_id`, `thrift_port`,
  behavioral-model `thrift_src/standard.thrift`); p4-utils starts each switch with
  `--device-id` (`p4utils/mininetlib/node.py`, `P4Switch.add_arguments`).
- The tables and sizes are those of p4src/ecmp.p4 (`ipv4_lpm`, `ecmp_group_to_nhop`, 1024).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any

TABLES = {
    "ipv4_lpm": {"set_nhop", "ecmp_group", "drop"},
    "ecmp_group_to_nhop": {"set_nhop", "drop"},
}
TABLE_SIZE = 1024


@dataclass
class BmConfig:
    device_id: int
    thrift_port: int


@dataclass
class FakeSwitch:
    """One bmv2 simple_switch as p4run starts it: its device id, thrift port and tables."""

    name: str
    device_id: int
    thrift_port: int
    entries: dict[str, dict[str, tuple[str, list[str]]]] = field(
        default_factory=lambda: {t: {} for t in TABLES}
    )
    defaults: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    clear_works: bool = True  # False: table_clear silently does nothing (a broken switch)

    def bm_mgmt_get_info(self) -> BmConfig:
        return BmConfig(self.device_id, self.thrift_port)


class FakeNetwork:
    """What p4run has running: thrift port -> switch."""

    def __init__(self, switches: list[FakeSwitch]) -> None:
        self.by_port = {s.thrift_port: s for s in switches}
        self.made: list[RecordingThriftAPI] = []

    def switch(self, name: str) -> FakeSwitch:
        return next(s for s in self.by_port.values() if s.name == name)

    def factory(self, switch: str, port: int) -> RecordingThriftAPI:
        """An ApiFactory: connects as SimpleSwitchThriftAPI(port) would."""
        api = RecordingThriftAPI(port, network=self)
        self.made.append(api)
        return api


class RecordingThriftAPI:
    """SimpleSwitchThriftAPI against a FakeNetwork, recording every call."""

    def __init__(
        self,
        thrift_port: int,
        thrift_ip: str = "localhost",
        json_path: str | None = None,
        *,
        network: FakeNetwork,
    ) -> None:
        if thrift_port not in network.by_port:
            print(f"Could not connect to thrift client on port {thrift_port}")
            print("Make sure the switch is running and that you have the right port")
            sys.exit(1)
        self.thrift_port = thrift_port
        self.switch = network.by_port[thrift_port]
        self.client = self.switch  # bm_mgmt_get_info() lives on the Standard client
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self._handles = 0

    def _table(self, table_name: str) -> dict[str, tuple[str, list[str]]] | None:
        if table_name not in TABLES:
            print(f"Error: Invalid table name ({table_name})")
            return None
        return self.switch.entries[table_name]

    def table_set_default(self, table_name, action_name, action_params=[]):  # noqa: B006
        self.calls.append(("table_set_default", (table_name, action_name, action_params)))
        if self._table(table_name) is None:
            return None
        if action_name not in TABLES[table_name]:
            print(f"Error: Table {table_name} has no action {action_name}")
            return None
        self.switch.defaults[table_name] = (action_name, list(action_params))
        return None  # None on success too

    def table_add(self, table_name, action_name, match_keys, action_params=[], prio=0):  # noqa: B006
        self.calls.append(("table_add", (table_name, action_name, match_keys, action_params)))
        table = self._table(table_name)
        if table is None:
            return None
        if action_name not in TABLES[table_name]:
            print(f"Error: Table {table_name} has no action {action_name}")
            return None
        key = json.dumps(match_keys)
        if key in table:
            print("Invalid table operation (DUPLICATE_ENTRY)")
            return None
        if len(table) >= TABLE_SIZE:
            print("Invalid table operation (TABLE_FULL)")
            return None
        table[key] = (action_name, list(action_params))
        handle = self._handles
        self._handles += 1
        return handle

    def table_clear(self, table_name):
        self.calls.append(("table_clear", (table_name,)))
        table = self._table(table_name)
        if table is not None and self.switch.clear_works:
            table.clear()
        return None

    def table_num_entries(self, table_name):
        self.calls.append(("table_num_entries", (table_name,)))
        table = self._table(table_name)
        return None if table is None else len(table)

    def call_lines(self) -> list[str]:
        """One line per call: the method, then its arguments as JSON."""
        return [f"{name} {json.dumps(list(args))}" for name, args in self.calls]
