"""The project's exception base and the two errors every command line reports the same way."""

from __future__ import annotations


class L4lbError(Exception):
    """A failure a process reports as one line (no traceback); the message says what to do."""


class UsageError(L4lbError):
    """Bad arguments, or a refusal to start: the command exits with status 2 and the message."""


class ConfigError(L4lbError, ValueError):
    """A configuration value is out of range or malformed; the message names the field."""
