"""The backend state model (fastpath.backends): the semantics table, fail open, the health
checker's interface, and refusals that change nothing; through the real packet core."""

from __future__ import annotations

import pytest
from core_flows import FIFTH, FOUR, backends_of, cfg, random_flows

from fastpath.backends import (
    BackendError,
    Backends,
    BackendSpec,
    Health,
    Rates,
    effective,
)
from fastpath.balancer import Balancer

A, B, C, D = (ip for ip, _ in FOUR)
E = FIFTH[0]
SPECS = tuple(BackendSpec(ip, w) for ip, w in FOUR)


def make(specs: tuple[BackendSpec, ...] = SPECS, **kw) -> Backends:
    forbidden = {"20.0.0.1": "a VIP", "10.1.1.2": "this load balancer's own address"}
    return Backends(Balancer(cfg()), specs, 0.0, {A: "h3"}, forbidden, **kw)


def health(**states: str) -> dict[str, Health]:
    ips = {"a": A, "b": B, "c": C, "d": D}
    out = {ip: Health() for ip in (A, B, C, D)}
    for k, v in states.items():
        out[ips[k]] = Health(state=v)
    return out


@pytest.mark.parametrize(
    ("specs", "states", "down", "fail_open", "words"),
    [
        (SPECS, {}, set(), False, ["active"] * 4),
        (SPECS, {"a": "down"}, {A}, False, ["unhealthy", "active", "active", "active"]),
        (
            (BackendSpec(A, 0), *SPECS[1:3], BackendSpec(D, 1, "down")),
            {"b": "up"},
            {D},
            False,
            ["draining", "active", "active", "admin_down"],
        ),
        # every usable one health-down: fail open, health ignored
        (
            SPECS,
            {"a": "down", "b": "down", "c": "down", "d": "down"},
            set(),
            True,
            ["fail_open"] * 4,
        ),
        # fail open never brings back what the operator took out
        (
            (*SPECS[:2], BackendSpec(C, 0), BackendSpec(D, 1, "down")),
            {"a": "down", "b": "down", "c": "up"},
            {D},
            True,
            ["fail_open", "fail_open", "draining", "admin_down"],
        ),
    ],
)
def test_the_rule(specs, states, down, fail_open, words) -> None:
    h = health(**states)
    eff = effective(specs, h)
    assert (set(eff.down), eff.fail_open) == (down, fail_open)
    assert eff.backends == tuple((s.ip, s.weight) for s in specs)
    assert [eff.state(s, h[s.ip]) for s in specs] == words


def test_drain_keeps_tracked_flows_and_takes_no_new_one() -> None:
    bk = make()
    old, new = random_flows(2000, seed=31), random_flows(2000, seed=32)
    before = backends_of(bk.balancer, old)
    owned = bk.slots[B]
    applied = bk.apply(bk.plan_weight(B, 0), 1.0)
    assert applied.changed and applied.slots_moved == owned > 0
    assert bk.slots[B] == 0 and bk.state(B) == "draining"
    assert backends_of(bk.balancer, old) == before
    assert B not in backends_of(bk.balancer, new)
    assert bk.balancer.tracked(B) == before.count(B)


def test_remove_forgets_tracked_flows_add_takes_a_fifth() -> None:
    bk = make()
    flows = random_flows(3000, seed=33)
    before = backends_of(bk.balancer, flows)
    bk.apply(bk.plan_remove(C), 1.0)
    after = backends_of(bk.balancer, flows)
    assert C not in after
    assert all(x == y for x, y in zip(before, after, strict=True) if x != C)
    bk.apply(bk.plan_add(C), 2.0)
    bk.apply(bk.plan_add(E), 3.0)
    again = backends_of(bk.balancer, flows)
    assert again == after  # tracked flows stay where they are
    fresh = backends_of(bk.balancer, random_flows(5000, seed=34))
    assert abs(fresh.count(E) / 5000 - 0.2) < 0.03  # about 1/(N+1)


