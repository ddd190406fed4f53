"""l4lb.procnet: /proc/net/dev and /proc/net/tcp parsed as the kernel prints them."""

from __future__ import annotations

import socket

from l4lb import procnet

NET_DEV = """\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:     100       2    0    0    0     0          0         0      100       2    0    0    0     0       0          0
h1-eth0: 1234567    8901    0    3    0     0          0         0  7654321     1098    0    0    0     0       0          0
"""  # noqa: E501


def test_net_dev_columns_are_named_as_the_kernel_orders_them() -> None:
    dev = procnet.parse_net_dev(NET_DEV)
    assert set(dev) == {"lo", "h1-eth0"}
    h1 = dev["h1-eth0"]
    assert (h1["rx_bytes"], h1["rx_packets"], h1["rx_drop"]) == (1234567, 8901, 3)
    assert (h1["tx_bytes"], h1["tx_packets"]) == (7654321, 1098)


def test_net_dev_of_this_process_has_lo() -> None:
    assert "lo" in procnet.net_dev()


def test_proc_net_addr_matches_kernel_format() -> None:
    # /proc/net/tcp shows 127.0.0.1:80 as 0100007F:0050
    assert procnet.proc_net_addr("127.0.0.1", 80) == "0100007F:0050"
    assert procnet.proc_net_addr("20.0.0.1", 80) == "01000014:0050"


def test_tcp_listening_sees_a_real_listener_and_not_a_closed_one() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    assert not procnet.tcp_listening("self", "127.0.0.1", port)  # bound, not listening
    s.listen()
    try:
        assert procnet.tcp_listening("self", "127.0.0.1", port)
        assert not procnet.tcp_listening("self", "127.0.0.2", port)
    finally:
        s.close()
    assert not procnet.tcp_listening("self", "127.0.0.1", port)
    assert not procnet.tcp_listening(2**22 + 1, "127.0.0.1", port)  # no such process
