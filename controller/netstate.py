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
import ctypes
import ctypes.util
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
PIN_DIR = "ns"  # state_dir/ns/<node>: a bind mount of each node's network namespace
_MS_BIND = 4096
_MNT_DETACH = 2


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


def proc_start_time(pid: int, *, zombie_is_gone: bool = True) -> int | None:
    """Kernel start time of a process (clock ticks since boot, field 22 of /proc/PID/stat),
    None if there is none. A zombie has finished (only its parent's wait is left): None too,
    unless `zombie_is_gone` is False (for a parent that still has to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after its last ')'
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z" and zombie_is_gone:
        return None
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


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def pin_netns(pid: int, path: Path) -> None:
    """Bind-mount the process's network namespace on `path`, so the namespace (and with it its
    inode number) outlives its processes until `unpin_netns`: teardown can then find its
    members by inode without ever matching a newer namespace that reused the number."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    src = f"/proc/{pid}/ns/net".encode()
    if _libc().mount(src, str(path).encode(), None, _MS_BIND, None) != 0:
        err = ctypes.get_errno()
        raise NetStateError(f"pinning the namespace of pid {pid} on {path}: {os.strerror(err)}")


def unpin_netns(path: Path) -> None:
    _libc().umount2(str(path).encode(), _MNT_DETACH)
    with contextlib.suppress(OSError):
        path.unlink()


def pinned_inode(path: Path) -> int | None:
    """The namespace inode pinned on `path`, or None if nothing is mounted there."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    # An unmounted placeholder is an empty regular file on the state directory's filesystem;
    # a pinned namespace is on nsfs, another device.
    return st.st_ino if st.st_dev != os.stat(path.parent).st_dev else None


def kill_namespaces(
    st: NetState, grace: float = 1.0, timeout: float = 5.0, pin_dir: Path | None = None
) -> list[int]:
    """End every process in the network's namespaces; returns the PIDs that survived.

    Node shells get SIGHUP (as mininet does; an interactive bash ignores SIGTERM), the rest
    SIGTERM, so a tcpdump can flush; whatever is left after `grace` seconds gets SIGKILL.
    The namespaces and their veths go with their last process.

    The kernel reuses a freed namespace's inode number at once, so an inode from the record
    proves nothing by itself: a namespace counts as ours only while a process already known to
    be ours (a node shell whose start time matches, or a member found while such a process was
    in it) is still alive in it, checked again after each scan, or while it is pinned in
    `pin_dir` (`pin_netns`: a pinned namespace cannot be freed, so its number not reused; the
    caller unpins after this returns). Pins are what make `down` after a crashed owner work:
    its node shells end with it.
    """
    pinned: set[int] = set()
    if pin_dir is not None:
        for r in st.nodes.values():
            if pinned_inode(pin_dir / r.name) == r.netns:
                pinned.add(r.netns)
    known: dict[int, tuple[int, int]] = {}  # pid -> (start time, namespace inode)
    for r in st.nodes.values():
        if is_running(r.pid, r.start_time) and netns_of(r.pid) == r.netns:
            known[r.pid] = (r.start_time, r.netns)
    shells = set(known)

    def held() -> dict[int, list[int]]:
        """Namespace inode -> known processes alive in it."""
        out: dict[int, list[int]] = {}
        for pid, (start_time, ino) in known.items():
            if is_running(pid, start_time) and netns_of(pid) == ino:
                out.setdefault(ino, []).append(pid)
        return out

    def scan() -> None:
        """Add the members of namespaces still held by a known process."""
        before = held()
        found = namespace_members(set(before) | pinned)
        after = held()
        for pid in found:
            ino = netns_of(pid)
            start_time = proc_start_time(pid)
            if pid in known or ino is None or start_time is None:
                continue
            # Ours only if a holder seen before the scan is still there after it: then the
            # namespace was never freed (nor its inode reused) in between.
            if ino in pinned or set(before.get(ino, [])) & set(after.get(ino, [])):
                known[pid] = (start_time, ino)

    signalled: set[int] = set()
    start = time.monotonic()
    killed = False
    while True:
        scan()
        left = [p for p, (t, _ino) in known.items() if is_running(p, t)]
        if not left:
            return []
        elapsed = time.monotonic() - start
        if elapsed >= timeout:
            return left
        if elapsed >= grace and not killed:
            for pid in left:
                _signal(pid, signal.SIGKILL)
            killed = True
        for pid in left:  # first round, and members that joined since (a late service)
            if pid not in signalled:
                sig = (
                    signal.SIGKILL if killed else signal.SIGHUP if pid in shells else signal.SIGTERM
                )
                _signal(pid, sig)
                signalled.add(pid)
        time.sleep(0.02)


def wait_gone(pid: int, start_time: int, timeout: float) -> bool:
    """Wait until the process has exited; True if it did within `timeout` s."""
    deadline = time.monotonic() + timeout
    while is_running(pid, start_time):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True
