"""Who may import whom: l4lb/ (the shared layer) imports none of fastpath, agent, controller;
the agent does not import the load balancer's package; the data planes import neither the
controller nor the exporter (controller/exporter/: prometheus_client stays out of the packet
processes), and the exporter, which runs in the hosts, imports nothing else of the controller."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# directory -> (forbidden module prefixes, allowed exceptions)
FORBIDDEN: dict[str, tuple[set[str], set[str]]] = {
    "l4lb": ({"fastpath", "agent", "controller", "bench"}, set()),
    "agent": ({"fastpath", "controller"}, set()),
    "fastpath": ({"controller"}, set()),
    "controller/exporter": ({"controller", "bench"}, {"controller.exporter"}),
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def _under(module: str, prefixes: set[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_stay_in_their_layer(package: str) -> None:
    files = sorted((REPO / package).rglob("*.py"))
    assert files
    forbidden, allowed = FORBIDDEN[package]
    bad = {
        str(f.relative_to(REPO)): sorted(
            m for m in imported_modules(f) if _under(m, forbidden) and not _under(m, allowed)
        )
        for f in files
    }
    assert {f: b for f, b in bad.items() if b} == {}


def test_the_check_sees_an_import() -> None:
    assert {"fastpath.balancer", "l4lb.rxloop"} <= imported_modules(
        REPO / "fastpath" / "forward.py"
    )
