"""One sample of the running fat tree, read from the root namespace: every node's interface
counters (/proc/<node shell>/net/dev, no exec) and every exporter's /metrics, fetched from
inside its host's namespace (controller.nodenet), in parallel."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from controller import netstate, nodenet
from controller.dashboard.model import Metrics, Sample, parse_metrics
from controller.targets import MonitorConfig, Target
from l4lb import procnet

SCRAPE_TIMEOUT = 1.0


def node_pids(state_dir: Path) -> dict[str, int]:
    """The running network's node shells (only those whose start time still matches)."""
    st = netstate.read_state(state_dir)
    if st is None:
        return {}
    return {n: r.pid for n, r in st.nodes.items() if netstate.is_running(r.pid, r.start_time)}


class Sampler:
    def __init__(self, cfg: MonitorConfig, state_dir: Path) -> None:
        self.cfg = cfg
        self.state_dir = state_dir
        self.pool = ThreadPoolExecutor(max_workers=max(1, len(cfg.targets)))
        self._pids: dict[str, int] = {}
        self._pids_at = 0.0

    def pids(self, now: float) -> dict[str, int]:
        if now - self._pids_at > 2.0 or not self._pids:  # the state file changes rarely
            self._pids, self._pids_at = node_pids(self.state_dir), now
        return self._pids

    def scrape(self, t: Target) -> Metrics:
        body = nodenet.http_get(t.netns, t.addr, t.port, "/metrics", SCRAPE_TIMEOUT)
        return parse_metrics(body.decode())

    def sample(self) -> Sample:
        now = time.monotonic()
        futures = {t.host: self.pool.submit(self.scrape, t) for t in self.cfg.targets}
        s = Sample(time=now, netdev={}, metrics={})
        for node, pid in self.pids(now).items():
            try:
                s.netdev[node] = procnet.net_dev(pid)
            except OSError as exc:
                s.errors[node] = f"interface counters: {exc.strerror or exc}"
        for host, fut in futures.items():
            try:
                s.metrics[host] = fut.result()
            except (OSError, ValueError) as exc:
                s.metrics[host] = None
                s.errors[host] = f"exporter: {exc}"
        if not s.netdev:
            s.errors["network"] = "no network is up (python -m controller up --services)"
        return s

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
