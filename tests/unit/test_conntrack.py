"""The connection table: idle expiry, capacity eviction, and tracked flows across backend
changes."""

from __future__ import annotations

import random

from core_flows import FIFTH, FOUR, backends_of, cfg, random_flows, tcp_frame
from hypothesis import given, settings
from hypothesis import strategies as st

from fastpath.balancer import Balancer
from fastpath.conntrack import ConnTable, FlowEvent
from fastpath.stats import CoreStats


def conn_table(capacity: int, idle_timeout: float, values: int = 1000) -> ConnTable:
    """A ConnTable with values 0..values-1 registered (its per-value counts need them)."""
    ct = ConnTable(capacity, idle_timeout)
    for _ in range(values):
        ct.add_value()
    return ct


def test_kept_for_the_idle_timeout_and_gone_after_twice_it() -> None:
    ct = conn_table(capacity=100, idle_timeout=10.0)
    ct.tick(0.0)
    ct.insert(1, 7)
    for now in (0.5, 9.9, 10.0, 19.9):  # idle 19.9 s: still kept (a rotation happened at 10)
        ct.tick(now)
        assert ct.get(1) == 7, now
    ct.tick(20.0)  # idle 20 s = 2 x timeout: gone
    assert ct.get(1) is None
    assert len(ct) == 0


def test_a_refreshed_flow_stays() -> None:
    ct = conn_table(capacity=100, idle_timeout=10.0)
    for now in range(0, 100, 3):  # a packet every 3 s for 100 s: tracked all along
        if ct.lookup(5, float(now)) is None:
            assert now == 0
            ct.insert(5, 1)
    ct.tick(99.0 + 9.9)
    assert ct.get(5) == 1


def test_long_silence_clears_both_generations() -> None:
    ct = conn_table(capacity=100, idle_timeout=10.0)
    ct.tick(0.0)
    ct.insert(1, 1)
    ct.tick(5.0)
    ct.insert(2, 2)
    ct.tick(1000.0)
    assert len(ct) == 0


def test_capacity_bounds_the_table_and_keeps_recent_flows() -> None:
    ct = conn_table(capacity=10, idle_timeout=1e9)
    ct.tick(0.0)
    for key in range(1000):
        if ct.lookup(key, 0.0) is None:
            ct.insert(key, key % 4)
        assert len(ct) <= 10
        for recent in range(max(0, key - 4), key + 1):  # the last capacity/2 always stay
            assert ct.get(recent) == recent % 4


def test_eviction_is_least_recently_used_first() -> None:
    ct = conn_table(capacity=4, idle_timeout=1e9)
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


# --- tracked flows per backend: counted as the table changes, exact ---------------------------


def recount(ct: ConnTable) -> list[int]:
    counts = [0] * len(ct.young_n)
    for gen in (ct.young, ct.old):
        for v in gen.values():
            counts[v] += 1
    return counts


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["lookup", "insert", "forget", "tick"]),
            st.integers(0, 40),  # key
            st.integers(0, 4),  # value
            st.floats(0, 5),  # time step
        ),
        max_size=120,
    )
)
def test_counts_per_value_follow_every_operation(ops) -> None:
    ct = conn_table(capacity=12, idle_timeout=3.0, values=5)
    now = 0.0
    for op, key, value, dt in ops:
        now += dt
        if op == "lookup":
            ct.lookup(key, now)
        elif op == "insert":
            ct.forget(key)
            ct.insert(key, value)
        elif op == "forget":
            ct.forget(key)
        else:
            ct.tick(now)
        assert [ct.tracked(v) for v in range(5)] == recount(ct)
        assert sum(recount(ct)) == len(ct) <= 12


