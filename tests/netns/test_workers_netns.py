"""`python -m fastpath.lb IFACE --workers 2` on a routed veth testbed (root).

client -> router -> LB (2 workers) -> router -> two backends, real kernel UDP: many flows of
FRAMES_PER_FLOW datagrams each (one source port per flow).
- Flow affinity: every flow's frames were handled by one worker. A flow split between workers
  would be tracked by each (new connections counted twice, so their sum would exceed the flows)
  and each would have forwarded fewer than FRAMES_PER_FLOW frames per connection; so per
  worker forwarded == FRAMES_PER_FLOW x connections, and the connections sum to the flows.
  Both workers get a share (all 200 flows hashing to one worker: probability 2**-199).
- The supervisor's counters are the workers' sums and add up to what was sent; what the
  backend captured is that too.
- A backend change through the control channel reaches both workers before the answer: new
  flows after draining one backend go to the other on both workers; a refused change changes
  nothing on either.
- Fanout groups (l4lb.fanout): two groups on one interface get distinct kernel-chosen ids, a
  joiner lands in the creator's group, and a joiner with other flags is refused.
- SIGTERM stops both workers (their PIDs are gone) and the supervisor exits 0 with the
  nftables table removed; a worker killed with SIGKILL makes the supervisor report it, stop the
  other and exit 1, cleaning up the same.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from bench.netns import PY, ROUTED_BACKENDS, Capture, Netns, NsProc, py, routed_lb, sh
from l4lb.control import RequestRefused, request

pytestmark = [pytest.mark.netns, pytest.mark.needs("ethtool")]

FRAMES_PER_FLOW = 3
FLOWS = 200
B1, B2 = ROUTED_BACKENDS

_CLIENT = r"""
import socket, sys
first, end, k = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
for port in range(first, end):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    for i in range(k):
        s.sendto(b"flow %d frame %d" % (port, i), ("20.0.0.1", 80))
    s.close()
"""


def _start(lbns: str, tag: str, tmp_path: Path) -> tuple[NsProc, Path, Path]:
    stats, ctl = tmp_path / "lb.json", tmp_path / "lb.ctl"
    args = [f"l{tag}", "--workers", "2", "--vip", "20.0.0.1:80", "--backend", B1]
    args += ["--backend", B2, "--stats-file", str(stats), "--stats-interval", "0.2"]
    args += ["--control-socket", str(ctl)]
    return NsProc(lbns, [PY, "-m", "fastpath.lb", *args]), stats, ctl


def _send(c: str, first: int, flows: int) -> None:
    sh(PY, "-c", _CLIENT, str(first), str(first + flows), str(FRAMES_PER_FLOW), ns=c)


def _settled(ctl: Path, forwarded: int, timeout: float = 5.0) -> dict[str, Any]:
    """`show` once the workers' cores have counted `forwarded` frames (or the last one)."""
    end = time.monotonic() + timeout
    while True:
        snap: dict[str, Any] = request(ctl, "show")
        if snap["core"]["forwarded"] >= forwarded or time.monotonic() > end:
            return snap
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _per_worker(snap: dict[str, Any], ip: str, key: str) -> list[int]:
    return [w["per_backend"].get(ip, {}).get(key, 0) for w in snap["workers"]]


