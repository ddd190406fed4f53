"""TCP connections from the root namespace into a node's network namespace, without a route.

The root namespace has no route to the fabric's addresses (and must not get one: the machine is
shared). A socket, though, belongs to the namespace its creating thread was in when it made it:
so the calling thread enters the node's namespace (setns(2) on /proc/PID/ns/net, or on the pin
controller.netstate keeps of it, /run/l4lb/ns/NODE), makes the socket, and goes back to its own
before it connects; the connection then runs inside the node, as if started there (the
scrape proxy and the dashboard reach every exporter this way). setns with CLONE_NEWNET changes
the calling thread only, so other threads never see the switch.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import http.client
import os
import socket
from pathlib import Path

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class NodeNetError(OSError):
    """The namespace cannot be entered, or nobody answers inside it."""


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NodeNetError(err, f"setns into {what}: {os.strerror(err)}")


def socket_in(netns: str | Path) -> socket.socket:
    """A TCP socket made inside the network namespace `netns` (a path to a namespace file)."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            target = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise NodeNetError(exc.errno, f"{netns}: {exc.strerror}") from None
        try:
            _setns(target, str(netns))
            try:
                return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            finally:
                _setns(home, "this thread's own namespace")
        finally:
            os.close(target)
    finally:
        os.close(home)


def connect(netns: str | Path, addr: tuple[str, int], timeout: float) -> socket.socket:
    """A TCP connection to `addr` from inside `netns`."""
    sock = socket_in(netns)
    sock.settimeout(timeout)
    try:
        sock.connect(addr)
    except OSError as exc:
        sock.close()
        raise NodeNetError(exc.errno or 0, f"{addr[0]}:{addr[1]} in {netns}: {exc}") from None
    return sock


def http_get(netns: str | Path, host: str, port: int, path: str, timeout: float = 2.0) -> bytes:
    """The body of GET http://host:port/path fetched inside `netns` (NodeNetError unless 200)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    conn.sock = connect(netns, (host, port), timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
    except (OSError, http.client.HTTPException) as exc:
        raise NodeNetError(0, f"GET http://{host}:{port}{path} in {netns}: {exc}") from None
    finally:
        conn.close()
    if resp.status != 200:
        raise NodeNetError(0, f"GET http://{host}:{port}{path} in {netns}: HTTP {resp.status}")
    return body
