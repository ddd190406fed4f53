"""The workers of `fastpath.lb --workers N` as one packet core: `WorkerPool` starts them
(fork: fastpath.worker), asks them (fastpath.workerproto over a socket pair each), sums their
counters, and stops them. It is what fastpath.backends.Backends drives in the supervisor
(fastpath.workers), and one of the supervisor's plane services: a worker that dies or speaks out
of turn fails the pool, which stops the supervisor's loop."""

from __future__ import annotations

import contextlib
import math
import os
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastpath.backends import BackendError
from fastpath.balancer import Balancer
from fastpath.config import BalancerConfig, LbConfig
from fastpath.counters import Counters
from fastpath.runner import log
from fastpath.stats import CoreStats, FlowStats, IoStats
from fastpath.worker import die_with_parent, run_worker
from fastpath.workerproto import LineReader, ProtocolError, counters_of, encode, merge
from l4lb.errors import L4lbError
from l4lb.wire import format_mac

START_TIMEOUT = 20.0
"""Seconds for a worker to map its ring, join the group and say it is ready."""
REPLY_TIMEOUT = 5.0
"""Seconds for every worker to answer a request (a change to 64 new backends costs a worker's
loop about a second: fastpath.config.MAX_BACKENDS; they work on it in parallel)."""
STOP_TIMEOUT = 5.0
"""Seconds between SIGTERM and SIGKILL for a worker at stop."""


class WorkerFailed(L4lbError):
    """A worker died, refused, or did not answer in time; the message says which and why."""


def worker_cpus(n: int, allowed: Collection[int]) -> list[int]:
    """The CPU of each of `n` workers: worker i on the i-th allowed CPU, round robin."""
    cpus = sorted(allowed)
    if not cpus:
        raise ValueError("no CPU allowed")
    return [cpus[i % len(cpus)] for i in range(n)]