def test_two_workers_split_flows_sum_counters_and_take_changes(
    netns: Netns, tmp_path: Path
) -> None:
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one CPU: both workers would share it (the test's point is two cores)")
    c, _r, lbns, b = routed_lb(netns)
    t = netns.tag
    lb, stats, ctl = _start(lbns, t, tmp_path)
    pids: list[int] = []
    try:
        lb.wait_event(timeout=30)
        ping = request(ctl, "ping")
        pids = ping["workers"]
        assert len(pids) == 2 and ping["pid"] not in pids and all(map(_alive, pids))
        at_backend = Capture(b, f"b{t}", 6.0)
        _send(c, 40000, FLOWS)
        snap = _settled(ctl, FLOWS * FRAMES_PER_FLOW)
        workers = snap["workers"]
        assert [w["pid"] for w in workers] == pids
        assert sorted(w["cpu"] for w in workers) == [0, 1]  # each on its own core

        # Flow affinity (module docstring): checked per worker, from its own counters.
        conns = [sum(c["connections"] for c in w["per_backend"].values()) for w in workers]
        fwd = [w["core"]["forwarded"] for w in workers]
        assert sum(conns) == FLOWS, f"connections per worker {conns}: a flow was split"
        assert fwd == [FRAMES_PER_FLOW * n for n in conns], (fwd, conns)
        assert min(conns) > 0, f"one worker got every flow: {conns}"
        # The supervisor's figures are the workers' sums, and what was sent.
        core = snap["core"]
        assert core["forwarded"] == sum(fwd) == FLOWS * FRAMES_PER_FLOW
        assert core["frames"] == sum(w["core"]["frames"] for w in workers)
        assert core["drops"]["internal_error"] == 0
        assert snap["tracked_flows"] == FLOWS
        assert {x["ip"]: x["connections"] for x in snap["backends"]}.keys() == {B1, B2}
        assert sum(x["packets"] for x in snap["backends"]) == FLOWS * FRAMES_PER_FLOW

        # A backend change reaches both workers before it is answered.
        reply = request(ctl, "backend.drain", ip=B2)
        assert reply["changed"] is True
        before = _per_worker(request(ctl, "show"), B2, "connections")
        _send(c, 41000, FLOWS)
        after = _settled(ctl, 2 * FLOWS * FRAMES_PER_FLOW)
        assert _per_worker(after, B2, "connections") == before  # no new flow to B2, anywhere
        new_b1 = [
            n - o
            for n, o in zip(
                _per_worker(after, B1, "connections"),
                _per_worker(snap, B1, "connections"),
                strict=True,
            )
        ]
        assert sum(new_b1) == FLOWS and min(new_b1) > 0  # both workers took new flows to B1
        # A refused change changes nothing on any worker.
        with pytest.raises(RequestRefused, match="no backend would take new flows"):
            request(ctl, "backend.drain", ip=B1)
        assert request(ctl, "backends")["table"]["digest"] == reply["table_digest"]
        got = at_backend.result()
    finally:
        rc = lb.stop()
    assert rc == 0, lb.stderr
    ipip = [f for f in got if f[12:14] == b"\x08\x00" and f[23] == 4]
    assert len(ipip) == 2 * FLOWS * FRAMES_PER_FLOW
    assert not any(map(_alive, pids)), "a worker outlived SIGTERM"
    final = json.loads(stats.read_text())
    assert final["final"] is True and len(final["workers"]) == 2
    assert final["core"]["forwarded"] == 2 * FLOWS * FRAMES_PER_FLOW
    # The workers' last counters, sent as their loops ended: the I/O counts are complete too.
    assert final["io"]["rx_frames"] == final["core"]["frames"] == final["io"]["tx_frames"]
    assert [w["io"]["rx_frames"] for w in final["workers"]] == [
        w["core"]["frames"] for w in final["workers"]
    ]
    assert f"l4lb_l{t}" not in sh("nft", "list", "tables", ns=lbns)
    assert not ctl.exists()


def test_a_dead_worker_stops_the_lb_with_status_1(netns: Netns, tmp_path: Path) -> None:
    _c, _r, lbns, _b = routed_lb(netns)
    lb, _stats, ctl = _start(lbns, netns.tag, tmp_path)
    pids: list[int] = []
    try:
        lb.wait_event(timeout=30)
        pids = request(ctl, "ping")["workers"]
        os.kill(pids[1], signal.SIGKILL)
        lb.proc.wait(10)
    finally:
        rc = lb.stop()
    assert rc == 1, lb.stderr
    assert f"worker 1 (pid {pids[1]}) exited: killed by signal 9" in lb.stderr
    assert not any(map(_alive, pids))
    assert f"l4lb_l{netns.tag}" not in sh("nft", "list", "tables", ns=lbns)
    assert not ctl.exists()


_GROUPS = r"""
import json, socket, sys
from l4lb import fanout
def bound():
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    s.bind((sys.argv[1], 0x0003))
    return s
a, b, c, d = bound(), bound(), bound(), bound()
ga, gb = fanout.create_group(a), fanout.create_group(b)
fanout.join_group(c, ga)
try:  # same id, another mode (1: PACKET_FANOUT_LB): the kernel refuses to mix them
    fanout.join_group(d, ga, mode=1)
    refused = None
except OSError as exc:
    refused = exc.errno
print(json.dumps([ga, gb, fanout.group_id(c), refused]))
"""


def test_fanout_groups_are_unique_per_creator_and_joined_by_id(netns: Netns) -> None:
    a, b = netns.add("A"), netns.add("B")
    netns.veth(a, f"a{netns.tag}", b, f"b{netns.tag}")
    ga, gb, joined, refused = py(a, _GROUPS, f"a{netns.tag}")
    assert ga != gb  # two LBs on one interface can never share a group
    assert joined == ga
    assert refused is not None  # EINVAL: a worker cannot join a group of another kind
