"""Command line: `python -m controller routes|up|down|exec|p4-program|p4-follow|lb|bird-config|
dashboard|backend`, in the spirit of p4run.

`routes`, `p4-program`, `p4-follow` and `bird-config` need neither root nor mininet; `up`,
`down` and `exec` import controller.network only when run; `lb` reads the running network;
`backend ...` (controller.backend_cmd) talks to the running load balancers.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from controller import backend_cmd
from controller.deployment import DEFAULT_DEPLOYMENT, Deployment, load_deployment
from controller.routes import SwitchProgram, compute_routes
from controller.topology import DEFAULT_TOPOLOGY, Topology, load_topology
from l4lb.errors import UsageError  # bad command-line input: printed with the usage, exit 2

PROG = "python -m controller"


def _programs(args: argparse.Namespace) -> tuple[Topology, dict[str, SwitchProgram]]:
    """Topology (--topo, else the deployment's) and the routes for the deployment's VIP."""
    dep: Deployment = load_deployment(args.deployment)
    topo = load_topology(args.topo) if args.topo else dep.topology
    programs = compute_routes(topo, dep.vip, dep.load_balancers, dep.vip_sources())
    if getattr(args, "switch", None) is not None:
        if args.switch not in programs:
            raise UsageError(
                f"unknown switch {args.switch!r} (switches: {', '.join(topo.switches())})"
            )
        programs = {args.switch: programs[args.switch]}
    return topo, programs


def cmd_routes(args: argparse.Namespace) -> int:
    from controller.drivers.p4 import thrift_port

    topo, programs = _programs(args)
    for sw, program in programs.items():
        if args.switch is None:
            # a header per switch; with --switch the output is pure simple_switch_CLI input
            print(
                f"# {sw} (device_id {topo.node(sw).device_id}, thrift port {thrift_port(topo, sw)})"
            )
        print("\n".join(program.cli_lines()))
    return 0


def cmd_p4_program(args: argparse.Namespace) -> int:
    from controller.drivers.p4 import program_all

    topo, programs = _programs(args)
    added = program_all(topo, programs)
    for sw, n in added.items():
        print(f"{sw}: {n} entries")
    return 0


def _state_dir(args: argparse.Namespace) -> Path:
    from controller.netstate import STATE_DIR

    return Path(args.state_dir) if args.state_dir else STATE_DIR


class _Stop(Exception):
    """SIGTERM: leave the follow loop (exit 0)."""


def cmd_p4_follow(args: argparse.Namespace) -> int:
    from controller import bgp
    from controller.drivers.p4 import thrift_api_factory
    from controller.p4follow import Follower, bird_announces

    dep: Deployment = load_deployment(args.deployment)
    topo, programs = _programs(args)
    sockets = {h: bgp.bird_files(_state_dir(args), h).ctl for h in dep.load_balancers}
    for spec in args.socket:
        host, sep, path = spec.partition("=")
        if not sep or host not in dep.load_balancers:
            raise UsageError(
                f"--socket {spec!r}: expected HOST=PATH with HOST one of "
                f"{', '.join(dep.load_balancers)}"
            )
        sockets[host] = Path(path)
    follower = Follower(
        topo,
        programs,
        dep.vip,
        dep.load_balancers,
        lambda h: bird_announces(sockets[h], dep.vip),
        thrift_api_factory,
    )

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise _Stop

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        for line in follower.start():
            print(line, flush=True)
        print(
            "p4-follow: following "
            + ", ".join(f"{h} ({sockets[h]})" for h in follower.lbs)
            + f" every {args.interval:g} s",
            flush=True,
        )
        while True:
            for line in follower.step():
                print(line, flush=True)
            if args.once:
                return 0
            time.sleep(args.interval)
    except _Stop:
        return 0
    finally:
        signal.signal(signal.SIGTERM, old)


def cmd_bird_config(args: argparse.Namespace) -> int:
    from controller import bgp

    dep: Deployment = load_deployment(args.deployment)
    if args.node in dep.load_balancers:
        print(bgp.lb_config(dep, args.node), end="")
    elif args.node in bgp.lb_tors(dep):
        print(bgp.tor_config(dep, args.node), end="")
    else:
        raise UsageError(
            f"{args.node!r} runs no BIRD: the load balancers "
            f"({', '.join(dep.load_balancers)}) and their ToRs "
            f"({', '.join(bgp.lb_tors(dep))}) do"
        )
    return 0


def cmd_lb(args: argparse.Namespace) -> int:
    from controller import lbctl

    dep: Deployment = load_deployment(args.deployment)
    state_dir = _state_dir(args)
    try:
        if args.lb_cmd == "list":
            report = lbctl.collect(dep, state_dir)
            print(json.dumps(report, indent=1) if args.json else lbctl.render(report))
        elif args.lb_cmd == "drain":
            print(lbctl.drain(dep, state_dir, args.host, force=args.force))
        else:
            print(lbctl.undrain(dep, state_dir, args.host))
    except lbctl.LbUsageError as e:
        raise UsageError(str(e)) from None
    except lbctl.LbError as e:
        raise RuntimeError(str(e)) from None
    return 0


def _network() -> Any:
    """controller.network, imported late: it needs mininet and root, `routes` needs neither."""
    try:
        return importlib.import_module("controller.network")
    except ImportError as e:
        raise RuntimeError(f"the network part is unavailable: {e}") from None


def cmd_up(args: argparse.Namespace) -> int:
    topo = str(args.topo) if args.topo else None
    mode = "detach" if args.detach else "cli"
    dep = str(args.deployment) if args.deployment else None
    if args.monitor and not args.services:
        raise UsageError("up: --monitor watches the services: give --services too")
    return _network().up(topo, mode, services=args.services, deployment=dep, monitor=args.monitor)


def cmd_down(args: argparse.Namespace) -> int:
    return _network().down()


def cmd_dashboard(args: argparse.Namespace) -> int:
    from controller.dashboard import server

    return server.run(args)


def cmd_exec(args: argparse.Namespace) -> int:
    argv = list(args.command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise UsageError("exec: no command given (usage: exec HOST -- CMD ...)")
    return _network().exec_on(args.host, argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Fat-tree network and ECMP/VIP routing controller."
    )
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def topo_args(p: argparse.ArgumentParser, switch: bool, topo: bool = True) -> None:
        if topo:
            p.add_argument(
                "--topo",
                type=Path,
                metavar="FILE",
                help=f"topology file (default {DEFAULT_TOPOLOGY})",
            )
        p.add_argument(
            "--deployment",
            type=Path,
            metavar="FILE",
            default=DEFAULT_DEPLOYMENT,
            help="deployment file: VIP and load-balancer hosts (default %(default)s)",
        )
        if switch:
            p.add_argument("--switch", metavar="NAME", help="only this switch")

    p = sub.add_parser("routes", help="print the table entries in simple_switch_CLI syntax")
    topo_args(p, switch=True)
    p.set_defaults(func=cmd_routes, subparser=p)

    p = sub.add_parser(
        "p4-program", help="send the entries to running bmv2 switches (p4run) with p4-utils"
    )
    topo_args(p, switch=True)
    p.set_defaults(func=cmd_p4_program, subparser=p)

    p = sub.add_parser("up", help="build and route the network (root)")
    p.add_argument(
        "--topo", type=Path, metavar="FILE", help="topology file (replaces the deployment's)"
    )
    p.add_argument(
        "--deployment",
        type=Path,
        metavar="FILE",
        help=f"deployment file: VIP, roles, seed, MSS (default {DEFAULT_DEPLOYMENT})",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--cli", action="store_true", help="open the mininet CLI (default)")
    mode.add_argument("--detach", action="store_true", help="keep running in the background")
    p.add_argument(
        "--services",
        action="store_true",
        help="also start LBs, agents, servers, their exporters and the status page",
    )
    p.add_argument(
        "--monitor",
        action="store_true",
        help="with --services: also Prometheus on 127.0.0.1:9090, scraping every exporter",
    )
    p.set_defaults(func=cmd_up, subparser=p)

    p = sub.add_parser(
        "dashboard", help="the live status page of the running network (http://127.0.0.1:8145/)"
    )
    from controller.dashboard import server

    server.add_arguments(p)
    p.set_defaults(func=cmd_dashboard, subparser=p)

    p = sub.add_parser("down", help="remove everything `up` made (root)")
    p.set_defaults(func=cmd_down, subparser=p)

    p = sub.add_parser(
        "p4-follow",
        help="under p4run: keep the LB ToRs' VIP entries in step with the LBs' BIRDs",
    )
    topo_args(p, switch=False)
    p.add_argument(
        "--interval", type=float, default=0.1, help="seconds between looks (default %(default)s)"
    )
    p.add_argument(
        "--socket",
        action="append",
        default=[],
        metavar="HOST=PATH",
        help="an LB's BIRD control socket (default STATE_DIR/bird/HOST.ctl)",
    )
    p.add_argument("--state-dir", metavar="DIR", help="default /run/l4lb")
    p.add_argument("--once", action="store_true", help="program, look once, exit")
    p.set_defaults(func=cmd_p4_follow, subparser=p)

    p = sub.add_parser("bird-config", help="print the BIRD configuration of an LB or its ToR")
    topo_args(p, switch=False, topo=False)
    p.add_argument("node", metavar="NODE")
    p.set_defaults(func=cmd_bird_config, subparser=p)

    p = sub.add_parser("lb", help="the load balancers: list, drain, undrain (root)")
    lb_sub = p.add_subparsers(dest="lb_cmd", required=True, metavar="list|drain|undrain")
    for name, what in (
        ("list", "each LB: announced, since, BGP, BFD, in the ToR's ECMP, packets/s, flows"),
        ("drain", "withdraw the VIP from one LB (its BIRD stops announcing it)"),
        ("undrain", "announce it again"),
    ):
        q = lb_sub.add_parser(name, help=what)
        topo_args(q, switch=False, topo=False)
        q.add_argument("--state-dir", metavar="DIR", help="default /run/l4lb")
        if name == "list":
            q.add_argument("--json", action="store_true", help="one JSON object")
        else:
            q.add_argument("host", metavar="HOST")
        if name == "drain":
            q.add_argument("--force", action="store_true", help="also the last announcing LB")
        q.set_defaults(func=cmd_lb, subparser=q, cmd=f"lb {name}")

    p = sub.add_parser("exec", help="run a command on a host of the running network (root)")
    p.add_argument("host", metavar="HOST")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ...")
    p.set_defaults(func=cmd_exec, subparser=p)

    backend_cmd.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc: int = args.func(args)
    except (UsageError, ValueError, LookupError) as e:
        # bad input: a bad file (TopologyError, DeploymentError), an unknown name
        args.subparser.print_usage(sys.stderr)
        print(f"{PROG} {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # stdout closed early (`routes | head`): not an error; keep Python from complaining
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (RuntimeError, OSError) as e:
        print(f"{PROG} {args.cmd}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return rc


if __name__ == "__main__":
    sys.exit(main())
