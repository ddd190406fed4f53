"""The status page's server: `python -m controller dashboard [--port P]`.

Serves, on 127.0.0.1 only and read-only (GET and HEAD; anything else 405): `/` the page,
`/dashboard.js` and `/dashboard.css` (shipped in static/, no library: it works with no
internet), `/api/topology` (nodes, links, roles; once per page load) and `/api/state` (the latest
rates and their history, controller.dashboard.model). A thread samples the fabric every
`--interval` seconds (0.5 by default; the page asks every 0.5 s), so however many pages are
open, each exporter is asked twice a second. Without a network it says so and keeps trying.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any

from controller import netstate, targets
from controller.dashboard.model import Model, topology
from controller.dashboard.sample import Sampler
from l4lb.errors import ConfigError

STATIC = Path(__file__).resolve().parent / "static"
PAGES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}
DEFAULT_PORT = 8145
INTERVAL = 0.5


class Dashboard:
    """The latest state, kept fresh by a sampling thread."""

    def __init__(self, state_dir: Path, interval: float) -> None:
        self.state_dir = state_dir
        self.interval = interval
        self.lock = threading.Lock()
        self.state: bytes = json.dumps({"errors": {"dashboard": "starting"}}).encode()
        self.topology: bytes = b"{}"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def _publish(self, state: dict[str, Any], topo: dict[str, Any] | None = None) -> None:
        data = json.dumps(state, separators=(",", ":")).encode()
        with self.lock:
            self.state = data
            if topo is not None:
                self.topology = json.dumps(topo).encode()

    def _run(self) -> None:
        sampler: Sampler | None = None
        model: Model | None = None
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                if sampler is None:
                    cfg = targets.load(self.state_dir)
                    sampler, model = Sampler(cfg, self.state_dir), Model(cfg)
                    self._publish({"errors": {}}, topology(cfg))
                assert model is not None
                self._publish(model.update(sampler.sample()))
            except ConfigError as exc:
                self._publish({"errors": {"network": f"no network is up ({exc})"}})
            except Exception as exc:  # a bug: say it on the page and in the log, keep going
                print(f"controller.dashboard: sampling failed: {exc!r}", file=sys.stderr)
                self._publish({"errors": {"dashboard": f"sampling failed: {exc!r}"}})
                if sampler is not None:
                    sampler.close()
                sampler = model = None
            self.stop.wait(max(0.05, self.interval - (time.monotonic() - started)))
        if sampler is not None:
            sampler.close()


def handler(dash: Dashboard) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "l4lb-dashboard"

        def _send(self, status: int, body: bytes, ctype: str, head: bool = False) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def do_GET(self, head: bool = False) -> None:
            path = self.path.split("?", 1)[0]
            if path in PAGES:
                name, ctype = PAGES[path]
                self._send(200, (STATIC / name).read_bytes(), ctype, head)
            elif path in ("/api/state", "/api/topology"):
                with dash.lock:
                    body = dash.state if path == "/api/state" else dash.topology
                self._send(200, body, "application/json", head)
            else:
                self._send(404, b"not found\n", "text/plain", head)

        def do_HEAD(self) -> None:
            self.do_GET(head=True)

        def _read_only(self) -> None:
            self._send(405, b"read-only: GET and HEAD only\n", "text/plain")

        do_POST = do_PUT = do_DELETE = do_PATCH = _read_only

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per request every half second would drown the log

    return Handler


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m controller dashboard", description=__doc__)
    add_arguments(ap)
    return run(ap.parse_args(argv))


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--port", type=int, default=DEFAULT_PORT, help="on 127.0.0.1 (%(default)s)")
    ap.add_argument("--interval", type=float, default=INTERVAL, help="seconds between samples")
    ap.add_argument("--state-dir", type=Path, default=netstate.STATE_DIR, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    if not 1 <= args.port <= 65535:
        print(f"controller dashboard: --port {args.port}: must be 1..65535", file=sys.stderr)
        return 2
    if not 0.1 <= args.interval <= 10:
        print("controller dashboard: --interval must be 0.1..10 seconds", file=sys.stderr)
        return 2
    dash = Dashboard(args.state_dir, args.interval)
    try:
        server = ThreadingHTTPServer(("127.0.0.1", args.port), handler(dash))
    except OSError as exc:
        print(f"controller dashboard: cannot listen on 127.0.0.1:{args.port}: {exc}",
              file=sys.stderr)  # fmt: skip
        return 1
    server.daemon_threads = True

    def stop(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    dash.thread.start()
    print(f"controller dashboard: http://127.0.0.1:{args.port}/", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        dash.stop.set()
        dash.thread.join(5)
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
