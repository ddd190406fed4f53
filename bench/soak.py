"""The soak: clients fetch in a loop over the fat tree while web servers are killed and restored
on a schedule; `bench/soak.sh [--seconds 60]` runs it (as root, after ./install.sh).

Brings up the fat tree with the fastpath services (waiting its turn for the machine's one fat
tree), waits until every LB has heard from every agent, captures the new flows reaching each
backend, starts bench/fetch_loop.py in the client hosts, then every `--period` seconds kills
the next backend's web server (SIGKILL) and restores it `--down-for` seconds later; and every
`--lb-period` seconds (offset by half of it) it SIGKILLs the next load balancer and restarts
it `--down-for` seconds later as the services started it. It prints a line per event and at
the end: the requests, the failed ones (apart: those in flight on a killed server or sent to it
before the LBs knew, bench.health_drill.classify; a killed LB's are not excused), per kill the
time from the kill to the last new flow sent to that server (target < 2 s, per LB too) and
from its return to its first new flow (target < 3 s), per LB kill the time until its ToR
stopped using it (target < 1 s) and from its restart until it used it again (target < 3 s),
each LB's RSS at start and end, and as its last line one JSON object (also written to
bench/results/soak-<time>.json).

Between two server kills, one other backend goes through the cluster commands (`python -m
controller backend`, on every LB or none): drained when the killed server is back, removed a
third of the way to the next kill (its short requests are over by then), added back two thirds
of the way. Each change is recorded (`cluster_changes`) with its commands' results and the new
flows that reached the backend between the drain and the add (target 0: a drained or removed
backend gets none); a change waits while an LB is down (the commands need every LB).
Everything started is stopped on exit, failure, Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.health_drill import SLACK, Drill, Outage, Syn, classify
from bench.wget_load import Fabric, interrupts_as_exceptions, safe_streams, teardown
from controller import services
from controller.deployment import Deployment, DeploymentError, load_deployment

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
TARGET_LAST_NEW_FLOW = 2.0
TARGET_BACK = 3.0
TARGET_LB_OUT = 1.0  # s: a killed LB out of its ToR's ECMP (issue 9)
TARGET_LB_BACK = 3.0  # s: a restarted one back in it


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench/soak.sh", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="length of the load (default 60)")
    ap.add_argument("--period", type=float, default=8.0, help="seconds between kills (default 8)")
    ap.add_argument(
        "--down-for", type=float, default=3.0, help="seconds a killed server stays dead (3)"
    )
    ap.add_argument(
        "--lb-period", type=float, default=20.0,
        help="seconds between LB kills, the first 2 s + half of it in (default 20; 0: none)",
    )  # fmt: skip
    ap.add_argument("--clients", default="", help="client hosts, e.g. h4,h16 (default: all)")
    ap.add_argument("--threads", type=int, default=2, help="request loops per client (2)")
    ap.add_argument("--pace", type=float, default=0.05, help="seconds between requests (0.05)")
    ap.add_argument("--path", default="/1k.bin", help="what the clients fetch (/1k.bin)")
    ap.add_argument("--deployment", help="deployment file (default: the controller's)")
    ap.add_argument("--wait-network", type=float, default=0.0, metavar="S",
                    help="wait this long for another run's fat tree to go away")  # fmt: skip
    ap.add_argument("--results", default=str(RESULTS), help="where the JSON result goes")
    args = ap.parse_args(argv)
    if not 5 <= args.seconds <= 3600:
        ap.error("--seconds must be 5..3600")
    if not 0.5 <= args.down_for < args.period:
        ap.error("--down-for must be >= 0.5 and below --period")
    if args.lb_period and args.lb_period <= args.down_for:
        ap.error("--lb-period must be 0 (none) or above --down-for")
    return args


def cluster_step(step: str, host: str) -> str:
    """Drain, remove or add `host` on every LB through the cluster commands: "ok" or why not."""
    argv = {"drain": ["drain", host], "remove": ["remove", host], "add": ["add", host]}[step]
    res = subprocess.run(
        [sys.executable, "-m", "controller", "backend", *argv], capture_output=True, text=True,
        cwd=REPO, timeout=60,
    )  # fmt: skip
    return "ok" if res.returncode == 0 else f"exit {res.returncode}: {res.stderr.strip()}"


@dataclass
class Change:
    """One backend drained, removed and added back between two kills."""

    host: str
    at: dict[str, float]
    """Step -> when it is due (wall time)."""
    began: dict[str, float] = field(default_factory=dict)
    """Step -> wall time its command started."""
    done: dict[str, float] = field(default_factory=dict)
    """Step -> wall time its command returned."""
    results: dict[str, str] = field(default_factory=dict)
    syns_while_out: int | None = None
    """SYNs that reached it from SLACK after the drain returned until the add began."""
    new_flows_while_out: int | None = None
    """Those of them from a client address and port that had not reached it before the drain:
    new flows. (A client reusing the port of a flow still tracked here is that flow to the LB,
    which keeps a drained backend's tracked flows: drain's rule.)"""

    def due(self, now: float) -> str | None:
        return next((st for st in STEPS if st not in self.done and self.at[st] <= now), None)

    def run(self, step: str) -> None:
        self.began[step] = time.time()
        self.results[step] = cluster_step(step, self.host)
        self.done[step] = time.time()

    def judge(self, syns: list[Syn]) -> None:
        if "drain" in self.done:
            start, end = self.done["drain"] + SLACK, self.began.get("add", float("inf"))
            before = {s.client for s in syns if s.t < self.began["drain"]}
            out = [s for s in syns if start <= s.t < end]
            self.syns_while_out = len(out)
            self.new_flows_while_out = sum(1 for s in out if s.client not in before)

    def ok(self) -> bool:
        return all(self.results.get(st) == "ok" for st in STEPS) and self.new_flows_while_out == 0

    def as_dict(self, t0: float) -> dict[str, Any]:
        return {
            "host": self.host,
            "done_at_s": {st: round(t - t0, 3) for st, t in self.done.items()},
            "took_s": {st: round(self.done[st] - self.began[st], 3) for st in self.done},
            "results": self.results,
            "syns_while_out": self.syns_while_out,
            "new_flows_while_out": self.new_flows_while_out,
        }


STEPS = ("drain", "remove", "add")


def heard_all(drill: Drill, lb: str) -> bool:
    return all(b["replies"] > 0 for b in drill.lb_health(lb)["backends"].values())


def soak(args: argparse.Namespace, dep: Deployment, drill: Drill, log: Any) -> dict[str, Any]:
    backends = [h for h, _ in dep.backends]
    clients = [c for c in args.clients.split(",") if c] or dep.clients()
    for lb in dep.load_balancers:  # every LB has heard from every agent
        drill.wait(f"{lb} hears every agent", lambda lb=lb: heard_all(drill, lb), 10)  # type: ignore[misc]
    rss_start = drill.lb_rss_kb()
    drill.capture_syns(backends)
    drill.start_clients(clients, args.seconds, args.threads, args.pace, args.path)
    t0 = time.time()
    log(f"soak: {len(clients)} clients x {args.threads} loops for {args.seconds:g} s; a server "
        f"killed every {args.period:g} s for {args.down_for:g} s")  # fmt: skip
    changes: list[Change] = []
    outages: list[Outage] = []
    down: Outage | None = None
    lb_kills: list[dict[str, Any]] = []
    lb_down: tuple[str, float] | None = None  # the killed LB and when
    k = j = 0
    while time.time() - t0 < args.seconds:
        now = time.time() - t0
        lb_at = 2.0 + args.lb_period * (j + 0.5)
        if args.lb_period and lb_down is None and lb_at <= now < args.seconds - args.down_for:
            lb = drill.lbs[j % len(drill.lbs)]
            killed, out = drill.kill_lb(lb)
            lb_down = (lb, killed)
            lb_kills.append({"lb": lb, "out_of_ecmp_s": round(out, 3), "back_in_ecmp_s": None})
            log(f"{now:6.1f} s  killed the LB on {lb}: out of its ToR's ECMP in {out:.3f} s")
        elif lb_down is not None and time.time() - lb_down[1] >= args.down_for:
            back = drill.restart_lb(lb_down[0])
            lb_kills[-1]["back_in_ecmp_s"] = round(back, 3)
            log(f"{time.time() - t0:6.1f} s  restarted it: back in ECMP in {back:.3f} s")
            lb_down, j = None, j + 1
        if down is None and now >= 2.0 + k * args.period and now + args.down_for < args.seconds:
            down = drill.kill_server(backends[k % len(backends)])
            log(f"{now:6.1f} s  killed the web server on {down.host}")
        elif down is not None and time.time() - down.killed >= args.down_for:
            down.restored = drill.start_server(down.host)
            log(f"{time.time() - t0:6.1f} s  restored it on {down.host}")
            outages.append(down)
            # Until the next kill (if it comes: before the load ends), another backend is
            # drained, removed and added back; with 3 or more backends it is not the next
            # one to be killed.
            restored = time.time()
            gap = min(t0 + 2.0 + (k + 1) * args.period, t0 + args.seconds) - restored
            if len(backends) >= 3 and gap > 1.0:
                host = backends[(k + 2) % len(backends)]
                at = {"drain": restored, "remove": restored + gap / 3}
                changes.append(Change(host, {**at, "add": restored + 2 * gap / 3}))
            down = None
            k += 1
        change = changes[-1] if changes else None
        step = change.due(time.time()) if change is not None and lb_down is None else None
        if change is not None and step is not None:
            change.run(step)
            log(f"{time.time() - t0:6.1f} s  backend {step} {change.host}: "
                f"{change.results[step]}")  # fmt: skip
        time.sleep(0.01)
    if down is not None:
        down.restored = drill.start_server(down.host)
        outages.append(down)
    if lb_down is not None:
        lb_kills[-1]["back_in_ecmp_s"] = round(drill.restart_lb(lb_down[0]), 3)
    if changes and "add" not in changes[-1].done:  # the load ended first: put it back
        for st in STEPS:
            if st not in changes[-1].done:
                changes[-1].run(st)
    results = drill.client_results(timeout=30)
    time.sleep(0.2)  # the captures' last packets
    for o in outages:
        o.judge(drill.syns(o.host))
    for c in changes:
        c.judge(drill.syns(c.host))
    reqs = classify(outages, results)
    rss_end = drill.lb_rss_kb()
    kills = [
        {"host": o.host, "last_new_flow_s": o.last_new_flow, "by_lb": o.last_new_flow_by_lb,
         "back_after_s": o.back_after}
        for o in outages
    ]  # fmt: skip
    worst = max((o.last_new_flow or 0.0 for o in outages), default=None)
    backs = [o.back_after for o in outages if o.back_after is not None]
    health = {
        lb: {ip: b["table_changes"] for ip, b in drill.lb_health(lb)["backends"].items()}
        for lb in dep.load_balancers
    }
    return {
        "seconds": args.seconds,
        "clients": len(clients),
        **reqs,
        "kills": kills,
        "max_last_new_flow_s": worst,
        "max_back_after_s": max(backs) if backs else None,
        "lb_kills": lb_kills,
        "targets_met": (
            reqs["failed"] == 0
            and worst is not None
            and worst < TARGET_LAST_NEW_FLOW
            and len(backs) == len(outages)
            and max(backs, default=0.0) < TARGET_BACK
            and all(c.ok() for c in changes)
            and all(x["out_of_ecmp_s"] < TARGET_LB_OUT for x in lb_kills)
            and all(
                x["back_in_ecmp_s"] is not None and x["back_in_ecmp_s"] < TARGET_LB_BACK
                for x in lb_kills
            )
        ),
        "lb_rss_kb": {lb: {"start": rss_start[lb], "end": rss_end[lb]} for lb in rss_start},
        "table_changes": health,
        "cluster_changes": [c.as_dict(t0) for c in changes],
    }


def summary(res: dict[str, Any]) -> str:
    lines = [
        f"requests {res['requests']}, ok {res['ok']}, failed {res['failed']} (target 0), "
        f"failed in flight on a killed server {res['failed_on_killed_server']} (counted apart)",
    ]
    for k in res["kills"]:
        by = ", ".join(f"{lb} {t:.2f} s" for lb, t in sorted(k["by_lb"].items()))
        lines.append(
            f"kill {k['host']}: last new flow {k['last_new_flow_s']:.2f} s after the kill "
            f"({by or 'none after it'}); new flows again {k['back_after_s']} s after its return"
        )
    for x in res["lb_kills"]:
        lines.append(
            f"kill of the LB on {x['lb']}: out of its ToR's ECMP {x['out_of_ecmp_s']:.3f} s "
            f"after, back {x['back_in_ecmp_s']} s after its restart"
        )
    for c in res["cluster_changes"]:
        took = ", ".join(f"{st} {t:.2f} s" for st, t in c["took_s"].items())
        bad = {st: r for st, r in c["results"].items() if r != "ok"}
        lines.append(
            f"backend {c['host']} drained, removed, added ({took}): new flows while out "
            f"{c['new_flows_while_out']} (target 0) of {c['syns_while_out']} SYNs"
            f"{f'; failed: {bad}' if bad else ''}"
        )
    for lb, r in res["lb_rss_kb"].items():
        lines.append(f"{lb}: RSS {r['start']} kB at start, {r['end']} kB at the end")
    lines.append(f"targets met: {res['targets_met']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    args = parse_args(argv)
    try:
        dep = load_deployment(args.deployment)
    except DeploymentError as exc:
        log(f"soak: {exc}")
        return 2
    fabric = Fabric()
    drill: Drill | None = None
    res: dict[str, Any] | None = None
    safe_streams()
    with interrupts_as_exceptions():
        try:
            fabric.up(args.wait_network, dep)
            services.start(fabric.node_pid, dep, "fastpath")
            drill = Drill(dep)
            res = soak(args, dep, drill, log)
        except KeyboardInterrupt:
            log("interrupted: tearing down")
            return 130
        except (services.ServiceError, RuntimeError) as exc:
            log(f"soak: {exc}")
            return 1
        finally:
            if drill is not None:
                drill.close()
            teardown(fabric, log)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(res, indent=1))
    print(summary(res))
    print(json.dumps(res))
    return 0 if res["targets_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
