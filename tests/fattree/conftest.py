"""Fat-tree tests: root, mininet, the whole k=4 topology brought up through controller.network.

Only one fat tree runs on the machine at a time (/run/l4lb/fattree.lock): the fixture waits
for its turn (bounded) rather than fail when another run holds it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest
from fatnet import fat_tree

from controller.netstate import NetState


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "fat-tree tests need root (network namespaces, veths)"
    for tool in ("mnexec", "ip", "sysctl", "lsns"):
        if shutil.which(tool) is None:
            return f"fat-tree tests need {tool}"
    try:
        import mininet.net  # noqa: F401
    except ImportError:
        return "fat-tree tests need the mininet Python package (Debian: python3-mininet)"
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    reason = _why_not()
    if reason is None:
        return
    for item in items:
        if item.get_closest_marker("fattree") is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="module")
def fattree() -> Iterator[NetState]:
    """The fat tree, up (detached) for a module's tests, and always taken down after."""
    with fat_tree() as st:
        yield st


@pytest.fixture(scope="module")
def fattree_services() -> Iterator[NetState]:
    """The same with its services (`up --services`: LBs, agents, servers, BGP, exporters)."""
    with fat_tree(services=True) as st:
        yield st
