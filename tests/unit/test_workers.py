"""fastpath.workers without root or fork: the protocol, the summing, the arguments, and the
WorkerPool against in-process workers (a real Balancer each, served by fastpath.worker's
Channel and handlers on a thread, over real socket pairs)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import pytest
from core_flows import FOUR, cfg, random_flows

from fastpath.backends import BackendError, Backends, BackendSpec
from fastpath.balancer import Balancer
from fastpath.config import LbConfig
from fastpath.lb import build_parser
from fastpath.stats import IoStats
from fastpath.worker import Channel, handlers
from fastpath.workerpool import Worker, WorkerFailed, WorkerPool, worker_cpus
from fastpath.workerproto import (
    LineReader,
    ProtocolError,
    WorkerStats,
    counters_of,
    encode,
    merge,
)
from l4lb.errors import ConfigError

# --- the protocol and the sums ------------------------------------------------------------


def test_line_reader_joins_partial_lines_and_splits_several() -> None:
    r = LineReader()
    line = encode({"seq": 1, "op": "stats"}) + encode({"seq": 2, "op": "x"})
    assert list(r.feed(line[:5])) == []
    assert list(r.feed(line[5:])) == [{"seq": 1, "op": "stats"}, {"seq": 2, "op": "x"}]


@pytest.mark.parametrize(
    ("line", "why"),
    [(b"{nope\n", "not JSON"), (b"[1]\n", "integer seq"), (b'{"seq": "1"}\n', "integer seq")],
)
def test_line_reader_refuses_what_is_no_message(line: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        list(LineReader().feed(line))


def test_merge_adds_counters_key_by_key_and_keeps_the_rest() -> None:
    a = {"frames": 3, "drops": {"not_vip": 1, "ttl_expired": 0}, "final": False, "ip": "x"}
    b = {"frames": 4, "drops": {"not_vip": 2, "new_reason": 5}, "final": True, "ip": "y"}
    assert merge([a, b]) == {
        "frames": 7,
        "drops": {"not_vip": 3, "ttl_expired": 0, "new_reason": 5},
        "final": False,  # a flag, not a counter: the first worker's
        "ip": "x",
    }
    with pytest.raises(ValueError, match="merge of nothing"):
        merge([])


def test_a_counter_added_to_a_stats_dataclass_sums_with_no_change_here() -> None:
    @dataclass
    class Later(IoStats):  # as another change would add a field to IoStats
        evictions: int = 0

    one, two = Later(rx_frames=5, evictions=2), Later(rx_frames=7, evictions=3)
    summed = Later(**merge([asdict(one), asdict(two)]))
    assert summed.rx_frames == 12 and summed.evictions == 5


def test_worker_stats_sum_to_the_single_process_figures() -> None:
    """Two Balancers that shared a flow set between them count, summed, what one Balancer that
    saw all of it counts (the worker's stats and the merge, end to end)."""
    frames = random_flows(400, seed=7)
    one, halves = Balancer(cfg()), [Balancer(cfg()), Balancer(cfg())]
    out = memoryview(bytearray(2048))
    for i, f in enumerate(frames):
        one.process(f, out, 1.0)
        halves[i % 2].process(f, out, 1.0)
    io = IoStats()
    stats = [WorkerStats.of(i, 100 + i, i, b, io, 0).as_dict() for i, b in enumerate(halves)]
    whole = WorkerStats.of(0, 100, 0, one, io, 0).as_dict()
    assert merge([s["core"] for s in stats]) == whole["core"]
    assert merge([s["per_backend"] for s in stats]) == whole["per_backend"]
    c = counters_of(merge([s["per_backend"] for s in stats]))
    assert c.per_backend(c.forwarded) == one.counters.per_backend(one.counters.forwarded)
    # The connection tables' flow counters too; the cap adds up (each worker has its own).
    flows, alone = merge([s["flows"] for s in stats]), whole["flows"]
    assert flows["new_flows"] == alone["new_flows"] == len(frames)
    assert flows["established"] + flows["half_open"] == alone["established"] + alone["half_open"]
    assert flows["insert_rate"] == 2 * alone["insert_rate"]


def test_worker_cpus_round_robin_over_the_allowed_ones() -> None:
    assert worker_cpus(3, {4, 2}) == [2, 4, 2]
    assert worker_cpus(1, {0}) == [0]
    with pytest.raises(ValueError, match="no CPU"):
        worker_cpus(2, set())


# --- arguments ----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1, 65, True, "2", 2.0])
def test_lbconfig_workers_must_be_an_integer_in_range(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"workers: must be an integer 1\.\.64"):
        LbConfig(iface="h1-eth0", vips=(("20.0.0.1", None),), backends=FOUR, workers=bad)  # type: ignore[arg-type]


def test_lbconfig_refuses_cpu_with_several_workers() -> None:
    with pytest.raises(ConfigError, match="cpu: pins the single forwarding process"):
        LbConfig(iface="h1-eth0", vips=(("20.0.0.1", None),), backends=FOUR, workers=2, cpu=0)


@pytest.mark.parametrize("bad", ["0", "-2", "x", "65"])
def test_cli_workers_bad_value_exits_2_with_the_reason(
    bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["h1-eth0", "--workers", bad])
    assert exc.value.code == 2
    assert f"argument --workers: must be an integer 1..64, not '{bad}'" in capsys.readouterr().err


# --- the pool against in-process workers --------------------------------------------------


class FakeWorker:
    """fastpath.worker's Channel and handlers on a real Balancer, served by a thread."""

    def __init__(self, index: int, sock: socket.socket) -> None:
        self.balancer = Balancer(cfg())
        self.index = index
        self.refuse_next = False
        """Refuse the next backend change (as a worker whose Balancer raises would)."""

        def stats(msg: dict[str, Any]) -> dict[str, Any]:
            return WorkerStats.of(index, 0, index, self.balancer, IoStats(), 0).as_dict()

        h = handlers(self.balancer, stats)
        apply = h["backends"]

        def maybe(msg: dict[str, Any]) -> Any:
            if self.refuse_next:
                self.refuse_next = False
                raise ValueError("refused for the test")
            return apply(msg)

        h["backends"] = maybe
        self.channel = Channel(sock, h, lambda: None)
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while not self.channel.eof:
            self.channel.service(time.monotonic())
            time.sleep(0.001)


@pytest.fixture
def pool_of() -> Iterator[Any]:
    made: list[tuple[WorkerPool, list[FakeWorker]]] = []

    def make() -> tuple[WorkerPool, list[FakeWorker]]:
        lb = LbConfig(iface="h1-eth0", vips=(("20.0.0.1", None),), backends=FOUR, workers=2)
        pool = WorkerPool(lb, cfg(), [0, 1])
        fakes = []
        for i in range(2):
            ours, theirs = socket.socketpair()
            pool.workers.append(Worker(i, i, -1, ours))
            fakes.append(FakeWorker(i, theirs))
        made.append((pool, fakes))
        return pool, fakes

    yield make
    for pool, fakes in made:
        for w in pool.workers:
            w.sock.close()
        for f in fakes:
            f.thread.join(2)
            f.channel.sock.close()


def test_a_backend_change_reaches_every_worker_before_it_returns(pool_of: Any) -> None:
    pool, fakes = pool_of()
    backends = Backends(pool, [BackendSpec(ip, w) for ip, w in FOUR])
    applied = backends.apply(backends.plan_weight("10.4.7.2", 0), 1.0)
    assert applied.changed and applied.slots_moved > 0
    for f in fakes:
        assert f.balancer.table_digest == pool.table_digest == backends.table.digest
        assert f.balancer.slots_owned()["10.4.7.2"] == 0


def test_a_change_one_worker_refuses_is_rolled_back_everywhere(pool_of: Any) -> None:
    pool, fakes = pool_of()
    backends = Backends(pool, [BackendSpec(ip, w) for ip, w in FOUR])
    before = pool.table_digest
    specs = backends.specs
    assert all(f.balancer.table_digest == before for f in fakes)
    fakes[1].refuse_next = True
    with pytest.raises(BackendError, match=r"rolled back.*worker 1: backends: refused for the"):
        backends.apply(backends.plan_remove("10.4.7.2"), 1.0)
    assert backends.specs == specs and backends.table.digest == before
    assert pool.table_digest == before  # the supervisor's shadow table too
    assert fakes[0].balancer.table_digest == before  # worker 0 had applied it: undone
    assert "10.4.7.2" in fakes[0].balancer.backends
    assert pool.failed is None  # a refusal is not a failure: the LB goes on


def test_poll_sums_the_workers_counters_for_backends(pool_of: Any) -> None:
    pool, fakes = pool_of()
    backends = Backends(pool, [BackendSpec(ip, w) for ip, w in FOUR])
    out = memoryview(bytearray(2048))
    frames = random_flows(300, seed=3)
    for i, f in enumerate(frames):
        fakes[i % 2].balancer.process(f, out, 1.0)
    results = pool.poll()
    assert [r["worker"] for r in results] == [0, 1]
    core, _, _, tracked = pool.summed()
    assert core.forwarded == len(frames) and tracked == len(frames)
    rows = backends.stats(1.0, 1000.0)
    assert sum(r.packets for r in rows) == len(frames)
    assert sum(r.active_flows for r in rows) == len(frames)
    assert sum(r.connections for r in rows) == len(frames)


def five_tuple(frame: bytes) -> tuple[str, int, str, int, int]:
    ip = socket.inet_ntoa
    sport, dport = int.from_bytes(frame[34:36], "big"), int.from_bytes(frame[36:38], "big")
    return ip(frame[26:30]), sport, ip(frame[30:34]), dport, frame[23]


def test_flow_asks_every_worker_and_answers_with_the_one_that_tracks_it(pool_of: Any) -> None:
    pool, fakes = pool_of()
    Backends(pool, [BackendSpec(ip, w) for ip, w in FOUR])
    seen, unseen = random_flows(2, seed=11)
    fakes[1].balancer.process(seen, memoryview(bytearray(2048)), 1.0)
    got = pool.flow(*five_tuple(seen))
    assert got["worker"] == 1 and got["state"] != "untracked", got
    assert got["backend"] == got["table_backend"] is not None
    nobody = pool.flow(*five_tuple(unseen))
    assert nobody["worker"] is None and nobody["state"] == "untracked", nobody
    assert pool.poll() and pool.flows().new_flows == 1


def test_a_worker_that_goes_away_fails_the_pool(pool_of: Any) -> None:
    pool, fakes = pool_of()
    stopped: list[bool] = []
    pool.on_failure = lambda: stopped.append(True)
    fakes[1].channel.sock.shutdown(socket.SHUT_RDWR)  # as its end closing at exit
    pool.workers[1].exited = "exit status 1"  # reaped (not a child of ours to wait for)
    with pytest.raises(WorkerFailed, match="worker 1"):
        pool.poll()
    assert stopped == [True] and pool.failed is not None
    with pytest.raises(WorkerFailed):  # and it stays failed
        pool.poll()
