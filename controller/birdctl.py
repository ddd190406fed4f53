"""A client of BIRD's control socket (what `birdc -s SOCKET` speaks), and parsers of its replies.

The socket is a unix socket file: reachable from the root namespace (and any other) for a BIRD
running in a mininet node, since the nodes share the mount namespace.

The protocol, as BIRD 2's `client/client.c` and `doc/reply_codes` describe it: on connect the
daemon greets with `0001 BIRD <version> ready.`; each command is one line; each reply line is
`CCCC-text` (a four-digit code, more lines follow), ` text` (a continuation of the previous
code) or `CCCC text` (the last line). Codes 0xxx are actions done, 1xxx and 2xxx table lines,
8xxx run-time errors (8001 "Network not found"), 9xxx parse errors.

The parsers expect the timestamps controller/bgp.py configures (`timeformat ... "%s.%3f"`: Unix
seconds with milliseconds, so no time zone is involved).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

Line = tuple[int, str]  # (reply code, text)


class BirdError(RuntimeError):
    """BIRD cannot be reached, or refused a command; the message says which socket and why."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


def parse_reply(lines: list[str]) -> tuple[list[Line], bool]:
    """Reply lines (without newlines) -> (code, text) pairs, and whether the reply is complete
    (its last line had a space after the code)."""
    out: list[Line] = []
    code = 0
    for raw in lines:
        if len(raw) >= 5 and raw[:4].isdigit() and raw[4] in " -":
            code = int(raw[:4])
            out.append((code, raw[5:]))
            if raw[4] == " ":
                return out, True
        elif raw.startswith(" "):
            out.append((code, raw[1:]))
        else:
            raise BirdError(f"unexpected line from BIRD: {raw!r}")
    return out, False


def query(path: str | Path, command: str, timeout: float = 2.0) -> list[Line]:
    """Run one command on the BIRD behind `path`; raises BirdError for an 8xxx/9xxx answer."""
    if "\n" in command:
        raise ValueError("one command, one line")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            f = s.makefile("rwb")
            _read_reply(f, path)  # the greeting
            f.write(command.encode() + b"\n")
            f.flush()
            lines = _read_reply(f, path)
    except FileNotFoundError:
        raise BirdError(f"{path}: no BIRD control socket (is BIRD running?)") from None
    except ConnectionRefusedError:
        raise BirdError(f"{path}: nothing listens on the control socket (BIRD died?)") from None
    except (OSError, TimeoutError) as e:
        raise BirdError(f"{path}: {e}") from None
    code, text = lines[-1]
    if code >= 8000:
        raise BirdError(f"{path}: `{command}`: {text} ({code})", code)
    return lines


def _read_reply(f: object, path: str | Path) -> list[Line]:
    raw: list[str] = []
    while True:
        data = f.readline()  # type: ignore[attr-defined]
        if not data:
            raise BirdError(f"{path}: BIRD closed the control socket mid-reply")
        raw.append(data.decode(errors="replace").rstrip("\n"))
        lines, done = parse_reply(raw)
        if done:
            return lines


# --- parsers of `show protocols`, `show bfd sessions`, `show route` ------------------------


@dataclass(frozen=True)
class Protocol:
    name: str
    proto: str  # "BGP", "Static", ...
    table: str
    state: str  # "up", "down", "start", ...
    since: float  # Unix seconds
    info: str  # BGP: "Established", "Active", "Connect", ...


def parse_protocols(lines: list[Line]) -> dict[str, Protocol]:
    """`show protocols`: the 1002 lines, by name."""
    out: dict[str, Protocol] = {}
    for code, text in lines:
        if code != 1002:
            continue
        parts = text.split(None, 5)
        if len(parts) < 5:
            continue
        name, proto, table, state, since = parts[:5]
        out[name] = Protocol(
            name, proto, table, state, _time(since), parts[5].strip() if len(parts) > 5 else ""
        )
    return out


@dataclass(frozen=True)
class BfdSession:
    address: str
    interface: str
    state: str  # "Up", "Down", "Init", "AdminDown"
    since: float
    interval: float  # seconds
    timeout: float  # seconds


def parse_bfd_sessions(lines: list[Line]) -> list[BfdSession]:
    """`show bfd sessions`: one per session line (under the `bfd1:` and header lines)."""
    out: list[BfdSession] = []
    for code, text in lines:
        if code != 1020:
            continue
        parts = text.split()
        if len(parts) != 6 or parts[0] == "IP":
            continue
        try:
            out.append(
                BfdSession(
                    parts[0], parts[1], parts[2], _time(parts[3]), float(parts[4]), float(parts[5])
                )
            )
        except ValueError:
            continue
    return out


@dataclass(frozen=True)
class Route:
    network: str
    protocol: str
    since: float
    primary: bool
    via: tuple[tuple[str, str], ...]  # (gateway, interface)


def parse_routes(lines: list[Line]) -> list[Route]:
    """`show route ...`: each network line with the `via` lines below it."""
    out: list[Route] = []
    net = ""
    for code, text in lines:
        if code != 1007 or text.startswith("Table "):
            continue
        if text.startswith("\t"):
            parts = text.split()
            if out and len(parts) >= 4 and parts[0] == "via" and parts[2] == "on":
                r = out[-1]
                via = (*r.via, (parts[1], parts[3]))
                out[-1] = Route(r.network, r.protocol, r.since, r.primary, via)
            continue
        # "20.0.0.1/32          unicast [vip 1796166481.124] * (200)" (the network may be
        # left out on further routes to the same one)
        head, _, rest = text.partition("[")
        words = head.split()
        if words and "/" in words[0]:
            net = words[0]
        inside, _, tail = rest.partition("]")
        bits = inside.split()
        if len(bits) < 2:
            continue
        out.append(Route(net, bits[0], _time(bits[1]), "*" in tail.split()[:1], ()))
    return out


def _time(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 0.0
