"""A stand-in for Prometheus in the benchmarks: GET a URL `--hz` times a second for at most
`--seconds`, then print {"ok": N, "failed": N, "seconds": S} (also on SIGTERM/SIGINT).
`python -m bench.scrape --url http://10.201.1.1:9180/metrics --hz 10 --seconds 60`"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import urllib.request
from collections.abc import Sequence
from types import FrameType


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scrape", description=__doc__)
    ap.add_argument("--url", required=True)
    ap.add_argument("--hz", type=float, default=1.0)
    ap.add_argument("--seconds", type=float, default=60.0)
    a = ap.parse_args(argv)
    if not 0 < a.hz <= 1000 or not 0 < a.seconds <= 3600:
        ap.error("--hz must be 0 < hz <= 1000 and --seconds 0 < s <= 3600")
    stop = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    ok = failed = 0
    start = time.monotonic()
    due = start
    while not stop and time.monotonic() - start < a.seconds:
        try:
            with urllib.request.urlopen(a.url, timeout=2) as r:
                r.read()
            ok += 1
        except OSError:
            failed += 1
        due += 1 / a.hz
        time.sleep(max(0.0, due - time.monotonic()))
    out = {"ok": ok, "failed": failed, "seconds": round(time.monotonic() - start, 2)}
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
