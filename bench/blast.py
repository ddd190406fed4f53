"""The benchmark's traffic generator: prebuilt frames sent round robin with sendmmsg on an
AF_PACKET socket, as fast as the kernel takes them or paced at a given rate.

    python -m bench.blast IFACE --frames FILE [--rate PPS] [--count N] [--duration S]

Why not trafgen: it pins its worker to CPU 0 whatever taskset says, and its TX ring socket gets
the namespace's default send buffer (212,992 bytes; a child namespace cannot raise it), so once
frames queue behind RPS on another core the ring flush fails with EAGAIN, which trafgen treats
as fatal. Here the socket's buffer is forced (SO_SNDBUFFORCE) and sends block instead of failing.
FILE holds the frames as written by `bench.frames.pack_frames`. One JSON line at exit: frames
handed to the kernel, seconds, errors.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from bench.frames import unpack_frames
from l4lb.tx import Iovec, Mmsghdr, open_tx_socket, sendmmsg

SNDBUF = 8 << 20
BATCH = 256  # frames per sendmmsg call at full speed


class Batches:
    """The frames in one C buffer, and mmsghdr arrays covering them `batch` at a time (the
    last batches wrap around), so the send loop only picks an array and calls sendmmsg."""

    def __init__(self, frames: Sequence[bytes], batch: int) -> None:
        if not frames:
            raise ValueError("no frames to send")
        self.batch = batch
        blob = b"".join(frames)
        self.buf = ctypes.create_string_buffer(blob, len(blob))
        base = ctypes.addressof(self.buf)
        offsets, pos = [], 0
        for f in frames:
            offsets.append(pos)
            pos += len(f)
        n = len(frames)
        self.iovs = (Iovec * n)()
        for i, f in enumerate(frames):
            self.iovs[i].base = base + offsets[i]
            self.iovs[i].len = len(f)
        self.arrays: list[ctypes.Array[Mmsghdr]] = []
        for start in range(0, n, batch):
            arr = (Mmsghdr * batch)()
            for j in range(batch):
                hdr = arr[j].hdr
                hdr.iov = ctypes.pointer(self.iovs[(start + j) % n])
                hdr.iovlen = 1
            self.arrays.append(arr)


def run(
    iface: str, frames: Sequence[bytes], rate: float, count: int, duration: float
) -> dict[str, float]:
    # Paced: small bursts on a fixed schedule (32 frames per 107 us at 300,000/s).
    batch = BATCH if rate <= 0 else max(1, min(BATCH, int(rate / 10_000)))
    batches = Batches(frames, batch)
    arrays = [ctypes.addressof(a) for a in batches.arrays]
    sock = open_tx_socket(iface, sndbuf=SNDBUF)
    fd = sock.fileno()
    stop = {"now": False}

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    clock = time.perf_counter
    sent = errors = 0
    k, nb = 0, len(arrays)
    start = clock()
    end = start + duration if duration > 0 else float("inf")
    limit = count if count > 0 else 1 << 62
    interval = batch / rate if rate > 0 else 0.0
    due = start
    while sent < limit and not stop["now"]:
        want = min(batch, limit - sent)
        if interval:
            due += interval
            now = clock()
            if now < due - 0.0005:
                time.sleep(due - now - 0.0005)
            while clock() < due:  # spin the last half millisecond: the generator owns its core
                pass
        r = sendmmsg(fd, arrays[k], want, 0)
        k = k + 1 if k + 1 < nb else 0
        if r > 0:
            sent += r
        else:
            errors += 1
        if (k & 63) == 0 and clock() >= end:
            break
    elapsed = clock() - start
    sock.close()
    return {
        "sent": sent,
        "seconds": round(elapsed, 4),
        "errors": errors,
        "pps": round(sent / elapsed) if elapsed > 0 else 0,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Send prebuilt frames fast, or at a paced rate.")
    p.add_argument("iface")
    p.add_argument("--frames", type=Path, required=True, help="file from frames.pack_frames")
    p.add_argument("--rate", type=float, default=0.0, help="frames/s (0: as fast as possible)")
    p.add_argument("--count", type=int, default=0, help="stop after N frames (0: no limit)")
    p.add_argument("--duration", type=float, default=0.0, help="stop after S seconds (0: never)")
    args = p.parse_args(argv)
    if args.rate < 0 or args.count < 0 or args.duration < 0:
        p.error("--rate, --count and --duration must be >= 0")
    try:
        frames = unpack_frames(args.frames.read_bytes())
    except (OSError, ValueError) as exc:
        p.error(f"--frames {args.frames}: {exc}")
    if not os.path.exists(f"/sys/class/net/{args.iface}"):
        p.error(f"no interface {args.iface!r} here")
    print(json.dumps(run(args.iface, frames, args.rate, args.count, args.duration)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
