"""The agent's health checks: the checker's state machine and dampening with `now` passed in,
the HTTP check against real sockets on loopback, and the probe responder (answers, malformed
probes counted and ignored, a push the moment the verdict changes). No root."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from agent.health import Checker, Dampening
from agent.healthsvc import AgentHealth, HttpCheck
from l4lb.healthcfg import HealthConfig
from l4lb.healthwire import Kind, Probe, Verdict, decode_reply, encode_probe

CFG = HealthConfig()


def simulate(up: Callable[[float], bool], until: float, cfg: HealthConfig = CFG) -> list:
    """Run a checker over a server whose state at time t is up(t); checks take no time.
    Returns the verdict changes as (time, verdict)."""
    c = Checker(cfg, 0.0)
    changes = []
    t = 0.0
    while t < until:
        if c.result(t, up(t), "ok" if up(t) else "refused"):
            changes.append((round(t, 3), c.verdict))
        nxt = c.next_check(t)
        wake = c.wake_at()
        if wake < nxt and c.tick(wake):  # a held server released between two checks
            changes.append((round(wake, 3), c.verdict))
        t = nxt
    return changes


def test_unknown_until_the_first_result_then_up_at_once() -> None:
    c = Checker(CFG, 0.0)
    assert c.verdict == Verdict.UNKNOWN
    assert c.next_check(0.0) == pytest.approx(CFG.fast_interval)  # not known: look again soon
    assert c.result(0.0, True, "200") and c.verdict == Verdict.UP


def test_a_server_down_at_start_needs_fall_failures() -> None:
    changes = simulate(lambda t: False, 2.0)
    assert changes == [(pytest.approx(2 * CFG.fast_interval), Verdict.DOWN)]


def test_a_death_is_confirmed_fast_and_a_recovery_is_not_delayed() -> None:
    def up(t: float) -> bool:
        return not 5.03 <= t < 10.03

    changes = simulate(up, 20.0)
    assert [v for _, v in changes] == [Verdict.UP, Verdict.DOWN, Verdict.UP]
    worst = CFG.interval + (CFG.fall - 1) * CFG.fast_interval
    assert 0 < changes[1][0] - 5.03 <= worst + 1e-9
    assert 0 < changes[2][0] - 10.03 <= CFG.interval + (CFG.rise - 1) * CFG.fast_interval + 1e-9


def test_a_server_flapping_every_half_second_changes_the_verdict_a_few_times() -> None:
    def up(t: float) -> bool:
        return t < 1.0 or t >= 21.0 or int((t - 1.0) / 0.5) % 2 == 1

    changes = simulate(up, 80.0)
    during = [c for c in changes if c[0] < 21.0]
    assert len(during) <= 6, changes  # without dampening: two per second, 40
    # Held down from the third death on, released once the penalty decays (within the bound),
    # and up for good.
    assert changes[-1][1] == Verdict.UP
    assert 21.0 < changes[-1][0] <= 21.0 + CFG.max_suppress + CFG.interval
    held = simulate(up, 21.0)
    assert held[-1][1] == Verdict.DOWN


def test_dampening_decays_and_is_bounded() -> None:
    d = Dampening(CFG, 0.0)
    d.went_down(0.0)
    assert not d.update(0.0) and d.penalty == 1.0
    assert d.update(CFG.half_life) is False and d.penalty == pytest.approx(0.5)
    for i in range(100):
        d.went_down(CFG.half_life + i * 0.01)
    assert d.suppressed and d.penalty == pytest.approx(CFG.ceiling)
    release = d.release_at()
    assert release == pytest.approx(d.at + CFG.max_suppress)
    assert d.update(release - 0.01) and not d.update(release + 0.01)
    assert d.release_at() == float("inf")


# -- the HTTP check, on loopback --------------------------------------------------------------


class Handler(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_HEAD(self) -> None:
        self.send_response(self.status)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[http.server.ThreadingHTTPServer]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


def run_check(check: HttpCheck) -> tuple[bool, str]:
    res = check.start(time.monotonic())
    deadline = time.monotonic() + 5
    while res is None:
        assert time.monotonic() < deadline, "the check never ended"
        time.sleep(0.001)
        res = check.poll(time.monotonic())
    assert not check.running
    return res


def test_http_check_passes_on_2xx_and_fails_on_5xx(
    server: http.server.ThreadingHTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    addr = server.server_address[:2]
    ok, detail = run_check(HttpCheck(addr, CFG.request(), 1.0))  # type: ignore[arg-type]
    assert ok and detail.startswith("HTTP/1.0 200 OK in "), detail
    monkeypatch.setattr(Handler, "status", 503)
    ok, detail = run_check(HttpCheck(addr, CFG.request(), 1.0))  # type: ignore[arg-type]
    assert not ok and detail.startswith("HTTP/1.0 503"), detail


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_http_check_fails_when_refused_or_silent() -> None:
    ok, detail = run_check(HttpCheck(("127.0.0.1", free_port()), CFG.request(), 1.0))
    assert (ok, detail) == (False, "connect: connection refused")
    with socket.socket() as silent:  # the kernel completes the handshake; nobody answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        t0 = time.monotonic()
        ok, detail = run_check(HttpCheck(silent.getsockname(), CFG.request(), 0.2))
        assert not ok and detail == "no status line in 200 ms"
        assert 0.2 <= time.monotonic() - t0 < 1.0


# -- the responder --------------------------------------------------------------------------


def drive(agent: AgentHealth, seconds: float, until: Callable[[], bool] = lambda: False) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end and not until():
        agent.service(time.monotonic())
        time.sleep(0.002)


def test_responder_answers_probes_counts_bad_ones_and_pushes_a_change(
    server: http.server.ThreadingHTTPServer,
) -> None:
    responder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    responder.bind(("127.0.0.1", 0))
    cfg = HealthConfig(port=responder.getsockname()[1])
    agent = AgentHealth(
        cfg, "127.0.0.1", "10.2.3.2", time.monotonic(), responder=responder,
        check_addr=server.server_address[:2],  # type: ignore[arg-type]
    )  # fmt: skip
    lb = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    lb.bind(("127.0.0.1", 0))
    lb.settimeout(2)
    try:
        drive(agent, 2, lambda: agent.checker.verdict == Verdict.UP)
        assert agent.checker.verdict == Verdict.UP
        me = bytes([10, 2, 3, 2])
        lb.sendto(encode_probe(Probe(token=99, seq=5, backend=me)), responder.getsockname())
        lb.sendto(b"junk", responder.getsockname())
        lb.sendto(encode_probe(Probe(99, 6, bytes([10, 9, 9, 9]))), responder.getsockname())
        drive(agent, 2, lambda: agent.probes == 1 and sum(agent.malformed.values()) == 2)
        r = decode_reply(lb.recv(2048))
        assert (r.kind, r.token, r.seq, r.backend, r.verdict) == (Kind.REPLY, 99, 5, me, Verdict.UP)
        assert agent.malformed["short"] == 1 and agent.malformed["wrong_backend"] == 1
        assert agent.probes == 1  # the bad ones were not answered
        # The server dies: the verdict changes and is pushed to the LB that probed, unasked.
        server.shutdown()
        server.server_close()
        t0 = time.monotonic()
        drive(agent, 3, lambda: agent.pushes > 0)
        push = decode_reply(lb.recv(2048))
        assert (push.kind, push.verdict, push.token, push.seq) == (Kind.PUSH, Verdict.DOWN, 99, 5)
        assert "refused" in push.detail
        assert time.monotonic() - t0 < CFG.interval + CFG.fall * CFG.fast_interval + 0.5
        s = agent.stats(time.monotonic())
        assert (s.verdict, s.probes, s.pushes, s.lbs) == ("down", 1, 1, [
            f"127.0.0.1:{lb.getsockname()[1]}"
        ])  # fmt: skip
    finally:
        agent.close()
        lb.close()


def test_service_checks_fast_after_a_failure(server: http.server.ThreadingHTTPServer) -> None:
    """The service's own schedule, with `now` passed in: once an up server fails a check, it
    is down `fall` checks later, fast_interval apart (not interval apart)."""
    responder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    responder.bind(("127.0.0.1", 0))
    agent = AgentHealth(
        CFG, "127.0.0.1", "10.2.3.2", 0.0, responder=responder,
        check_addr=server.server_address[:2],  # type: ignore[arg-type]
    )  # fmt: skip
    t, first_failure = 0.0, None
    try:
        while agent.checker.verdict != Verdict.DOWN and t < 5.0:
            due = agent.service(t)
            if agent.checker.verdict == Verdict.UP and t > 1.0 and server.socket.fileno() >= 0:
                server.shutdown()
                server.server_close()
            if first_failure is None and agent.checker.check_failures:
                first_failure = t
            time.sleep(0.001)  # real sockets: let the check's I/O happen
            t = round(max(t + 0.001, min(due, t + 0.05)), 4)
        assert agent.checker.verdict == Verdict.DOWN and first_failure is not None
        assert agent.checker.since - first_failure <= (CFG.fall - 1) * CFG.fast_interval + 0.01
    finally:
        agent.close()


def test_the_lbs_remembered_for_pushes_are_bounded() -> None:
    from agent.healthsvc import PEERS_MAX

    responder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    responder.bind(("127.0.0.1", 0))
    agent = AgentHealth(
        CFG, "127.0.0.1", "10.2.3.2", 0.0, responder=responder, check_addr=("127.0.0.1", 1)
    )
    senders = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(PEERS_MAX + 6)]
    try:
        probe = encode_probe(Probe(1, 1, bytes([10, 2, 3, 2])))
        for s in senders:
            s.sendto(probe, responder.getsockname())
        drive(agent, 2, lambda: agent.probes == len(senders))
        assert agent.probes == len(senders) and len(agent.peers) == PEERS_MAX
        newest = senders[-1].getsockname()
        assert ("127.0.0.1", newest[1]) in agent.peers  # the oldest went, not the newest
    finally:
        for s in senders:
            s.close()
        agent.close()