def exit_text(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    return f"killed by signal {-code}" if code < 0 else f"exit status {code}"


@dataclass
class Worker:
    index: int
    cpu: int
    pid: int
    sock: socket.socket
    reader: LineReader = field(default_factory=LineReader)
    inbox: list[dict[str, Any]] = field(default_factory=list)
    exited: str | None = None
    """How it ended, once reaped."""


class WorkerPool:
    """The workers as one packet core (module docstring), and their plane service."""

    def __init__(
        self,
        cfg: LbConfig,
        core: BalancerConfig,
        cpus: Sequence[int],
        on_failure: Callable[[], None] = lambda: None,
    ) -> None:
        self.cfg, self.core, self.cpus = cfg, core, list(cpus)
        self.shadow = Balancer(core)
        """The table's digest and slots per backend without packets (identical in workers)."""
        self.on_failure = on_failure
        self.current: tuple[tuple[tuple[str, int], ...], frozenset[str]] = (
            tuple(core.backends),
            frozenset(),
        )
        self.workers: list[Worker] = []
        self.failed: str | None = None
        """Why the pool stopped working (None while it works)."""
        self.results: list[dict[str, Any]] = []
        """Each worker's last stats answer (fastpath.workerproto.WorkerStats as a dict)."""
        self._counters = Counters()
        self._tracked: dict[str, int] = {}
        self._seq = 0

    # --- fastpath.backends.PacketCore -----------------------------------------------------

    @property
    def table_size(self) -> int:
        return self.core.table_size

    @property
    def table_digest(self) -> str:
        return self.shadow.table_digest

    @property
    def counters(self) -> Counters:
        """Per-backend counts summed over the workers, as of the last `poll`."""
        return self._counters

    def slots_owned(self) -> dict[str, int]:
        return self.shadow.slots_owned()

    def tracked(self, ip: str) -> int:
        return self._tracked.get(ip, 0)

    def set_backends(self, backends: Sequence[tuple[str, int]], down: Collection[str] = ()) -> int:
        """Balancer.set_backends on the shadow and every worker, or on none (BackendError)."""
        old = self.current
        moved = self.shadow.set_backends(backends, down)  # a bad set raises here, nothing sent
        new = (tuple(backends), frozenset(down))
        if not self.workers:  # before start: the workers begin with it
            self.current = new
            return moved
        try:
            digests = {r["table_digest"] for r in self.request(self._backends_msg(new))}
            if digests != {self.shadow.table_digest}:
                raise WorkerFailed(
                    f"workers' tables differ from the supervisor's: {sorted(digests)} vs "
                    f"{self.shadow.table_digest}"
                )
        except WorkerFailed as exc:
            self.shadow.set_backends(*old)
            try:
                self.request(self._backends_msg(old))
            except WorkerFailed as again:
                self.fail(f"rollback failed: {again}")
            raise BackendError(f"not applied (rolled back on every worker): {exc}") from None
        self.current = new
        return moved

    def set_next_hop_mac(self, mac: bytes) -> None:
        self.shadow.set_next_hop_mac(mac)
        self.request({"op": "next_hop", "mac": format_mac(mac)})

    @staticmethod
    def _backends_msg(
        state: tuple[tuple[tuple[str, int], ...], frozenset[str]],
    ) -> dict[str, Any]:
        backends, down = state
        return {"op": "backends", "backends": [list(b) for b in backends], "down": sorted(down)}

    # --- starting, asking, stopping -------------------------------------------------------

    def start(self) -> None:
        """Fork the workers; returns once every one forwards (WorkerFailed otherwise). The
        first creates the fanout group, the others join the id it reports."""
        group: int | None = None
        for i, cpu in enumerate(self.cpus):
            self._fork(i, cpu, group)
            if group is None:
                group = int(self._ready(self.workers[0])["group"])
        for w in self.workers[1:]:
            self._ready(w)

    def _fork(self, index: int, cpu: int, group: int | None) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        me = os.getpid()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the supervisor's stack
            status = 1
            try:
                parent.close()
                for w in self.workers:
                    w.sock.close()
                die_with_parent(me)
                status = run_worker(index, cpu, self.cfg, self.core, self.current, child, group)
            except SystemExit as exc:
                status = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        child.close()
        self.workers.append(Worker(index, cpu, pid, parent))

    def _ready(self, w: Worker) -> dict[str, Any]:
        msg = self._next(w, time.monotonic() + START_TIMEOUT)
        if not msg.get("ok") or msg["seq"] != 0:
            raise WorkerFailed(f"worker {w.index} did not start: {msg.get('error', msg)}")
        result: dict[str, Any] = msg["result"]
        return result

    def _next(self, w: Worker, deadline: float) -> dict[str, Any]:
        """The next message from `w` (WorkerFailed if it dies or stays silent)."""
        while not w.inbox:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerFailed(f"worker {w.index} (pid {w.pid}) did not answer in time")
            ready, _, _ = select.select([w.sock], [], [], left)
            if ready:
                self._read(w)
        return w.inbox.pop(0)

    def _read(self, w: Worker) -> None:
        try:
            data = w.sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            self._reap(w, block=True)
            raise WorkerFailed(f"worker {w.index} (pid {w.pid}) exited: {w.exited}")
        try:
            w.inbox.extend(w.reader.feed(data))
        except ProtocolError as exc:
            raise WorkerFailed(f"worker {w.index}: {exc}") from None

    def _reap(self, w: Worker, block: bool) -> bool:
        if w.exited is not None:
            return True
        deadline = time.monotonic() + (1.0 if block else 0.0)
        while True:
            pid, status = os.waitpid(w.pid, os.WNOHANG)
            if pid:
                w.exited = exit_text(status)
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)

    def request(self, msg: dict[str, Any]) -> list[dict[str, Any]]:
        """`msg` to every worker; their results in worker order, or WorkerFailed (one
        refused, died or was silent: the reasons of all)."""
        if self.failed:
            raise WorkerFailed(self.failed)
        self._seq += 1
        seq = self._seq
        line = encode({"seq": seq, **msg})
        for w in self.workers:
            try:
                w.sock.sendall(line)
            except OSError as exc:
                self.fail(f"worker {w.index} (pid {w.pid}): {exc}")
                raise WorkerFailed(self.failed or str(exc)) from None
        deadline = time.monotonic() + REPLY_TIMEOUT
        results: list[dict[str, Any]] = []
        errors: list[str] = []
        for w in self.workers:
            try:
                reply = self._next(w, deadline)
                while reply["seq"] != seq:  # a late answer to an earlier request
                    reply = self._next(w, deadline)
            except WorkerFailed as exc:
                self.fail(str(exc))
                raise
            if reply.get("ok"):
                results.append(reply["result"])
            else:
                errors.append(f"worker {w.index}: {reply.get('error')}")
        if errors:
            raise WorkerFailed("; ".join(errors))
        return results

    def fail(self, why: str) -> None:
        if self.failed is None:
            self.failed = why
            log(f"workers: {why}; stopping")
            self.on_failure()

    def stop(self) -> list[str]:
        """SIGTERM every worker by PID and wait (SIGKILL after STOP_TIMEOUT); the failures.
        Each worker's last counters, sent as its loop ends, become `results` when every worker
        sent them (the final snapshot is then exact: no I/O count lags). Idempotent."""
        errors: list[str] = []
        for w in self.workers:
            if w.exited is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        finals: list[dict[str, Any]] = []
        for w in self.workers:
            final = self._final(w, deadline)
            if final is not None:
                finals.append(final)
            while not self._reap(w, block=False) and time.monotonic() < deadline:
                time.sleep(0.01)
            if w.exited is None:
                os.kill(w.pid, signal.SIGKILL)
                _, status = os.waitpid(w.pid, 0)
                w.exited = exit_text(status)
                errors.append(f"worker {w.index} (pid {w.pid}) ignored SIGTERM: killed")
            elif w.exited != "exit status 0" and self.failed is None:
                errors.append(f"worker {w.index} (pid {w.pid}): {w.exited}")
            w.sock.close()
        if self.workers and len(finals) == len(self.workers) and self.failed is None:
            self._absorb(finals)
        self.workers = []  # stopped: nothing left to ask
        return errors

    def _final(self, w: Worker, deadline: float) -> dict[str, Any] | None:
        """The counters `w` sends as its loop ends (None if it ends without)."""
        if w.exited is not None or w.sock.fileno() < 0:
            return None
        while True:
            try:
                msg = self._next(w, deadline)
            except WorkerFailed:  # its end closed (it exited) or it stayed silent
                return None
            result = msg.get("result")
            if msg.get("ok") and isinstance(result, dict) and "final" in result:
                final: dict[str, Any] = result["final"]
                return final

    # --- counters -------------------------------------------------------------------------

    def poll(self) -> list[dict[str, Any]]:
        """Every worker's stats now (kept in `results`, summed into `counters`)."""
        self._absorb(self.request({"op": "stats"}))
        return self.results

    def _absorb(self, results: list[dict[str, Any]]) -> None:
        self.results = results
        per = merge([r["per_backend"] for r in results])
        self._counters = counters_of(per)
        self._tracked = {ip: c["active_flows"] for ip, c in per.items()}

    def flow(self, src: str, sport: int, dst: str, dport: int, proto: int) -> dict[str, Any]:
        """Balancer.flow over the workers: the one whose table tracks the flow (the fanout
        sends a flow to one worker), else the first's answer (untracked, the table's choice,
        which every worker shares)."""
        answers = self.request({"op": "flow", "flow": [src, sport, dst, dport, proto]})
        tracked = [(i, a) for i, a in enumerate(answers) if a["state"] != "untracked"]
        i, answer = tracked[0] if tracked else (None, answers[0])
        return {**answer, "worker": i}

    def flows(self) -> FlowStats:
        """The connection tables' flow counters of all, from `results`."""
        return FlowStats(**merge([x["flows"] for x in self.results]))

    def summed(self) -> tuple[CoreStats, IoStats, int, int]:
        """The core and I/O counters, kernel drops and tracked flows of all, from `results`."""
        r = self.results
        return (
            CoreStats(**merge([x["core"] for x in r])),
            IoStats(**merge([x["io"] for x in r])),
            sum(x["kernel_drops"] for x in r),
            sum(x["tracked_flows"] for x in r),
        )

    def frames(self) -> int:
        """Frames the workers' cores have seen, now (the drain's count)."""
        try:
            return sum(r["core"]["frames"] for r in self.poll())
        except WorkerFailed:
            return -1  # the loop is stopping anyway; a change of count keeps the drain going

    # --- l4lb.plane service: a worker that dies or speaks out of turn ---------------------

    def fds(self) -> Sequence[int]:
        return [w.sock.fileno() for w in self.workers if w.exited is None]

    def service(self, now: float) -> float:
        for w in self.workers:
            if w.exited is not None or self.failed:
                continue
            ready, _, _ = select.select([w.sock], [], [], 0)
            if not ready:
                continue
            try:
                self._read(w)
                stray = w.inbox.pop(0) if w.inbox else None
                if stray is not None and not stray.get("ok"):
                    raise WorkerFailed(f"worker {w.index}: {stray.get('error')}")
            except WorkerFailed as exc:
                self.fail(str(exc))
        return math.inf  # woken by its sockets only
