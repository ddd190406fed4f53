"""A recording stand-in for p4-utils' SimpleSwitchThriftAPI (no thrift, no switch).

Same method names, parameter names and defaults as `p4utils.utils.sswitch_thrift_API.
SimpleSwitchThriftAPI` (inherited from `thrift_API.ThriftAPI`):
`table_set_default(self, table_name, action_name, action_params=[])` and
`table_add(self, table_name, action_name, match_keys, action_params=[], prio=None)`.
Like the real one, `table_add` returns an entry handle, or None when it refuses the entry.
"""

from __future__ import annotations

import json
from typing import Any


class RecordingThriftAPI:
    def __init__(self, thrift_port: int, refuse_after: int | None = None) -> None:
        self.thrift_port = thrift_port
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self._refuse_after = refuse_after  # refuse table_add number N (0-based) and later
        self._handles = 0

    def table_set_default(self, table_name, action_name, action_params=[]):  # noqa: B006
        self.calls.append(("table_set_default", (table_name, action_name, action_params)))

    def table_add(self, table_name, action_name, match_keys, action_params=[], prio=None):  # noqa: B006
        self.calls.append(("table_add", (table_name, action_name, match_keys, action_params)))
        if self._refuse_after is not None and self._handles >= self._refuse_after:
            return None  # p4-utils prints the error and returns None
        handle = self._handles
        self._handles += 1
        return handle

    def call_lines(self) -> list[str]:
        """One line per call: the method, then its arguments as JSON."""
        return [f"{name} {json.dumps(list(args))}" for name, args in self.calls]
