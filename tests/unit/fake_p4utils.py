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
- The tables and sizes are those of p4src/ecmp.p4 (`ipv4_lpm`, `ecmp_group_to_nhop`,
  `src_guard`, 1024 each).

Changing entries (what p4-follow uses), also from `p4utils/utils/thrift_API.py`:
- `table_modify(table_name, action_name, entry_handle, action_params=[])` and
  `table_delete(table_name, entry_handle, quiet=False)` act on a handle and are wrapped in
  `handle_bad_input`: `table_modify` returns the handle, or None when bmv2 refuses
  (INVALID_HANDLE, EXPIRED_HANDLE, a bad action); `table_delete` returns None either way.
- `table_modify_match(table_name, action_name, match_keys, action_params=[])` and
  `table_delete_match(table_name, match_keys)` are NOT wrapped: they look the handle up with
  `get_handle_from_match(table_name, match_keys, pop=False)` in the API object's own
  `table_entries_match_to_handle`, raise `UIn_Error("Table ... has no match ...")` when it is
  not there, and otherwise call the wrapped method, ignoring what it returned (so a refused
  modify still returns the handle). `table_delete_match` pops the handle first.
- That dictionary is filled by this object's `table_add`, and in the constructor by
  `load_table_entries_match_to_handle()`, which, as written, keeps only the LAST entry the
  switch lists for each table (`d[table] = {key: handle}` inside the loop). So entries added by
  another process (p4-program, an earlier p4-follow) are mostly unknown to a new API object:
  `table_modify_match` raises for them. `table_clear` leaves the dictionary alone.
- Handles are bmv2's (`src/bm_sim/match_units.cpp`, `include/bm/bm_sim/handle_mgr.h`): the
  lowest free index of the table, with an 8-bit version in bits 24..31 that a delete bumps; a
  handle whose index is free is INVALID_HANDLE, one with an old version EXPIRED_HANDLE. (A clear
  is modelled as deleting every entry.)
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any

TABLES = {
    "ipv4_lpm": {"set_nhop", "ecmp_group", "drop"},
    "ecmp_group_to_nhop": {"set_nhop", "drop"},
    "src_guard": {"src_allow", "src_deny"},
}
TABLE_SIZE = 1024


class UIn_Error(Exception):  # (p4-utils' names)
    """p4utils.utils.thrift_API.UIn_Error: raised by the unwrapped *_match methods."""


class UIn_ResourceError(UIn_Error):
    """p4utils.utils.thrift_API.UIn_ResourceError: an unknown table name."""


