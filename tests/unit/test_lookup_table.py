"""Backend choice: lookup table properties, and agreement between Balancer instances."""

from __future__ import annotations

from array import array

import pytest
from core_flows import FIFTH, FOUR, SIZE, backends_of, cfg, random_flows
from hypothesis import given, settings
from hypothesis import strategies as st

from fastpath.balancer import Balancer
from fastpath.lookup_table import (
    NO_BACKEND,
    RendezvousTable,
    maglev_permutation_table,
    rendezvous_table,
)


def test_table_is_full_and_balanced() -> None:
    table = rendezvous_table(FOUR, SIZE)
    assert len(table) == SIZE
    counts = [table.count(i) for i in range(4)]
    assert sum(counts) == SIZE
    for c in counts:  # binomial spread: within 2% of a quarter
        assert abs(c / SIZE - 0.25) < 0.02


def test_table_ignores_backend_order() -> None:
    shuffled = (FOUR[2], FOUR[0], FOUR[3], FOUR[1])
    a = [FOUR[i][0] for i in rendezvous_table(FOUR, SIZE)]
    b = [shuffled[i][0] for i in rendezvous_table(shuffled, SIZE)]
    assert a == b


def test_removing_one_of_four_moves_only_its_flows() -> None:
    before = [FOUR[i][0] for i in rendezvous_table(FOUR, SIZE)]
    after = [FOUR[i][0] for i in rendezvous_table(FOUR[:3], SIZE)]
    moved_elsewhere = [s for s in range(SIZE) if before[s] != after[s] and before[s] != FOUR[3][0]]
    assert moved_elsewhere == []  # every slot, so every flow
    assert FOUR[3][0] not in after


def test_adding_a_fifth_moves_at_most_a_quarter() -> None:
    before = [FOUR[i][0] for i in rendezvous_table(FOUR, SIZE)]
    five = (*FOUR, FIFTH)
    after = [five[i][0] for i in rendezvous_table(five, SIZE)]
    moved = [s for s in range(SIZE) if before[s] != after[s]]
    assert all(after[s] == FIFTH[0] for s in moved)  # only to the new backend
    assert len(moved) / SIZE <= 0.25
    assert abs(len(moved) / SIZE - 0.2) < 0.02  # about 1/5


def test_flows_through_balancers_follow_the_table() -> None:
    """The same two properties measured on 10,000 random flows through the whole core."""
    flows = random_flows(10_000, seed=3)
    four = backends_of(Balancer(cfg()), flows)
    three = backends_of(Balancer(cfg(backends=FOUR[:3])), flows)
    five = backends_of(Balancer(cfg(backends=(*FOUR, FIFTH))), flows)
    assert all(a == b for a, b in zip(four, three, strict=True) if a != FOUR[3][0])
    moved = sum(a != b for a, b in zip(four, five, strict=True))
    assert moved / len(flows) <= 0.25


def test_two_instances_agree_on_10000_flows() -> None:
    flows = random_flows(10_000, seed=7)
    a = backends_of(Balancer(cfg(local_ip="10.1.1.2")), flows)
    b = backends_of(Balancer(cfg(local_ip="10.1.2.2")), flows)
    assert a == b
    assert len(set(a)) == 4


def test_seed_changes_the_choice() -> None:
    flows = random_flows(1000, seed=9)
    a = backends_of(Balancer(cfg(hash_seed=1)), flows)
    b = backends_of(Balancer(cfg(hash_seed=2)), flows)
    assert sum(x != y for x, y in zip(a, b, strict=True)) > 500  # ~3/4 differ


@pytest.mark.parametrize("weights", [(2, 1, 1, 1), (3, 1, 0, 2), (1, 1, 1, 4)])
def test_weights_scale_shares(weights: tuple[int, ...]) -> None:
    backends = tuple((ip, w) for (ip, _), w in zip(FOUR, weights, strict=True))
    table = rendezvous_table(backends, SIZE)
    total = sum(weights)
    for i, w in enumerate(weights):
        assert abs(table.count(i) / SIZE - w / total) < 0.015


def test_all_weights_zero_gives_no_backend() -> None:
    table = rendezvous_table(tuple((ip, 0) for ip, _ in FOUR), SIZE)
    assert set(table) == {NO_BACKEND}
    assert set(maglev_permutation_table(tuple((ip, 0) for ip, _ in FOUR), 251)) == {NO_BACKEND}


def test_weight_zero_drains_new_flows() -> None:
    drained = (FOUR[0], FOUR[1], (FOUR[2][0], 0), FOUR[3])
    got = backends_of(Balancer(cfg(backends=drained)), random_flows(2000, seed=11))
    assert FOUR[2][0] not in got


