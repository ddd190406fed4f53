"""CPU cost per frame of the whole forwarding loop (fastpath.forward), without a generator.

A fake TPACKET_V2 ring (anonymous memory laid out like the kernel's: l4lb.ring.FakeRing here,
a patched RxRing in trees before l4lb/) is prefilled with
64-byte UDP frames over 4,096 flows to the VIP and drained through Forwarder + Balancer +
sendmmsg into a veth pair in a throwaway namespace (the peer discards them); the ring is
refilled each time the loop wraps. Prints thread CPU ns per frame (user + kernel: the
sendmmsg and the peer's receive included), which other load on a shared machine inflates
far less than wall time. Several source trees can be compared, interleaved round by round:
    bench/fwd_drain.py --tree /tmp/old --tree . --rounds 3      (as root)
Each measurement runs in its own interpreter (`--child`), pinned to --cpu.
"""

from __future__ import annotations

import argparse
import importlib
import json
import mmap
import os
import socket
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


FLOWS = 4096
SLOTS = 4096
MAC = 66  # where a slot's frame starts (l4lb.ring.ETH_MAC_OFFSET; the same in older trees)


def _old_tree(ifname: str, bal: Any, frames: list[bytes]) -> tuple[object, object, Any]:
    """Trees before l4lb/ (f6a45e1 and earlier): RxRing over an anonymous mapping. Their
    modules are imported by name: this tree's types do not describe them."""
    ring_mod: Any = importlib.import_module("fastpath.ring")
    tx_mod = importlib.import_module("fastpath.tx")
    forwarder_cls = importlib.import_module("fastpath.forward").Forwarder
    real = mmap.mmap
    # The ring's memory: anonymous instead of the socket's (same layout, filled by us).
    ring_mod.mmap = types.SimpleNamespace(
        mmap=lambda fd, size, *a: real(-1, size),
        MAP_SHARED=mmap.MAP_SHARED, PROT_READ=mmap.PROT_READ, PROT_WRITE=mmap.PROT_WRITE,
        PAGESIZE=mmap.PAGESIZE,
    )  # fmt: skip
    ring = ring_mod.RxRing(SLOTS, 2048)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    ring.map(sock)
    st, words = ring.status, ring.words
    for j in range(ring.frame_nr):
        f = frames[j % len(frames)]
        st[j * words + 1] = st[j * words + 2] = len(f)
        ring.view[j * 2048 + MAC : j * 2048 + MAC + len(f)] = f
    sender = tx_mod.MmsgSender(tx_mod.open_tx_socket(ifname), 256, 2048)
    fw = forwarder_cls(ring, sock, sender, bal, 64)
    return ring.view, st[0::words], (fw, sender, sock)


def _new_tree(ifname: str, bal: Any, frames: list[bytes]) -> tuple[object, object, Any]:
    """This tree: a FakeRing over an anonymous mapping, the production Forwarder over it."""
    from fastpath.forward import Forwarder
    from l4lb.ring import FakeRing
    from l4lb.tx import ZeroCopySender, open_tx_socket

    ring = FakeRing(SLOTS, mem=mmap.mmap(-1, SLOTS * 2048))
    ring.load([frames[j % len(frames)] for j in range(SLOTS)])
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # polled when the ring is empty
    sender = ZeroCopySender(open_tx_socket(ifname), ring.slots)
    fw = Forwarder(ring.slots, sock.fileno(), sender, bal, 64)
    return ring.slots.mem, ring.slots.status, (fw, sender, sock)


