"""The netns tests' namespaces: one bench.netns.Netns per test (the one way the tests and the
benchmarks make and remove them), deleted after the test, also when it fails; the test skips,
saying why, when it cannot run here (not root, a tool missing)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench.netns import Netns, Procs, list_netns, missing


@pytest.fixture
def netns(request: pytest.FixtureRequest) -> Iterator[Netns]:
    """Tools beyond ip and nft: `@pytest.mark.needs("tcpdump", tun=True)` on the test."""
    marker = request.node.get_closest_marker("needs")
    args, kwargs = (marker.args, marker.kwargs) if marker else ((), {})
    if why := missing(*args, **kwargs):
        pytest.skip(why)
    bed = Netns()
    try:
        yield bed
    finally:
        made = list(bed.made)
        bed.close()
        assert not set(made) & set(list_netns()), "a namespace was left behind"


@pytest.fixture
def procs() -> Iterator[Procs]:
    """Processes the test starts in its namespaces (bench.netns.Procs), stopped by PID after
    it, also when it fails."""
    p = Procs()
    try:
        yield p
    finally:
        p.stop_all()
