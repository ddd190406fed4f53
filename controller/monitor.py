"""The monitoring's processes and files, planned from the deployment (pure; controller.services
starts and stops them by PID with the others):

- an exporter beside every LB and agent (controller.exporter), inside its host, on the host's
  own address and the deployment's `metrics_port`;
- with `monitor`: the scrape proxy (controller.scrapeproxy) and Debian's `prometheus`, both in
  the root namespace on 127.0.0.1, Prometheus scraping every exporter every second through the
  proxy, its data under `<state dir>/prometheus/` (removed by `down`), its scrape configuration
  rendered here and its recording rules shipped in controller/prometheus/rules.yml;
- with `dashboard`: the live status page (controller.dashboard) on 127.0.0.1.

Why Prometheus runs in the root namespace and not in a node: its UI and HTTP API are then
where an operator's browser, the dashboard and the tests already are (127.0.0.1), and the
scrapes cross no fabric link (none of the monitoring's bytes shows in the links' loads on the
dashboard); the price is the proxy's relay, measured in the README.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from controller import render, targets
from controller.scrapeproxy import DEFAULT_PORT as PROXY_PORT

if TYPE_CHECKING:
    from controller.deployment import Deployment
    from controller.services import Service

RULES = Path(__file__).resolve().parent / "prometheus" / "rules.yml"
PROMETHEUS_PORT = 9090
DASHBOARD_PORT = 8145
SCRAPE_INTERVAL = "1s"


def prometheus_dir(state_dir: Path) -> Path:
    return state_dir / "prometheus"


def prometheus_config(cfg: targets.MonitorConfig, proxy_port: int = PROXY_PORT) -> str:
    """prometheus.yml: a job per kind ("lb", "agent"), every exporter a target labelled with
    its host, scraped every second through the proxy."""
    jobs = []
    for kind in ("lb", "agent"):
        entries = "".join(
            f'      - targets: ["{t.address}"]\n        labels: {{host: "{t.host}"}}\n'
            for t in cfg.targets
            if t.kind == kind
        )
        if entries:
            jobs.append(
                f"  - job_name: {kind}\n"
                f"    proxy_url: http://127.0.0.1:{proxy_port}\n"
                f"    static_configs:\n{entries}"
            )
    return (
        "# Rendered by controller/monitor.py from the deployment; do not edit.\n"
        "global:\n"
        f"  scrape_interval: {SCRAPE_INTERVAL}\n"
        "  scrape_timeout: 900ms\n"
        f"  evaluation_interval: {SCRAPE_INTERVAL}\n"
        f"rule_files:\n  - {RULES}\n"
        "scrape_configs:\n" + "".join(jobs)
    )


def exporter_service(dep: Deployment, kind: str, host: str, state_dir: Path, py: str) -> Service:
    """The exporter beside the LB (kind "lb") or agent ("agent") on `host`."""
    from controller.services import Service  # services.plan imports this module

    return Service(
        name=f"exporter-{kind}-{host}",
        node=host,
        role="exporter",
        argv=(
            py,
            "-m",
            "controller.exporter",
            "--config",
            str(render.exporter_path(state_dir, kind, host)),
        ),
        log=str(state_dir / "logs" / f"exporter-{kind}-{host}.log"),
        listen=(dep.topology.host_ip(host), dep.metrics_port),
    )


def services(
    dep: Deployment, state_dir: Path, py: str, prometheus: bool, dashboard: bool
) -> tuple[list[Service], dict[str, str], list[str]]:
    """(services, files to write, directories `stop` removes) of the monitoring."""
    from controller.services import Service  # services.plan imports this module

    logs = state_dir / "logs"
    out: list[Service] = []
    for kind, hosts in (("lb", dep.load_balancers), ("agent", [h for h, _ in dep.backends])):
        out += [exporter_service(dep, kind, host, state_dir, py) for host in hosts]
    files: dict[str, str] = {}
    dirs: list[str] = []
    if prometheus:
        pdir = prometheus_dir(state_dir)
        conf = pdir / "prometheus.yml"
        files[str(conf)] = prometheus_config(targets.build(dep, state_dir))
        dirs.append(str(pdir))
        out.append(
            Service(
                name="scrapeproxy",
                node="",
                role="monitor",
                argv=(py, "-m", "controller.scrapeproxy", "--state-dir", str(state_dir)),
                log=str(logs / "scrapeproxy.log"),
                listen=("127.0.0.1", PROXY_PORT),
            )
        )
        out.append(
            Service(
                name="prometheus",
                node="",
                role="monitor",
                argv=(
                    "prometheus",
                    f"--config.file={conf}",
                    f"--storage.tsdb.path={pdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}",
                    "--storage.tsdb.retention.time=1d",
                    "--log.level=warn",
                ),
                log=str(logs / "prometheus.log"),
                listen=("127.0.0.1", PROMETHEUS_PORT),
            )
        )
    if dashboard:
        out.append(
            Service(
                name="dashboard",
                node="",
                role="monitor",
                argv=(
                    *(py, "-m", "controller", "dashboard"),
                    *("--port", str(DASHBOARD_PORT), "--state-dir", str(state_dir)),
                ),
                log=str(logs / "dashboard.log"),
                listen=("127.0.0.1", DASHBOARD_PORT),
            )
        )
    return out, files, dirs
