"""The Prometheus exporter beside one load balancer or agent:
`python -m controller.exporter --config FILE` (controller.services starts one per LB and agent,
inside its host, and stops it by PID).

It serves `/metrics` (the Prometheus text format, prometheus_client's HTTP server) on the
host's own address, port 9180 by default. Each scrape asks the process for `show` and `ping`
on its control channel (served from the process's receive loop between batches, so the packet
path never waits on a lock or shares the GIL with a thread of ours), reads, for an LB, the
nftables counters of the frames dropped before its ring (`nft -j`, here, not in the packet
loop), the host's interface counters and, for an agent, whether the local server listens on
the VIP; `view` puts them together and `mapping`'s table turns them into metric families.
The process's own CPU, memory and file descriptors come from prometheus_client's
ProcessCollector on its PID (`l4lb_process_*`, `l4lb_agent_process_*`).

Where a process is pinned (`fastpath.lb --cpu N`), the exporter moves itself to the other CPUs
once it knows the process's PID, so serving scrapes never takes the pinned loop's core.

A source that cannot be read (the process down, nft refused) is counted in
l4lb_exporter_errors_total{reason}, reported on stderr once per failing stretch, and the scrape
serves the rest (l4lb_up 0 while the process does not answer). Exit: 0 on SIGTERM/SIGINT, 2 for
a bad configuration, 1 when the port cannot be served.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socketserver
import sys
import threading
from collections.abc import Iterator, Sequence
from types import FrameType
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app
from prometheus_client.core import Metric
from prometheus_client.exposition import ThreadingWSGIServer

from agent.config import AgentConfig
from controller.exporter import mapping, view
from controller.exporter.config import ExporterConfig
from controller.exporter.sources import SourceError, Sources
from fastpath.config import LbConfig
from l4lb import cfgfile
from l4lb.control import default_socket
from l4lb.errors import ConfigError

ERROR_REASONS = ("control", "nft", "netdev", "listeners", "bad_value")


class Collector:
    """A prometheus_client collector: one scrape, one view of the process, one table."""

    def __init__(self, cfg: ExporterConfig, process: LbConfig | AgentConfig, src: Any) -> None:
        self.cfg = cfg
        self.process = process
        self.src = src
        self.rows = mapping.TABLES[cfg.kind]
        self.pid = 0
        """The process's PID from its latest answer (0 while it does not answer)."""
        self.errors = dict.fromkeys(ERROR_REASONS, 0)
        self._failing: set[str] = set()
        self._lock = threading.Lock()  # scrapes may overlap (one server thread each)

    def _read(self, reason: str, fn: Any, *args: Any) -> Any:
        try:
            value = fn(*args)
        except SourceError as exc:
            with self._lock:
                self.errors[reason] += 1
                if reason not in self._failing:
                    self._failing.add(reason)
                    print(
                        f"controller.exporter: {exc} (counted, serving the rest)", file=sys.stderr
                    )
            return None
        with self._lock:
            self._failing.discard(reason)
        return value

    def view(self) -> dict[str, Any]:
        replies = self._read("control", self.src.control)
        show, ping = replies if replies is not None else (None, None)
        pid = int(ping.get("pid", 0)) if isinstance(ping, dict) else 0
        if pid and pid != self.pid:
            keep_off(pid)
        self.pid = pid
        netdev = self._read("netdev", self.src.netdev)
        if isinstance(self.process, LbConfig):
            nft = self._read("nft", self.src.nft) if self.process.nft else None
            return view.lb_view(show, self.process, nft, netdev, self.errors)
        ports = self.cfg.server_ports
        servers = self._read("listeners", self.src.servers, self.process.vips, ports)
        return view.agent_view(show, servers, netdev, self.errors)

    def collect(self) -> Iterator[Metric]:
        families, bad = mapping.families(self.rows, self.view())
        with self._lock:
            self.errors["bad_value"] += len(bad)
            errors = dict(self.errors)
        yield from families
        yield from mapping.families([mapping.ERRORS], {"errors": errors})[0]


def keep_off(pid: int) -> None:
    """Run on the CPUs `pid` may not run on, when it is pinned to some (no-op otherwise)."""
    try:
        theirs = os.sched_getaffinity(pid)
    except OSError:
        return
    others = set(range(os.cpu_count() or 1)) - theirs
    if others:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, others)


def load(path: str) -> tuple[ExporterConfig, LbConfig | AgentConfig]:
    """The exporter's configuration and the process's it names (ConfigError naming the file)."""
    cfg = cfgfile.load(ExporterConfig, path)
    if cfg.kind == "lb":
        return cfg, cfgfile.load(LbConfig, cfg.process_config)
    return cfg, cfgfile.load(AgentConfig, cfg.process_config)


def sources(cfg: ExporterConfig, process: LbConfig | AgentConfig) -> Sources:
    iface = process.iface
    if iface is None:  # an agent left to choose its interface: the same rule
        from agent.decap import default_iface

        iface = default_iface()
    sock = process.control_socket or str(default_socket(cfg.kind, iface))
    return Sources(sock, cfg.control_timeout, iface)


def registry(collector: Collector, kind: str) -> CollectorRegistry:
    reg = CollectorRegistry()
    reg.register(collector)  # first: each scrape learns the PID before the next collector
    prefix = "l4lb" if kind == "lb" else "l4lb_agent"
    ProcessCollector(namespace=prefix, pid=lambda: collector.pid, registry=reg)
    return reg


class _Server(ThreadingWSGIServer):
    """prometheus_client's threading WSGI server, bound without HTTPServer's reverse lookup of
    its own address (socket.getfqdn: 10 s of DNS timeouts on a machine without a resolver)."""

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]  # type: ignore[assignment]
        self.setup_environ()


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # a line per scrape would drown the log


def serve(reg: CollectorRegistry, addr: str, port: int) -> tuple[_Server, threading.Thread]:
    """/metrics of `reg` on addr:port, from a thread (OSError when the port cannot be had)."""
    server = make_server(addr, port, make_wsgi_app(reg), _Server, handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    thread.start()
    return server, thread


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m controller.exporter",
        description="Serve an LB's or agent's counters as Prometheus metrics on /metrics.",
    )
    ap.add_argument("--config", required=True, help="the exporter's configuration file")
    args = ap.parse_args(argv)
    try:
        cfg, process = load(args.config)
        src = sources(cfg, process)
    except (ConfigError, OSError) as exc:
        print(f"controller.exporter: {exc}", file=sys.stderr)
        return 2
    reg = registry(Collector(cfg, process, src), cfg.kind)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server, thread = serve(reg, cfg.listen, cfg.port)
    except OSError as exc:
        print(f"controller.exporter: cannot serve {cfg.listen}:{cfg.port}: {exc}", file=sys.stderr)
        return 1
    print(
        f"controller.exporter: {cfg.kind} metrics on http://{cfg.listen}:{cfg.port}/metrics "
        f"from {src.socket}",
        file=sys.stderr,
        flush=True,
    )
    try:
        while not stop.wait(1.0):
            pass
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
