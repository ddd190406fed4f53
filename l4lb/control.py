"""The control channel of a load balancer or agent: a unix socket only root can use.

Protocol: one JSON object per line (UTF-8), each way.

    request  {"cmd": "show"}
             {"cmd": "backend.weight", "ip": "10.2.3.2", "weight": 2}
    reply    {"ok": true, "result": ...}
             {"ok": false, "error": "backend.weight: weight must be an integer 0..1000, not -1"}

A connection may carry several requests; the replies come in the same order. A line longer
than MAX_LINE bytes, a line that is not a JSON object, a missing or unknown `cmd`, or a handler
that raises CommandError gets `{"ok": false, "error": ...}`, and handlers check every argument
before they change anything: a refused request changes nothing. `{"cmd": "help"}` lists the
commands with their one-line descriptions.

Who may ask: the socket file is created with mode 0600 (only its owner, root, may connect),
and each connection's peer credentials (SO_PEERCRED) are checked as well: a caller whose uid is
not the server's gets an error reply and is disconnected, whatever the file's mode.

Serving never blocks the owner's packet loop: every socket is non-blocking; `service()` accepts,
reads what has arrived, answers the complete lines and returns; a reply the client's socket
cannot take at once is kept and sent by later calls, and a client that lets more than
MAX_PENDING bytes of replies pile up is disconnected. The loop calls `service()` when one of
`fds()` is readable (while idle) and every few milliseconds while busy.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import ipaddress
import json
import os
import socket
import struct
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from l4lb.errors import L4lbError
from l4lb.statsfile import STATS_DIR

MAX_LINE = 1 << 20
"""Longest request line (bytes): a bigger one is refused and the connection closed."""
MAX_PENDING = 4 << 20
"""Most reply bytes kept for a client that does not read."""
MAX_CLIENTS = 32
"""Connections served at once; more are refused at accept."""
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def default_socket(kind: str, ifname: str) -> Path:
    """Where a process of `kind` ("lb", "agent") on `ifname` serves its control channel."""
    return STATS_DIR / f"{kind}-{ifname}.ctl"


class CommandError(L4lbError):
    """A request refused by its handler; the message goes back to the caller as the error."""


class ControlUnavailable(L4lbError):
    """Nobody answers on the socket (no such file, refused, timed out, connection closed)."""


class RequestRefused(L4lbError):
    """The server answered `ok: false`; the message is its error."""


Handler = Callable[[Mapping[str, Any]], Any]


@dataclass(frozen=True)
class Command:
    """A request handler and its description for `help`."""

    run: Handler
    help: str


@dataclass
class _Client:
    sock: socket.socket
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    closing: bool = False  # close once outbuf is sent


class ControlServer:
    """Serves `commands` on a unix stream socket at `path` (see the module docstring)."""

    def __init__(self, path: str | Path, commands: Mapping[str, Command]) -> None:
        self.path = Path(path)
        self.commands = dict(commands)
        self.commands.setdefault("help", Command(self._help, "list the commands"))
        self.uid = os.geteuid()
        self.requests = 0
        """Requests answered (refusals included)."""
        self.refused = 0
        """Requests answered with ok: false."""
        self.clients: dict[int, _Client] = {}
        self.listener = _listen(self.path)

    def fds(self) -> list[int]:
        """The listening socket and every connection: poll these for input."""
        return [self.listener.fileno(), *self.clients]

    def service(self) -> int:
        """Accept, read, answer and flush what can be done now, without blocking; returns
        the number of requests answered."""
        answered = 0
        self._accept()
        for fd, client in list(self.clients.items()):
            try:
                if not client.closing:
                    answered += self._read(client)
                self._flush(client)
            except OSError:
                self._drop(fd)
                continue
            if client.closing and not client.outbuf:
                self._drop(fd)
        return answered

    def close(self) -> None:
        for fd in list(self.clients):
            self._drop(fd)
        self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def handle(self, line: bytes) -> dict[str, Any]:
        """One request line to its reply object (also the unit tests' entry)."""
        self.requests += 1
        try:
            req = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            return self._refuse(f"request is not JSON: {exc}")
        if not isinstance(req, dict):
            return self._refuse("request must be a JSON object with a string 'cmd'")
        cmd = req.get("cmd")
        if not isinstance(cmd, str):
            return self._refuse("request has no string 'cmd'")
        command = self.commands.get(cmd)
        if command is None:
            return self._refuse(f"unknown command {cmd!r} (commands: {', '.join(self.commands)})")
        try:
            return {"ok": True, "result": command.run(req)}
        except CommandError as exc:
            return self._refuse(f"{cmd}: {exc}")

    def _help(self, req: Mapping[str, Any]) -> dict[str, str]:
        return {name: c.help for name, c in sorted(self.commands.items())}

    def _refuse(self, why: str) -> dict[str, Any]:
        self.refused += 1
        return {"ok": False, "error": why}

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            sock.setblocking(False)
            client = _Client(sock)
            uid = peer_uid(sock)
            if len(self.clients) >= MAX_CLIENTS:
                client.outbuf += _line({"ok": False, "error": "too many connections; retry"})
                client.closing = True
            elif uid != self.uid:
                self.refused += 1
                who = f"uid {uid}" if uid is not None else "an unknown caller"
                msg = f"permission denied: the control channel is for root only, not {who}"
                client.outbuf += _line({"ok": False, "error": msg})
                client.closing = True
            self.clients[sock.fileno()] = client
            with contextlib.suppress(OSError):
                self._flush(client)

    def _read(self, client: _Client) -> int:
        answered = 0
        while True:
            try:
                data = client.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            if not data:  # the caller closed its side: answer what is complete, then close
                client.closing = True
                break
            client.inbuf += data
            if len(client.inbuf) > MAX_LINE and b"\n" not in client.inbuf:
                client.outbuf += _line(self._refuse(f"request longer than {MAX_LINE} bytes"))
                client.inbuf.clear()
                client.closing = True
                break
        while not client.closing or b"\n" in client.inbuf:
            end = client.inbuf.find(b"\n")
            if end < 0:
                break
            line = bytes(client.inbuf[:end])
            del client.inbuf[: end + 1]
            if line.strip():
                client.outbuf += _line(self.handle(line))
                answered += 1
        if len(client.outbuf) > MAX_PENDING:
            raise OSError(errno.ENOBUFS, "client does not read its replies")
        return answered

    def _flush(self, client: _Client) -> None:
        while client.outbuf:
            try:
                sent = client.sock.send(client.outbuf)
            except (BlockingIOError, InterruptedError):
                return
            del client.outbuf[:sent]

    def _drop(self, fd: int) -> None:
        client = self.clients.pop(fd, None)
        if client is not None:
            client.sock.close()


def peer_uid(sock: socket.socket) -> int | None:
    """The connecting process's uid (SO_PEERCRED), or None if the kernel does not say."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    return _UCRED.unpack(raw)[1]


def _line(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def _listen(path: Path) -> socket.socket:
    """Bind `path` (mode 0600), replacing a stale socket file of a process that died; refuse
    when a live server answers there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(0.5)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # stale: its server is gone
        except OSError as exc:
            raise L4lbError(
                f"control socket {path}: cannot check the existing file: {exc}"
            ) from exc
        else:
            raise L4lbError(f"control socket {path}: another process already serves it")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the file is born 0600: no window where others could connect
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise L4lbError(f"control socket {path}: {exc.strerror or exc}") from exc
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(16)
    sock.setblocking(False)
    return sock


def request(path: str | Path, cmd: str, timeout: float = 2.0, **args: Any) -> Any:
    """Send one request and return its result; RequestRefused carries the server's error,
    ControlUnavailable says why nobody answered."""
    return requests(path, [{"cmd": cmd, **args}], timeout)[0]


def requests(
    path: str | Path, reqs: Sequence[Mapping[str, Any]], timeout: float = 2.0
) -> list[Any]:
    """Send several requests on one connection; the results in order (the first refusal
    raises RequestRefused, after the earlier ones were applied)."""
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise ControlUnavailable(
                f"{path}: no control socket (is the process running?)"
            ) from None
        except PermissionError:
            raise ControlUnavailable(f"{path}: permission denied (root only)") from None
        except OSError as exc:
            raise ControlUnavailable(f"{path}: {exc.strerror or exc}") from None
        # A server that refuses the caller answers at once and closes: its reply is read below.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(b"".join(_line(dict(r)) for r in reqs))
        buf = bytearray()
        results: list[Any] = []
        while len(results) < len(reqs):
            end = buf.find(b"\n")
            if end < 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ControlUnavailable(f"{path}: no reply within {timeout:g} s")
                sock.settimeout(left)
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    raise ControlUnavailable(f"{path}: no reply within {timeout:g} s") from None
                except OSError as exc:
                    raise ControlUnavailable(f"{path}: {exc.strerror or exc}") from None
                if not data:
                    raise ControlUnavailable(f"{path}: connection closed before the reply")
                buf += data
                continue
            reply = json.loads(buf[:end])
            del buf[: end + 1]
            if not reply.get("ok"):
                raise RequestRefused(str(reply.get("error", "refused")))
            results.append(reply.get("result"))
        return results
    finally:
        sock.close()


# --- argument checks for handlers: each raises CommandError naming the argument -------------


def arg_str(req: Mapping[str, Any], name: str) -> str:
    value = req.get(name)
    if not isinstance(value, str) or not value:
        raise CommandError(f"argument {name!r} must be a non-empty string")
    return value


def arg_int(req: Mapping[str, Any], name: str, lo: int, hi: int, default: int | None = None) -> int:
    value = req.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise CommandError(f"argument {name!r} must be an integer {lo}..{hi}, not {value!r}")
    return value


def arg_bool(req: Mapping[str, Any], name: str, default: bool = False) -> bool:
    value = req.get(name, default)
    if not isinstance(value, bool):
        raise CommandError(f"argument {name!r} must be true or false, not {value!r}")
    return value


def arg_ipv4(req: Mapping[str, Any], name: str) -> str:
    """An IPv4 address argument, as its canonical text."""
    value = arg_str(req, name)
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise CommandError(f"argument {name!r} must be an IPv4 address, not {value!r}") from None


def only_args(req: Mapping[str, Any], *names: str) -> None:
    """Refuse arguments a command does not take (a typo must not pass for a default)."""
    unknown = sorted(set(req) - {"cmd", *names})
    if unknown:
        known = ", ".join(names) or "none"
        raise CommandError(f"unknown argument(s) {', '.join(map(repr, unknown))} (known: {known})")


def arg_float(
    req: Mapping[str, Any], name: str, lo: float, hi: float, default: float | None = None
) -> float:
    value = req.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise CommandError(f"argument {name!r} must be a number {lo:g}..{hi:g}, not {value!r}")
    return float(value)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m l4lb.control SOCKET CMD [NAME=JSON ...]`: one request by hand."""
    ap = argparse.ArgumentParser(
        prog="python -m l4lb.control",
        description="Send one request to an LB's or agent's control socket and print the result.",
    )
    ap.add_argument("socket", help="e.g. /run/l4lb/lb-h1-eth0.ctl")
    ap.add_argument("cmd", help="e.g. show, help")
    ap.add_argument("args", nargs="*", metavar="NAME=VALUE", help="arguments (VALUE as JSON)")
    ap.add_argument("--timeout", type=float, default=2.0)
    a = ap.parse_args(argv)
    kwargs: dict[str, Any] = {}
    for item in a.args:
        name, sep, value = item.partition("=")
        if not sep or not name:
            ap.error(f"argument {item!r}: expected NAME=VALUE")
        try:
            kwargs[name] = json.loads(value)
        except ValueError:
            kwargs[name] = value  # a bare word: a string
    try:
        result = request(a.socket, a.cmd, a.timeout, **kwargs)
    except (ControlUnavailable, RequestRefused) as exc:
        print(f"l4lb.control: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
