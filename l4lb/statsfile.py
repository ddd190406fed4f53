"""Counters out: one JSON line on stdout per snapshot, and the latest snapshot in a stats file
(default /run/l4lb/<name>.json), replaced atomically (a temporary file in the same directory,
then rename) so a reader sees the old or the new file, never a mix. The file stays after exit
with the final snapshot; the next run of the same name replaces it."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

STATS_DIR = Path("/run/l4lb")


def default_path(kind: str, ifname: str) -> Path:
    """Where a process of `kind` ("lb", "agent") on `ifname` keeps its stats by default."""
    return STATS_DIR / f"{kind}-{ifname}.json"


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` in one rename; raises OSError, leaving no temporary file."""
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
    """Prints snapshots as JSON lines and keeps the stats file current. A file that cannot be
    written is reported on stderr (once per failing stretch) and the lines go on: counters are
    no reason to stop forwarding."""

    def __init__(self, path: Path | None, prog: str, stream: TextIO | None = None) -> None:
        self.path = path
        self.prog = prog
        self.stream = stream if stream is not None else sys.stdout
        self.failing = False

    def emit(self, snapshot: dict[str, Any]) -> None:
        line = json.dumps(snapshot, sort_keys=True)
        if self.path is not None:  # the file first: whoever saw the line can read the file
            try:
                write_atomic(self.path, line + "\n")
                self.failing = False
            except OSError as exc:
                if not self.failing:
                    print(f"{self.prog}: stats file {self.path}: {exc}", file=sys.stderr)
                self.failing = True
        print(line, file=self.stream, flush=True)
