"""The LB's backend requests (fastpath.backend_commands) as the control channel serves them:
replies, dry runs, and every refusal changing nothing."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from core_flows import FIFTH, FOUR, backends_of, cfg, random_flows

from fastpath.backend_commands import backend_commands
from fastpath.backends import Backends, BackendSpec
from fastpath.balancer import Balancer
from l4lb.control import ControlServer

A, B, C, D = (ip for ip, _ in FOUR)
E = FIFTH[0]


@pytest.fixture
def lb(tmp_path: Path) -> Iterator[tuple[ControlServer, Backends]]:
    bk = Backends(
        Balancer(cfg()),
        (BackendSpec(ip, w) for ip, w in FOUR),
        0.0,
        {A: "h3"},
        {"20.0.0.1": "a VIP", "10.1.1.2": "this load balancer's own address"},
    )
    server = ControlServer(tmp_path / "lb.ctl", backend_commands(bk, lambda: 5.0))
    try:
        yield server, bk
    finally:
        server.close()


def ask(server: ControlServer, cmd: str, **args: Any) -> dict[str, Any]:
    return server.handle(json.dumps({"cmd": cmd, **args}).encode())


def state(bk: Backends) -> tuple[Any, ...]:
    """Everything a refused request must leave as it was."""
    return (bk.specs, bk.table.digest, bk.table.changes, dict(bk.names), list(bk.balancer.backends))


def test_backends_lists_the_set(lb) -> None:
    server, bk = lb
    reply = ask(server, "backends")
    assert reply["ok"], reply
    res = reply["result"]
    assert [b["ip"] for b in res["backends"]] == [A, B, C, D]
    first = res["backends"][0]
    assert (first["name"], first["weight"], first["admin"], first["health"]) == (
        "h3",
        1,
        "up",
        "unknown",
    )
    assert res["fail_open"] is False and res["table"]["size"] == 65537
    assert res["table"]["digest"] == bk.table.digest


def test_add_then_its_reply(lb) -> None:
    server, bk = lb
    reply = ask(server, "backend.add", ip=E, weight=2, name="h16")
    assert reply["ok"], reply
    res = reply["result"]
    assert res["dry_run"] is False and res["changed"] is True
    assert res["backends"][-1] == {"ip": E, "weight": 2, "admin": "up"}
    assert abs(res["slots_moved"] / 65537 - 2 / 6) < 0.02
    assert res["table_digest"] == bk.table.digest and bk.names[E] == "h16"
    assert ask(server, "backends")["result"]["backends"][-1]["name"] == "h16"


@pytest.mark.parametrize(
    ("cmd", "args"),
    [
        ("backend.add", {"ip": E}),
        ("backend.remove", {"ip": B}),
        ("backend.drain", {"ip": B}),
        ("backend.weight", {"ip": B, "weight": 7}),
        ("backend.admin", {"ip": B, "state": "down"}),
        ("backends.replace", {"backends": [{"ip": A}, {"ip": E, "weight": 3}]}),
    ],
)
def test_a_dry_run_checks_and_changes_nothing(lb, cmd: str, args: dict[str, Any]) -> None:
    server, bk = lb
    before = state(bk)
    reply = ask(server, cmd, dry_run=True, **args)
    assert reply["ok"] and reply["result"]["dry_run"] is True and reply["result"]["changed"]
    assert state(bk) == before
    # ... and the same request applied gives the set the dry run announced.
    applied = ask(server, cmd, **args)["result"]
    assert applied["backends"] == reply["result"]["backends"]
    assert [s.ip for s in bk.specs] == [b["ip"] for b in applied["backends"]]


@pytest.mark.parametrize(
    ("cmd", "args", "why"),
    [
        ("backend.add", {"ip": A}, "already a backend"),
        ("backend.add", {"ip": "h16"}, "must be an IPv4 address"),
        ("backend.add", {}, "'ip' must be a non-empty string"),
        ("backend.add", {"ip": E, "weight": 1001}, r"0\.\.1000"),
        ("backend.add", {"ip": E, "weight": -1}, r"0\.\.1000"),
        ("backend.add", {"ip": E, "weight": "2"}, r"0\.\.1000"),
        ("backend.add", {"ip": E, "weight": True}, r"0\.\.1000"),
        ("backend.add", {"ip": E, "wieght": 2}, "unknown argument"),
        ("backend.add", {"ip": "20.0.0.1"}, "it is a VIP"),
        ("backend.add", {"ip": "10.1.1.2"}, "own address"),
        ("backend.add", {"ip": E, "dry_run": "yes"}, "true or false"),
        ("backend.remove", {"ip": E}, "not a backend"),
        ("backend.drain", {"ip": E}, "not a backend"),
        ("backend.weight", {"ip": A}, r"0\.\.1000"),
        ("backend.weight", {"ip": A, "weight": 5000}, r"0\.\.1000"),
        ("backend.admin", {"ip": A, "state": "off"}, "up.*down"),
        ("backend.admin", {"ip": A}, "up.*down"),
        ("backends.replace", {}, "must be a list"),
        ("backends.replace", {"backends": "h3"}, "must be a list"),
        ("backends.replace", {"backends": [[A, 1]]}, r"backends\[0\] must be an object"),
        ("backends.replace", {"backends": [{"ip": A}, {"ip": A}]}, "listed twice"),
        ("backends.replace", {"backends": [{"ip": A, "port": 80}]}, "unknown argument"),
        ("backends.replace", {"backends": [{"ip": A, "weight": 0}]}, "no backend would take"),
        ("backends.replace", {"backends": []}, "no backend would take"),
        ("backends", {"verbose": True}, "unknown argument"),
    ],
)
def test_a_refused_request_changes_nothing(lb, cmd: str, args: dict[str, Any], why: str) -> None:
    server, bk = lb
    flows = random_flows(300, seed=41)
    routed = backends_of(bk.balancer, flows)
    before = state(bk)
    reply = ask(server, cmd, **args)
    assert reply["ok"] is False, reply
    assert reply["error"].startswith(f"{cmd}: ")
    assert re.search(why, reply["error"]), reply["error"]
    assert state(bk) == before
    assert backends_of(bk.balancer, flows) == routed


def test_replace_is_one_table_update(lb) -> None:
    server, bk = lb
    changes = bk.table.changes
    new = [{"ip": A, "weight": 2}, {"ip": C, "admin": "down"}, {"ip": E, "name": "h16"}]
    res = ask(server, "backends.replace", backends=new)["result"]
    assert bk.table.changes == changes + 1
    assert [(s.ip, s.weight, s.admin) for s in bk.specs] == [
        (A, 2, "up"),
        (C, 1, "down"),
        (E, 1, "up"),
    ]
    assert res["changed"] and bk.names[E] == "h16"
    # The same set again is no change at all.
    again = ask(server, "backends.replace", backends=new)["result"]
    assert (again["changed"], again["slots_moved"], bk.table.changes) == (False, 0, changes + 1)
