"""The running network's record and the process plumbing to take it down from that record alone.

`/run/l4lb/state.json` names the process that owns the network (PID and kernel start time) and
every node: its shell's PID and start time and its network namespace (inode). A PID counts as
ours only while its start time matches, so a recycled PID is never signalled. Processes are
found by namespace, not by name: everything whose network namespace is one of the nodes' is
part of the network (shells, things started with `exec`, services), and nothing else is.

`/run/l4lb/fattree.lock` is held (flock, exclusive) for as long as a network is up, by the
process that owns it; whoever wants the fat tree takes turns through it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATE_DIR = Path("/run/l4lb")
STATE_FILE = "state.json"
LOCK_FILE = "fattree.lock"
LOG_FILE = "network.log"


class NetStateError(RuntimeError):
    """The state file or the lock cannot be used; the message says which and why."""


@dataclass
class NodeRecord:
    name: str
    kind: str  # "host" | "switch"
    pid: int  # the node's shell
    start_time: int  # /proc/PID/stat field 22, to tell a recycled PID
    netns: int  # inode of /proc/PID/ns/net


@dataclass
class NetState:
    owner_pid: int  # the process that owns the mininet objects
    owner_start_time: int
    mode: str  # "cli" | "detach"
    topology: str  # file the network was built from
    started: float  # time.time()
    ready: bool = False  # routes programmed
    nodes: dict[str, NodeRecord] = field(default_factory=dict)
    interfaces: list[str] = field(default_factory=list)  # every interface name it creates

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> NetState:
        data = json.loads(text)
        nodes = {k: NodeRecord(**v) for k, v in data.pop("nodes").items()}
        return cls(nodes=nodes, **data)

    def hosts(self) -> list[str]:
        return [n for n, r in self.nodes.items() if r.kind == "host"]

    def switches(self) -> list[str]:
        return [n for n, r in self.nodes.items() if r.kind == "switch"]


def read_state(state_dir: Path = STATE_DIR) -> NetState | None:
    path = state_dir / STATE_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return NetState.from_json(text)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise NetStateError(f"{path}: unreadable state ({e}); remove it by hand") from None


def write_state(st: NetState, state_dir: Path = STATE_DIR) -> None:
    """Atomically (write and rename), so a reader never sees half a file."""
    tmp = state_dir / f".{STATE_FILE}.{os.getpid()}"
    tmp.write_text(st.to_json())
    tmp.replace(state_dir / STATE_FILE)


def remove_state(state_dir: Path = STATE_DIR) -> None:
    with contextlib.suppress(FileNotFoundError):
        (state_dir / STATE_FILE).unlink()


def take_lock(state_dir: Path = STATE_DIR, wait: float = 0.0) -> int | None:
    """The exclusive lock's file descriptor, or None if still held by another after `wait` s."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                return None
            time.sleep(0.1)


def proc_start_time(pid: int) -> int | None:
    """Kernel start time of a process (clock ticks since boot), None if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after its last ')'
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None  # a zombie has finished; only its parent's wait is left
    return int(fields[19])


def is_running(pid: int, start_time: int) -> bool:
    return pid > 0 and proc_start_time(pid) == start_time


def netns_of(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def root_netns() -> int:
    """This process's network namespace: never one of a network's nodes."""
    return os.stat("/proc/self/ns/net").st_ino


def namespace_members(inodes: Iterable[int]) -> list[int]:
    """PIDs of every live process whose network namespace is one of `inodes`."""
    wanted = set(inodes) - {root_netns()}
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and netns_of(int(entry.name)) in wanted:
            out.append(int(entry.name))
    return out


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def kill_namespaces(st: NetState, grace: float = 1.0, timeout: float = 5.0) -> list[int]:
    """End every process in the network's namespaces; returns the PIDs that survived.

    Node shells get SIGHUP (as mininet does; an interactive bash ignores SIGTERM), the rest
    SIGTERM, so a tcpdump can flush; whatever is left after `grace` seconds gets SIGKILL.
    The namespaces and their veths go with their last process. Node shells are only
    signalled while their start time matches the record.
    """
    inodes = {r.netns for r in st.nodes.values()}
    shells = {r.pid for r in st.nodes.values() if is_running(r.pid, r.start_time)}
    for pid in shells:
        _signal(pid, signal.SIGHUP)
    for pid in namespace_members(inodes):
        if pid not in shells:
            _signal(pid, signal.SIGTERM)
    start = time.monotonic()
    killed = False
    while True:
        left = namespace_members(inodes)
        if not left:
            return []
        elapsed = time.monotonic() - start
        if elapsed >= timeout:
            return left
        if elapsed >= grace and not killed:
            for pid in left:
                _signal(pid, signal.SIGKILL)
            killed = True
        time.sleep(0.02)


def wait_gone(pid: int, start_time: int, timeout: float) -> bool:
    """Wait until the process has exited; True if it did within `timeout` s."""
    deadline = time.monotonic() + timeout
    while is_running(pid, start_time):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True
