"""The SYN flood on the fat tree with its services (root, mininet), at CI size: 60,000 SYNs
from h16 to VIP:80 while six rate-limited 10 MB downloads run through both LBs. The fabric's
source guard (BCP 38) lets h16 send from its own address only, so the flood varies the source
port (one host's worth of flows; bench/synflood.py floods from spoofed sources on a veth
testbed). h16's kernel would answer the servers' SYN-ACKs with RSTs: an nftables rule in h16
drops them while the flood runs, as a flooding host would. Asserts: every download completes
with the right sha256, each one's flow is still tracked as established on the LB that
carries it, and no LB's established table shrank or rotated during the flood."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from clients import Downloads, node_run
from fatnet import in_node

from bench.frames import pack_frames, syn_frames
from controller import render, services
from controller.deployment import REPO_ROOT as REPO
from controller.deployment import load_deployment
from controller.netstate import NetState
from l4lb.control import request

pytestmark = pytest.mark.fattree

DEP = load_deployment()
FLOODER = "h16"
CLIENTS = [c for c in DEP.clients() if c != FLOODER][:6]
SYNS = 60_000
NFT_TABLE = "lbb_synflood"  # h16's drop of its own RSTs, removed after the flood


def figure(what: str, value: str) -> None:
    print(f"\n[synflood] {what}: {value}")


def ctl(host: str) -> Path:
    return render.control_path(services.STATE_DIR, "lb", host)


def flows(host: str) -> dict[str, Any]:
    result: dict[str, Any] = request(ctl(host), "show", timeout=5.0)["flows"]
    return result


def test_downloads_survive_a_syn_flood_from_a_client(
    fattree_services: NetState, tmp_path: Path
) -> None:
    st = fattree_services
    topo = DEP.topology
    lb_of = {topo.host_ip(h): h for h in DEP.load_balancers}
    iface = topo.host_interface(FLOODER)
    gw = topo.gateway(FLOODER)
    src_mac = node_run(st, FLOODER, ["cat", f"/sys/class/net/{iface.name}/address"]).strip()
    gw_mac = node_run(st, iface.peer, ["cat", f"/sys/class/net/{gw.name}/address"]).strip()
    frames = tmp_path / "syns.bin"
    frames.write_bytes(
        pack_frames(syn_frames(SYNS, src_mac, gw_mac, DEP.vip, 80, f"{topo.host_ip(FLOODER)}/32"))
    )
    downloads = Downloads(st, DEP, [(c, None) for c in CLIENTS], tmp_path)
    try:
        time.sleep(1.0)
        figure("downloads per LB", str(downloads.map_flows()))
        before = {h: flows(h) for h in DEP.load_balancers}
        rule = f"add table ip {NFT_TABLE}; add chain ip {NFT_TABLE} out {{ type filter hook output priority 0; }}; add rule ip {NFT_TABLE} out ip daddr {DEP.vip} tcp flags rst drop"  # noqa: E501
        node_run(st, FLOODER, ["nft", rule])
        try:
            blast = subprocess.run(
                in_node(st.nodes[FLOODER].pid, [
                    sys.executable, "-m", "bench.blast", iface.name, "--frames", str(frames),
                    "--count", str(SYNS), "--duration", "60",
                ]),
                capture_output=True, text=True, timeout=90, check=True, cwd=REPO,
            )  # fmt: skip
            figure("SYNs sent", blast.stdout.strip())
            minimum = {h: f["established"] for h, f in before.items()}
            for _ in range(20):  # the LBs' rings drain: 2 s of samples
                for h in DEP.load_balancers:
                    minimum[h] = min(minimum[h], flows(h)["established"])
                time.sleep(0.1)
        finally:
            with contextlib.suppress(subprocess.SubprocessError):
                node_run(st, FLOODER, ["nft", "delete", "table", "ip", NFT_TABLE])
        after = {h: flows(h) for h in DEP.load_balancers}
        for h in DEP.load_balancers:
            delta = {k: after[h][k] - before[h][k] for k in ("new_flows", "flood_bypass",
                                                             "evictions")}  # fmt: skip
            figure(f"{h}", f"{delta}, established {before[h]['established']} -> "
                   f"{after[h]['established']} (least {minimum[h]})")  # fmt: skip
            assert minimum[h] >= before[h]["established"], (h, before[h], minimum[h])
            assert after[h]["rotations"] == before[h]["rotations"], (h, before[h], after[h])
        assert sum(after[h]["new_flows"] + after[h]["flood_bypass"] for h in after) >= SYNS // 4
        for d in downloads.items:
            host = lb_of[str(d.lb)]
            where = request(ctl(host), "flow", timeout=5.0, src=topo.host_ip(d.client),
                            sport=d.sport, dst=DEP.vip, dport=80, proto="tcp")  # fmt: skip
            assert where["state"] == "established", (d.client, d.sport, host, where)
        results = downloads.wait(60)
        broken = [r for r in results if r["rc"] != 0 or not r["sha256_ok"]]
        figure(
            "downloads", f"{len(results) - len(broken)} of {len(results)} complete, sha256 right"
        )
        assert not broken, broken
    finally:
        downloads.close()
