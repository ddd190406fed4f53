"""What one scrape costs: a real `fastpath.lb` and its exporter in a throwaway namespace, N
scrapes of /metrics from inside it; prints wall time, the exporter's and the LB's CPU per scrape
(utime + stime from /proc; the exporter's `nft -j` child is not included) and the text's size.
`sudo .venv/bin/python -m bench.scrape_cost [--scrapes N]`"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from bench.netns import PY, Netns, NsProc
from controller import nodenet
from controller.exporter.config import ExporterConfig
from controller.services import proc_cpu_seconds
from fastpath.config import LbConfig
from l4lb import cfgfile

LB_IP = "10.90.0.1"


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scrape_cost", description=__doc__)
    ap.add_argument("--scrapes", type=int, default=100)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="l4lb-scrape-cost-") as tmpdir, Netns() as bed:
        tmp = Path(tmpdir)
        lbns, peer = bed.add("l"), bed.add("p")
        bed.veth(
            lbns, f"sl{bed.tag}", peer, f"sp{bed.tag}", ip_a=f"{LB_IP}/24", ip_b="10.90.0.2/24"
        )
        lb = LbConfig(
            iface=f"sl{bed.tag}", vips=(("20.0.0.1", 80),), backends=(("10.90.0.2", 1),),
            next_hop_mac="02:00:00:00:00:01", stats_file=str(tmp / "lb-stats.json"),
            control_socket=str(tmp / "lb.ctl"),
        )  # fmt: skip
        (tmp / "lb.json").write_text(cfgfile.dump(lb))
        exp = ExporterConfig("lb", str(tmp / "lb.json"), LB_IP)
        (tmp / "exporter.json").write_text(cfgfile.dump(exp))
        procs = [
            NsProc(lbns, [PY, "-m", "fastpath.lb", lb.iface, "--config", str(tmp / "lb.json")])
        ]
        try:
            procs[0].wait_event()
            procs.append(NsProc(lbns, [PY, "-m", "controller.exporter", "--config",
                                       str(tmp / "exporter.json")]))  # fmt: skip
            netns = f"/run/netns/{lbns}"
            deadline = time.monotonic() + 20
            while True:  # ready, and warm
                try:
                    nodenet.http_get(netns, LB_IP, exp.port, "/metrics")
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            pids = [p.proc.pid for p in procs]
            cpu0 = [proc_cpu_seconds(pid) or 0.0 for pid in pids]
            t0 = time.monotonic()
            for _ in range(a.scrapes):
                body = nodenet.http_get(netns, LB_IP, exp.port, "/metrics")
            wall = time.monotonic() - t0
            cpu1 = [proc_cpu_seconds(pid) or 0.0 for pid in pids]
        finally:
            for p in reversed(procs):
                p.stop()
    lb_ms, exp_ms = ((c1 - c0) / a.scrapes * 1e3 for c0, c1 in zip(cpu0, cpu1, strict=True))
    print(json.dumps({
        "scrapes": a.scrapes, "wall_ms_per_scrape": round(wall / a.scrapes * 1e3, 2),
        "exporter_cpu_ms_per_scrape": round(exp_ms, 2), "lb_cpu_ms_per_scrape": round(lb_ms, 2),
        "bytes": len(body),
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
