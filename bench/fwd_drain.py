"""CPU cost per frame of the whole forwarding loop (fastpath.forward), without a generator.

A fake TPACKET_V2 ring (anonymous memory laid out like the kernel's) is prefilled with
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

REPO = Path(__file__).resolve().parent.parent


def child(tree: str, ifname: str, total: int) -> dict[str, float]:
    sys.path.insert(0, tree)
    import fastpath.ring as ring_mod

    real = mmap.mmap
    # The ring's memory: anonymous instead of the socket's (same layout, filled by us).
    ring_mod.mmap = types.SimpleNamespace(  # type: ignore[assignment]
        mmap=lambda fd, size, *a: real(-1, size),
        MAP_SHARED=mmap.MAP_SHARED, PROT_READ=mmap.PROT_READ, PROT_WRITE=mmap.PROT_WRITE,
        PAGESIZE=mmap.PAGESIZE,
    )  # fmt: skip
    from bench.frames import udp_frames
    from fastpath.balancer import Balancer
    from fastpath.config import BalancerConfig
    from fastpath.forward import Forwarder
    from fastpath.tx import MmsgSender, open_tx_socket

    backends = (("10.2.3.2", 1), ("10.4.7.2", 1), ("10.6.11.2", 1), ("10.8.15.2", 1))
    cfg = BalancerConfig(
        vips=(("20.0.0.1", None),), backends=backends, local_ip="10.1.1.2",
        local_mac=bytes.fromhex("00000a010102"), next_hop_mac=bytes.fromhex("00010a010102"),
    )  # fmt: skip
    bal = Balancer(cfg)
    ring = ring_mod.RxRing(4096, 2048)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    ring.map(sock)
    frames = udp_frames(4096, "00:00:0a:09:00:02", "00:00:0a:01:01:02", "20.0.0.1")
    st, words = ring.status, ring.words
    for j in range(ring.frame_nr):
        f = frames[j % len(frames)]
        st[j * words + 1] = st[j * words + 2] = len(f)
        off = j * ring.frame_size + ring_mod.ETH_MAC_OFFSET
        ring.view[off : off + len(f)] = f
    statv = st[0::words]
    ready = memoryview(bytearray(b"\1\0\0\0" * ring.frame_nr)).cast("I")
    statv[:] = ready
    sender = MmsgSender(open_tx_socket(ifname), 256, 2048)
    fw = Forwarder(ring, sock, sender, bal, 64)
    batches = [0]
    per_lap = ring.frame_nr // 64
    # The forwarder may write its outer header over a frame's Ethernet header in the slot (as
    # it does in the kernel's ring, which rewrites every frame it hands over): each lap puts
    # the original headers back, and the time that takes is not counted.
    eth = [(j * ring.frame_size + ring_mod.ETH_MAC_OFFSET, frames[j % len(frames)][:14])
           for j in range(ring.frame_nr)]  # fmt: skip
    view = ring.view
    excluded = [0.0, 0.0]  # thread CPU, wall

    def tick(now: float) -> None:  # after every batch (tick_every=0)
        batches[0] += 1
        if batches[0] % per_lap == 0:
            c0, x0 = time.thread_time(), time.perf_counter()
            for off, head in eth:
                view[off : off + 14] = head
            excluded[0] += time.thread_time() - c0
            excluded[1] += time.perf_counter() - x0
            statv[:] = ready
            if batches[0] * 64 >= total:
                fw.stop()

    t0, w0 = time.thread_time(), time.perf_counter()
    fw.run(tick=tick, tick_every=0.0)
    t1, w1 = time.thread_time(), time.perf_counter()
    n = sender.sent
    assert bal.counters.as_dict()["forwarded"] == n + sender.errors
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
