"""Building and stopping one network in the process that owns it (see controller.network).

Hosts are mininet Hosts; switches are plain mininet nodes acting as Linux routers (no OVS, no
OpenFlow controller); links are veth pairs made in one `ip -batch` (no TCLink: this kernel has
no netem). Addresses, MACs and permanent neighbours come from controller.nodeconfig, routes
from controller.drivers.linux. The owner records each node in the state file as soon as it
exists, so a crash at any point leaves a record `down` can clean up from.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from controller import netstate, nodeconfig, render
from controller.drivers import linux
from controller.netstate import STATE_DIR, NetState, NodeRecord
from controller.routes import SwitchProgram
from controller.topology import Topology

if TYPE_CHECKING:
    from controller.deployment import Deployment

Progress = Callable[[str], None]


class NetworkError(RuntimeError):
    """The network cannot be brought up, reached or taken down; the message says what to do."""


class UnknownNode(LookupError):
    """A node name the running network does not have; the message lists the valid ones."""


class Stop(BaseException):
    """SIGTERM/SIGHUP/SIGINT reached the owner: stop the network."""


def say(line: str) -> None:
    print(line, flush=True)


class Signals:
    """Turns SIGTERM/SIGHUP/SIGINT into Stop: a flag checked between build steps, or an
    exception while the owner just waits (the CLI's loop, the detached idle loop)."""

    def __init__(self) -> None:
        self.requested: str | None = None  # name of the first stop signal
        self.raising = False

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.requested = self.requested or signal.Signals(signum).name
        if self.raising:
            self.raising = False  # once: the teardown that follows must not be interrupted
            raise Stop(self.requested)

    def install(self, sigint: bool = True) -> None:
        for sig in (signal.SIGTERM, signal.SIGHUP, *([signal.SIGINT] if sigint else [])):
            signal.signal(sig, self._handler)

    def check(self) -> None:
        if self.requested is not None:
            raise Stop(self.requested)


class Network:
    """The mininet objects of one fat tree, owned by this process."""

    def __init__(
        self,
        topo: Topology,
        programs: dict[str, SwitchProgram],
        mode: str,
        state_dir: Path = STATE_DIR,
        signals: Signals | None = None,
        deployment: Deployment | None = None,
    ) -> None:
        self.topo = topo
        self.programs = programs
        self.deployment = deployment
        """Whose process configurations are rendered as the network comes up (controller.render)."""
        self.state_dir = state_dir
        self.signals = signals or Signals()
        self.net: Any = None
        me = os.getpid()
        self.state = NetState(
            owner_pid=me,
            owner_start_time=netstate.proc_start_time(me) or 0,
            mode=mode,
            topology=topo.source,
            started=time.time(),
            interfaces=[i.name for n in topo.nodes.values() for i in n.interfaces.values()],
        )

    def build(self, progress: Progress = say) -> float:
        """Create, link, address and route every node; returns the seconds it took."""
        from mininet.log import setLogLevel
        from mininet.net import Mininet

        setLogLevel("output")  # mininet's "*** Adding ..." lines off, CLI output on
        t0 = time.monotonic()
        # Mininet.init() raises root-namespace limits and sysctls; this network needs none of
        # that, and the machine is shared.
        Mininet.inited = True
        self.router_cls, self.intf_cls, self.link_cls = _mininet_classes()
        self.net = Mininet(topo=None, controller=None, build=False, intf=self.intf_cls)
        netstate.write_state(self.state, self.state_dir)
        names = self.topo.hosts() + self.topo.switches()
        for name in names:
            self.signals.check()
            self._add_node(name)
        t1 = time.monotonic()
        progress(f"up: {len(names)} nodes in {t1 - t0:.2f} s")

        pids = {n: r.pid for n, r in self.state.nodes.items()}
        sysctl = {n: nodeconfig.sysctl_argv(nodeconfig.sysctls(self.topo, n)) for n in names}
        _run_all({n: ["mnexec", "-a", str(pids[n]), *argv] for n, argv in sysctl.items()}, "sysctl")
        self.signals.check()
        _run_root_batch(nodeconfig.link_commands(self.topo, pids))
        self._record_links()
        t2 = time.monotonic()
        progress(f"up: {len(self.topo.links())} links in {t2 - t1:.2f} s")

        self.signals.check()
        batches: dict[str, tuple[int, list[list[str]]]] = {}
        n_routes = 0
        for n in names:
            cmds = nodeconfig.node_commands(self.topo, n)
            if n in self.programs:
                routes = linux.program_commands(self.programs[n], self.topo)
                n_routes += sum(1 for c in routes if c[1] == "route")
                cmds += routes
            batches[n] = (pids[n], cmds)
        linux.run_batches(batches)
        guards = {}
        for n in names:
            script = (
                linux.guard_ruleset(self.programs[n], self.topo) if n in self.programs else None
            )
            if script is not None:
                guards[n] = (pids[n], script)
        linux.run_nft(guards)
        t3 = time.monotonic()
        progress(
            f"up: addresses, static neighbours, {n_routes} routes on {len(self.programs)} "
            f"switches and source guards on {len(guards)} in {t3 - t2:.2f} s"
        )
        if self.deployment is not None:
            render.write(self.deployment, self.state_dir)
        self.state.ready = True
        netstate.write_state(self.state, self.state_dir)
        return t3 - t0

    def _add_node(self, name: str) -> None:
        kind = self.topo.node(name).kind
        if kind == "host":
            from mininet.node import Host

            node = self.net.addHost(name, cls=Host, ip=None)
        else:
            node = self.net.addSwitch(name, cls=self.router_cls, inNamespace=True)
        ns = netstate.netns_of(node.pid)
        if ns is None or ns == netstate.root_netns():
            raise NetworkError(f"{name}: node shell {node.pid} has no namespace of its own")
        self.state.nodes[name] = NodeRecord(
            name, kind, node.pid, netstate.proc_start_time(node.pid) or 0, ns
        )
        netstate.write_state(self.state, self.state_dir)
        netstate.pin_netns(node.pid, self.state_dir / netstate.PIN_DIR / name)

    def _record_links(self) -> None:
        """Give mininet its Link/Intf objects for the veths already made (for the CLI)."""
        for a, b in self.topo.links():
            link = self.link_cls(
                self.net[a.node],
                self.net[b.node],
                port1=a.port,
                port2=b.port,
                intfName1=a.name,
                intfName2=b.name,
                addr1=a.mac,
                addr2=b.mac,
                intf=self.intf_cls,
                params1={"ip": a.ip},
                params2={"ip": b.ip},
            )
            self.net.links.append(link)

    def stop(self, progress: Progress = say) -> list[int]:
        """Stop services and every process in the network's namespaces (which removes the
        namespaces and veths); returns PIDs that survived (none, normally)."""
        t0 = time.monotonic()
        left = teardown(self.state, self.state_dir)
        if self.net is not None:
            for node in self.net.hosts + self.net.switches:
                with suppress(Exception):
                    node.cleanup()  # reap the shell, close its pty
        progress(f"down: {len(self.state.nodes)} nodes stopped in {time.monotonic() - t0:.2f} s")
        return left


def _mininet_classes() -> tuple[type, type, type]:
    from mininet.link import Intf, Link
    from mininet.node import Node

    class Router(Node):
        """A node in its own namespace that routes; nothing to start or stop."""

        def __init__(self, name: str, **params: Any) -> None:
            params.pop("listenPort", None)
            super().__init__(name, **params)

        def start(self, controllers: Any) -> None:
            pass

    class QuietIntf(Intf):
        """Records its address for mininet's CLI; the ip batches configure it."""

        def config(self, ip: str | None = None, **params: Any) -> dict[str, Any]:
            if ip:
                self.ip, prefix = ip.split("/")
                self.prefixLen = int(prefix)
            return {}

    class PrebuiltLink(Link):
        """A Link whose veth pair already exists (made in one batch for all links)."""

        @classmethod
        def makeIntfPair(cls, *args: Any, **kwargs: Any) -> None:
            return None

    return Router, QuietIntf, PrebuiltLink


def _run_all(cmds: dict[str, list[str]], what: str, timeout: float = 20.0) -> None:
    procs = {
        n: subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for n, argv in cmds.items()
    }
    errors = []
    for n, p in procs.items():
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out = p.communicate()[0] + f" (timed out after {timeout:.0f} s)"
        if p.returncode != 0:
            errors.append(f"{n}: {out.strip()}")
    if errors:
        raise NetworkError(f"{what} failed: " + "; ".join(errors))


def _run_root_batch(commands: list[list[str]]) -> None:
    proc = subprocess.run(
        ["ip", "-batch", "-"],
        input=linux.batch_text(commands),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if proc.returncode != 0:
        raise NetworkError(f"creating links failed: {proc.stderr.strip()}")


def teardown(st: NetState, state_dir: Path = STATE_DIR) -> list[int]:
    """Take down what the state file names, from the file alone; returns surviving PIDs."""
    from controller import services

    try:
        services.stop(state_dir)  # by PID, and undoes their setup; the rest goes below
    except Exception as e:
        say(f"down: stopping the services failed ({e}); ending them with the namespaces")
    pin_dir = state_dir / netstate.PIN_DIR
    left = netstate.kill_namespaces(st, pin_dir=pin_dir)
    for name in st.nodes:
        netstate.unpin_netns(pin_dir / name)  # the namespaces (and veths) go with their pins
    with suppress(OSError):
        pin_dir.rmdir()
    _delete_root_interfaces(st.interfaces)
    shutil.rmtree(state_dir / render.CONFIG_DIR, ignore_errors=True)  # the processes' configs
    netstate.remove_state(state_dir)
    return left


def _delete_root_interfaces(names: Sequence[str]) -> list[str]:
    """Delete any of the network's interface names found in the root namespace (normally none:
    every end lives in a node and vanishes with it)."""
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    present = {line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line}
    stray = [n for n in names if n in present]
    for n in stray:
        subprocess.run(["ip", "link", "del", n], capture_output=True, check=False)
    return stray
