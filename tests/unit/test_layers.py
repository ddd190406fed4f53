"""Who may import whom: l4lb/ (the shared layer) imports none of fastpath, agent, controller;
the agent does not import the load balancer's package; the data planes import neither the
controller nor the exporter (monitor/: prometheus_client stays out of the packet processes),
and the exporter does not import the controller."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = {
    "l4lb": {"fastpath", "agent", "controller", "bench", "monitor"},
    "agent": {"fastpath", "controller", "monitor"},
    "fastpath": {"controller", "monitor"},
    "monitor": {"controller", "bench"},
}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_stay_in_their_layer(package: str) -> None:
    files = sorted((REPO / package).rglob("*.py"))
    assert files
    bad = {
        str(f.relative_to(REPO)): sorted(imported_packages(f) & FORBIDDEN[package]) for f in files
    }
    assert {f: b for f, b in bad.items() if b} == {}


def test_the_check_sees_an_import() -> None:
    assert imported_packages(REPO / "fastpath" / "forward.py") >= {"fastpath", "l4lb"}
