"""The cluster's backend set now, recorded in the state directory.

`<state dir>/config/backends.json` is written when the fastpath services start (from the
deployment) and after every cluster change that every LB applied (controller.backend_cmd), so
it is always the set the LBs run with. controller.render renders each LB's configuration from
it when it exists, so an LB (re)started later starts with the current set, not the
deployment file's. It lives with the rendered configurations: `down` removes it with them,
and `services.stop` removes it (the next start begins from its deployment again).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from l4lb import cfgfile
from l4lb.errors import ConfigError

if TYPE_CHECKING:
    from controller.deployment import Deployment

RECORD = "config/backends.json"


@dataclass(frozen=True)
class BackendEntry:
    """One backend of the cluster."""

    host: str
    ip: str
    weight: int = 1
    admin: str = "up"
    """`up` or `down` (administratively)."""


@dataclass(frozen=True)
class ClusterRecord:
    """What the backend commands need to know of the running cluster, and its backend set."""

    vip: str
    ports: tuple[int, ...]
    load_balancers: tuple[str, ...]
    """Hosts running fastpath.lb: every change goes to all of them, or to none."""
    backends: tuple[BackendEntry, ...]
    updated: float = 0.0
    """Unix time of the last change recorded."""

    def entry(self, host: str) -> BackendEntry | None:
        return next((b for b in self.backends if b.host == host), None)

    def lb_backends(self) -> tuple[tuple[str, int], ...]:
        """LbConfig.backends of this set."""
        return tuple((b.ip, b.weight) for b in self.backends)

    def lb_backends_down(self) -> tuple[str, ...]:
        """LbConfig.backends_down of this set."""
        return tuple(b.ip for b in self.backends if b.admin == "down")


def backend_hosts(hosts: Iterable[str], load_balancers: Iterable[str]) -> list[str]:
    """The hosts that can be backends: every host but the load balancers (an LB host taps the
    VIP's traffic and must not forward, so it cannot serve it as well)."""
    lbs = set(load_balancers)
    return [h for h in hosts if h not in lbs]


def record_path(state_dir: Path) -> Path:
    return Path(state_dir) / RECORD


def from_deployment(dep: Deployment) -> ClusterRecord:
    topo = dep.topology
    return ClusterRecord(
        vip=dep.vip,
        ports=dep.vip_ports,
        load_balancers=dep.load_balancers,
        backends=tuple(BackendEntry(h, topo.host_ip(h), w) for h, w in dep.backends),
        updated=time.time(),
    )


def read_record(state_dir: Path) -> ClusterRecord | None:
    """The record, or None when there is none; ConfigError when it cannot be read."""
    path = record_path(state_dir)
    if not path.exists():
        return None
    return cfgfile.load(ClusterRecord, path)


def write_record(state_dir: Path, record: ClusterRecord) -> Path:
    """Replace the record atomically (a reader sees the old one or the new one)."""
    path = record_path(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        tmp.write_text(cfgfile.dump(record))
        tmp.replace(path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ConfigError(f"{path}: cannot write the backend record: {exc}") from exc
    return path


def remove_record(state_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        record_path(state_dir).unlink()
