"""Classic BPF programs: assembled bytes, run on crafted frames by a small interpreter.

The interpreter follows the kernel's classic BPF semantics for the opcodes our programs use
(net/core/filter.c): an out-of-bounds load ends the program with 0 (drop).
"""

from __future__ import annotations

import ipaddress
import struct

import pytest

from l4lb import bpf
from l4lb.bpf import BpfError, Insn, Label
from l4lb.wire import IPIP, IPPROTO_UDP, Encap

PKTTYPE_HOST = 0
PKTTYPE_OUTGOING = 4


def run(code: bytes, frame: bytes, pkttype: int = PKTTYPE_HOST) -> int:
    """Execute assembled classic BPF `code` on `frame`; returns the accepted length."""
    insns = [bpf.SOCK_FILTER.unpack_from(code, i) for i in range(0, len(code), 8)]
    a = x = 0
    pc = 0
    for _ in range(10_000):
        op, jt, jf, k = insns[pc]
        pc += 1
        cls = op & 0x07
        if cls in (bpf.LD, bpf.LDX):
            size = {bpf.W: 4, bpf.H: 2, bpf.B: 1}[op & 0x18]
            mode = op & 0xE0
            if cls == bpf.LDX and mode == bpf.MSH:
                if k >= len(frame):
                    return 0
                x = (frame[k] & 0x0F) * 4
                continue
            if mode == bpf.IMM:
                val = k
            elif mode == bpf.LEN:
                val = len(frame)
            elif mode == bpf.ABS and k >= 0x80000000:
                assert k == (bpf.SKF_AD_OFF + bpf.SKF_AD_PKTTYPE) & 0xFFFFFFFF
                val = pkttype
            else:
                off = k + (x if mode == bpf.IND else 0)
                if off + size > len(frame):
                    return 0
                val = int.from_bytes(frame[off : off + size], "big")
            if cls == bpf.LD:
                a = val
            else:
                x = val
        elif cls == bpf.ALU:
            assert op & 0xF0 == bpf.AND
            a &= k if op & bpf.X == 0 else x
        elif cls == bpf.JMP:
            jop = op & 0xF0
            if jop == bpf.JA:
                pc += k
                continue
            src = k if op & bpf.X == 0 else x
            cond = {bpf.JEQ: a == src, bpf.JGT: a > src, bpf.JGE: a >= src, bpf.JSET: a & src}[jop]
            pc += jt if cond else jf
        elif cls == bpf.RET:
            return a if op & bpf.A else k
        else:
            raise AssertionError(f"opcode {op:#x} not modelled")
    raise AssertionError("program did not terminate")


