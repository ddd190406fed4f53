"""The forward proxy Prometheus scrapes through: `python -m controller.scrapeproxy`.

Prometheus runs in the root namespace (its UI and API on 127.0.0.1, where an operator's browser
and the tests are), which has no route to the hosts' addresses and must not get one (the
machine is shared). Its scrape jobs name this proxy as `proxy_url`, so each scrape arrives here
as `GET http://10.1.1.2:9180/metrics`; the proxy looks the address up among the exporters of
`monitor.json` (controller.targets), opens the connection from inside that host's namespace
(controller.nodenet: a socket made there by setns from the handling thread) and relays the
request and the answer. Nothing else passes: a method other than GET is refused with 405, an
address that is no exporter of ours with 403, an exporter that does not answer with 502; each
is counted (stderr, once per target and failing stretch). It listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import socketserver
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit

from controller import netstate, nodenet, targets
from controller.targets import MonitorConfig
from l4lb.errors import ConfigError

DEFAULT_PORT = 9189
MAX_HEAD = 16384
TIMEOUT = 3.0
HOP_BY_HOP = {"connection", "proxy-connection", "keep-alive", "proxy-authorization", "te"}


class ProxyRefused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def parse_request(head: bytes, cfg: MonitorConfig) -> tuple[targets.Target, bytes]:
    """A proxy request's head -> the exporter it is for and the head to send it (origin-form,
    hop-by-hop headers dropped, `Connection: close`). ProxyRefused says why not."""
    try:
        text = head.decode("latin-1")
        line, *headers = text.split("\r\n")
        method, url, version = line.split(" ")
    except ValueError:
        raise ProxyRefused(400, "malformed request line") from None
    if method != "GET":
        raise ProxyRefused(405, f"only GET passes, not {method}")
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname or parts.port is None:
        raise ProxyRefused(400, f"need an absolute http://host:port/ URL, not {url!r}")
    target = cfg.target(f"{parts.hostname}:{parts.port}")
    if target is None:
        raise ProxyRefused(403, f"{parts.hostname}:{parts.port} is no exporter of this network")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    kept = [h for h in headers if h and h.split(":", 1)[0].strip().lower() not in HOP_BY_HOP]
    out = "\r\n".join([f"GET {path} {version}", *kept, "Connection: close", "", ""])
    return target, out.encode("latin-1")


class Handler(socketserver.BaseRequestHandler):
    server: ProxyServer

    def handle(self) -> None:
        client: socket.socket = self.request
        client.settimeout(TIMEOUT)
        head = bytearray()
        try:
            while b"\r\n\r\n" not in head:
                data = client.recv(4096)
                if not data:
                    return
                head += data
                if len(head) > MAX_HEAD:
                    raise ProxyRefused(431, "request head too large")
            raw, _, _body = bytes(head).partition(b"\r\n\r\n")
            target, request = parse_request(raw, self.server.config)
            try:
                upstream = nodenet.connect(target.netns, (target.addr, target.port), TIMEOUT)
            except OSError as exc:
                raise ProxyRefused(502, f"{target.host}: {exc}") from None
            with upstream:
                upstream.sendall(request)
                while data := upstream.recv(65536):
                    client.sendall(data)
            self.server.ok(target.address)
        except ProxyRefused as exc:
            self.server.refused(exc)
            body = f"{exc}\n".encode()
            reply = f"HTTP/1.1 {exc.status} Refused\r\nContent-Length: {len(body)}\r\n"
            reply += "Content-Type: text/plain\r\nConnection: close\r\n\r\n"
            with contextlib.suppress(OSError):
                client.sendall(reply.encode() + body)
        except OSError:
            pass  # the client went away


class ProxyServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], config: MonitorConfig) -> None:
        super().__init__(addr, Handler)
        self.config = config
        self.lock = threading.Lock()
        self.failing: set[str] = set()
        self.counts = {"ok": 0, "refused": 0}

    def ok(self, address: str) -> None:
        with self.lock:
            self.counts["ok"] += 1
            self.failing.discard(address)

    def refused(self, exc: ProxyRefused) -> None:
        with self.lock:
            self.counts["refused"] += 1
            key = f"{exc.status}:{str(exc).split(':')[0]}"
            if key in self.failing:
                return
            self.failing.add(key)
        print(f"controller.scrapeproxy: {exc.status} {exc} (counted)", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m controller.scrapeproxy", description=__doc__)
    ap.add_argument("--port", type=int, default=DEFAULT_PORT, help="on 127.0.0.1 (%(default)s)")
    ap.add_argument("--state-dir", type=Path, default=netstate.STATE_DIR)
    a = ap.parse_args(argv)
    try:
        cfg = targets.load(a.state_dir)
    except ConfigError as exc:
        print(f"controller.scrapeproxy: {exc} (is a network up?)", file=sys.stderr)
        return 2
    try:
        server = ProxyServer(("127.0.0.1", a.port), cfg)
    except OSError as exc:
        print(f"controller.scrapeproxy: cannot listen on 127.0.0.1:{a.port}: {exc}",
              file=sys.stderr)  # fmt: skip
        return 1

    def stop(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"controller.scrapeproxy: on 127.0.0.1:{a.port}, {len(cfg.targets)} exporters",
          file=sys.stderr, flush=True)  # fmt: skip
    with server:
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