def test_permutation_table_reference() -> None:
    """Maglev's own fill, kept for comparison: exact balance, weights honoured, and nearly
    (not exactly) minimal disruption on removal (why rendezvous_table is the one in use)."""
    four = maglev_permutation_table(FOUR, SIZE)
    assert max(four.count(i) for i in range(4)) - min(four.count(i) for i in range(4)) <= 1
    weighted = maglev_permutation_table((("10.2.3.2", 2), *FOUR[1:]), SIZE)
    assert abs(weighted.count(0) / SIZE - 0.4) < 0.001
    three = maglev_permutation_table(FOUR[:3], SIZE)
    collateral = sum(1 for s in range(SIZE) if four[s] != 3 and four[s] != three[s])
    assert collateral / SIZE < 0.005


# --- RendezvousTable: the same table as the full build, at the cost of the change -----------

SMALL = 257  # a prime: enough slots for every backend to own some, fast enough for hypothesis
IPS = [f"10.{i}.{j}.2" for i in range(1, 4) for j in range(1, 4)]  # nine addresses, in order
CHANGES = st.lists(
    st.tuples(st.integers(0, len(IPS) - 1), st.sampled_from([None, 0, 1, 1, 2, 3, 1000])),
    min_size=1,
    max_size=14,
)  # (backend id, new weight, None: it leaves the set)


def full_build(state: dict[int, int], size: int) -> list[int]:
    """rendezvous_table of the state, as backend ids."""
    order = sorted(state)
    full = rendezvous_table([(IPS[b], state[b]) for b in order], size)
    return [NO_BACKEND if i == NO_BACKEND else order[i] for i in full]


@settings(max_examples=60, deadline=None)
@given(CHANGES)
def test_incremental_table_is_the_full_build_after_every_change(changes) -> None:
    rt = RendezvousTable(SMALL)
    state: dict[int, int] = {}
    for bid, weight in changes:
        before = list(rt.table)
        if weight is None:
            state.pop(bid, None)
        else:
            state[bid] = weight
        moved = rt.update({b: (IPS[b], w) for b, w in state.items()})
        assert rt.table == full_build(state, SMALL)
        assert moved == sum(a != b for a, b in zip(before, rt.table, strict=True))


@settings(max_examples=30, deadline=None)
@given(CHANGES, st.randoms(use_true_random=False))
def test_two_instances_fed_the_same_changes_in_other_orders_agree(changes, rnd) -> None:
    """Two LBs that saw the same changes in a different order (and with their own ids for the
    same addresses) end with the same backend address in every slot."""
    a, b = RendezvousTable(SMALL), RendezvousTable(SMALL)
    state: dict[int, int] = {}
    for bid, weight in changes:  # a: the changes one by one
        if weight is None:
            state.pop(bid, None)
        else:
            state[bid] = weight
        a.update({i: (IPS[i], w) for i, w in state.items()})
    final = state
    # b: the final set reached one backend at a time in a shuffled order, ids reversed.
    order = list(final.items())
    rnd.shuffle(order)
    for k in range(1, len(order) + 1):
        b.update({100 - i: (IPS[i], w) for i, w in order[:k]})
    b.update({100 - i: (IPS[i], w) for i, w in final.items()})
    a.update({i: (IPS[i], w) for i, w in final.items()})
    ip_a = [IPS[i] if i != NO_BACKEND else None for i in a.table]
    ip_b = [IPS[100 - i] if i != NO_BACKEND else None for i in b.table]
    assert ip_a == ip_b


def test_incremental_table_moves_only_what_the_change_moves() -> None:
    four = {i: (ip, w) for i, (ip, w) in enumerate(FOUR)}
    rt = RendezvousTable(SIZE)
    rt.update(four)
    assert rt.table == rendezvous_table(FOUR, SIZE)
    before = list(rt.table)
    three = {i: four[i] for i in range(3)}
    moved = rt.update(three)
    assert moved == before.count(3) and all(
        a == b for a, b in zip(before, rt.table, strict=True) if a != 3
    )
    five = {**four, 4: FIFTH}
    rt.update(four)
    before = list(rt.table)
    moved = rt.update(five)
    assert all(b == 4 for a, b in zip(before, rt.table, strict=True) if a != b)
    assert abs(moved / SIZE - 0.2) < 0.02


def test_a_tie_goes_to_the_lower_address(monkeypatch: pytest.MonkeyPatch) -> None:
    """Equal scores (never seen with 64-bit hashes, but defined): both builds give the slot to
    the lower IPv4 address, whatever the order of the backends or of the changes."""
    from fastpath import lookup_table

    monkeypatch.setattr(lookup_table, "raw_scores", lambda ip, size: array("d", [1.0] * size))
    low, high = ("10.0.0.9", 1), ("10.0.0.10", 1)  # 10.0.0.9 < 10.0.0.10 as addresses
    assert set(rendezvous_table((high, low), 31)) == {1}
    rt = RendezvousTable(31)
    rt.update({0: high})
    rt.update({0: high, 1: low})
    assert set(rt.table) == {1}
    rt.update({0: high})
    assert set(rt.table) == {0}
    rt.update({1: low, 0: high})
    assert set(rt.table) == {1}
