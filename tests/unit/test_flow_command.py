"""The `flow` control request: where the connection table has a flow (the SYN flood test's
check that the downloads' flows stay tracked)."""

from __future__ import annotations

import json

import pytest
from core_flows import backends_of, cfg, tcp_frame

from fastpath.balancer import Balancer
from fastpath.flow_commands import flow_commands
from l4lb.control import ControlServer

CLIENT = 0x0A090102  # 10.9.1.2


def ask(server: ControlServer, **req: object) -> dict[str, object]:
    return server.handle(json.dumps({"cmd": "flow", **req}).encode())


@pytest.fixture
def served(tmp_path) -> tuple[Balancer, ControlServer]:
    bal = Balancer(cfg(conn_insert_rate=2))
    server = ControlServer(tmp_path / "lb.ctl", flow_commands(bal.flow))
    yield bal, server
    server.close()


def test_a_flow_s_state_follows_its_packets(served) -> None:
    bal, server = served
    q = {"src": "10.9.1.2", "sport": 4000, "dst": "20.0.0.1", "dport": 80}
    table = ask(server, **q)["result"]
    assert table["state"] == "untracked" and table["backend"] is None  # type: ignore[index]
    [chosen] = backends_of(bal, [tcp_frame(CLIENT, 4000, flags=0x02)])
    assert ask(server, **q)["result"] == {
        "state": "half_open", "backend": chosen, "table_backend": chosen,
    }  # fmt: skip
    backends_of(bal, [tcp_frame(CLIENT, 4000, flags=0x10)])
    assert ask(server, **q)["result"]["state"] == "established"  # type: ignore[index]
    # Over the cap (2 per second): forwarded, never tracked.
    backends_of(bal, [tcp_frame(CLIENT, p, flags=0x02) for p in (4001, 4002)])
    assert ask(server, **{**q, "sport": 4001})["result"]["state"] == "half_open"  # type: ignore[index]
    assert ask(server, **{**q, "sport": 4002})["result"]["state"] == "untracked"  # type: ignore[index]


@pytest.mark.parametrize(
    ("req", "error"),
    [
        ({"src": "10.9.1.2", "sport": 1, "dst": "20.0.0.1"}, "'dport' must be an integer"),
        ({"src": "x", "sport": 1, "dst": "20.0.0.1", "dport": 80}, "'src' must be an IPv4"),
        ({"src": "10.9.1.2", "sport": 70000, "dst": "20.0.0.1", "dport": 80}, "'sport' must"),
        (
            {"src": "10.9.1.2", "sport": 1, "dst": "20.0.0.1", "dport": 80, "proto": "sctp"},
            '\'proto\' must be "tcp" or "udp"',
        ),
        ({"src": "10.9.1.2", "sport": 1, "dst": "20.0.0.1", "dport": 80, "prot": 6}, "unknown"),
    ],
)
def test_bad_flow_requests_are_refused(served, req, error) -> None:
    _, server = served
    reply = ask(server, **req)
    assert reply["ok"] is False and error in str(reply["error"]), reply
