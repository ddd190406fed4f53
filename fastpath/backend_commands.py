"""The load balancer's control requests on its backend set (served by l4lb.control).

Every request is checked whole before anything changes (types, unknown arguments, addresses,
weights, the resulting set: fastpath.backends.check_specs); a refused one gets the reason and
changes nothing. Each changing request takes `"dry_run": true`: then it only checks and says
what the set would be (the cluster command's first phase). Requests and replies (the README's
"Control protocol" section has examples):

    backends                                   -> {"backends": [BackendStats...], "fail_open",
                                                   "table": TableStats, "health_ignored"}
    backends.replace  backends=[{"ip", "weight"=1, "admin"="up", "name"?}, ...]
    backend.add       ip, weight=1, admin="up", name?
    backend.remove    ip
    backend.drain     ip                       (weight 0)
    backend.weight    ip, weight               (0..MAX_WEIGHT)
    backend.admin     ip, state ("up" | "down")
  each changing one, applied -> {"dry_run": false, "changed", "slots_moved", "build_ms",
                                 "table_digest", "fail_open", "backends": [spec...]}
                    dry run -> {"dry_run": true, "changed" (would change), "backends": [spec...]}

A spec is {"ip", "weight", "admin"}. `backends.replace` is one table update however many
backends change, so the cluster's rollback (the previous set, replaced back) is one too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any

from fastpath.backends import ADMIN, BackendError, Backends, BackendSpec
from fastpath.config import MAX_WEIGHT
from l4lb.control import (
    Command,
    CommandError,
    arg_bool,
    arg_int,
    arg_ipv4,
    arg_str,
    only_args,
)

Plan = Callable[[Mapping[str, Any]], tuple[tuple[BackendSpec, ...], dict[str, str]]]


def _admin(req: Mapping[str, Any], name: str, default: str | None = None) -> str:
    value = req.get(name, default)
    if value not in ADMIN:
        raise CommandError(f'argument {name!r} must be "up" or "down", not {value!r}')
    return str(value)


def _name(req: Mapping[str, Any]) -> str | None:
    return arg_str(req, "name") if "name" in req else None


def _weight(req: Mapping[str, Any], default: int | None = None) -> int:
    return arg_int(req, "weight", 0, MAX_WEIGHT, default)


def _entries(req: Mapping[str, Any]) -> tuple[tuple[BackendSpec, ...], dict[str, str]]:
    raw = req.get("backends")
    if not isinstance(raw, list):
        raise CommandError('argument \'backends\' must be a list of {"ip", "weight", ...}')
    specs, names = [], {}
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise CommandError(f"backends[{i}] must be an object, not {entry!r}")
        try:
            only_args(entry, "ip", "weight", "admin", "name")
            ip = arg_ipv4(entry, "ip")
            specs.append(BackendSpec(ip, _weight(entry, 1), _admin(entry, "admin", "up")))
            if (name := _name(entry)) is not None:
                names[ip] = name
        except CommandError as exc:
            raise CommandError(f"backends[{i}]: {exc}") from None
    return tuple(specs), names


def backend_commands(backends: Backends, clock: Callable[[], float]) -> dict[str, Command]:
    """The requests above over `backends`; `clock()` is the loop's `now` (monotonic)."""

    def changing(args: tuple[str, ...], plan: Plan) -> Callable[[Mapping[str, Any]], Any]:
        def run(req: Mapping[str, Any]) -> dict[str, Any]:
            only_args(req, *args, "dry_run")
            dry = arg_bool(req, "dry_run")
            try:
                new, names = plan(req)
            except BackendError as exc:
                raise CommandError(str(exc)) from None
            listed = [asdict(s) for s in new]
            if dry:
                return {"dry_run": True, "changed": new != backends.specs, "backends": listed}
            try:
                applied = backends.apply(new, clock())
            except BackendError as exc:  # the core refused it (a worker): rolled back
                raise CommandError(str(exc)) from None
            backends.names.update(names)
            return {
                "dry_run": False,
                "changed": applied.changed,
                "slots_moved": applied.slots_moved,
                "build_ms": applied.build_ms,
                "table_digest": backends.table.digest,
                "fail_open": backends.fail_open,
                "backends": listed,
            }

        return run

    def replace_set(req: Mapping[str, Any]) -> tuple[tuple[BackendSpec, ...], dict[str, str]]:
        specs, names = _entries(req)
        return backends.plan_replace(specs), names

    def add(req: Mapping[str, Any]) -> tuple[tuple[BackendSpec, ...], dict[str, str]]:
        ip = arg_ipv4(req, "ip")
        new = backends.plan_add(ip, _weight(req, 1), _admin(req, "admin", "up"))
        name = _name(req)
        return new, ({ip: name} if name else {})

    def remove(req: Mapping[str, Any]) -> tuple[tuple[BackendSpec, ...], dict[str, str]]:
        return backends.plan_remove(arg_ipv4(req, "ip")), {}

    def drain(req: Mapping[str, Any]) -> tuple[tuple[BackendSpec, ...], dict[str, str]]:
        return backends.plan_weight(arg_ipv4(req, "ip"), 0), {}

    def weight(req: Mapping[str, Any]) -> tuple[tuple[BackendSpec, ...], dict[str, str]]:
        return backends.plan_weight(arg_ipv4(req, "ip"), _weight(req)), {}

    def admin(req: Mapping[str, Any]) -> tuple[tuple[BackendSpec, ...], dict[str, str]]:
        return backends.plan_admin(arg_ipv4(req, "ip"), _admin(req, "state")), {}

    def listing(req: Mapping[str, Any]) -> dict[str, Any]:
        only_args(req)
        return backends_reply(backends, clock())

    return {
        "backends": Command(listing, "the backend set: weight, health, state, flows, counts"),
        "backends.replace": Command(
            changing(("backends",), replace_set),
            "replace the whole set, atomically: backends=[{ip, weight, admin, name}], dry_run",
        ),
        "backend.add": Command(
            changing(("ip", "weight", "admin", "name"), add),
            "add a backend: ip, weight=1, admin=up, name, dry_run",
        ),
        "backend.remove": Command(
            changing(("ip",), remove), "remove a backend, forgetting its tracked flows: ip"
        ),
        "backend.drain": Command(
            changing(("ip",), drain), "weight 0: no new flows, tracked flows stay: ip"
        ),
        "backend.weight": Command(
            changing(("ip", "weight"), weight), f"set a weight 0..{MAX_WEIGHT}: ip, weight"
        ),
        "backend.admin": Command(
            changing(("ip", "state"), admin),
            "administratively up or down (down: no new flows, tracked ones re-hashed): ip, state",
        ),
    }


def backends_reply(backends: Backends, now: float) -> dict[str, Any]:
    """The `backends` reply: rates over the last stats interval."""
    return {
        "backends": [asdict(r) for r in backends.stats(now, time.time())],
        "fail_open": backends.fail_open,
        "table": asdict(backends.table),
        "health_ignored": backends.health_ignored,
    }
