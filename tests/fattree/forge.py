"""Send forged IP-in-IP packets from inside a mininet host (no scapy: it starts fast).

forge.py OUTER_SRC OUTER_DST INNER_SRC INNER_DST COUNT
    COUNT packets, each an outer IPv4 header (protocol 4) from OUTER_SRC to OUTER_DST around
    an inner TCP SYN from INNER_SRC to INNER_DST:80, through a raw socket that writes the
    outer header as given (the kernel fills in its length and checksum, and routes it by
    destination: any source goes out). Prints the number sent.
"""

from __future__ import annotations

import socket
import struct
import sys

IPV4 = struct.Struct("!BBHHHBBH4s4s")
TCP = struct.Struct("!HHIIBBHHH")


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def inner_syn(src: str, dst: str, sport: int) -> bytes:
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    tcp = TCP.pack(sport, 80, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
    csum = checksum(s + d + struct.pack("!BBH", 0, 6, len(tcp)) + tcp)
    tcp = tcp[:16] + struct.pack("!H", csum) + tcp[18:]
    ip = IPV4.pack(0x45, 0, 20 + len(tcp), 0, 0x4000, 64, 6, 0, s, d)
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return ip + tcp


def main(argv: list[str]) -> int:
    outer_src, outer_dst, inner_src, inner_dst, count = argv
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    sent = 0
    for i in range(int(count)):
        inner = inner_syn(inner_src, inner_dst, 40000 + i)
        outer = IPV4.pack(
            0x45, 0, 20 + len(inner), 0, 0, 64, 4, 0,
            socket.inet_aton(outer_src), socket.inet_aton(outer_dst),
        )  # fmt: skip
        sent += sock.sendto(outer + inner, (outer_dst, 0)) > 0
    print(sent)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
