"""Classic BPF socket filters for AF_PACKET sockets, written as named opcodes.

A program is a list of `Insn` (one per classic BPF instruction, each with a comment) and `Label`
markers; jump targets may be label names, resolved by `assemble`. Frames seen by the filter
start at the Ethernet header (AF_PACKET, SOCK_RAW).

Opening order (`open_filtered`): a socket made with protocol 0 receives nothing; a drop-all
filter goes on before `bind` gives it a protocol and an interface, the queue is drained, and only
then the real filter replaces drop-all, so no unfiltered packet ever reaches user space.

Used by fastpath.lb (`ipv4_dst_filter`) and agent.decap (`tunnel_filter`).
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from l4lb.errors import L4lbError
from l4lb.ring import PACKET_IGNORE_OUTGOING, SOL_PACKET
from l4lb.wire import (
    ETH_P_ALL,
    ETH_P_IP,
    IP_OFFSET,
    IPPROTO_TCP,
    IPPROTO_UDP,
    OFF_ETHERTYPE,
    OFF_IP,
    OFF_IP_DST,
    OFF_IP_FRAG,
    OFF_IP_PROTO,
    OFF_IP_SRC,
    Encap,
)

# Instruction classes.
LD = 0x00
LDX = 0x01
ST = 0x02
STX = 0x03
ALU = 0x04
JMP = 0x05
RET = 0x06
MISC = 0x07
# Load sizes.
W = 0x00
H = 0x08
B = 0x10
# Addressing modes.
IMM = 0x00
ABS = 0x20
IND = 0x40
MEM = 0x60
LEN = 0x80
MSH = 0xA0
# ALU operations.
ADD = 0x00
SUB = 0x10
MUL = 0x20
DIV = 0x30
OR = 0x40
AND = 0x50
LSH = 0x60
RSH = 0x70
# Jump operations.
JA = 0x00
JEQ = 0x10
JGT = 0x20
JGE = 0x30
JSET = 0x40
# Operand source: the constant k, or the X register.
K = 0x00
X = 0x08
# Return value source.
A = 0x10

# Ancillary data loads (linux/filter.h): negative offsets read skb metadata, not packet bytes.
SKF_AD_OFF = -0x1000
SKF_AD_PKTTYPE = 4
PACKET_OUTGOING = 4  # skb->pkt_type of a frame this host transmits (tapped on the way out)

ACCEPT_LEN = 0x40000  # returned snap length: the whole frame (256 KiB is far above any frame)

SO_ATTACH_FILTER = 26
BPF_MAXINSNS = 4096

SOCK_FILTER = struct.Struct("=HBBI")  # struct sock_filter {u16 code; u8 jt; u8 jf; u32 k}
SOCK_FPROG = struct.Struct("@HP")  # struct sock_fprog {unsigned short len; filter *}


@dataclass(frozen=True)
class Insn:
    """One classic BPF instruction; jt/jf (and k of JA) are relative skips or label names."""

    code: int
    jt: int | str = 0
    jf: int | str = 0
    k: int | str = 0


@dataclass(frozen=True)
class Label:
    """A jump target; occupies no instruction slot."""

    name: str


Program = Sequence[Insn | Label]


class BpfError(L4lbError, ValueError):
    """A program that the kernel would reject (bad label, jump too far, too long)."""


def assemble(prog: Program | bytes) -> bytes:
    """Resolve labels and encode `prog` as an array of struct sock_filter."""
    if isinstance(prog, bytes | bytearray):
        return bytes(prog)
    labels: dict[str, int] = {}
    insns: list[Insn] = []
    for item in prog:
        if isinstance(item, Label):
            if item.name in labels:
                raise BpfError(f"label {item.name!r} defined twice")
            labels[item.name] = len(insns)
        else:
            insns.append(item)
    if not insns or len(insns) > BPF_MAXINSNS:
        raise BpfError(f"program has {len(insns)} instructions (1..{BPF_MAXINSNS} allowed)")
    out = bytearray()
    for pc, ins in enumerate(insns):
        jt = _skip(ins.jt, pc, labels)
        jf = _skip(ins.jf, pc, labels)
        if isinstance(ins.k, str):
            if ins.code != JMP | JA:
                raise BpfError(f"label {ins.k!r} as k of a non-JA instruction at {pc}")
            k = _skip(ins.k, pc, labels, limit=len(insns))
        else:
            k = ins.k & 0xFFFFFFFF
        out += SOCK_FILTER.pack(ins.code, jt, jf, k)
    return bytes(out)


def _skip(target: int | str, pc: int, labels: Mapping[str, int], limit: int = 255) -> int:
    if isinstance(target, int):
        skip = target
    else:
        if target not in labels:
            raise BpfError(f"undefined label {target!r}")
        skip = labels[target] - pc - 1
    if not 0 <= skip <= limit:
        raise BpfError(f"jump at {pc} to {target!r} skips {skip} (0..{limit} allowed)")
    return skip


def attach(sock: socket.socket, prog: Program | bytes) -> None:
    """Attach (or atomically replace) the socket filter of `sock`."""
    code = assemble(prog)
    buf = ctypes.create_string_buffer(code, len(code))
    fprog = SOCK_FPROG.pack(len(code) // SOCK_FILTER.size, ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)  # the kernel copies the code


# Rejects everything; attached before bind so nothing arrives before the real filter.
DROP_ALL: Program = (Insn(RET | K, k=0),)  # return 0: drop


def _ip(addr: str) -> int:
    return int(ipaddress.IPv4Address(addr))


def _ipv4_prologue() -> list[Insn | Label]:
    """Common start: drop frames this host sends, then keep IPv4 only."""
    return [
        Insn(LD | B | ABS, k=(SKF_AD_OFF + SKF_AD_PKTTYPE) & 0xFFFFFFFF),  # A = skb->pkt_type
        Insn(JMP | JEQ | K, jt="reject", k=PACKET_OUTGOING),  # our own transmissions: drop
        Insn(LD | H | ABS, k=OFF_ETHERTYPE),  # A = EtherType
        Insn(JMP | JEQ | K, jf="reject", k=ETH_P_IP),  # not IPv4 (VLAN, ARP, IPv6): drop
    ]


def _epilogue() -> list[Insn | Label]:
    return [
        Label("accept"),
        Insn(RET | K, k=ACCEPT_LEN),  # pass the whole frame
        Label("reject"),
        Insn(RET | K, k=0),  # drop
    ]


def ipv4_dst_filter(
    dsts: Sequence[str] | Iterable[tuple[str, int | None]],
) -> list[Insn | Label]:
    """IPv4 frames to one of `dsts`, arriving on the interface (not sent by this host).

    `dsts` holds addresses ("20.0.0.1") or (address, port-or-None) pairs. An address listed only
    with ports passes TCP/UDP first fragments only to those destination ports; everything else to
    it (ICMP errors, other protocols, non-first fragments that carry no port) still passes, so the
    balancer can route or count it by reason.
    """
    ports: dict[int, set[int] | None] = {}
    for item in dsts:
        addr, port = (item, None) if isinstance(item, str) else item
        ip = _ip(addr)
        if port is None:
            ports[ip] = None  # any port wins over a port list
            continue
        if not 0 < port < 65536:
            raise BpfError(f"port {port} of {addr} out of range 1..65535")
        known = ports.get(ip, set())
        if known is not None:
            known.add(port)
            ports[ip] = known
    if not ports:
        raise BpfError("no destination address given")
    prog = _ipv4_prologue()
    prog.append(Insn(LD | W | ABS, k=OFF_IP_DST))  # A = IPv4 destination
    for i, ip in enumerate(ports):
        target = "accept" if ports[ip] is None else f"ports{i}"
        prog.append(Insn(JMP | JEQ | K, jt=target, k=ip))  # destination is this address
    prog.append(Insn(RET | K, k=0))  # no address matched: drop
    for i, ip in enumerate(ports):
        allowed = ports[ip]
        if allowed is None:
            continue
        prog += [
            Label(f"ports{i}"),
            Insn(LD | B | ABS, k=OFF_IP_PROTO),  # A = IP protocol
            Insn(JMP | JEQ | K, jt=f"l4_{i}", k=IPPROTO_TCP),  # TCP has ports
            Insn(JMP | JEQ | K, jt=f"l4_{i}", k=IPPROTO_UDP),  # UDP has ports
            Insn(JMP | JA, k="accept"),  # other protocols: let the core count them
            Label(f"l4_{i}"),
            Insn(LD | H | ABS, k=OFF_IP_FRAG),  # A = flags + fragment offset
            Insn(JMP | JSET | K, jt="accept", k=IP_OFFSET),  # non-first fragment: no port to see
            Insn(LDX | B | MSH, k=OFF_IP),  # X = IPv4 header length (4 * IHL)
            Insn(LD | H | IND, k=OFF_IP + 2),  # A = destination port
        ]
        prog += [Insn(JMP | JEQ | K, jt="accept", k=p) for p in sorted(allowed)]  # a VIP port
        prog.append(Insn(RET | K, k=0))  # other port: drop
    return prog + _epilogue()


def tunnel_filter(
    encap: Encap, local_ip: str, allowed_srcs: Sequence[str | tuple[str, int]] | None = None
) -> list[Insn | Label]:
    """Tunnel frames of `encap` (its outer IP protocol) to `local_ip`, arriving on the interface.

    `allowed_srcs` are addresses or (network, prefix length) pairs ("10.1.1.2", ("10.1.0.0", 16),
    "10.1.0.0/16" also works); None passes every source (the caller then checks and counts
    spoofed tunnels itself).
    """
    prog = _ipv4_prologue()
    prog += [
        Insn(LD | B | ABS, k=OFF_IP_PROTO),  # A = IP protocol
        Insn(JMP | JEQ | K, jf="reject", k=encap.ip_proto),  # not the tunnel's protocol: drop
        Insn(LD | W | ABS, k=OFF_IP_DST),  # A = outer destination
        Insn(JMP | JEQ | K, jf="reject", k=_ip(local_ip)),  # not addressed to this host: drop
    ]
    if allowed_srcs is not None:
        nets = [_network(s) for s in allowed_srcs]
        if not nets:
            prog.append(Insn(RET | K, k=0))  # no source allowed: drop
        for net in nets:
            prog += [
                Insn(LD | W | ABS, k=OFF_IP_SRC),  # A = outer source
                Insn(ALU | AND | K, k=int(net.netmask)),  # A &= network mask
                Insn(JMP | JEQ | K, jt="accept", k=int(net.network_address)),  # allowed LB
            ]
        prog.append(Insn(RET | K, k=0))  # source not allowed: drop
    else:
        prog.append(Insn(JMP | JA, k="accept"))  # any source
    return prog + _epilogue()


def _network(src: str | tuple[str, int]) -> ipaddress.IPv4Network:
    if isinstance(src, str):
        return ipaddress.IPv4Network(src, strict=False)
    return ipaddress.IPv4Network(f"{src[0]}/{src[1]}", strict=False)


def drain(sock: socket.socket) -> int:
    """Read and discard whatever is queued on `sock`; returns the number of packets dropped."""
    n = 0
    while True:
        try:
            sock.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return n
        n += 1


def open_filtered(
    ifname: str,
    prog: Program | bytes,
    setup: Callable[[socket.socket], None] | None = None,
    ignore_outgoing: bool = True,
    bound: Callable[[socket.socket], None] | None = None,
) -> socket.socket:
    """An AF_PACKET raw socket on `ifname` that has only ever queued frames passing `prog`.

    socket(protocol 0: receives nothing) -> drop-all filter -> `setup(sock)` (e.g. map a ring,
    which must precede traffic) -> bind(ifname, ETH_P_ALL) -> `bound(sock)` (e.g. join a
    PACKET_FANOUT group, which needs a bound socket) -> drain -> the real filter.
    `ignore_outgoing` also keeps the kernel from cloning this host's transmissions to the socket.
    Raises OSError (e.g. ENODEV for an unknown interface); the socket is closed on failure.
    """
    code = assemble(prog)  # fail on a bad program before touching the network
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        attach(sock, DROP_ALL)
        if ignore_outgoing:
            sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        if setup is not None:
            setup(sock)
        sock.bind((ifname, ETH_P_ALL))
        if bound is not None:
            bound(sock)
        drain(sock)
        attach(sock, code)
    except BaseException:
        sock.close()
        raise
    return sock
