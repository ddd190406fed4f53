"""Health checks with the real processes (root): the LB probes the agent through the tunnel,
the agent checks a real server on the VIP; killing the server turns the LB's view of the
backend unhealthy by the agent's push, its return makes it healthy again, and a killed agent
makes it unreachable through missed replies.

    l (python -m fastpath.lb --health) ---- b (python -m agent.decap --health + HTTP on VIP:80)
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bench.netns import PY, Netns, Procs
from l4lb.control import request

pytestmark = [pytest.mark.netns, pytest.mark.needs(tun=True)]

VIP, LB, BACKEND = "20.0.0.1", "10.83.0.1", "10.83.0.2"
SERVER = r"""
import http.server, sys
class H(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer.allow_reuse_address = True
srv = http.server.ThreadingHTTPServer((sys.argv[1], 80), H)
print("serving", flush=True)
srv.serve_forever()
"""


def wait_for(what: str, cond: Callable[[], Any], seconds: float) -> float:
    """Poll `cond` every 10 ms; the seconds it took. Fails naming `what` after `seconds`."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > seconds:
            raise AssertionError(f"{what}: not within {seconds} s")
        time.sleep(0.01)
    return time.monotonic() - t0


def test_probe_through_the_tunnel_server_death_push_and_agent_death(
    netns: Netns, procs: Procs, tmp_path: Path
) -> None:
    t = netns.tag
    lns, bns = netns.add("l"), netns.add("b")
    lif, bif = f"el{t}", f"eb{t}"
    netns.veth(lns, lif, bns, bif, ip_a=f"{LB}/24", ip_b=f"{BACKEND}/24")
    ctl = tmp_path / "lb.ctl"
    agent_ctl = tmp_path / "agent.ctl"
    agent_argv = [
        PY, "-m", "agent.decap", "--iface", bif, "--vip", VIP, "--allow-lb", LB, "--health",
        "--stats-file", str(tmp_path / "agent.json"), "--control-socket", str(agent_ctl),
    ]  # fmt: skip
    agent = procs.start(bns, agent_argv)
    agent.wait_event("ready")
    server = procs.start(bns, [PY, "-c", SERVER, VIP])
    assert server.proc.stdout is not None
    lb = procs.start(
        lns,
        [
            PY, "-m", "fastpath.lb", lif, "--vip", f"{VIP}:80", "--backend", BACKEND,
            "--health", "--stats-file", str(tmp_path / "lb.json"),
            "--control-socket", str(ctl),
        ],
    )  # fmt: skip
    lb.wait_event("")

    def backend() -> dict[str, Any]:
        return dict(request(ctl, "health")["backends"][BACKEND])

    # Probes cross the tunnel and the agent's core, and are not client traffic.
    wait_for("replies", lambda: backend()["replies"] >= 3, 10)
    b = backend()
    assert b["healthy"] and b["reachable"] and b["verdict"] == "up", b
    assert b["last_check"].startswith("HTTP/1.0 200"), b
    shown = request(agent_ctl, "show")
    assert shown["health"]["probes"] >= 3 and shown["delivered"] >= shown["health"]["probes"]
    assert shown["health"]["lbs"] and shown["health"]["lbs"][0].startswith(f"{LB}:")
    assert request(ctl, "show")["core"]["backends"][BACKEND] == 0

    # The server dies: the agent's checks fail, its verdict is pushed to the LB at once.
    pushes = b["pushes"]
    server.stop(signal.SIGKILL)
    took = wait_for("unhealthy after the kill", lambda: not backend()["healthy"], 3)
    b = backend()
    assert b["verdict"] == "down" and b["reachable"] and "refused" in b["reason"], b
    assert b["pushes"] == pushes + 1 and b["table_changes"] == 0  # one backend: fails open
    assert took < CFG_DEATH_BOUND, took
    health = request(agent_ctl, "health")
    assert health["verdict"] == "down" and health["pushes"] >= 1 and health["check_failures"] >= 3

    # It comes back: healthy again well within 3 s.
    server = procs.start(bns, [PY, "-c", SERVER, VIP])
    took = wait_for("healthy after the restart", lambda: backend()["healthy"], 3)
    assert backend()["verdict"] == "up"

    # The agent dies (SIGKILL): no replies, unreachable after `fall` missed probes.
    agent.stop(signal.SIGKILL)
    took = wait_for("unreachable after the agent's death", lambda: not backend()["reachable"], 3)
    b = backend()
    assert not b["healthy"] and b["missed"] >= 3 and "unanswered" in b["reason"], b
    assert took < 2.5, took
    assert request(ctl, "show")["health"]["malformed"] == {}


CFG_DEATH_BOUND = 1.5  # interval + (fall - 1) * fast_interval = 0.7 s, plus the loop's slack
