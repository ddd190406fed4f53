"""Processes the benchmark starts: in a namespace, pinned to a core, output to a log file (never
a pipe that could fill and block), each in its own process group, stopped by that group's id."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path


class ProcError(RuntimeError):
    """A benchmark process failed to start or exited early; the message says which and why."""


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
            kids.extend(int(k) for k in text.split())
    except OSError:
        pass
    return kids


class Procs:
    """Starts processes and remembers them; `stop_all()` ends every one still running."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.running: dict[int, tuple[subprocess.Popen[bytes], str]] = {}

    def start(
        self, name: str, ns: str, argv: Sequence[str], cpu: int | str | None = None
    ) -> subprocess.Popen[bytes]:
        """Runs argv inside namespace `ns` (ip netns exec execs it: the pid is the program's),
        pinned to `cpu` if given (a CPU, or a taskset list such as "0,2-5"); stdout and stderr
        go to <log_dir>/<name>.log."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
        log = (self.log_dir / f"{name}.log").open("ab")
        try:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, *pin, *argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                # A shell's background job inherits SIGINT ignored; our programs must see it.
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            )
        finally:
            log.close()
        self.running[proc.pid] = (proc, name)
        return proc

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def pin_children(self, proc: subprocess.Popen[bytes], cpu: int, wait: float = 2.0) -> int:
        """Moves a forking program's workers to `cpu` (trafgen pins its worker to CPU 0 itself,
        whatever taskset said). Returns how many were moved."""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            kids = _children(proc.pid)
            if kids:
                for kid in kids:
                    with contextlib.suppress(OSError):
                        os.sched_setaffinity(kid, {cpu})
                return len(kids)
            if proc.poll() is not None:
                return 0
            time.sleep(0.02)
        return 0

    def check_alive(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is not None:
            name = self.running.get(proc.pid, (proc, "?"))[1]
            tail = self.log(name)[-800:]
            raise ProcError(f"{name} exited with status {proc.returncode}:\n{tail}")

    def stop(
        self, proc: subprocess.Popen[bytes], sig: int = signal.SIGINT, timeout: float = 8.0
    ) -> int | None:
        """Signals the process group (the program and any workers it forked; trafgen's parent
        alone ignores SIGINT), waits, then SIGKILLs it if it lingers. Returns the exit status."""
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout)
        else:  # the leader exited; its workers may not have
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        self.running.pop(proc.pid, None)
        return proc.returncode

    def stop_all(self) -> None:
        for proc, _name in list(self.running.values()):
            self.stop(proc, timeout=3.0)
