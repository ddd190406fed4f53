"""Backend choice: lookup table properties, and agreement between Balancer instances."""

from __future__ import annotations

import pytest
from core_flows import FIFTH, FOUR, SIZE, backends_of, cfg, random_flows

from fastpath.balancer import Balancer
from fastpath.lookup_table import NO_BACKEND, maglev_permutation_table, rendezvous_table


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