def ip_header(
    src: str, dst: str, proto: int, payload_len: int, frag: int = 0, ihl: int = 5
) -> bytes:
    hdr = struct.pack(
        "!BBHHHBBH4s4s",
        0x40 | ihl,
        0,
        ihl * 4 + payload_len,
        1,
        frag,
        64,
        proto,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    return hdr + b"\x01\x01\x00\x00" * (ihl - 5)  # options: NOP NOP EOL EOL


def frame(
    dst: str = "20.0.0.1",
    src: str = "10.8.16.2",
    proto: int = 17,
    dport: int = 80,
    ethertype: int = 0x0800,
    frag: int = 0,
    ihl: int = 5,
) -> bytes:
    l4 = struct.pack("!HHHH", 40000, dport, 8, 0)
    eth = b"\x02" * 6 + b"\x04" * 6 + struct.pack("!H", ethertype)
    return eth + ip_header(src, dst, proto, len(l4), frag, ihl) + l4


def test_drop_all_drops() -> None:
    code = bpf.assemble(bpf.DROP_ALL)
    assert len(code) == 8
    assert run(code, frame()) == 0


def test_assemble_encodes_sock_filter_and_resolves_labels() -> None:
    code = bpf.assemble(
        [
            Insn(bpf.LD | bpf.H | bpf.ABS, k=12),
            Insn(bpf.JMP | bpf.JEQ | bpf.K, jt="yes", jf=0, k=0x0800),
            Insn(bpf.RET | bpf.K, k=0),
            Label("yes"),
            Insn(bpf.RET | bpf.K, k=0xFFFF),
        ]
    )
    assert code == bytes.fromhex("28000000 0c000000 15000100 00080000 06000000 00000000") + bytes(
        [6, 0, 0, 0, 0xFF, 0xFF, 0, 0]
    )


def test_assemble_rejects_bad_programs() -> None:
    with pytest.raises(BpfError, match="undefined label"):
        bpf.assemble([Insn(bpf.JMP | bpf.JEQ, jt="nowhere")])
    with pytest.raises(BpfError, match="instructions"):
        bpf.assemble([])
    far = (
        [Insn(bpf.JMP | bpf.JEQ, jt="end")] + [Insn(bpf.RET)] * 300 + [Label("end"), Insn(bpf.RET)]
    )
    with pytest.raises(BpfError, match="skips 300"):
        bpf.assemble(far)


def test_vip_filter_any_port() -> None:
    code = bpf.assemble(bpf.ipv4_dst_filter(["20.0.0.1", "20.0.0.2"]))
    assert run(code, frame()) == bpf.ACCEPT_LEN
    assert run(code, frame(dst="20.0.0.2", proto=6, dport=22)) == bpf.ACCEPT_LEN
    assert run(code, frame(dst="20.0.0.3")) == 0
    assert run(code, frame(ethertype=0x86DD)) == 0  # IPv6
    assert run(code, frame(ethertype=0x0806)) == 0  # ARP
    assert run(code, frame(), pkttype=PKTTYPE_OUTGOING) == 0
    assert run(code, frame()[:20]) == 0  # truncated before the destination


def test_vip_filter_ports() -> None:
    code = bpf.assemble(bpf.ipv4_dst_filter([("20.0.0.1", 80), ("20.0.0.1", 443)]))
    assert run(code, frame(dport=80)) == bpf.ACCEPT_LEN
    assert run(code, frame(proto=6, dport=443)) == bpf.ACCEPT_LEN
    assert run(code, frame(dport=81)) == 0
    assert run(code, frame(proto=6, dport=22)) == 0
    assert run(code, frame(dport=80, ihl=6)) == bpf.ACCEPT_LEN  # options move the port
    assert run(code, frame(dport=81, ihl=6)) == 0
    # ICMP to the VIP (errors quoting a VIP flow) and non-first fragments carry no port: pass.
    assert run(code, frame(proto=1, dport=81)) == bpf.ACCEPT_LEN
    assert run(code, frame(dport=81, frag=0x2000 | 185)) == bpf.ACCEPT_LEN
    # A first fragment (MF set, offset 0) has its UDP header: the port rule applies.
    assert run(code, frame(dport=81, frag=0x2000)) == 0


def test_vip_filter_any_port_wins_over_port_list() -> None:
    code = bpf.assemble(bpf.ipv4_dst_filter([("20.0.0.1", 80), ("20.0.0.1", None)]))
    assert run(code, frame(dport=8080)) == bpf.ACCEPT_LEN


def test_vip_filter_bad_input() -> None:
    with pytest.raises(BpfError, match="no destination"):
        bpf.ipv4_dst_filter([])
    with pytest.raises(BpfError, match="out of range"):
        bpf.ipv4_dst_filter([("20.0.0.1", 70000)])
    with pytest.raises(ValueError):
        bpf.ipv4_dst_filter(["20.0.0.300"])


def test_tunnel_filter_sources() -> None:
    local = "10.2.3.2"
    prog = bpf.tunnel_filter(IPIP, local, ["10.1.1.2", ("10.1.2.0", 24)])
    code = bpf.assemble(prog)
    assert run(code, frame(dst=local, src="10.1.1.2", proto=4)) == bpf.ACCEPT_LEN
    assert run(code, frame(dst=local, src="10.1.2.77", proto=4)) == bpf.ACCEPT_LEN
    assert run(code, frame(dst=local, src="10.8.16.2", proto=4)) == 0  # spoofed tunnel
    assert run(code, frame(dst=local, src="10.1.1.2", proto=17)) == 0  # not IP-in-IP
    assert run(code, frame(dst="10.2.3.3", src="10.1.1.2", proto=4)) == 0  # not to us
    assert run(code, frame(dst=local, src="10.1.1.2", proto=4), PKTTYPE_OUTGOING) == 0


def test_tunnel_filter_any_source_and_none_allowed() -> None:
    local = "10.2.3.2"
    code = bpf.assemble(bpf.tunnel_filter(IPIP, local))
    assert run(code, frame(dst=local, src="1.2.3.4", proto=4)) == bpf.ACCEPT_LEN
    code = bpf.assemble(bpf.tunnel_filter(IPIP, local, ["10.1.0.0/16"]))
    assert run(code, frame(dst=local, src="10.1.200.1", proto=4)) == bpf.ACCEPT_LEN
    code = bpf.assemble(bpf.tunnel_filter(IPIP, local, []))
    assert run(code, frame(dst=local, src="10.1.1.2", proto=4)) == 0


def test_tunnel_filter_reads_the_encapsulation() -> None:
    """Another encapsulation (a UDP-based one, as GUE would be) changes what passes."""
    local = "10.2.3.2"
    udp_tunnel = Encap("udp-test", IPPROTO_UDP, IPIP.header_len + 8)
    code = bpf.assemble(bpf.tunnel_filter(udp_tunnel, local, ["10.1.1.2"]))
    assert run(code, frame(dst=local, src="10.1.1.2", proto=17)) == bpf.ACCEPT_LEN
    assert run(code, frame(dst=local, src="10.1.1.2", proto=4)) == 0