def test_counts_through_the_packet_core_across_changes_and_rotations() -> None:
    """The fast path's inline insert, re-hashes of flows whose backend is down or gone, and
    rotations (a small table rotates by capacity and by time): the counts stay exact."""
    bal = Balancer(cfg(conn_capacity=600, conn_idle_timeout=5.0))
    out = memoryview(bytearray(1600))
    flows = random_flows(900, seed=12)
    rng = random.Random(3)
    sets = [
        ((*FOUR, FIFTH), ()),
        (FOUR, (FOUR[1][0],)),
        (FOUR[1:], ()),
        (FOUR, ()),
        (tuple((ip, 0 if ip == FOUR[2][0] else 1) for ip, _ in FOUR), ()),
    ]
    now = 1.0
    for backends, down in sets * 2:
        bal.set_backends(backends, down)
        for f in rng.sample(flows, 400):
            bal.process(memoryview(f), out, now)
        now += 2.0
        counts = recount(bal.conntrack)
        assert [bal.conntrack.tracked(b) for b in range(len(counts))] == counts
        assert sum(bal.tracked(ip) for ip in bal.backends) <= len(bal.conntrack)
    # Every entry names a backend id that serves (or a stale one): none is lost or doubled.
    assert sum(recount(bal.conntrack)) == len(bal.conntrack)


def test_a_down_backend_s_tracked_flows_are_rehashed_and_it_gets_no_new_one() -> None:
    flows = random_flows(2000, seed=21)
    bal = Balancer(cfg())
    before = backends_of(bal, flows)
    down = FOUR[0][0]
    assert bal.tracked(down) == before.count(down) > 0
    bal.set_backends(FOUR, down=(down,))
    after = backends_of(bal, flows)
    assert down not in after
    # Flows on the other backends stay; those of the down one go where the table says.
    assert all(a == b for a, b in zip(before, after, strict=True) if a != down)
    assert bal.tracked(down) == 0
    fresh = backends_of(Balancer(cfg(backends=FOUR[1:])), flows)
    assert [b for a, b in zip(before, after, strict=True) if a == down] == [
        c for a, c in zip(before, fresh, strict=True) if a == down
    ]


def test_a_removed_backend_s_flows_do_not_return_when_it_is_added_back() -> None:
    flows = random_flows(2000, seed=22)
    bal = Balancer(cfg())
    backends_of(bal, flows)
    gone = FOUR[3][0]
    bal.set_backends(FOUR[:3])
    bal.set_backends(FOUR)  # back at once: the old entries are not its any more
    assert bal.tracked(gone) == 0
    assert bal.counters.backend_names.count(gone) == 2  # a new id
    # Its flows were tracked to the old id: at their next packet they take the table's choice,
    # which with the same set is the same backend again (rendezvous restores its slots).
    assert backends_of(bal, flows) == backends_of(Balancer(cfg()), flows)
    assert bal.tracked(gone) > 0


def test_a_retired_id_is_reused_once_no_entry_can_name_it() -> None:
    bal = Balancer(cfg(conn_idle_timeout=10.0))
    out = memoryview(bytearray(1600))
    for f in random_flows(100, seed=23):
        bal.process(memoryview(f), out, 1.0)
    gone = FOUR[3][0]
    bal.set_backends(FOUR[:3])
    for now in (11.0, 21.0):  # two rotations of the connection table
        bal.process(memoryview(random_flows(1, seed=int(now))[0]), out, now)
    bal.set_backends(FOUR)
    assert bal.counters.backend_names.count(gone) == 1  # its old id again
    assert bal.tracked(gone) == 0


def test_bytes_and_connections_per_backend() -> None:
    flows = random_flows(500, seed=24)
    bal = Balancer(cfg())
    got = backends_of(bal, flows)
    backends_of(bal, flows)  # again: tracked now, no new connection
    c = bal.counters
    packets, nbytes, conns = (
        c.per_backend(x) for x in (c.forwarded, c.forwarded_bytes, c.connections)
    )
    for ip, _ in FOUR:
        n = got.count(ip)
        assert (packets[ip], nbytes[ip], conns[ip]) == (2 * n, 2 * n * 40, n)


# --- the SYN flood defence: half-open flows apart, an insert cap (fastpath.conntrack) --------

SYN, ACK = 0x02, 0x10


def flows_of(n: int, seed: int, flags: int) -> list[bytes]:
    rng = random.Random(seed)
    return [tcp_frame(rng.getrandbits(32), rng.randrange(1, 65536), flags=flags) for _ in range(n)]


def send(bal: Balancer, frames: list[bytes], now: float) -> None:
    out = memoryview(bytearray(1600))
    for f in frames:
        assert bal.process(memoryview(f), out, now) == len(f) + 20  # every one forwarded


