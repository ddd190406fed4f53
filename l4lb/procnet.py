"""A network namespace's counters and sockets, read from /proc without entering it.

/proc/PID/net/* shows the tables of the network namespace PID lives in, so the root namespace
reads any mininet node's interface counters or listening sockets by the PID of a process in it
("self": the caller's own namespace). Used by the exporters (their own host), the dashboard
(every node), the services' readiness checks and the wget load's byte counts.
"""

from __future__ import annotations

from pathlib import Path

# /proc/net/dev's columns after "iface:", in order: receive, then transmit.
RX_FIELDS = ("bytes", "packets", "errs", "drop", "fifo", "frame", "compressed", "multicast")
TX_FIELDS = ("bytes", "packets", "errs", "drop", "fifo", "colls", "carrier", "compressed")
NET_DEV_FIELDS = tuple(f"rx_{f}" for f in RX_FIELDS) + tuple(f"tx_{f}" for f in TX_FIELDS)
TCP_LISTEN = "0A"  # /proc/net/tcp's st column for TCP_LISTEN


def parse_net_dev(text: str) -> dict[str, dict[str, int]]:
    """/proc/net/dev's text -> {interface: {"rx_bytes": ..., "tx_packets": ..., ...}}."""
    out: dict[str, dict[str, int]] = {}
    for line in text.splitlines()[2:]:  # two header lines
        name, sep, rest = line.partition(":")
        values = rest.split()
        if not sep or len(values) < len(NET_DEV_FIELDS):
            continue
        out[name.strip()] = dict(zip(NET_DEV_FIELDS, map(int, values), strict=False))
    return out


def net_dev(pid: int | str = "self") -> dict[str, dict[str, int]]:
    """Interface counters of the namespace of `pid` (OSError when the process is gone)."""
    return parse_net_dev(Path(f"/proc/{pid}/net/dev").read_text())


def proc_net_addr(ip: str, port: int) -> str:
    """An IPv4 socket address as /proc/net/tcp prints it: the host-order hex of the network-order
    u32, a colon, the port in hex ("0100007F:0050" for 127.0.0.1:80)."""
    octets = [int(x) for x in ip.split(".")]
    return "".join(f"{o:02X}" for o in reversed(octets)) + f":{port:04X}"


def parse_tcp_listening(text: str, ip: str, port: int) -> bool:
    """True when /proc/net/tcp's text has a TCP socket listening on ip:port or 0.0.0.0:port."""
    want = {proc_net_addr(ip, port), proc_net_addr("0.0.0.0", port)}
    for line in text.splitlines()[1:]:
        cols = line.split()
        if len(cols) > 3 and cols[3] == TCP_LISTEN and cols[1] in want:
            return True
    return False


def tcp_listening(pid: int | str, ip: str, port: int) -> bool:
    """True when a TCP socket listens on ip:port (or the wildcard) in the namespace of `pid`;
    False also when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/net/tcp").read_text()
    except OSError:
        return False
    return parse_tcp_listening(text, ip, port)
