"""The real `python -m fastpath.lb` on veth testbeds (root).

- golden: the core's golden input pcap injected on the LB's link gives exactly the golden output
  pcap on the wire, in order and nothing else; counters in the stats file; SIGTERM exits 0 with
  offloads and nftables as before (the nft ingress drop was in place and counted the VIP
  frames the LB still forwarded: AF_PACKET taps run before netdev ingress on this kernel).
- routed: client -> router -> LB -> router -> backend with real kernel UDP; the backend receives
  IP-in-IP whose inner packet is what reached the LB, with the UDP checksum the client's
  checksum offload left partial completed; the LB host sends nothing but encapsulated frames;
  the next-hop MAC was learned from the neighbour table.
"""

from __future__ import annotations

import ipaddress
import json
import os
import struct
from pathlib import Path

import pytest

from bench.netns import PY, Capture, Netns, NsProc, capture, routed_lb, sh
from l4lb.control import RequestRefused, request
from tests.fixtures import cases

pytestmark = [pytest.mark.netns, pytest.mark.needs("ethtool")]


def lb_proc(ns: str, args: list[str]) -> NsProc:
    return NsProc(ns, [PY, "-m", "fastpath.lb", *args])


def _checksum_ok(header: bytes) -> bool:
    s = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    return s == 0xFFFF


def _udp_checksum_ok(ip: bytes) -> bool:
    ihl = (ip[0] & 0x0F) * 4
    seg = ip[ihl : int.from_bytes(ip[2:4], "big")]
    pseudo = ip[12:20] + bytes([0, ip[9]]) + len(seg).to_bytes(2, "big")
    return _checksum_ok(pseudo + seg + b"\0" * (len(seg) % 2))


def _no_udp_csum(ip: bytes) -> bytes:
    off = (ip[0] & 0x0F) * 4 + 6
    return ip[:off] + b"\0\0" + ip[off + 2 :]


def _golden_args(ifname: str, stats: Path) -> list[str]:
    cfg = cases.CONFIGS["default"]
    args = [ifname, "--next-hop-mac", str(cfg["next_hop_mac"]), "--stats-file", str(stats)]
    args += ["--stats-interval", "0.2"]
    for ip, port in cfg["vips"]:  # type: ignore[attr-defined]
        args += ["--vip", f"{ip}:{port}" if port else ip]
    for ip, weight in cfg["backends"]:  # type: ignore[attr-defined]
        args += ["--backend", f"{ip}={weight}"]
    return args


def test_golden_pcaps_on_the_wire_and_clean_exit(netns: Netns, tmp_path: Path) -> None:
    peer, lbns = netns.add("P"), netns.add("L")
    p_if, l_if = f"p{netns.tag}", f"l{netns.tag}"
    netns.veth(peer, p_if, lbns, l_if, mac_a=cases.GW_MAC, mac_b=cases.LB_MAC)
    sh("ip", "addr", "add", f"{cases.LB_IP}/24", "dev", l_if, ns=lbns)
    sh("ethtool", "-K", l_if, "gro", "on", ns=lbns)  # so the LB has an offload to restore
    offloads_before = sh("ethtool", "-k", l_if, ns=lbns)
    stats = tmp_path / "lb.json"
    ctl = tmp_path / "lb.ctl"

    lb = lb_proc(lbns, [*_golden_args(l_if, stats), "--control-socket", str(ctl)])
    try:
        first = lb.wait_event(timeout=20)
        assert first["final"] is False and first["iface"] == l_if
        assert json.loads(stats.read_text())["final"] is False  # readable while running
        during = sh("ethtool", "-k", l_if, ns=lbns)
        assert "generic-receive-offload: off" in during
        table = sh("nft", "list", "table", "netdev", f"l4lb_{l_if}", ns=lbns)
        assert "20.0.0.1" in table and "drop" in table

        inputs = cases.read_pcap(cases.pcap_path("default", "in"))
        expected = cases.read_pcap(cases.pcap_path("default", "out"))
        got = capture(peer, p_if, 2.0, send=inputs)
        # The control channel answers from the running loop with the counters as they are now.
        live = request(ctl, "show")
        assert live["iface"] == l_if and live["final"] is False
        ipip_out = [f for f in expected if f[23] == 4]
        assert live["core"]["forwarded"] == len(ipip_out)  # the filter passed the rest
        assert request(ctl, "ping")["pid"] == live["pid"]
        with pytest.raises(RequestRefused, match="unknown command 'nope'"):
            request(ctl, "nope")
    finally:
        rc = lb.stop()
    assert rc == 0, lb.stderr
    assert not ctl.exists()  # the socket file goes with the process

    # Exactly the golden frames, in order, and nothing else from the LB host.
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g == e, f"frame {i}: got {g.hex()} expected {e.hex()}"

    # Restored: offloads exactly as before, no nftables table left.
    assert sh("ethtool", "-k", l_if, ns=lbns) == offloads_before
    assert f"l4lb_{l_if}" not in sh("nft", "list", "tables", ns=lbns)

    final = json.loads(stats.read_text())
    assert final["final"] is True
    assert lb.latest_event() == final  # the last stdout line is the final snapshot
    core = final["core"]
    ipip = [f for f in expected if f[23] == 4]
    icmp = [f for f in expected if f[23] == 1]
    assert core["forwarded"] == len(ipip)
    assert core["icmp_frag_needed_sent"] == len(icmp) == 1
    assert core["drops"]["internal_error"] == 0
    assert core["frames"] == final["io"]["rx_frames"]
    assert final["io"]["tx_frames"] == len(expected) and final["io"]["tx_errors"] == 0
    assert final["kernel_drops"] == 0
    # The netdev ingress drop saw (and dropped) the VIP frames the LB forwarded.
    assert final["nft_dropped"] >= len(ipip)