def test_established_flows_are_never_evicted_by_syns() -> None:
    """A flood of SYNs far beyond both tables' sizes leaves every established flow tracked,
    on its backend, and the established generations unrotated: SYNs evict only SYNs."""
    bal = Balancer(cfg(conn_capacity=1000, conn_half_open_capacity=100, conn_insert_rate=0))
    ct = bal.conntrack
    established = flows_of(400, seed=40, flags=ACK)
    send(bal, established, 1.0)
    assert len(ct) == 400 and ct.events[FlowEvent.NONSYN_MISS] == 400
    before = {k: ct.get(k) for k in ct.young}
    rotations = ct.rotations
    send(bal, flows_of(20_000, seed=41, flags=SYN), 1.5)
    assert {k: ct.get(k) for k in ct.young} == before and ct.rotations == rotations
    assert ct.half_open <= 100
    # Every SYN beyond the half-open table's room was evicted (all but those it still holds).
    assert ct.events[FlowEvent.EVICTIONS] == 20_000 - ct.half_open
    assert backends_of(bal, established) == backends_of(Balancer(cfg()), established)


def test_half_open_flows_idle_out_sooner_and_their_ack_promotes_them() -> None:
    bal = Balancer(cfg(conn_idle_timeout=60.0, conn_half_open_timeout=2.0))
    ct = bal.conntrack
    syns = flows_of(50, seed=42, flags=SYN)
    send(bal, syns, 1.0)
    assert (len(ct), ct.half_open) == (0, 50)
    acks = [f[:47] + bytes([ACK]) + f[48:] for f in syns]  # the same flows' ACKs
    send(bal, acks[:10], 2.5)  # within the timeout: promoted
    assert (len(ct), ct.half_open, ct.events[FlowEvent.PROMOTED]) == (10, 40, 10)
    established_ack = flows_of(5, seed=43, flags=ACK)
    send(bal, established_ack, 2.5)
    send(bal, flows_of(1, seed=44, flags=SYN), 6.0)  # a miss 2 x 2 s later ticks them out
    assert ct.half_open == 1 and ct.events[FlowEvent.EVICTIONS] == 40
    assert len(ct) == 15  # the established ones idle out after 60-120 s, not now
    send(bal, acks[10:20], 6.5)  # forgotten: their ACKs are non-SYN misses now
    assert ct.events[FlowEvent.NONSYN_MISS] == 5 + 10


def test_the_insert_cap_refills_every_second() -> None:
    bal = Balancer(cfg(conn_insert_rate=100))
    ct = bal.conntrack
    send(bal, flows_of(250, seed=45, flags=SYN), 1.0)
    assert ct.half_open == 100 and ct.events[FlowEvent.FLOOD_BYPASS] == 150
    send(bal, flows_of(250, seed=46, flags=SYN), 1.9)  # the same second: nothing more
    assert ct.half_open == 100 and ct.events[FlowEvent.FLOOD_BYPASS] == 400
    send(bal, flows_of(250, seed=47, flags=ACK), 2.0)  # a new second: 100 more, any kind
    assert len(ct) == 100 and ct.events[FlowEvent.FLOOD_BYPASS] == 550
    assert ct.events[FlowEvent.NEW] == 200
    # Over the cap a flow still gets the table's backend: the one any LB picks.
    bypassed = flows_of(250, seed=46, flags=SYN)
    assert backends_of(bal, bypassed) == backends_of(Balancer(cfg()), bypassed)


def test_no_cap_when_the_rate_is_zero() -> None:
    bal = Balancer(cfg(conn_insert_rate=0))
    send(bal, flows_of(30_000, seed=48, flags=ACK), 1.0)
    assert len(bal.conntrack) == 30_000 and bal.conntrack.events[FlowEvent.FLOOD_BYPASS] == 0


def test_half_open_flows_are_not_active_flows_of_a_backend() -> None:
    bal = Balancer(cfg())
    send(bal, flows_of(200, seed=49, flags=SYN), 1.0)
    assert sum(bal.tracked(ip) for ip in bal.backends) == 0
    assert sum(bal.counters.connections) == 200  # but they are connections begun