@pytest.mark.parametrize("how", ["admin", "health"])
def test_down_takes_no_new_flow_and_rehashes_its_tracked_ones(how: str) -> None:
    bk = make()
    flows = random_flows(2000, seed=35)
    before = backends_of(bk.balancer, flows)
    if how == "admin":
        bk.apply(bk.plan_admin(A, "down"), 1.0)
    else:
        assert bk.set_health(A, False, 1.0, "connect refused") is True
    after = backends_of(bk.balancer, flows)
    assert A not in after
    assert all(x == y for x, y in zip(before, after, strict=True) if x != A)
    assert bk.state(A) == ("admin_down" if how == "admin" else "unhealthy")
    # Back up: it takes new flows again (those re-hashed away stay where they went).
    if how == "admin":
        bk.apply(bk.plan_admin(A, "up"), 2.0)
    else:
        assert bk.set_health(A, True, 2.0, "ok") is True
    assert A in backends_of(bk.balancer, random_flows(500, seed=36))
    assert backends_of(bk.balancer, flows) == after


def test_no_healthy_backend_fails_open() -> None:
    bk = make()
    flows = random_flows(2000, seed=37)
    before = backends_of(bk.balancer, flows)
    changed = [bk.set_health(ip, False, 1.0, "timeout") for ip in (A, B, C, D)]
    assert changed == [True, True, True, True]  # the last one turns fail open on
    assert bk.fail_open and {bk.state(ip) for ip in (A, B, C, D)} == {"fail_open"}
    # Built from every backend again: tracked flows (none had a packet meanwhile) where they
    # were, new flows everywhere.
    assert backends_of(bk.balancer, flows) == before
    assert set(backends_of(bk.balancer, random_flows(2000, seed=38))) == {A, B, C, D}
    assert bk.set_health(B, True, 2.0, "ok") is True  # one healthy again: only it
    assert not bk.fail_open
    assert set(backends_of(bk.balancer, random_flows(1000, seed=39))) == {B}


def test_set_health_says_whether_the_table_changed() -> None:
    bk = make()
    assert bk.set_health(A, True, 1.0, "ok") is False  # unknown -> up: usable either way
    assert bk.health[A].since == 1.0
    assert bk.set_health(A, True, 2.0, "ok") is False  # no change
    assert bk.health[A].since == 1.0
    bk.apply(bk.plan_weight(A, 0), 3.0)
    digest = bk.table.digest
    assert bk.set_health(A, False, 4.0, "refused") is True  # drained but serving: now not
    assert bk.table.digest == digest  # it owned no slot: the same table, templates changed
    assert (bk.health[A].failures, bk.health[A].reason) == (1, "refused")
    assert bk.set_health("10.9.9.9", False, 5.0, "?") is False and bk.health_ignored == 1


def test_probe_targets_are_every_backend_in_address_order() -> None:
    bk = make((BackendSpec(D), BackendSpec(A, 0), BackendSpec(B, 1, "down")))
    assert bk.probe_targets() == [A, B, D]
    bk.apply(bk.plan_add("10.2.3.10"), 1.0)
    assert bk.probe_targets() == [A, "10.2.3.10", B, D]  # .10 after .2 as addresses


def test_health_is_kept_across_changes_and_forgotten_on_remove() -> None:
    bk = make()
    bk.set_health(A, False, 1.0, "x")
    bk.apply(bk.plan_weight(A, 2), 2.0)
    assert bk.health[A].state == "down"
    bk.apply(bk.plan_remove(A), 3.0)
    bk.apply(bk.plan_add(A), 4.0)
    assert (bk.health[A].state, bk.health[A].since, bk.health[A].failures) == ("unknown", 4.0, 0)