def _ipv4(frame: bytes) -> tuple[int, int, str, str]:
    """(protocol, TTL, source, destination) of an Ethernet/IPv4 frame."""
    ttl, proto = frame[22], frame[23]
    return (
        proto,
        ttl,
        str(ipaddress.IPv4Address(frame[26:30])),
        str(ipaddress.IPv4Address(frame[30:34])),
    )


_UDP_CLIENT = r"""
import socket, sys
for port in range(int(sys.argv[1]), int(sys.argv[2])):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    s.sendto(b"hello %d" % port, ("20.0.0.1", int(sys.argv[3])))
    s.close()
print("[]")
"""


def test_routed_udp_reaches_backend_encapsulated(netns: Netns, tmp_path: Path) -> None:
    c, r, lbns, b = routed_lb(netns, client_offload=True)  # partial checksums leave c
    t = netns.tag
    r_mac = json.loads(sh("ip", "-j", "link", "show", f"rl{t}", ns=r))[0]["address"]
    b_mac = json.loads(sh("ip", "-j", "link", "show", f"b{t}", ns=b))[0]["address"]

    stats = tmp_path / "lb.json"
    args = [f"l{t}", "--vip", "20.0.0.1:80", "--backend", "10.100.3.2", "--backend"]
    args += ["10.100.3.3", "--stats-file", str(stats), "--stats-interval", "0.2"]
    lb = lb_proc(lbns, args)
    caps: list[Capture] = []
    try:
        ready = lb.wait_event(timeout=20)
        assert ready["next_hop_mac"] == r_mac  # learned from the neighbour table
        at_backend = Capture(b, f"b{t}", 4.0)
        from_lb = Capture(r, f"rl{t}", 4.0)  # everything the LB host sends
        at_lb = Capture(lbns, f"l{t}", 4.0)
        caps = [at_backend, from_lb, at_lb]
        flows = 40
        sh(PY, "-c", _UDP_CLIENT, "40000", str(40000 + flows), "80", ns=c)
        sh(PY, "-c", _UDP_CLIENT, "41000", "41001", "81", ns=c)  # not a VIP port: filtered
        backend_frames, lb_sent, lb_got = (cap.result() for cap in caps)
    finally:
        for cap in caps:
            cap.kill()
        rc = lb.stop()
    assert rc == 0, lb.stderr

    to_vip = [f for f in lb_got if f[12:14] == b"\x08\x00" and _ipv4(f)[3] == "20.0.0.1"]
    to_vip_80 = [f for f in to_vip if f[36:38] == (80).to_bytes(2, "big")]
    assert len(to_vip_80) == flows
    ipip = [f for f in backend_frames if f[12:14] == b"\x08\x00" and f[23] == 4]
    assert len(ipip) == flows
    # The client's veth has checksum offload on: its UDP checksums reach the LB partial
    # (TP_STATUS_CSUMNOTREADY), and the LB completes them. Otherwise byte-identical.
    inner_sent = sorted(
        _no_udp_csum(f[14 : 14 + int.from_bytes(f[16:18], "big")]) for f in to_vip_80
    )
    inner_got = [f[34:] for f in ipip]
    assert sorted(_no_udp_csum(p) for p in inner_got) == inner_sent
    # ...and complete: the backend's stack verifies the UDP checksum after decapsulation.
    assert all(_udp_checksum_ok(ip) for ip in inner_got)
    backends_used = set()
    for f in ipip:
        _, ttl, src, dst = _ipv4(f)
        assert f[0:6] == bytes.fromhex(b_mac.replace(":", ""))
        assert f[14] == 0x45 and ttl == 63  # TTL 64 set by the LB, minus the router's hop
        assert src == "10.100.2.2" and dst in ("10.100.3.2", "10.100.3.3")
        assert _checksum_ok(f[14:34])
        assert int.from_bytes(f[16:18], "big") == len(f) - 14
        backends_used.add(dst)
    assert backends_used == {"10.100.3.2", "10.100.3.3"}

    # The LB host sent nothing but IP-in-IP (ARP for its own address aside).
    for f in lb_sent:
        if f[12:14] == b"\x08\x06":
            continue
        assert f[12:14] == b"\x08\x00" and f[23] == 4, f"LB host sent {f[:40].hex()}"

    final = json.loads(stats.read_text())
    assert final["core"]["forwarded"] == flows
    assert final["io"]["rx_csum_completed"] == flows
    assert sum(final["core"]["backends"].values()) == flows
    assert final["core"]["drops"]["wrong_port"] == 0  # port 81 never reached Python


