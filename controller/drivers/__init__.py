"""Drivers that realise the canonical P4 table entries: `linux` (default) and `p4` (p4-utils)."""
