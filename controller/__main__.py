"""Command line: `python -m controller routes|up|down|exec|p4-program|dashboard`, in the spirit
of p4run.

`routes` and `p4-program` need neither root nor mininet; `up`, `down` and `exec` import
controller.network only when run.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from controller.deployment import DEFAULT_DEPLOYMENT, Deployment, load_deployment
from controller.routes import SwitchProgram, compute_routes
from controller.topology import DEFAULT_TOPOLOGY, Topology, load_topology
from l4lb.errors import UsageError  # bad command-line input: printed with the usage, exit 2

PROG = "python -m controller"


def _programs(args: argparse.Namespace) -> tuple[Topology, dict[str, SwitchProgram]]:
    """Topology (--topo, else the deployment's) and the routes for the deployment's VIP."""
    dep: Deployment = load_deployment(args.deployment)
    topo = load_topology(args.topo) if args.topo else dep.topology
    programs = compute_routes(topo, dep.vip, dep.load_balancers)
    if args.switch is not None:
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

    def topo_args(p: argparse.ArgumentParser, switch: bool) -> None:
        p.add_argument(
            "--topo", type=Path, metavar="FILE", help=f"topology file (default {DEFAULT_TOPOLOGY})"
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

    p = sub.add_parser("exec", help="run a command on a host of the running network (root)")
    p.add_argument("host", metavar="HOST")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ...")
    p.set_defaults(func=cmd_exec, subparser=p)
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
