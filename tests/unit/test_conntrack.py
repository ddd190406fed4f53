"""The connection table: idle expiry, capacity eviction, and tracked flows across backend
changes."""

from __future__ import annotations

from core_flows import FIFTH, FOUR, backends_of, cfg, random_flows

from fastpath.balancer import Balancer
from fastpath.conntrack import ConnTable
from fastpath.stats import CoreStats


def test_kept_for_the_idle_timeout_and_gone_after_twice_it() -> None:
    ct = ConnTable(capacity=100, idle_timeout=10.0)
    ct.tick(0.0)
    ct.insert(1, 7)
    for now in (0.5, 9.9, 10.0, 19.9):  # idle 19.9 s: still kept (a rotation happened at 10)
        ct.tick(now)
        assert ct.get(1) == 7, now
    ct.tick(20.0)  # idle 20 s = 2 x timeout: gone
    assert ct.get(1) is None
    assert len(ct) == 0


def test_a_refreshed_flow_stays() -> None:
    ct = ConnTable(capacity=100, idle_timeout=10.0)
    for now in range(0, 100, 3):  # a packet every 3 s for 100 s: tracked all along
        if ct.lookup(5, float(now)) is None:
            assert now == 0
            ct.insert(5, 1)
    ct.tick(99.0 + 9.9)
    assert ct.get(5) == 1


def test_long_silence_clears_both_generations() -> None:
    ct = ConnTable(capacity=100, idle_timeout=10.0)
    ct.tick(0.0)
    ct.insert(1, 1)
    ct.tick(5.0)
    ct.insert(2, 2)
    ct.tick(1000.0)
    assert len(ct) == 0


def test_capacity_bounds_the_table_and_keeps_recent_flows() -> None:
    ct = ConnTable(capacity=10, idle_timeout=1e9)
    ct.tick(0.0)
    for key in range(1000):
        if ct.lookup(key, 0.0) is None:
            ct.insert(key, key % 4)
        assert len(ct) <= 10
        for recent in range(max(0, key - 4), key + 1):  # the last capacity/2 always stay
            assert ct.get(recent) == recent % 4


def test_eviction_is_least_recently_used_first() -> None:
    ct = ConnTable(capacity=4, idle_timeout=1e9)
    ct.tick(0.0)
    for key in (1, 2):
        ct.insert(key, key)
    ct.insert(3, 3)  # young full: {1, 2} become old
    assert ct.lookup(1, 0.0) == 1  # touched: back to young
    ct.insert(4, 4)  # young {3, 1} full: becomes old, 2 (untouched) is evicted
    assert ct.get(2) is None
    assert [ct.get(k) for k in (1, 3, 4)] == [1, 3, 4]


def test_tracked_flows_keep_their_backend_across_changes() -> None:
    flows = random_flows(3000, seed=5)
    bal = Balancer(cfg())
    first = backends_of(bal, flows)
    bal.set_backends((*FOUR, FIFTH))  # add: fresh flows would move ~1/5
    assert backends_of(bal, flows) == first
    bal.set_backends(tuple((ip, 3 if i == 0 else 1) for i, (ip, _) in enumerate(FOUR)))
    assert backends_of(bal, flows) == first
    fresh = backends_of(Balancer(cfg(backends=(*FOUR, FIFTH))), flows)
    assert sum(a != b for a, b in zip(first, fresh, strict=True)) > 300


def test_weight_zero_drains_new_flows_but_keeps_tracked_ones() -> None:
    old_flows, new_flows = random_flows(2000, seed=1), random_flows(2000, seed=2)
    bal = Balancer(cfg())
    before = backends_of(bal, old_flows)
    drained = FOUR[1][0]
    assert drained in before
    bal.set_backends(tuple((ip, 0 if ip == drained else 1) for ip, _ in FOUR))
    assert backends_of(bal, old_flows) == before  # tracked: stay, also on the drained one
    assert drained not in backends_of(bal, new_flows)


def test_removed_backend_flows_move_the_rest_stay() -> None:
    flows = random_flows(2000, seed=4)
    bal = Balancer(cfg())
    before = backends_of(bal, flows)
    bal.set_backends(FOUR[:3])
    after = backends_of(bal, flows)
    for a, b in zip(before, after, strict=True):
        assert b == a if a != FOUR[3][0] else b != FOUR[3][0]
    assert bal.backends == [ip for ip, _ in FOUR[:3]]
    assert CoreStats.of(bal.counters).backends[FOUR[3][0]] > 0  # its count stays reported


def test_idle_flows_expire_then_follow_the_new_table() -> None:
    flows = random_flows(2000, seed=6)
    bal = Balancer(cfg(conn_idle_timeout=10.0))
    out = memoryview(bytearray(1600))
    first = backends_of(bal, flows)  # at now=1.0
    bal.set_backends((*FOUR, FIFTH))
    # 2 x timeout later the entries are gone: flows take the new table's choice.
    later = []
    for f in flows:
        bal.process(memoryview(f), out, 100.0)
        later.append(".".join(str(b) for b in out[30:34]))
    fresh = backends_of(Balancer(cfg(backends=(*FOUR, FIFTH))), flows)
    assert later == fresh != first
