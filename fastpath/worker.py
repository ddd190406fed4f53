"""One forwarding worker of `python -m fastpath.lb IFACE --workers N` (fastpath.workers starts
it with fork): its own AF_PACKET socket and TPACKET ring on IFACE in the LB's PACKET_FANOUT
group (l4lb.fanout, flow hash), its own Balancer (connection table, counters), pinned to its
CPU, forwarding with the same loop as the single process (fastpath.forward).

The supervisor talks to it over a socket pair (fastpath.workerproto), served from the
receive loop as a plane service like the control channel is: backend-set and next-hop changes
in, stats out. It stops on SIGTERM (the supervisor's, by PID), on EOF of the socket pair, or
on SIGKILL when the supervisor dies (PR_SET_PDEATHSIG): it owns nothing the kernel does not
release at exit. SIGINT is ignored: Ctrl-C reaches the whole process group, and the
supervisor decides the stop (a graceful drain keeps the workers forwarding).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
from collections.abc import Callable, Collection, Sequence
from types import FrameType
from typing import Any

from fastpath.balancer import Balancer
from fastpath.config import BalancerConfig, LbConfig
from fastpath.forward import Forwarder
from fastpath.workerproto import LineReader, ProtocolError, WorkerStats, encode
from l4lb import bpf, fanout
from l4lb.errors import L4lbError
from l4lb.plane import Plane
from l4lb.ring import RxRing, kernel_drops
from l4lb.tx import ZeroCopySender, open_tx_socket
from l4lb.wire import parse_mac

Handler = Callable[[dict[str, Any]], Any]
PR_SET_PDEATHSIG = 1
IO_EVERY = 0.1
"""Seconds between two updates of the loop's I/O counters (l4lb.rxloop folds them in at its
tick), so a stats answer is at most this stale."""
CHANNEL_EVERY = 0.005
"""Seconds between two looks at the supervisor's socket while forwarding (as the control
channel's CONTROL_EVERY in fastpath.runner)."""


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when its parent dies (prctl), and at once if it already has."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:
        os._exit(1)


class Channel:
    """The worker's end of its socket pair as a plane service: requests in, replies out."""

    def __init__(
        self,
        sock: socket.socket,
        handlers: dict[str, Handler],
        on_eof: Callable[[], None],
    ) -> None:
        self.sock = sock
        self.handlers = handlers
        self.on_eof = on_eof
        self.reader = LineReader()
        self.eof = False
        sock.setblocking(False)

    def send(self, msg: dict[str, Any]) -> None:
        self.sock.setblocking(True)  # replies are small; the supervisor reads them at once
        try:
            self.sock.sendall(encode(msg))
        except OSError:  # the supervisor is gone: stop, as at EOF
            self.eof = True
            self.on_eof()
        finally:
            self.sock.setblocking(False)

    def fds(self) -> Sequence[int]:
        return () if self.eof else (self.sock.fileno(),)

    def service(self, now: float) -> float:
        if self.eof:
            return float("inf")
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:  # the supervisor is gone: stop
                self.eof = True
                self.on_eof()
                break
            try:
                for msg in self.reader.feed(data):
                    self.send(self.reply(msg))
            except ProtocolError as exc:
                self.send({"seq": -1, "ok": False, "error": f"protocol: {exc}"})
            if self.eof:
                break
        return now + CHANNEL_EVERY

    def reply(self, msg: dict[str, Any]) -> dict[str, Any]:
        seq, op = msg["seq"], msg.get("op")
        handler = self.handlers.get(op) if isinstance(op, str) else None
        if handler is None:
            return {"seq": seq, "ok": False, "error": f"unknown op {op!r}"}
        try:
            return {"seq": seq, "ok": True, "result": handler(msg)}
        except (ValueError, TypeError, KeyError, L4lbError) as exc:  # refused: nothing changed
            return {"seq": seq, "ok": False, "error": f"{op}: {exc}"}


def handlers(balancer: Balancer, stats: Handler) -> dict[str, Handler]:
    """The requests a worker serves (fastpath.workerproto), on its `balancer`."""

    def backends(msg: dict[str, Any]) -> dict[str, Any]:
        pairs = tuple((str(ip), int(w)) for ip, w in msg["backends"])
        moved = balancer.set_backends(pairs, frozenset(msg["down"]))
        return {"slots_moved": moved, "table_digest": balancer.table_digest}

    def next_hop(msg: dict[str, Any]) -> None:
        balancer.set_next_hop_mac(parse_mac(msg["mac"]))

    def flow(msg: dict[str, Any]) -> dict[str, Any]:
        src, sport, dst, dport, proto = msg["flow"]
        return balancer.flow(str(src), int(sport), str(dst), int(dport), int(proto))

    return {"stats": stats, "backends": backends, "next_hop": next_hop, "flow": flow}


def run_worker(
    index: int,
    cpu: int | None,
    cfg: LbConfig,
    core: BalancerConfig,
    initial: tuple[Sequence[tuple[str, int]], Collection[str]],
    chan: socket.socket,
    group: int | None,
) -> int:
    """Forward until told to stop; `group` None: create the fanout group (the first worker).
    Returns the exit status (0 after a stop)."""
    stopping: list[Forwarder] = []

    def on_term(signum: int, frame: FrameType | None) -> None:
        if stopping:
            stopping[0].stop()
        else:
            raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    balancer = Balancer(core)
    balancer.set_backends(*initial)
    ring = RxRing(cfg.ring_frames)
    joined: list[int] = []

    def join(sock: socket.socket) -> None:
        if group is None:
            joined.append(fanout.create_group(sock))
        else:
            fanout.join_group(sock, group)
            joined.append(group)

    sock = txsock = None
    try:
        sock = bpf.open_filtered(
            cfg.iface, bpf.ipv4_dst_filter(cfg.vips), setup=ring.setup, bound=join
        )
        txsock = open_tx_socket(cfg.iface)
        sender = ZeroCopySender(txsock, ring.slots)
        forwarder = Forwarder(
            ring.slots, sock.fileno(), sender, balancer, cfg.batch, cfg.busy_poll_us
        )
        kdrops = [0]

        def stats(msg: dict[str, Any]) -> dict[str, Any]:
            assert sock is not None
            kdrops[0] += kernel_drops(sock)[1]
            io = forwarder.io  # its frame counts lag by up to IO_EVERY; the core's do not
            return WorkerStats.of(index, os.getpid(), cpu, balancer, io, kdrops[0]).as_dict()

        channel = Channel(chan, handlers(balancer, stats), forwarder.stop)
        stopping.append(forwarder)
        ready = {"ready": True, "pid": os.getpid(), "cpu": cpu, "group": joined[0]}
        channel.send({"seq": 0, "ok": True, "result": ready})
        forwarder.run(None, IO_EVERY, Plane([channel], name=f"fastpath.lb worker {index}"))
        if not channel.eof:  # the counters once the loop has folded in its last frames
            channel.send({"seq": 0, "ok": True, "result": {"final": stats({})}})
    except OSError as exc:
        with_err = {"seq": 0, "ok": False, "error": f"worker {index}: {exc}"}
        try:
            chan.setblocking(True)
            chan.sendall(encode(with_err))
        except OSError:
            pass
        return 1
    finally:
        ring.close()
        for s in (sock, txsock):
            if s is not None:
                s.close()
    return 0