@pytest.mark.parametrize(
    ("plan", "why"),
    [
        (lambda bk: bk.plan_add(A), "already a backend"),
        (lambda bk: bk.plan_remove(E), "is not a backend"),
        (lambda bk: bk.plan_weight(E, 1), "is not a backend"),
        (lambda bk: bk.plan_weight(A, 1001), "0..1000"),
        (lambda bk: bk.plan_weight(A, -1), "0..1000"),
        (lambda bk: bk.plan_admin(A, "sideways"), "up or down"),
        (lambda bk: bk.plan_add("20.0.0.1"), "it is a VIP"),
        (lambda bk: bk.plan_add("10.1.1.2"), "own address"),
        (lambda bk: bk.plan_add("10.0.0.256"), "not an IPv4"),
        (lambda bk: bk.plan_replace([BackendSpec(A), BackendSpec(A)]), "listed twice"),
        (lambda bk: bk.plan_replace([BackendSpec(A, 0), BackendSpec(B, 1, "down")]), "no backend"),
        (lambda bk: bk.plan_replace([]), "no backend"),
        (
            lambda bk: bk.plan_replace(BackendSpec(f"10.9.{i}.2") for i in range(65)),
            "at most 64",
        ),
    ],
)
def test_a_refused_plan_changes_nothing(plan, why: str) -> None:
    bk = make()
    before = (bk.specs, bk.table.digest, bk.table.changes, dict(bk.health))
    with pytest.raises(BackendError, match=why):
        plan(bk)
    assert (bk.specs, bk.table.digest, bk.table.changes, dict(bk.health)) == before


def test_the_last_backend_able_to_take_flows_cannot_be_drained_or_downed() -> None:
    bk = make((BackendSpec(A), BackendSpec(B, 0)))
    for plan in (lambda: bk.plan_weight(A, 0), lambda: bk.plan_admin(A, "down")):
        with pytest.raises(BackendError, match="no backend would take new flows"):
            plan()


def test_two_lbs_with_the_same_changes_in_another_order_have_the_same_table() -> None:
    one, two = make(), make(tuple(reversed(SPECS)))  # other ids for the same addresses
    one.apply(one.plan_add(E, 2), 1.0)
    one.apply(one.plan_remove(B), 2.0)
    one.apply(one.plan_weight(C, 3), 3.0)
    two.apply(two.plan_weight(C, 3), 1.0)
    two.apply(two.plan_remove(B), 2.0)
    two.apply(two.plan_add(E, 2), 3.0)
    assert one.specs != two.specs  # the set's order differs ...
    assert one.table.digest == two.table.digest  # ... the table does not
    fresh = make(tuple(sorted(one.specs, key=lambda s: s.ip)))
    assert fresh.table.digest == one.table.digest


def test_rates_between_ticks() -> None:
    r = Rates()
    r.update(10.0, {A: (100, 10_000)})
    assert r.rates == {}
    r.update(12.0, {A: (300, 50_000), B: (5, 500)})
    assert r.rates == {A: (100.0, 20_000.0), B: (0.0, 0.0)}  # B: new, no rate yet


def test_stats_rows() -> None:
    bk = make()
    flows = random_flows(400, seed=40)
    bk.tick(0.0)
    got = backends_of(bk.balancer, flows)
    bk.set_health(B, False, 0.5, "timeout")
    bk.tick(2.0)
    rows = {r.ip: r for r in bk.stats(now=2.0, wall=1000.0)}
    a = rows[A]
    assert (a.name, a.weight, a.admin, a.health, a.state) == ("h3", 1, "up", "unknown", "active")
    n = got.count(A)
    assert (a.packets, a.bytes, a.connections, a.active_flows) == (n, 40 * n, n, n)
    assert a.pps == n / 2.0 and a.bps == 40 * n / 2.0
    b = rows[B]
    assert (b.health, b.health_since, b.health_for_s, b.check_failures) == ("down", 998.5, 1.5, 1)
    assert (b.state, b.last_reason, b.slots) == ("unhealthy", "timeout", 0)
    assert sum(r.slots for r in rows.values()) == bk.table.size


def test_fail_open_with_one_backend_changes_no_table() -> None:
    bk = make((BackendSpec(A),))
    changes = bk.table.changes
    assert bk.set_health(A, False, 1.0, "refused") is False  # it serves as before
    assert bk.fail_open and bk.state(A) == "fail_open" and bk.table.changes == changes
    assert bk.set_health(A, True, 2.0, "ok") is False and not bk.fail_open
