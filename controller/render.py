"""Each data-plane process's configuration, rendered from the deployment.

The controller is the only reader of the deployment and the topology: it renders, for every
load balancer, a `fastpath.config.LbConfig` and, for every backend, an
`agent.config.AgentConfig`, into `<state dir>/config/lb-<iface>.json` and
`agent-<iface>.json`, and starts each process with `--config` on its file (controller.services).
`python -m controller up` renders them as the network comes up (so an LB or agent started by
hand in a node finds its file by default) and `down` removes them with the network. Beside them:
each LB's and agent's exporter configuration (controller.exporter.config.ExporterConfig, naming the
process's file) and what the monitoring reaches (controller.targets, `monitor.json`).

Rendering builds the dataclasses, so every value is checked by the data planes' own rules
(controller.deployment calls this at load time: a bad deployment is refused before anything
starts, with a message naming the field).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from agent.config import AgentConfig
from controller import targets
from controller.exporter.config import ExporterConfig
from controller.netstate import STATE_DIR
from fastpath.config import LbConfig
from l4lb import cfgfile

if TYPE_CHECKING:
    from controller.deployment import Deployment

CONFIG_DIR = "config"
STATS_INTERVAL = 0.5
"""Seconds between the LBs' and agents' stats-file rewrites when the controller runs them."""


def config_path(state_dir: Path, kind: str, iface: str) -> Path:
    """Where the configuration of a process of `kind` ("lb", "agent") on `iface` is rendered."""
    return state_dir / CONFIG_DIR / f"{kind}-{iface}.json"


def stats_path(state_dir: Path, kind: str, host: str) -> Path:
    return state_dir / f"{kind}-{host}.json"


def control_path(state_dir: Path, kind: str, host: str) -> Path:
    return state_dir / f"{kind}-{host}.ctl"


def lb_config(dep: Deployment, host: str, state_dir: Path = STATE_DIR) -> LbConfig:
    topo = dep.topology
    hosts = [*dep.load_balancers, *(h for h, _ in dep.backends)]
    return LbConfig(
        iface=topo.host_interface(host).name,
        vips=tuple((dep.vip, port) for port in dep.vip_ports) or ((dep.vip, None),),
        backends=dep.backend_ips(),
        hash_seed=dep.hash_seed,
        names=tuple((topo.host_ip(h), h) for h in hosts),
        stats_file=str(stats_path(state_dir, "lb", host)),
        stats_interval=STATS_INTERVAL,
        control_socket=str(control_path(state_dir, "lb", host)),
        health=dep.health,
    )


def agent_config(dep: Deployment, host: str, state_dir: Path = STATE_DIR) -> AgentConfig:
    topo = dep.topology
    return AgentConfig(
        iface=topo.host_interface(host).name,
        vips=(dep.vip,),
        allowed_lbs=tuple(topo.host_ip(h) for h in dep.load_balancers),
        server_mss=dep.server_mss,
        mtu=dep.mtu,
        stats_file=str(stats_path(state_dir, "agent", host)),
        stats_interval=STATS_INTERVAL,
        control_socket=str(control_path(state_dir, "agent", host)),
        health=dep.health,
    )


def exporter_path(state_dir: Path, kind: str, host: str) -> Path:
    return state_dir / CONFIG_DIR / f"exporter-{kind}-{host}.json"


def exporter_config(dep: Deployment, host: str, kind: str, state_dir: Path) -> ExporterConfig:
    """The exporter beside the LB (kind "lb") or agent ("agent") on `host`."""
    iface = dep.topology.host_interface(host).name
    return ExporterConfig(
        kind=kind,
        process_config=str(config_path(state_dir, kind, iface)),
        listen=dep.topology.host_ip(host),
        port=dep.metrics_port,
        server_ports=dep.vip_ports if kind == "agent" else (),
    )


def render(dep: Deployment, state_dir: Path = STATE_DIR) -> dict[Path, str]:
    """Every process's configuration file, the exporters' and monitor.json: path -> text."""
    topo = dep.topology
    files: dict[Path, str] = {}
    for host in dep.load_balancers:
        iface = topo.host_interface(host).name
        files[config_path(state_dir, "lb", iface)] = cfgfile.dump(lb_config(dep, host, state_dir))
    for host, _ in dep.backends:
        iface = topo.host_interface(host).name
        files[config_path(state_dir, "agent", iface)] = cfgfile.dump(
            agent_config(dep, host, state_dir)
        )
    for kind, hosts in (("lb", dep.load_balancers), ("agent", [h for h, _ in dep.backends])):
        for host in hosts:
            cfg = exporter_config(dep, host, kind, state_dir)
            files[exporter_path(state_dir, kind, host)] = cfgfile.dump(cfg)
    files[targets.path(state_dir)] = cfgfile.dump(targets.build(dep, state_dir))
    return files


def write(dep: Deployment, state_dir: Path = STATE_DIR) -> list[Path]:
    """Render every configuration file into the state directory; returns their paths."""
    files = render(dep, state_dir)
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return list(files)
