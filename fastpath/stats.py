"""Counters out: one JSON line on stdout per interval and at exit, plus a stats file.

The stats file (default /run/l4lb/lb-<iface>.json) always holds the latest snapshot as one JSON
object; it is replaced atomically (write to a temporary file in the same directory, then
rename), so a reader never sees a partial file. Fields: `time` (Unix seconds), `iface`, `pid`,
`uptime_s`, `final` (true in the line written at exit), `rx_pps`/`tx_pps` (rates since the
previous snapshot), `core` (the balancer's verdict counters: frames, forwarded, drops by
reason, per backend), `io` (ring and send counters), `kernel_drops` (frames the kernel could
not put in the ring because it was full), `tracked_flows`, `next_hop_mac`.
The file stays after exit with the final snapshot (`final: true`), so the last counters of a
run remain readable; the next run on the same interface replaces it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

STATS_DIR = Path("/run/l4lb")


def default_stats_path(ifname: str) -> Path:
    return STATS_DIR / f"lb-{ifname}.json"


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` in one rename (readers see the old or the new file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_stats(path: Path) -> dict[str, Any]:
    """The latest snapshot in a stats file."""
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")
    return data


class StatsWriter:
    """Prints snapshots as JSON lines and keeps the stats file current."""

    def __init__(self, path: Path | None, stream: TextIO | None = None) -> None:
        self.path = path
        self.stream = stream if stream is not None else sys.stdout

    def emit(self, snapshot: dict[str, Any]) -> None:
        line = json.dumps(snapshot, sort_keys=True)
        if self.path is not None:  # the file first: whoever saw the line can read the file
            write_atomic(self.path, line + "\n")
        print(line, file=self.stream, flush=True)
