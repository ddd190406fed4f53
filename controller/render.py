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

The LBs' backend set comes from the cluster's record (controller.backend_record) when there is
one, so an LB started after a `backend` command starts with the current set; the deployment's
otherwise. Every host that can be a backend (all but the LBs) gets an agent configuration,
so a backend added later needs nothing but its agent and server started.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from agent.config import AgentConfig
from controller import targets
from controller.backend_record import ClusterRecord, backend_hosts, read_record
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


def lb_config(
    dep: Deployment,
    host: str,
    state_dir: Path = STATE_DIR,
    record: ClusterRecord | None = None,
) -> LbConfig:
    """LB `host`'s configuration: the backend set of `record` if given, else the deployment's."""
    topo = dep.topology
    cfg = LbConfig(
        iface=topo.host_interface(host).name,
        vips=tuple((dep.vip, port) for port in dep.vip_ports) or ((dep.vip, None),),
        backends=dep.backend_ips(),
        hash_seed=dep.hash_seed,
        names=tuple((topo.host_ip(h), h) for h in topo.hosts()),
        stats_file=str(stats_path(state_dir, "lb", host)),
        stats_interval=STATS_INTERVAL,
        control_socket=str(control_path(state_dir, "lb", host)),
        health=dep.health,
        # the LB holds its announcement: BIRD on its host exports the VIP while it answers
        announce=True,
        bfd_interval_ms=dep.bgp.bfd_interval_ms,
        bfd_multiplier=dep.bgp.bfd_multiplier,
        workers=dep.lb_workers,
        **dict(dep.conn),  # type: ignore[arg-type]
    )
    return cfg if record is None else with_record(cfg, record)


def with_record(cfg: LbConfig, record: ClusterRecord) -> LbConfig:
    """An LB configuration with the record's backend set (weights, administrative states)."""
    return dataclasses.replace(
        cfg, backends=record.lb_backends(), backends_down=record.lb_backends_down()
    )


def rewrite_lb_configs(state_dir: Path, record: ClusterRecord, ifaces: dict[str, str]) -> None:
    """Put the record's backend set into every LB's rendered file (`ifaces`: LB host -> its
    interface), so an LB restarted from it starts with the set the others run."""
    for host in record.load_balancers:
        path = config_path(state_dir, "lb", ifaces[host])
        if path.exists():
            cfg = with_record(cfgfile.load(LbConfig, path), record)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(cfgfile.dump(cfg))
            tmp.replace(path)


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


def render(
    dep: Deployment, state_dir: Path = STATE_DIR, record: ClusterRecord | None = None
) -> dict[Path, str]:
    """Every process's configuration file, the exporters' and monitor.json: path -> text."""
    topo = dep.topology
    files: dict[Path, str] = {}
    for host in dep.load_balancers:
        iface = topo.host_interface(host).name
        lb = lb_config(dep, host, state_dir, record)
        files[config_path(state_dir, "lb", iface)] = cfgfile.dump(lb)
    for host in backend_hosts(topo.hosts(), dep.load_balancers):
        iface = topo.host_interface(host).name
        files[config_path(state_dir, "agent", iface)] = cfgfile.dump(
            agent_config(dep, host, state_dir)
        )
    agents = backend_hosts(topo.hosts(), dep.load_balancers)  # every host that may serve
    for kind, hosts in (("lb", dep.load_balancers), ("agent", agents)):
        for host in hosts:
            cfg = exporter_config(dep, host, kind, state_dir)
            files[exporter_path(state_dir, kind, host)] = cfgfile.dump(cfg)
    files[targets.path(state_dir)] = cfgfile.dump(targets.build(dep, state_dir))
    return files


def write(dep: Deployment, state_dir: Path = STATE_DIR) -> list[Path]:
    """Render every configuration file into the state directory (the LBs' backend set from
    the record there, if any); returns their paths."""
    files = render(dep, state_dir, read_record(state_dir))
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return list(files)
