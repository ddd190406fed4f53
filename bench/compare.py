"""fastpath, scapy, haproxy and none under the same wget load, interleaved, on one fat tree.

    python -m bench.compare [--modes fastpath,scapy,haproxy,none] [--rounds 3]
                            [--small-repeat 20] [--scapy-repeat 2] [--concurrency 1] [--no-large]

The network comes up once; each round starts one mode's services, runs the small workload
(1 KB files: requests/s and latency) and the large one (10 MB: throughput), reads the counters,
stops the services, and moves on to the next mode, so every mode sees the same machine state.
Writes bench/results/compare-<timestamp>.{json,md,png}: the results, a markdown table for the
README, the chart (requests/s, latency, bytes sent by the LB hosts, LB CPU). The course-style
scapy LB manages a few packets a second, so it gets fewer small requests and no 10 MB file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from bench import wget_load as wl
from bench.compare_report import add, chart, check_targets, markdown_table, targets_markdown
from bench.wget_summary import Fetch, format_summary, summarize, verdict
from controller import services


def parse(argv: Sequence[str] | None) -> tuple[argparse.Namespace, wl.Options]:
    ap = argparse.ArgumentParser(prog="bench/compare.sh", description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default=os.environ.get("COMPARE_MODES", ",".join(services.MODES)))
    ap.add_argument("--rounds", default=os.environ.get("COMPARE_ROUNDS", "3"))
    ap.add_argument("--small-repeat", default=os.environ.get("COMPARE_SMALL_REPEAT", "20"),
                    help="1 KB downloads per client per round (default 20)")  # fmt: skip
    ap.add_argument("--scapy-repeat", default=os.environ.get("COMPARE_SCAPY_REPEAT", "2"),
                    help="the same for the scapy LB (default 2: it is slow)")  # fmt: skip
    ap.add_argument("--concurrency", default=os.environ.get("COMPARE_CONCURRENCY", "1"))
    ap.add_argument("--clients", default=os.environ.get("COMPARE_CLIENTS", "all"))
    ap.add_argument("--no-large", action="store_true", help="skip the 10 MB workload")
    ap.add_argument("--no-python", action="store_true",
                    help="skip the 1 KB workload with the resident python client")  # fmt: skip
    ap.add_argument("--wait-network", default=os.environ.get("COMPARE_WAIT_NETWORK", "0"))
    ap.add_argument("--results", default=str(wl.RESULTS))
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in services.MODES]
    if bad or not modes:
        raise wl.UsageError(f"--modes: {', '.join(bad) or 'empty'}; choose from "
                            f"{', '.join(services.MODES)}")  # fmt: skip
    args.modes = cast(list[services.Mode], modes)
    args.rounds = wl._int("rounds", args.rounds, 1, 1000)
    args.small_repeat = wl._int("small-repeat", args.small_repeat, 1, 10_000)
    args.scapy_repeat = wl._int("scapy-repeat", args.scapy_repeat, 1, 10_000)
    base, _ = wl.parse_options(
        ["--clients", args.clients, "--concurrency", args.concurrency, "--wait-network",
         args.wait_network, "--results", args.results, "--file", "1k.bin"]
    )  # fmt: skip
    return args, base


def workloads(
    args: argparse.Namespace, base: wl.Options, mode: services.Mode
) -> dict[str, wl.Options]:
    rep = args.scapy_repeat if mode == "scapy" else args.small_repeat
    small = dataclasses.replace(base, lb=mode, files=["1k.bin"], repeat=rep, rounds=1)
    out = {"small": small}
    if not args.no_python:
        # The same 1 KB downloads from a resident client: the rate once wget's start is gone.
        # (x5 requests: each is cheaper; not for the course-style LB, which it would overrun.)
        out["small_py"] = dataclasses.replace(
            small, tool="python", repeat=rep if mode == "scapy" else rep * 5
        )
    if not args.no_large and mode != "scapy":
        out["large"] = dataclasses.replace(
            base, lb=mode, files=["10m.bin"], repeat=1, rounds=1, concurrency=1
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        args, base = parse(argv)
        for m in args.modes:
            wl.check_machine(dataclasses.replace(base, lb=m))
        wl.wait_for_network_free(base.wait_network)
    except wl.UsageError as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return 2
    fabric = wl.Fabric()
    wl.safe_streams()
    fetches: dict[tuple[str, str], list[Fetch]] = {}
    extra: dict[tuple[str, str], dict[str, Any]] = {}
    with wl.interrupts_as_exceptions():
        try:
            log(f"bringing up the fat tree; modes {', '.join(args.modes)}, {args.rounds} rounds")
            fabric.up(base.wait_network, base.deployment)
            for rnd in range(1, args.rounds + 1):
                for mode in args.modes:
                    recs = services.start(fabric.node_pid, base.deployment, mode)
                    try:
                        for name, opts in workloads(args, base, mode).items():
                            before = wl.snapshot(fabric, base.deployment, recs)
                            got = wl.run_round(opts, fabric.node_pid, rnd, log)
                            wl.wait_fresh_stats(recs, time.time() + wl.STATS_SETTLE)
                            after = wl.snapshot(fabric, base.deployment, recs)
                            fetches.setdefault((mode, name), []).extend(got)
                            per_backend, per_lb, lb_bytes = wl.counters(
                                base.deployment, mode, before, after
                            )
                            cur = extra.get((mode, name), {})
                            extra[(mode, name)] = add(cur, {
                                "per_backend": per_backend, "per_lb": per_lb,
                                "lb_host_bytes": lb_bytes,
                            })  # fmt: skip
                            bad = sum(1 for f in got if verdict(f, base.expected))
                            log(f"round {rnd}/{args.rounds} {mode:8s} {name}: {len(got)} "
                                f"requests, {bad} failed")  # fmt: skip
                    finally:
                        services.stop()
        except KeyboardInterrupt:
            log("interrupted: tearing down")
            return 130
        except Exception as exc:
            log(f"compare: {type(exc).__name__}: {exc}")
            return 1
        finally:
            wl.teardown(fabric, log)

    res: dict[str, dict[str, Any]] = {}
    for (mode, name), fs in fetches.items():
        e = extra[(mode, name)]
        r = summarize(fs, base.expected, lb=mode, per_backend=e["per_backend"],
                      per_lb=e["per_lb"], lb_host_bytes=e["lb_host_bytes"])  # fmt: skip
        r["lb_cpu_s"] = round(sum(v.get("cpu_s", 0.0) for v in e["per_lb"].values()), 3)
        res.setdefault(mode, {})[name] = r
        print(f"[{name}] " + format_summary(r))
    targets = check_targets(res)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.results)
    table = markdown_table(res, args.modes)
    tmd = targets_markdown(targets)
    cmd = "sudo bench/compare.sh " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / f"compare-{stamp}.md").write_text(
        f"Made by `{cmd.strip()}` ({args.rounds} interleaved rounds, {len(base.clients)} "
        f"clients, concurrency {base.concurrency}).\n\n{table}\n{tmd}"
    )
    png = out / f"compare-{stamp}.png"
    chart(res, args.modes, png)
    (out / f"compare-{stamp}.json").write_text(
        json.dumps({"results": res, "targets": targets}, indent=1) + "\n"
    )
    print()
    print(table)
    print(tmd)
    print(f"written: {out / f'compare-{stamp}.md'}, {png}, {out / f'compare-{stamp}.json'}")
    print(json.dumps({"targets": targets}))
    failed = sum(r.get("failed", 0) for wlr in res.values() for r in wlr.values())
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