def _handle(version: int, index: int) -> int:
    return ((version & 0xFF) << 24) | index  # bmv2's HANDLE_SET


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
    # bmv2's handles: per table, index -> key of the entry there, and each index's version
    slots: dict[str, dict[int, str]] = field(default_factory=lambda: {t: {} for t in TABLES})
    versions: dict[str, dict[int, int]] = field(default_factory=lambda: {t: {} for t in TABLES})

    def bm_mgmt_get_info(self) -> BmConfig:
        return BmConfig(self.device_id, self.thrift_port)

    def add(self, table: str, key: str, value: tuple[str, list[str]]) -> int:
        """bmv2 add_entry_: the lowest free index, at that index's current version."""
        index = 0
        while index in self.slots[table]:
            index += 1
        self.slots[table][index] = key
        self.entries[table][key] = value
        return _handle(self.versions[table].get(index, 0), index)

    def lookup(self, table: str, handle: int) -> str | None:
        """The entry's key, or None with the error bmv2 would give printed."""
        index, version = handle & 0x00FFFFFF, handle >> 24
        if index not in self.slots[table]:
            print("Invalid table operation (INVALID_HANDLE)")
            return None
        if self.versions[table].get(index, 0) != version:
            print("Invalid table operation (EXPIRED_HANDLE)")
            return None
        return self.slots[table][index]

    def delete(self, table: str, handle: int) -> None:
        key = self.lookup(table, handle)
        if key is None:
            return
        index = handle & 0x00FFFFFF
        del self.slots[table][index]
        del self.entries[table][key]
        self.versions[table][index] = (self.versions[table].get(index, 0) + 1) & 0xFF

    def handle_of(self, table: str, key: str) -> int | None:
        for index, k in self.slots[table].items():
            if k == key:
                return _handle(self.versions[table].get(index, 0), index)
        return None

    def clear(self, table: str) -> None:
        for index in sorted(self.slots[table]):
            handle = _handle(self.versions[table].get(index, 0), index)
            self.delete(table, handle)
        self.entries[table].clear()  # entries a test put there without a handle, too


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
        self.table_entries_match_to_handle: dict[str, dict[str, int]] = {t: {} for t in TABLES}
        self.load_table_entries_match_to_handle()

    def load_table_entries_match_to_handle(self) -> None:
        """As p4-utils wrote it: the dictionary is replaced per entry, so the last one stays."""
        for table in TABLES:
            self.table_entries_match_to_handle[table].clear()
            for index in sorted(self.switch.slots[table]):
                key = self.switch.slots[table][index]
                handle = _handle(self.switch.versions[table].get(index, 0), index)
                self.table_entries_match_to_handle[table] = {key: handle}

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
        handle = self.switch.add(table_name, key, (action_name, list(action_params)))
        self.table_entries_match_to_handle[table_name][key] = handle
        return handle

    def table_clear(self, table_name):
        self.calls.append(("table_clear", (table_name,)))
        table = self._table(table_name)
        if table is not None and self.switch.clear_works:
            self.switch.clear(table_name)
        return None

    def get_handle_from_match(self, table_name, match_keys, pop=False):
        if table_name not in TABLES:
            raise UIn_ResourceError(f"Invalid table name ({table_name})")  # get_res, unwrapped
        key = json.dumps([str(k) for k in match_keys])
        known = self.table_entries_match_to_handle[table_name]
        handle = known.get(key)
        if handle is not None and pop:
            del known[key]
        return handle

    def table_modify(self, table_name, action_name, entry_handle, action_params=[]):  # noqa: B006
        self.calls.append(("table_modify", (table_name, action_name, entry_handle, action_params)))
        if self._table(table_name) is None:
            return None
        if action_name not in TABLES[table_name]:
            print(f"Error: Table {table_name} has no action {action_name}")
            return None
        key = self.switch.lookup(table_name, entry_handle)
        if key is None:
            return None
        self.switch.entries[table_name][key] = (action_name, list(action_params))
        return entry_handle

    def table_modify_match(self, table_name, action_name, match_keys, action_params=[]):  # noqa: B006
        entry_handle = self.get_handle_from_match(table_name, match_keys)
        if entry_handle is not None:
            self.table_modify(table_name, action_name, entry_handle, action_params)
        else:
            raise UIn_Error(f"Table {table_name} has no match {match_keys}")
        return entry_handle

    def table_delete(self, table_name, entry_handle, quiet=False):
        self.calls.append(("table_delete", (table_name, entry_handle)))
        if self._table(table_name) is None:
            return None
        self.switch.delete(table_name, entry_handle)
        return None

    def table_delete_match(self, table_name, match_keys):
        entry_handle = self.get_handle_from_match(table_name, match_keys, pop=True)
        print("trying to delete entry with handle ", entry_handle)
        if entry_handle is not None:
            self.table_delete(table_name, entry_handle)
        else:
            raise UIn_Error(f"Table {table_name} has no match {match_keys}")

    def table_num_entries(self, table_name):
        self.calls.append(("table_num_entries", (table_name,)))
        table = self._table(table_name)
        return None if table is None else len(table)

    def call_lines(self) -> list[str]:
        """One line per call: the method, then its arguments as JSON."""
        return [f"{name} {json.dumps(list(args))}" for name, args in self.calls]
