"""The running network: bring the fat tree up, keep it, run commands in it, take it down.

`up(..., "cli")` keeps the network in this process and opens mininet's CLI; `up(..., "detach")`
starts a small background process (`python -m controller.network serve`) that owns the
mininet objects (controller.netbuild) until SIGTERM. Either way the owner writes
/run/l4lb/state.json (controller.netstate) as it goes and holds /run/l4lb/fattree.lock while
the network is up, so `down` works from that file alone, also after a crash of the owner, and
`exec` finds nodes by PID. Mininet's own logging is kept quiet; one progress line per phase
says what took how long.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any, Literal

from controller import netstate
from controller.deployment import Deployment, load_deployment, with_topology
from controller.netbuild import (
    Network,
    NetworkError,
    Progress,
    Signals,
    Stop,
    UnknownNode,
    say,
    teardown,
)
from controller.netstate import STATE_DIR, NetState
from controller.routes import SwitchProgram, compute_routes
from controller.topology import Topology, load_topology

__all__ = [
    "STATE_DIR",
    "NetworkError",
    "UnknownNode",
    "down",
    "exec_on",
    "node_pid",
    "running",
    "up",
]

REPO = Path(__file__).resolve().parent.parent
STOP_TIMEOUT = 20.0  # seconds `down` waits for the owner to take the network down


# --- what to build ---------------------------------------------------------------------------


def _plan(
    topo_path: str | None, deployment: str | None = None
) -> tuple[Topology, Deployment, dict[str, SwitchProgram]]:
    """Topology, deployment and every switch's program: bad files fail here, before anything
    is made. `--topo` replaces the deployment's topology for everything, the services too."""
    dep = load_deployment(deployment)
    if topo_path:
        dep = with_topology(dep, load_topology(topo_path))
    topo = dep.topology
    return topo, dep, compute_routes(topo, dep.vip, dep.load_balancers, dep.vip_sources())


# --- up -------------------------------------------------------------------------------------


def running(state_dir: Path = STATE_DIR) -> NetState | None:
    """The recorded network if its owner is still running, else None."""
    st = netstate.read_state(state_dir)
    if st is not None and netstate.is_running(st.owner_pid, st.owner_start_time):
        return st
    return None


def _describe(st: NetState) -> str:
    since = time.strftime("%H:%M:%S", time.localtime(st.started))
    return f"pid {st.owner_pid}, {st.mode} mode, since {since}, from {st.topology}"


def _claim(state_dir: Path, wait: float) -> int:
    """Take the fat-tree lock and clear what a crashed owner left; returns the lock's fd."""
    if os.geteuid() != 0:
        raise NetworkError("bringing a network up needs root (network namespaces, veths)")
    fd = netstate.take_lock(state_dir, wait)
    if fd is None:
        st = running(state_dir)
        if st is not None:
            raise NetworkError(
                f"a network is already up ({_describe(st)}); "
                "take it down first with `python -m controller down`"
            )
        raise NetworkError(
            f"{state_dir / netstate.LOCK_FILE} is held by another process (a network coming up "
            "or going down, or someone else's turn on the fat tree); try again later"
        )
    stale = netstate.read_state(state_dir)
    if stale is not None:
        say(f"up: cleaning up a network whose owner died ({_describe(stale)})")
        teardown(stale, state_dir)
    return fd


def up(
    topo_path: str | None,
    mode: Literal["cli", "detach"],
    services: bool = False,
    wait: float = 0.0,
    state_dir: Path = STATE_DIR,
    deployment: str | None = None,
    monitor: bool = False,
) -> int:
    """Build and route the network, then open the CLI (tearing down on exit) or detach.

    `services`: the LBs, agents, servers, exporters and the status page; `monitor`: Prometheus
    and its scrape proxy as well.

    `wait`: seconds to wait for the fat-tree lock if another network is up (default: refuse at
    once). Returns 0 when the network was up (cli: and is down again), 130 when interrupted.
    Raises NetworkError (or ValueError for a bad file) when it cannot.
    """
    topo, dep, programs = _plan(topo_path, deployment)  # bad files fail here, before anything
    lock = _claim(state_dir, wait)
    try:
        if mode == "detach":
            return _spawn_owner(topo_path, services, lock, state_dir, deployment, monitor)
        return _foreground(topo, dep, programs, services, state_dir, monitor)
    finally:
        os.close(lock)  # the detached owner keeps its own descriptor: the lock stays held


def _start_services(
    dep: Deployment, state_dir: Path, progress: Progress, monitor: bool = False
) -> None:
    from controller import services as svc

    t0 = time.monotonic()
    started = svc.start(
        lambda name: node_pid(name, state_dir), dep, "fastpath", state_dir,
        monitor=monitor, dashboard=True,
    )  # fmt: skip
    progress(f"up: {len(started)} services in {time.monotonic() - t0:.2f} s")
    from controller.monitor import DASHBOARD_PORT, PROMETHEUS_PORT

    progress(f"up: status page http://127.0.0.1:{DASHBOARD_PORT}/")
    if monitor:
        progress(
            f"up: Prometheus http://127.0.0.1:{PROMETHEUS_PORT}/ (every exporter, each second)"
        )