def test_refuses_to_start_when_the_host_forwards(netns: Netns, tmp_path: Path) -> None:
    lbns = netns.add("L")
    other = netns.add("P")
    netns.veth(lbns, f"l{netns.tag}", other, f"p{netns.tag}")
    sh("ip", "addr", "add", "10.1.1.2/24", "dev", f"l{netns.tag}", ns=lbns)
    sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=lbns)
    args = [f"l{netns.tag}", "--next-hop-mac", "02:00:00:00:00:01"]
    lb = lb_proc(lbns, [*args, "--vip", "20.0.0.1", "--backend", "10.2.3.2"])
    rc = lb.stop(timeout=20) if lb.proc.wait(20) is not None else -1
    assert rc == 2
    assert "net.ipv4.ip_forward is 1" in lb.stderr
    assert "l4lb_" not in sh("nft", "list", "tables", ns=lbns)  # nothing was installed


def test_frame_larger_than_a_ring_slot_is_counted_and_warned(netns: Netns, tmp_path: Path) -> None:
    # What an unsegmented TCP super-frame (TSO upstream) looks like to the LB: more bytes than
    # a ring slot holds. Jumbo MTUs let one through the veth.
    peer, lbns = netns.add("P"), netns.add("L")
    p_if, l_if = f"p{netns.tag}", f"l{netns.tag}"
    netns.veth(peer, p_if, lbns, l_if, mac_a=cases.GW_MAC, mac_b=cases.LB_MAC)
    for ns, dev in ((peer, p_if), (lbns, l_if)):
        sh("ip", "link", "set", dev, "mtu", "9000", ns=ns)
    sh("ip", "addr", "add", f"{cases.LB_IP}/24", "dev", l_if, ns=lbns)
    stats = tmp_path / "lb.json"
    lb = lb_proc(lbns, _golden_args(l_if, stats))
    try:
        lb.wait_event(timeout=20)
        big = bytes.fromhex(cases.GW_MAC.replace(":", "") + cases.LB_MAC.replace(":", ""))
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 4000, 1, 0x4000, 64, 17, 0,
                         bytes([10, 8, 16, 2]), bytes([20, 0, 0, 1]))  # fmt: skip
        udp = struct.pack("!HHHH", 40000, 53, 3980, 0)
        frame = big + b"\x08\x00" + ip + udp + bytes(3972)
        got = capture(peer, p_if, 1.0, send=[frame])
    finally:
        rc = lb.stop()
    assert rc == 0, lb.stderr
    assert got == []  # nothing forwarded
    final = json.loads(stats.read_text())
    assert final["io"]["rx_truncated"] == 1
    assert final["core"]["frames"] == 1 and final["core"]["forwarded"] == 0
    assert "turn off tso and gso" in lb.stderr


def test_pinned_lb_steers_its_receive_softirq_to_the_other_cpus(
    netns: Netns, tmp_path: Path
) -> None:
    """--rps-cpus auto (the default) with --cpu 0: IFACE's RPS mask is every other CPU while
    it runs (its receive work never shares the LB's core), the old mask after it exits."""
    ncpu = os.cpu_count() or 1
    if ncpu < 2:
        pytest.skip("one CPU: no other core to steer the receive softirq to")
    peer, lbns = netns.add("P"), netns.add("L")
    p_if, l_if = f"p{netns.tag}", f"l{netns.tag}"
    netns.veth(peer, p_if, lbns, l_if, mac_a=cases.GW_MAC, mac_b=cases.LB_MAC)
    sh("ip", "addr", "add", f"{cases.LB_IP}/24", "dev", l_if, ns=lbns)
    path = f"/sys/class/net/{l_if}/queues/rx-0/rps_cpus"
    before = int(sh("cat", path, ns=lbns).strip().replace(",", ""), 16)
    lb = lb_proc(lbns, [*_golden_args(l_if, tmp_path / "lb.json"), "--cpu", "0"])
    try:
        first = lb.wait_event(timeout=20)
        during = int(sh("cat", path, ns=lbns).strip().replace(",", ""), 16)
    finally:
        rc = lb.stop()
    assert rc == 0, lb.stderr
    others = (1 << ncpu) - 2  # every CPU but 0
    assert during == others
    assert int(first["rps_cpus"], 16) == others
    assert int(sh("cat", path, ns=lbns).strip().replace(",", ""), 16) == before
