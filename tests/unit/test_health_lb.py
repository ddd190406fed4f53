"""The LB's health probing: the prober's state machine with `now` passed in against a stand-in
of the backend state model (fastpath.health.HealthTarget), malformed and forged replies
counted and ignored, the state model itself as the target (fastpath.backends.Backends: fail
open; an unhealthy backend's slots move, the others stay), and one LB and one agent wired
together over loopback sockets. No root."""

from __future__ import annotations

import socket
import time
from typing import Any

from agent.healthsvc import AgentHealth
from fastpath.backends import Backends, BackendSpec
from fastpath.balancer import Balancer
from fastpath.config import BalancerConfig
from fastpath.health import HealthTarget, Prober
from fastpath.healthsvc import LbHealth
from l4lb.healthcfg import HealthConfig
from l4lb.healthwire import (
    PROBE,
    Kind,
    Reply,
    Verdict,
    decode_probe,
    encode_reply,
)

CFG = HealthConfig()
B1, B2 = "10.2.3.2", "10.4.7.2"


class StandIn:
    """The backend state model's two calls, recorded (its real one is on the other branch)."""

    def __init__(self, ips: list[str]) -> None:
        self.ips = ips
        self.healthy = dict.fromkeys(ips, True)
        self.calls: list[tuple[str, bool, float, str]] = []

    def probe_targets(self) -> list[str]:
        return list(self.ips)

    def set_health(self, ip: str, healthy: bool, now: float, reason: str) -> bool:
        self.calls.append((ip, healthy, now, reason))
        changed = self.healthy.get(ip) != healthy
        self.healthy[ip] = healthy
        return changed


def answer(
    payload: bytes, verdict: Verdict = Verdict.UP, kind: Kind = Kind.REPLY, **kw: Any
) -> bytes:
    p = decode_probe(payload)
    fields: dict[str, Any] = dict(
        kind=kind, token=p.token, seq=p.seq, backend=p.backend, verdict=verdict,
        suppressed=False, instance=1, age_ms=0, check_failures=0, detail="HTTP/1.0 200 OK",
    )  # fmt: skip
    fields.update(kw)
    return encode_reply(Reply(**fields))


def test_stand_in_is_a_health_target() -> None:
    assert isinstance(StandIn([]), HealthTarget)


def test_probes_every_interval_and_spreads_the_first_ones() -> None:
    t = StandIn([B1, B2])
    p = Prober(CFG, t, 0.0)
    assert [ip for ip, _ in p.due(0.0)] == [B1]
    assert [ip for ip, _ in p.due(CFG.interval / 2)] == [B2]
    ((ip, payload),) = p.due(CFG.interval)  # B1 never answered: missed, probed again
    assert ip == B1 and len(payload) == PROBE.size
    assert p.backends[B1].missed == 1 and p.backends[B1].reachable  # one miss is not enough
    assert t.calls == []


def test_unreachable_after_fall_misses_and_back_after_rise_replies() -> None:
    t = StandIn([B1])
    p = Prober(CFG, t, 0.0)
    now, sent = 0.0, 0
    while p.backends[B1].reachable:
        sent += len(p.due(now))
        now = round(now + 0.05, 3)
        assert now < 5
    # The first miss at timeout, then a probe at once after each miss (fast).
    ip, healthy, when, reason = t.calls[-1]
    assert (ip, healthy, "3 probes unanswered" in reason) == (B1, False, True)
    assert when <= CFG.fall * CFG.timeout + 0.051 and sent == CFG.fall
    # The agent answers again: reachable after `rise` replies.
    oks = 0
    while not p.backends[B1].healthy:
        for _ip, payload in p.due(now):
            p.on_reply(answer(payload), now + 0.001)
            oks += 1
        now = round(now + 0.05, 3)
        assert now < 10
    assert oks == CFG.rise and t.calls[-1][:2] == (B1, True)


def test_the_agents_verdict_and_its_push_decide() -> None:
    t = StandIn([B1])
    p = Prober(CFG, t, 0.0)
    ((_ip, payload),) = p.due(0.0)
    p.on_reply(answer(payload, Verdict.DOWN, detail="connect: connection refused"), 0.001)
    assert t.calls == [(B1, False, 0.001, "agent: down (connect: connection refused)")]
    # A push (the verdict changed) counts at once, without waiting for the next probe.
    p.on_reply(answer(payload, Verdict.UP, Kind.PUSH), 0.2)
    assert t.calls[-1][:3] == (B1, True, 0.2) and p.backends[B1].pushes == 1
    # UNKNOWN (an agent just started) keeps what the LB believed; a new instance is counted.
    ((_ip, payload),) = p.due(CFG.interval)
    p.on_reply(answer(payload, Verdict.UNKNOWN, instance=2), CFG.interval + 0.001)
    b = p.backends[B1]
    assert b.healthy and b.verdict == Verdict.UP and b.restarts == 1 and len(t.calls) == 2


def test_forged_late_and_malformed_replies_are_counted_and_ignored() -> None:
    t = StandIn([B1])
    p = Prober(CFG, t, 0.0, token=7)
    ((_ip, payload),) = p.due(0.0)
    p.on_reply(answer(payload, Verdict.DOWN, token=8), 0.01)  # not our token
    p.on_reply(answer(payload, Verdict.DOWN, backend=bytes([10, 9, 9, 9])), 0.01)
    p.on_reply(b"\x00" * 40, 0.01)
    p.on_reply(answer(payload, seq=12345), 0.01)  # no such probe awaiting
    assert p.malformed == {**p.malformed, "wrong_token": 1, "wrong_backend": 1, "bad_magic": 1}
    assert p.unknown_seq == 1 and t.calls == [] and p.backends[B1].outstanding is not None
    late = answer(payload, Verdict.DOWN)
    p.due(CFG.timeout)  # its time ran out
    p.on_reply(late, CFG.timeout + 0.01)
    assert p.backends[B1].late == p.unknown_seq == 2 and t.calls == []