def _foreground(
    topo: Topology,
    dep: Deployment,
    programs: dict[str, SwitchProgram],
    services: bool,
    state_dir: Path,
    monitor: bool = False,
) -> int:
    signals = Signals()
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    signals.install()
    network = Network(topo, programs, "cli", state_dir, signals, dep)
    try:
        took = network.build()
        say(f"up: network routed in {took:.2f} s")
        if services:
            _start_services(dep, state_dir, say, monitor)
        from mininet.cli import CLI

        signal.signal(signal.SIGINT, signal.default_int_handler)  # the CLI handles Ctrl-C
        signals.raising = True
        signals.check()
        CLI(network.net)
        signals.raising = False
        return 0
    except (Stop, KeyboardInterrupt) as e:
        if isinstance(e, Stop) and e.args and e.args[0] != "SIGINT":
            say(f"up: {e.args[0]}, taking the network down")  # `down`, or a hangup
            return 0
        say("up: interrupted, taking the network down")
        return 130
    finally:
        signals.raising = False
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the teardown must finish
        left = network.stop()
        for s, h in old.items():
            signal.signal(s, h)
        if left:
            raise NetworkError(f"processes survived the teardown: {left}")


def _spawn_owner(
    topo_path: str | None,
    services: bool,
    lock: int,
    state_dir: Path,
    deployment: str | None,
    monitor: bool = False,
) -> int:
    """Start the detached owner, relay its progress, return when the network is routed."""
    r, w = os.pipe()
    log = open(state_dir / netstate.LOG_FILE, "w")  # noqa: SIM115 (handed to the child)
    argv = [sys.executable, "-m", "controller.network", "serve", "--ready-fd", str(w)]
    argv += ["--lock-fd", str(lock), "--state-dir", str(state_dir)]
    argv += ["--topo", topo_path] if topo_path else []
    argv += ["--deployment", str(Path(deployment).resolve())] if deployment else []
    argv += ["--services"] if services else []
    argv += ["--monitor"] if monitor else []
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    try:
        child = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            pass_fds=(w, lock),
            start_new_session=True,  # Ctrl-C in our terminal is ours to relay, not its
            env=env,
            cwd=REPO,
        )
    finally:
        os.close(w)
        log.close()
    ready, error = False, ""
    try:
        with os.fdopen(r, "r") as pipe:
            for line in pipe:
                kind, _, text = line.rstrip("\n").partition(" ")
                if kind == "progress":
                    say(text)
                elif kind == "ready":
                    ready = True
                elif kind == "error":
                    error = text
    except KeyboardInterrupt:
        say("up: interrupted, taking the network down")
        child.send_signal(signal.SIGTERM)
        _wait_child(child)
        return 130
    if ready:
        say(f"up: network running in the background (pid {child.pid}); `down` stops it")
        return 0
    _wait_child(child)
    tail = _tail(state_dir / netstate.LOG_FILE)
    raise NetworkError(
        f"the network did not come up: {error or f'owner exited with {child.returncode}'}"
        + (f"\n{tail}" if tail and not error else "")
    )


def _wait_child(child: subprocess.Popen[bytes]) -> None:
    while True:
        try:
            child.wait(timeout=STOP_TIMEOUT)
            return
        except KeyboardInterrupt:
            continue  # the teardown is running; let it finish
        except subprocess.TimeoutExpired:
            child.kill()


def _tail(path: Path, lines: int = 10) -> str:
    try:
        return "\n".join(path.read_text().splitlines()[-lines:])
    except OSError:
        return ""


def _serve(args: argparse.Namespace) -> int:
    """The detached owner: build, report on the ready pipe, wait for SIGTERM, tear down."""
    state_dir = Path(args.state_dir)
    os.set_inheritable(args.lock_fd, False)  # nothing we start may keep the lock alive
    pipe: Any = os.fdopen(args.ready_fd, "w", buffering=1)

    def progress(line: str) -> None:
        print(line, flush=True)  # the log
        if pipe is not None:
            with suppress(OSError):
                pipe.write(f"progress {line}\n")

    signals = Signals()
    signals.install()
    network: Network | None = None
    try:
        topo, dep, programs = _plan(args.topo, args.deployment)
        network = Network(topo, programs, "detach", state_dir, signals, dep)
        took = network.build(progress)
        progress(f"up: network routed in {took:.2f} s")
        if args.services:
            _start_services(dep, state_dir, progress, args.monitor)
        signals.check()
        with suppress(OSError):
            pipe.write("ready\n")
            pipe.close()
        pipe = None
        signals.raising = True
        while True:
            signals.check()  # a signal that came before `raising` was set
            signal.pause()
    except Stop:
        return 0
    except BaseException as e:
        traceback.print_exc()
        if pipe is not None:
            with suppress(OSError):
                pipe.write(f"error {str(e).splitlines()[0] if str(e) else type(e).__name__}\n")
        return 1
    finally:
        signals.raising = False
        for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)  # the teardown must finish
        if network is not None:
            network.stop(progress)
        if pipe is not None:
            with suppress(OSError):
                pipe.close()


