"""TCP SYN probe for the fat-tree tests, run inside a mininet host (no scapy: it starts fast).

synprobe.py listen IFACE DST MAX_SECONDS
    Prints "ready" once its AF_PACKET socket is bound, then records every TCP SYN to DST
    that arrives on IFACE (not the ones it sends) until SIGTERM or MAX_SECONDS (then also
    those still queued), and prints one JSON object: {"iface": ..., "syns": [[src, sport,
    dport], ...], "drops": packets its socket had no room for}.
synprobe.py send DST DPORT REPEAT SPORT...
    Sends REPEAT SYNs per source port to DST:DPORT through a raw socket (the kernel adds
    the IP header and routes it), then exits. Nothing answers them: that is the point.
"""

from __future__ import annotations

import json
import select
import signal
import socket
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script in a node
from l4lb.bpf import PACKET_OUTGOING
from l4lb.checksum import checksum
from l4lb.ring import PACKET_STATISTICS, SOL_PACKET, TPACKET_STATS
from l4lb.wire import ETH_P_IP, IPV4, TCP

PSEUDO = struct.Struct("!4s4sBBH")  # TCP checksum pseudo-header
SYN = 0x02
SO_RCVBUFFORCE = 33  # root may exceed net.core.rmem_max
RCVBUF = 16 << 20


def listen(iface: str, dst: str, max_seconds: float) -> int:
    want = socket.inet_aton(dst)
    syns: list[list[object]] = []
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    # SOCK_DGRAM: the kernel strips the Ethernet header, so packets start at IPv4
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
    # Room for every SYN of a test run (hundreds arrive within milliseconds; the default
    # ~200 KB holds about 200 of them, and a listener starved on a busy machine drops the rest).
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
    sock.bind((iface, ETH_P_IP))

    def record(pkt: bytes, addr: tuple) -> None:
        if addr[0] != iface or addr[2] == PACKET_OUTGOING or len(pkt) < IPV4.size:
            return  # another interface (before bind), or our own transmission
        ver_ihl, _, _, _, _, _, proto, _, src, d = IPV4.unpack_from(pkt)
        ihl = (ver_ihl & 0x0F) * 4
        if proto != socket.IPPROTO_TCP or d != want or len(pkt) < ihl + TCP.size:
            return
        sport, dport, _, _, _, flags, _, _, _ = TCP.unpack_from(pkt, ihl)
        if flags & SYN:
            syns.append([socket.inet_ntoa(src), sport, dport])

    print("ready", flush=True)
    deadline = time.monotonic() + max_seconds
    try:
        while not stopping and (left := deadline - time.monotonic()) > 0:
            # (a signal does not cut a select short in Python: wake up to look at the flag)
            if select.select([sock], [], [], min(left, 0.1))[0]:
                record(*sock.recvfrom(65535))
        # SIGTERM: what already arrived is still queued; it counts too.
        sock.setblocking(False)
        while True:
            try:
                record(*sock.recvfrom(65535))
            except BlockingIOError:
                break
    finally:
        _, drops = TPACKET_STATS.unpack(
            sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, TPACKET_STATS.size)
        )
        print(json.dumps({"iface": iface, "syns": syns, "drops": drops}), flush=True)
    return 0


def send(dst: str, dport: int, repeat: int, sports: list[int]) -> int:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.connect((dst, 9))  # no packet: only asks the kernel which source address it would use
    src = socket.inet_aton(probe.getsockname()[0])
    probe.close()
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
    d = socket.inet_aton(dst)
    for sport in sports:
        for seq in range(repeat):
            hdr = TCP.pack(sport, dport, 1000 + seq, 0, 5 << 4, SYN, 64240, 0, 0)
            csum = checksum(PSEUDO.pack(src, d, 0, socket.IPPROTO_TCP, len(hdr)) + hdr)
            sock.sendto(hdr[:16] + struct.pack("!H", csum) + hdr[18:], (dst, 0))
    return 0


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[0] == "listen":
        return listen(argv[1], argv[2], float(argv[3]))
    if len(argv) >= 5 and argv[0] == "send":
        return send(argv[1], int(argv[2]), int(argv[3]), [int(p) for p in argv[4:]])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