def test_follows_the_backend_set() -> None:
    t = StandIn([B1])
    p = Prober(CFG, t, 0.0)
    p.due(0.0)
    t.ips = [B2]
    p.due(0.1)
    assert list(p.backends) == [B2] and {b.ip for b in p.by_seq.values()} == {B2}
    assert p.stats(0.1, 1000.0).backends[B2].healthy


# -- the interim target over the Balancer --------------------------------------------------------


def balancer(backends: tuple[tuple[str, int], ...]) -> Balancer:
    return Balancer(
        BalancerConfig(
            vips=(("20.0.0.1", 80),), backends=backends, local_ip="10.1.1.2",
            local_mac=bytes(6), next_hop_mac=bytes(6),
        )
    )  # fmt: skip


def test_the_state_model_is_the_target_applies_health_and_fails_open() -> None:
    backends = ((B1, 1), (B2, 1), ("10.6.11.2", 1))
    bal = balancer(backends)
    target = Backends(bal, (BackendSpec(ip, w) for ip, w in backends))
    assert isinstance(target, HealthTarget) and target.probe_targets() == [
        B1, B2, "10.6.11.2",
    ]  # fmt: skip
    table = list(bal._tables.table)
    id_b1 = bal.counters.backend_names.index(B1)
    assert target.set_health(B1, False, 1.0, "down")
    assert not target.set_health(B1, False, 1.1, "down")  # no change, no rebuild
    after = list(bal._tables.table)
    assert id_b1 not in after
    # Only B1's slots moved: no other flow changes backend.
    assert all(a == b for a, b in zip(table, after, strict=True) if a != id_b1)
    target.set_health(B2, False, 2.0, "down")
    target.set_health("10.6.11.2", False, 3.0, "down")
    assert target.fail_open and list(bal._tables.table) == table  # none healthy: all of them
    assert not target.set_health("10.9.9.9", False, 3.0, "unknown backend")
    target.set_health(B1, True, 4.0, "up")
    assert set(bal._tables.table) == {id_b1}


# -- one LB and one agent, wired over loopback ---------------------------------------------------


class LoopTunnel:
    """The tunnel, as the agent's core sees it: the inner UDP datagram's payload goes to the
    agent's probe socket, from the LB's reply socket (so the agent answers there)."""

    def __init__(self) -> None:
        self.lb_replies: socket.socket | None = None
        self.agent_addr: tuple[str, int] = ("", 0)
        self.sent: list[str] = []

    def setblocking(self, flag: bool) -> None:
        pass

    def sendto(self, inner: bytes, addr: tuple[str, int]) -> int:
        self.sent.append(addr[0])
        assert self.lb_replies is not None
        return self.lb_replies.sendto(inner[28:], self.agent_addr)  # past IPv4 + UDP

    def close(self) -> None:
        pass


def test_lb_and_agent_round_trip_and_a_death_reaches_the_lb_by_push() -> None:
    responder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    responder.bind(("127.0.0.1", 0))
    cfg = HealthConfig(port=responder.getsockname()[1])
    with socket.socket() as web:
        web.bind(("127.0.0.1", 0))
        web.listen()
        agent = AgentHealth(
            cfg, "127.0.0.1", B1, time.monotonic(), responder=responder,
            check_addr=("127.0.0.1", 1),  # nothing listens on port 1: every check fails
        )  # fmt: skip
    tunnel = LoopTunnel()
    replies = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    replies.bind(("127.0.0.1", 0))
    tunnel.lb_replies, tunnel.agent_addr = replies, responder.getsockname()
    target = StandIn([B1])
    lb = LbHealth(
        cfg, target, "127.0.0.1", "127.0.0.1", time.monotonic(), tunnel=tunnel,  # type: ignore[arg-type]
        replies=replies,
    )  # fmt: skip
    try:
        end = time.monotonic() + 5
        while time.monotonic() < end and not target.calls:
            now = time.monotonic()
            lb.service(now)
            agent.service(now)
            lb.service(time.monotonic())
            time.sleep(0.002)
        assert target.calls and target.calls[0][:2] == (B1, False), target.calls
        assert "refused" in target.calls[0][3]
        s = lb.stats(time.monotonic()).backends[B1]
        assert s.replies >= 1 and not s.healthy and s.reachable and s.verdict == "down"
        assert agent.probes >= 1 and tunnel.sent[0] == B1
    finally:
        lb.close()
        agent.close()
        replies.close()


def test_exporter_shows_health_and_a_failed_backend_as_down() -> None:
    from controller.exporter.view import lb_backends
    from fastpath.config import LbConfig

    cfg = LbConfig(iface="h1-eth0", vips=(("20.0.0.1", 80),), backends=((B1, 1), (B2, 0)))
    show = {
        "core": {"backends": {B1: 5, B2: 0}},
        "health": {"backends": {B1: {"healthy": False, "missed": 3}, B2: {"healthy": True}}},
    }
    rows = {r["backend"]: r for r in lb_backends(show, cfg)}
    assert (rows[B1]["state"], rows[B1]["healthy"], rows[B1]["health_missed"]) == ("DOWN", 0, 3)
    assert (rows[B2]["state"], rows[B2]["healthy"]) == ("DRAIN", 1)  # drained stays drained
    no_health = lb_backends({"core": {"backends": {}}}, cfg)
    assert all("healthy" not in r and r["state"] in ("UP", "DRAIN") for r in no_health)