def child(tree: str, ifname: str, total: int) -> dict[str, float]:
    sys.path.insert(0, tree)
    from bench.frames import udp_frames
    from fastpath.balancer import Balancer
    from fastpath.config import BalancerConfig

    backends = (("10.2.3.2", 1), ("10.4.7.2", 1), ("10.6.11.2", 1), ("10.8.15.2", 1))
    cfg = BalancerConfig(
        vips=(("20.0.0.1", None),), backends=backends, local_ip="10.1.1.2",
        local_mac=bytes.fromhex("00000a010102"), next_hop_mac=bytes.fromhex("00010a010102"),
    )  # fmt: skip
    bal = Balancer(cfg)
    frames = udp_frames(FLOWS, "00:00:0a:09:00:02", "00:00:0a:01:01:02", "20.0.0.1")
    setup = _new_tree if (Path(tree) / "l4lb").is_dir() else _old_tree
    view, statv, (fw, sender, _sock) = setup(ifname, bal, frames)
    ready = memoryview(bytearray(b"\1\0\0\0" * SLOTS)).cast("I")
    statv[:] = ready  # type: ignore[index]
    batches = [0]
    per_lap = SLOTS // 64
    # The forwarder writes its outer header over a frame's Ethernet header in the slot (as it
    # does in the kernel's ring, which rewrites every frame it hands over): each lap puts the
    # original headers back, and the time that takes is not counted.
    eth = [(j * 2048 + MAC, frames[j % len(frames)][:14]) for j in range(SLOTS)]
    excluded = [0.0, 0.0]  # thread CPU, wall

    def tick(now: float) -> None:  # after every batch (tick_every=0)
        batches[0] += 1
        if batches[0] % per_lap == 0:
            c0, x0 = time.thread_time(), time.perf_counter()
            for off, head in eth:
                view[off : off + 14] = head  # type: ignore[index]
            excluded[0] += time.thread_time() - c0
            excluded[1] += time.perf_counter() - x0
            statv[:] = ready  # type: ignore[index]
            if batches[0] * 64 >= total:
                fw.stop()

    t0, w0 = time.thread_time(), time.perf_counter()
    fw.run(tick=tick, tick_every=0.0)
    t1, w1 = time.thread_time(), time.perf_counter()
    n = sender.sent
    assert sum(bal.counters.forwarded) == n + sender.errors
    assert n >= total * 0.99, f"only {n} of {total} frames sent: the ring's frames went bad"
    cpu, wall = t1 - t0 - excluded[0], w1 - w0 - excluded[1]
    return {"frames": n, "cpu_ns": 1e9 * cpu / n, "wall_ns": 1e9 * wall / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", default=[], help="source tree (default: this)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--frames", type=int, default=1_000_000)
    ap.add_argument("--cpu", type=int, default=0)
    ap.add_argument("--child", nargs=2, metavar=("TREE", "IFACE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1], a.frames)))
        return
    if os.geteuid() != 0:
        sys.exit("bench/fwd_drain.py: run as root (namespace, veth, raw sockets)")
    trees = [str(Path(t).resolve()) for t in a.tree] or [str(REPO)]
    ns = f"fwdd{os.getpid() % 100000}"
    ip = ["ip", "-n", ns, "link"]
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run([*ip, "add", "fd0", "type", "veth", "peer", "name", "fd1"], check=True)
        for dev in ("fd0", "fd1"):
            subprocess.run([*ip, "set", dev, "up"], check=True)
        res: dict[str, list[float]] = {t: [] for t in trees}
        for r in range(a.rounds):
            for t in trees:
                argv = ["ip", "netns", "exec", ns, "taskset", "-c", str(a.cpu), sys.executable]
                argv += [__file__, "--child", t, "fd0", "--frames", str(a.frames)]
                out = subprocess.run(argv, check=True, capture_output=True, text=True, cwd=REPO)
                m = json.loads(out.stdout.strip().splitlines()[-1])
                res[t].append(m["cpu_ns"])
                print(f"round {r + 1} {t}: {m['cpu_ns']:.0f} ns/frame cpu, "
                      f"{m['wall_ns']:.0f} wall", flush=True)  # fmt: skip
        summary = {t: round(statistics.median(v)) for t, v in res.items()}
        print(json.dumps({"median_cpu_ns_per_frame": summary}))
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


if __name__ == "__main__":
    main()