# --- down, exec -----------------------------------------------------------------------------


def down(owner: int | None = None, state_dir: Path = STATE_DIR) -> int:
    """Take the network down: ask its owner, or clean up from the state file if it died.

    `owner`: only if the network is (or was) owned by that PID, so a caller never takes down a
    network someone else brought up since (the lock is free once an owner has died).
    Returns 0 when nothing of it is left (also when nothing was up), 1 otherwise.
    """
    if os.geteuid() != 0:
        raise NetworkError("taking a network down needs root")
    st = netstate.read_state(state_dir)
    if st is not None and owner is not None and st.owner_pid != owner:
        say(f"down: the network that is up is not pid {owner}'s ({_describe(st)}); left alone")
        return 0
    if st is None:
        fd = netstate.take_lock(state_dir)
        if fd is None:
            raise NetworkError(
                f"no network is recorded, but {state_dir / netstate.LOCK_FILE} is held: a "
                "network is coming up; try again in a moment"
            )
        os.close(fd)
        say("down: no network is up")
        return 0
    t0 = time.monotonic()
    if netstate.is_running(st.owner_pid, st.owner_start_time):
        os.kill(st.owner_pid, signal.SIGTERM)
        if not netstate.wait_gone(st.owner_pid, st.owner_start_time, STOP_TIMEOUT):
            say(f"down: owner {st.owner_pid} did not stop in {STOP_TIMEOUT:.0f} s; killing it")
            os.kill(st.owner_pid, signal.SIGKILL)
            netstate.wait_gone(st.owner_pid, st.owner_start_time, 5.0)
    else:
        say(f"down: the owner (pid {st.owner_pid}) is gone; cleaning up from the state file")
    # Whatever the owner did or did not do, make sure from the record (idempotent), under the
    # lock, so a network someone brings up meanwhile is neither touched nor half-cleaned.
    fd = netstate.take_lock(state_dir, wait=STOP_TIMEOUT)
    if fd is None:
        raise NetworkError(f"{state_dir / netstate.LOCK_FILE} stays held; cannot finish cleanup")
    try:
        now = netstate.read_state(state_dir)
        if now is not None and now.owner_pid != st.owner_pid:
            say(f"down: a new network is up ({_describe(now)}); left alone")
            return 0
        left = teardown(st, state_dir)
    finally:
        os.close(fd)
    if left:
        say(f"down: processes survived in the network's namespaces: {left}")
        return 1
    say(f"down: network down in {time.monotonic() - t0:.2f} s")
    return 0


def node_pid(name: str, state_dir: Path = STATE_DIR) -> int:
    """PID of a running node's shell (for nsenter / mnexec -a)."""
    st = netstate.read_state(state_dir)
    if st is None:
        raise NetworkError("no network is up; start one with `python -m controller up --detach`")
    rec = st.nodes.get(name)
    if rec is None:
        raise UnknownNode(
            f"unknown host {name!r}; hosts: {' '.join(st.hosts())}; "
            f"switches: {' '.join(st.switches())}"
        )
    if not st.ready or not netstate.is_running(rec.pid, rec.start_time):
        what = "is still coming up" if not st.ready else "is gone (did the network crash?)"
        raise NetworkError(f"node {name} (pid {rec.pid}) {what}; see `python -m controller down`")
    return rec.pid


def exec_on(host: str, argv: list[str], state_dir: Path = STATE_DIR) -> int:
    """Run argv in a node's network and mount namespaces; returns its exit status (128+N when
    killed by signal N)."""
    if not argv:
        raise ValueError("no command given")
    pid = node_pid(host, state_dir)
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the command's to handle
    try:
        rc = subprocess.call(["mnexec", "-a", str(pid), *argv])
    finally:
        signal.signal(signal.SIGINT, old)
    return rc if rc >= 0 else 128 - rc


# --- entry point of the detached owner ------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m controller.network")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("serve", help="(internal) own a detached network until SIGTERM")
    p.add_argument("--ready-fd", type=int, required=True)
    p.add_argument("--lock-fd", type=int, required=True)
    p.add_argument("--state-dir", default=str(STATE_DIR))
    p.add_argument("--topo", default=None)
    p.add_argument("--deployment", default=None)
    p.add_argument("--services", action="store_true")
    p.add_argument("--monitor", action="store_true")
    args = parser.parse_args(argv)
    return _serve(args)


if __name__ == "__main__":
    sys.exit(main())
