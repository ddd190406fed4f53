"""The agent's health service, run from its receive loop (an l4lb.plane service, never
blocking it): the HTTP check of the local server, the answers to the LBs' tunnelled probes,
and the pushes when the verdict changes. The decision itself is agent.health's.

- The check: a non-blocking TCP connect from the host itself to VIP:http_port, the request
  (`HEAD / HTTP/1.0`, or a GET of the configured path), and the status line (2xx or 3xx is a
  success) within `timeout`. Done in the loop, not a thread: a check is a few system calls
  every 0.5 s, and a thread would take the GIL from the packet loop all the same. A connect
  to a local address completes (or is refused) within the connect call or microseconds after
  it, so while connecting the service asks to be called again 1 ms later; the reply wakes the
  loop through the socket.
- The probes: a UDP socket bound to VIP:port. The LBs' probes arrive through the tunnel (the
  agent's core decapsulates them like client traffic and the TUN delivers them), so an answer
  proves the whole path; the answer goes from VIP:port straight to the LB. They are counted
  apart (`probes`), so the core's `delivered` minus `probes` is client traffic.
- The pushes: when the verdict changes, the same reply goes at once to every LB that probed
  within `push_window`, so every LB learns within milliseconds, not at its next probe.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import secrets
import select
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from agent.health import Checker
from agent.stats import HealthStats
from l4lb.healthcfg import HealthConfig
from l4lb.healthwire import (
    BadMessage,
    Kind,
    Reply,
    WireError,
    decode_probe,
    encode_reply,
)

CONNECT_RECHECK = 0.001
"""Seconds between looks at a connecting check socket (local connects finish at once)."""
STATUS_MAX = 512
"""Bytes read for the status line; a longer first line is a failed check."""
PROBES_PER_CALL = 64
"""Probes answered per call, so a flood of them cannot hold the packet loop."""
PEERS_MAX = 64
"""LBs remembered for pushes (the least recently heard goes first): bounded memory."""


class HttpCheck:
    """One HTTP check in flight, advanced without blocking by `poll`."""

    def __init__(self, addr: tuple[str, int], request: bytes, timeout: float) -> None:
        self.addr = addr
        self.request = request
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.started = 0.0
        self.sent = False
        self.buf = b""

    def start(self, now: float) -> tuple[bool, str] | None:
        """Begin a check; its result at once if the connect already failed."""
        self.close()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        self.started, self.sent, self.buf = now, False, b""
        rc = self.sock.connect_ex(self.addr)
        if rc not in (0, errno.EINPROGRESS):
            return self._done(False, f"connect: {os.strerror(rc).lower()}")
        return self.poll(now)

    @property
    def running(self) -> bool:
        return self.sock is not None

    def fileno(self) -> int | None:
        return self.sock.fileno() if self.sock is not None else None

    def due(self, now: float) -> float:
        """When `poll` should look again (once the request is sent, the socket wakes the loop
        for the answer)."""
        deadline = self.started + self.timeout
        return deadline if self.sent else min(now + CONNECT_RECHECK, deadline)

    def poll(self, now: float) -> tuple[bool, str] | None:
        """(ok, detail) once the check is over, else None."""
        sock = self.sock
        if sock is None:
            return None
        took = f"in {(now - self.started) * 1000:.1f} ms"
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            return self._done(False, f"connect: {os.strerror(err).lower()}")
        if not self.sent:
            p = select.poll()
            p.register(sock, select.POLLOUT)
            if not p.poll(0):
                if now - self.started >= self.timeout:
                    return self._done(False, f"connect: no answer in {self.timeout * 1000:.0f} ms")
                return None
            try:
                sock.send(self.request)
            except OSError as exc:
                return self._done(False, f"send: {(exc.strerror or str(exc)).lower()}")
            self.sent = True
        while True:
            try:
                chunk = sock.recv(STATUS_MAX)
            except BlockingIOError:
                break
            except OSError as exc:
                return self._done(False, f"read: {(exc.strerror or str(exc)).lower()}")
            if not chunk:
                if b"\n" not in self.buf:
                    return self._done(False, f"closed before the status line {took}")
                break
            self.buf += chunk
            if b"\n" in self.buf or len(self.buf) >= STATUS_MAX:
                break
        if b"\n" in self.buf:
            line = self.buf.split(b"\n", 1)[0].strip().decode("latin-1")
            parts = line.split(" ", 2)
            ok = (
                len(parts) >= 2
                and parts[0].startswith("HTTP/")
                and parts[1].isdigit()
                and 200 <= int(parts[1]) < 400
            )
            return self._done(ok, f"{line[:60]} {took}")
        if len(self.buf) >= STATUS_MAX:
            return self._done(False, "no status line")
        if now - self.started >= self.timeout:
            return self._done(False, f"no status line in {self.timeout * 1000:.0f} ms")
        return None

    def _done(self, ok: bool, detail: str) -> tuple[bool, str]:
        self.close()
        return ok, detail

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


@dataclass
class _Peer:
    token: int
    seq: int
    seen: float


class AgentHealth:
    """The plane service (fds/service) of the agent's health checks; see the module doc."""

    def __init__(
        self,
        cfg: HealthConfig,
        vip: str,
        local_ip: str,
        now: float,
        responder: socket.socket | None = None,
        check_addr: tuple[str, int] | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        """`responder` and `check_addr` replace the UDP socket on VIP:port and the checked
        address (tests); by default both are on the VIP."""
        self.cfg = cfg
        self.vip = vip
        self.backend = ipaddress.IPv4Address(local_ip).packed
        self.checker = Checker(cfg, now)
        self.check = HttpCheck(check_addr or (vip, cfg.http_port), cfg.request(), cfg.timeout)
        self.next_check = now
        self.instance = secrets.randbits(32)
        self.wall = wall
        if responder is None:
            responder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                responder.bind((vip, cfg.port))
            except OSError as exc:
                responder.close()
                raise OSError(exc.errno, f"health: cannot bind {vip}:{cfg.port}: {exc}") from None
        responder.setblocking(False)
        self.sock = responder
        self.peers: dict[tuple[str, int], _Peer] = {}
        """The LBs that probed, by reply address."""
        self.probes = 0
        """Probes answered (tunnelled UDP to VIP:port: not client traffic)."""
        self.malformed: dict[str, int] = {r.value: 0 for r in BadMessage}
        self.pushes = 0
        """Replies pushed unasked to LBs when the verdict changed."""
        self.socket_errors = 0
        """Replies the socket refused and errors it reported (lost, counted)."""

    def fds(self) -> Sequence[int]:
        fd = self.check.fileno()
        return [self.sock.fileno()] if fd is None else [self.sock.fileno(), fd]

    def service(self, now: float) -> float:
        changed = False
        if self.check.running:
            res = self.check.poll(now)
            if res is not None:
                changed |= self._result(now, *res)
        elif now >= self.next_check:
            res = self.check.start(now)
            if res is not None:
                changed |= self._result(now, *res)
        changed |= self.checker.tick(now)
        self._answer(now)
        if changed:
            self._push(now)
        due = self.check.due(now) if self.check.running else self.next_check
        return min(due, self.checker.wake_at())

    def _result(self, now: float, ok: bool, detail: str) -> bool:
        changed = self.checker.result(now, ok, detail)
        self.next_check = self.checker.next_check(now)  # after the result: fast if it failed
        return changed

    def _answer(self, now: float) -> None:
        for _ in range(PROBES_PER_CALL):
            try:
                data, addr = self.sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.socket_errors += 1  # e.g. an ICMP error queued on the socket
                continue
            try:
                probe = decode_probe(data)
                if probe.backend != self.backend:
                    raise WireError(BadMessage.WRONG_BACKEND)
            except WireError as exc:
                self.malformed[exc.reason.value] += 1
                continue
            self.probes += 1
            self.peers.pop(addr, None)  # re-inserted last: the dict stays in order of last probe
            self.peers[addr] = _Peer(probe.token, probe.seq, now)
            if len(self.peers) > PEERS_MAX:
                del self.peers[next(iter(self.peers))]
            self._send(addr, self._reply(Kind.REPLY, probe.token, probe.seq, now))

    def _push(self, now: float) -> None:
        window = self.cfg.push_window
        for addr, peer in list(self.peers.items()):
            if now - peer.seen > window:
                del self.peers[addr]  # not heard from lately: an LB gone or no longer probing
                continue
            self._send(addr, self._reply(Kind.PUSH, peer.token, peer.seq, now))
            self.pushes += 1

    def _reply(self, kind: Kind, token: int, seq: int, now: float) -> bytes:
        c = self.checker
        return encode_reply(
            Reply(
                kind=kind, token=token, seq=seq, backend=self.backend, verdict=c.verdict,
                suppressed=c.suppressed, instance=self.instance,
                age_ms=int(max(0.0, now - c.since) * 1000), check_failures=c.check_failures,
                detail=c.detail,
            )
        )  # fmt: skip

    def _send(self, addr: tuple[str, int], data: bytes) -> None:
        try:
            self.sock.sendto(data, addr)
        except OSError:
            self.socket_errors += 1

    def stats(self, now: float) -> HealthStats:
        """The snapshot; probes already queued are answered first, so that `probes` counts
        every probe the core has delivered (a TUN write delivers in the writer's call)."""
        self._answer(now)
        c = self.checker
        wall = self.wall()
        return HealthStats(
            verdict=c.verdict.name.lower(),
            since=round(wall - (now - c.since), 3),
            suppressed=c.suppressed,
            penalty=round(c.dampening.penalty, 3),
            changes=c.changes,
            checks=c.checks,
            check_failures=c.check_failures,
            last_check=c.detail,
            probes=self.probes,
            malformed={k: v for k, v in self.malformed.items() if v},
            pushes=self.pushes,
            socket_errors=self.socket_errors,
            lbs=sorted(f"{ip}:{port}" for ip, port in self.peers),
            instance=f"{self.instance:08x}",
        )

    def close(self) -> None:
        self.check.close()
        with contextlib.suppress(OSError):
            self.sock.close()
