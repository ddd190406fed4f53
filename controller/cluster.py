"""A backend set applied to every load balancer, or to none.

`apply_everywhere(lbs, backends)` makes `backends` the set of every LB in three steps:
1. read each LB's set now (to put it back if needed): an LB that cannot be reached refuses
   the whole change, before anything changed;
2. dry run on every LB (`backends.replace` with `dry_run`: the LB checks everything and changes
   nothing): one refusal refuses the whole change, nothing changed;
3. apply on each LB in turn; if one refuses or cannot be reached now, every LB already changed
   (and the failing one, in case its change landed before it went silent) is put back to the
   set it had, and the error says which LB failed, why, and what was put back.
Then the LBs' table digests are compared: the same set must give the same table everywhere.

Every LB gets the whole set (`backends.replace`), not the one change: a command thus also
brings an LB that differs from the others (restarted from an old file, say) back in line,
and a rollback is one request too. Pure but for the endpoints, which tests fake.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from l4lb.control import ControlUnavailable, RequestRefused


class Endpoint(Protocol):
    """One LB's control channel."""

    name: str

    def request(self, cmd: str, **args: Any) -> Any:
        """The result, or RequestRefused (its error) or ControlUnavailable (why nobody answered)."""
        ...


class ClusterError(RuntimeError):
    """The change was refused or undone; the message says which LB, why, and what was done."""


@dataclass
class Applied:
    results: dict[str, Any]
    """Per LB, the `backends.replace` reply."""
    differed: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """LBs whose set before the change was not the first LB's (LB -> its set): they agree
    now."""


def _specs(reply: Any) -> list[dict[str, Any]]:
    """The `backends` reply's set, as `backends.replace` takes it."""
    return [
        {"ip": b["ip"], "weight": b["weight"], "admin": b["admin"]}
        | ({"name": b["name"]} if b.get("name") else {})
        for b in reply["backends"]
    ]


def _why(exc: Exception) -> str:
    if isinstance(exc, ControlUnavailable):
        return f"cannot be reached ({exc})"
    return f"refused: {exc}"


def current_sets(lbs: Sequence[Endpoint]) -> dict[str, list[dict[str, Any]]]:
    """Every LB's set now; ClusterError naming the first that cannot be reached."""
    out = {}
    for lb in lbs:
        try:
            out[lb.name] = _specs(lb.request("backends"))
        except (ControlUnavailable, RequestRefused) as exc:
            raise ClusterError(f"{lb.name} {_why(exc)}; nothing was changed on any LB") from exc
    return out


def apply_everywhere(lbs: Sequence[Endpoint], backends: list[dict[str, Any]]) -> Applied:
    """Make `backends` ([{ip, weight, admin, name?}]) the set of every LB, or of none."""
    if not lbs:
        raise ClusterError("no load balancer is recorded: nothing to apply the change to")
    before = current_sets(lbs)
    for lb in lbs:
        try:
            lb.request("backends.replace", backends=backends, dry_run=True)
        except (ControlUnavailable, RequestRefused) as exc:
            raise ClusterError(f"{lb.name} {_why(exc)}; nothing was changed on any LB") from exc
    results: dict[str, Any] = {}
    for i, lb in enumerate(lbs):
        try:
            results[lb.name] = lb.request("backends.replace", backends=backends)
        except (ControlUnavailable, RequestRefused) as exc:
            # A refusal changed nothing there; silence may have come after the change landed.
            changed = [*lbs[:i], *([lb] if isinstance(exc, ControlUnavailable) else [])]
            undone = rollback(changed, before) if changed else "nothing was changed on any LB"
            raise ClusterError(f"{lb.name} {_why(exc)}; {undone}") from exc
    digests = {name: r["table_digest"] for name, r in results.items()}
    if len(set(digests.values())) > 1:  # a bug, never an input: say it loudly
        raise ClusterError(
            "applied on every LB, but their lookup tables differ (digests "
            + ", ".join(f"{n} {d}" for n, d in digests.items())
            + "): flows moved between LBs may change backend; report this"
        )
    first = [_key(b) for b in before[lbs[0].name]]
    differed = {n: s for n, s in before.items() if [_key(b) for b in s] != first}
    return Applied(results, differed)


def _key(b: dict[str, Any]) -> tuple[str, int, str]:
    return (b["ip"], b.get("weight", 1), b.get("admin", "up"))


def rollback(lbs: Sequence[Endpoint], before: dict[str, list[dict[str, Any]]]) -> str:
    """Put each LB back to its set of `before`; says what was put back and what could not be."""
    back, failed = [], []
    for lb in lbs:
        try:
            lb.request("backends.replace", backends=before[lb.name])
            back.append(lb.name)
        except (ControlUnavailable, RequestRefused) as exc:
            failed.append(f"{lb.name} could not be put back ({exc})")
    text = f"put back: {', '.join(back)}" if back else "nothing could be put back"
    if failed:
        text += "; " + "; ".join(failed) + " -- the LBs may differ: run the command again"
    return text
