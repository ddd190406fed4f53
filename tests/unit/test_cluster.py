"""Backend changes on every LB or on none (controller.cluster, controller.backend_cmd), with LB
endpoints faked by real packet cores and their real request handlers; the record and the
rendered configurations (controller.backend_record, controller.render)."""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from core_flows import cfg

from controller import backend_cmd, backend_record, render, services
from controller.backend_cmd import BackendCmdError, Env, format_list, gather, run_change
from controller.backend_record import BackendEntry, ClusterRecord
from controller.cluster import ClusterError, apply_everywhere
from controller.deployment import load_deployment
from controller.netstate import NetState, NodeRecord
from fastpath.backend_commands import backend_commands
from fastpath.backends import Backends, BackendSpec
from fastpath.balancer import Balancer
from fastpath.config import LbConfig
from l4lb import cfgfile
from l4lb.control import CommandError, ControlUnavailable, RequestRefused
from l4lb.errors import UsageError

DEP = load_deployment()
FOUR = DEP.backend_ips()
H16 = DEP.topology.host_ip("h16")
NAMES = {DEP.topology.host_ip(h): h for h, _ in DEP.backends}


class FakeLb:
    """An LB's control channel without the socket: a real Balancer and Backends behind the
    real handlers. `down` makes it unreachable; `fail_apply` makes the next non-dry-run
    replace refuse ("refuse") or land and then go silent ("vanish")."""

    def __init__(self, name: str, table_size: int = 65537, forbidden: Mapping[str, str] = {}):
        self.name = name
        specs = (BackendSpec(ip, w) for ip, w in FOUR)
        bal = Balancer(cfg(backends=FOUR, table_size=table_size))
        self.bk = Backends(bal, specs, 0.0, NAMES, forbidden)
        self.commands = backend_commands(self.bk, lambda: 1.0)
        self.down = False
        self.fail_apply: str | None = None
        self.log: list[str] = []

    def request(self, cmd: str, **args: Any) -> Any:
        if self.down:
            raise ControlUnavailable(f"/run/l4lb/lb-{self.name}.ctl: connection refused")
        self.log.append(cmd + (" dry" if args.get("dry_run") else ""))
        applying = cmd == "backends.replace" and not args.get("dry_run")
        if applying and self.fail_apply == "refuse":
            self.fail_apply = None
            raise RequestRefused(f"{cmd}: something changed since the dry run")
        try:
            result = self.commands[cmd].run({"cmd": cmd, **args})
        except CommandError as exc:
            raise RequestRefused(f"{cmd}: {exc}") from None
        if applying and self.fail_apply == "vanish":
            self.fail_apply = None
            self.down = True
            raise ControlUnavailable("no reply within 2 s")
        return json.loads(json.dumps(result))

    def state(self) -> tuple[Any, ...]:
        return (self.bk.specs, self.bk.table.digest)


def target(*extra: tuple[str, int]) -> list[dict[str, Any]]:
    return [{"ip": ip, "weight": w, "admin": "up"} for ip, w in (*FOUR, *extra)]


def test_applied_on_every_lb() -> None:
    lbs = [FakeLb("h1"), FakeLb("h2")]
    done = apply_everywhere(lbs, target((H16, 2)))
    assert [lb.bk.specs[-1] for lb in lbs] == [BackendSpec(H16, 2)] * 2
    assert lbs[0].bk.table.digest == lbs[1].bk.table.digest
    assert set(done.results) == {"h1", "h2"} and done.differed == {}
    # read, dry run everywhere, then apply everywhere
    assert lbs[0].log == ["backends", "backends.replace dry", "backends.replace"]


def test_an_lb_that_refuses_the_dry_run_changes_nothing_anywhere() -> None:
    lbs = [FakeLb("h1"), FakeLb("h2", forbidden={H16: "an LB's own address"})]
    before = [lb.state() for lb in lbs]
    with pytest.raises(ClusterError, match=r"h2 refused: .*own address; nothing was changed"):
        apply_everywhere(lbs, target((H16, 1)))
    assert [lb.state() for lb in lbs] == before
    assert "backends.replace" not in lbs[0].log  # h1 saw only the read and the dry run


def test_an_unreachable_lb_refuses_the_change_before_anything_changes() -> None:
    lbs = [FakeLb("h1"), FakeLb("h2")]
    lbs[1].down = True
    before = lbs[0].state()
    with pytest.raises(ClusterError, match=r"h2 cannot be reached .*nothing was changed"):
        apply_everywhere(lbs, target((H16, 1)))
    assert lbs[0].state() == before and lbs[0].log == ["backends"]


def test_an_lb_refusing_at_apply_gets_the_others_put_back() -> None:
    lbs = [FakeLb("h1"), FakeLb("h2"), FakeLb("h3x")]
    before = [lb.state() for lb in lbs]
    lbs[2].fail_apply = "refuse"
    with pytest.raises(ClusterError, match=r"h3x refused: .*; put back: h1, h2$"):
        apply_everywhere(lbs, target((H16, 1)))
    assert [lb.state() for lb in lbs] == before


def test_an_lb_lost_at_apply_is_reported_with_what_could_not_be_put_back() -> None:
    lbs = [FakeLb("h1"), FakeLb("h2")]
    before = lbs[0].state()
    lbs[1].fail_apply = "vanish"  # its change lands, then it goes silent
    with pytest.raises(ClusterError) as err:
        apply_everywhere(lbs, target((H16, 1)))
    msg = str(err.value)
    assert msg.startswith("h2 cannot be reached (no reply within 2 s); put back: h1; ")
    assert "h2 could not be put back" in msg and "the LBs may differ" in msg
    assert lbs[0].state() == before


def test_lbs_whose_tables_differ_are_an_error() -> None:
    lbs = [FakeLb("h1"), FakeLb("h2", table_size=65521)]
    with pytest.raises(ClusterError, match="lookup tables differ"):
        apply_everywhere(lbs, target())


def test_an_lb_that_differed_is_brought_in_line_and_named() -> None:
    lbs = [FakeLb("h1"), FakeLb("h2")]
    lbs[1].request("backend.weight", ip=FOUR[0][0], weight=5)
    done = apply_everywhere(lbs, target())
    assert set(done.differed) == {"h2"}
    assert lbs[0].state() == lbs[1].state()


# --- the command over a fake cluster ---------------------------------------------------------


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    """A cluster of two fake LBs, the deployment's record, rendered LB files, and a host h16
    that runs an agent and a server (the checks are faked; a test can take them away)."""
    record = backend_record.from_deployment(DEP)
    backend_record.write_record(tmp_path, record)
    for path, text in render.render(DEP, tmp_path, record).items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    names = [*DEP.topology.hosts(), *DEP.topology.switches()]
    nodes = {n: NodeRecord(n, "host", 1000 + i, 1, 1) for i, n in enumerate(names)}
    net = NetState(1, 1, "detach", str(DEP.topology.source), 0.0, True, nodes)
    serving = {"h16"}
    monkeypatch.setattr(
        backend_cmd,
        "request",
        lambda path, cmd, timeout=2.0, **a: _agent(path, serving),
    )
    monkeypatch.setattr(
        services, "listening", lambda pid, ip, port: pid == nodes["h16"].pid and "www" in serving
    )
    serving.add("www")
    guards: list[tuple[str, str]] = []  # (switch, nft script) as the ToRs would get them
    monkeypatch.setattr(
        backend_cmd,
        "run_nft",
        lambda scripts: guards.extend((sw, script) for sw, (_pid, script) in scripts.items()),
    )
    e = Env(tmp_path, net, DEP.topology, record, [FakeLb("h1"), FakeLb("h2")])
    e.serving = serving  # type: ignore[attr-defined]
    e.guards = guards  # type: ignore[attr-defined]
    return e


def vip_allowed(script: str, host: str) -> bool:
    """The source guard lets the VIP through from `host`'s ToR port."""
    port = DEP.topology.gateway(host).name
    return f'iifname "{port}" ip saddr 20.0.0.1/32 accept' in script


def _agent(path: Path, serving: set[str]) -> dict[str, int]:
    host = Path(path).name.removeprefix("agent-").removesuffix(".ctl")
    if host not in serving:
        raise ControlUnavailable(f"{path}: no control socket (is the process running?)")
    return {"pid": 1}


def act(action: str, host: str, **kw: Any) -> argparse.Namespace:
    return argparse.Namespace(action=action, host=host, weight=kw.get("weight", 1),
                              wait_drained=kw.get("wait_drained"), json=False)  # fmt: skip


def lb_sets(env: Env) -> list[tuple[Any, ...]]:
    return [lb.state() for lb in env.lbs]  # type: ignore[attr-defined]


def rendered(env: Env, host: str) -> LbConfig:
    iface = DEP.topology.host_interface(host).name
    return cfgfile.load(LbConfig, render.config_path(env.state_dir, "lb", iface))


def test_add_drain_weight_down_up_remove_recorded_and_rendered(env: Env) -> None:
    out = io.StringIO()
    assert run_change(act("add", "h16", weight=2), env, out) == 0
    assert "backend add h16: applied on h1, h2" in out.getvalue()
    assert "tables agree" in out.getvalue()
    # Its ToR lets its replies (from the VIP) through, and still h15's, its neighbour's.
    ((tor, script),) = env.guards  # type: ignore[attr-defined]
    assert tor == "t8" and vip_allowed(script, "h16") and vip_allowed(script, "h15")
    rec = backend_record.read_record(env.state_dir)
    assert rec is not None and rec.entry("h16") == BackendEntry("h16", H16, 2)
    for lb in ("h1", "h2"):  # an LB restarted now starts with the same set
        assert rendered(env, lb).backends == (*FOUR, (H16, 2))
    run_change(act("drain", "h3"), env, out)
    run_change(act("weight", "h7", weight=3), env, out)
    run_change(act("down", "h11"), env, out)
    rec = backend_record.read_record(env.state_dir)
    assert rec is not None
    assert [(b.host, b.weight, b.admin) for b in rec.backends] == [
        ("h3", 0, "up"), ("h7", 3, "up"), ("h11", 1, "down"), ("h15", 1, "up"), ("h16", 2, "up")
    ]  # fmt: skip
    assert rendered(env, "h2").backends_down == (DEP.topology.host_ip("h11"),)
    for lb in env.lbs:
        assert [(s.weight, s.admin) for s in lb.bk.specs] == [  # type: ignore[attr-defined]
            (0, "up"), (3, "up"), (1, "down"), (1, "up"), (2, "up")
        ]  # fmt: skip
    run_change(act("up", "h11"), env, out)
    run_change(act("remove", "h3"), env, out)
    rec = backend_record.read_record(env.state_dir)
    assert rec is not None and [b.host for b in rec.backends] == ["h7", "h11", "h15", "h16"]
    tor, script = env.guards[-1]  # type: ignore[attr-defined]
    assert tor == "t2" and not vip_allowed(script, "h3")  # removed: no longer sends as the VIP
    assert len(env.guards) == 2  # type: ignore[attr-defined]  # drain, weight, down, up: none
    a, b = env.lbs  # type: ignore[misc]
    assert a.bk.table.digest == b.bk.table.digest and len(a.bk.specs) == 4


@pytest.mark.parametrize(
    ("action", "host", "kw", "error", "why"),
    [
        ("add", "h99", {}, UsageError, "unknown host 'h99'"),
        ("add", "t1", {}, UsageError, "t1 is a switch"),
        ("add", "h1", {}, UsageError, "h1 is a load balancer"),
        ("add", "h3", {}, UsageError, "already a backend"),
        ("add", "h16", {"weight": 1001}, UsageError, r"0\.\.1000"),
        ("add", "h16", {"weight": -1}, UsageError, r"0\.\.1000"),
        ("add", "h14", {}, BackendCmdError, "h14 runs no agent"),
        ("weight", "h3", {"weight": 5000}, UsageError, r"0\.\.1000"),
        ("drain", "h16", {}, UsageError, "h16 is not a backend"),
        ("remove", "h2", {}, UsageError, "load balancer"),
        ("down", "h4", {}, UsageError, "h4 is not a backend"),
    ],
)
def test_bad_input_is_refused_and_nothing_changes(env: Env, action, host, kw, error, why) -> None:
    before = (lb_sets(env), backend_record.read_record(env.state_dir), rendered(env, "h1"))
    with pytest.raises(error, match=why):
        run_change(act(action, host, **kw), env, io.StringIO())
    assert (lb_sets(env), backend_record.read_record(env.state_dir), rendered(env, "h1")) == before
    assert all("backends.replace" not in lb.log for lb in env.lbs)  # type: ignore[attr-defined]
    assert env.guards == []  # type: ignore[attr-defined]


def test_add_needs_a_server_on_the_vip_too(env: Env) -> None:
    env.serving.discard("www")  # type: ignore[attr-defined]
    before = lb_sets(env)
    with pytest.raises(BackendCmdError, match=r"no server listens on 20\.0\.0\.1:80"):
        run_change(act("add", "h16"), env, io.StringIO())
    assert lb_sets(env) == before


def test_an_lb_down_during_add_refuses_and_nothing_changes(env: Env) -> None:
    env.lbs[1].down = True  # type: ignore[attr-defined]
    before = (lb_sets(env), backend_record.read_record(env.state_dir))
    with pytest.raises(BackendCmdError, match=r"backend add h16: h2 cannot be reached"):
        run_change(act("add", "h16"), env, io.StringIO())
    assert (lb_sets(env), backend_record.read_record(env.state_dir)) == before
    # The guard was opened for it, then put back as it was.
    (_, opened), (_, closed) = env.guards  # type: ignore[attr-defined]
    assert vip_allowed(opened, "h16") and not vip_allowed(closed, "h16")


def test_remove_wait_drained_drains_waits_then_removes(env: Env, monkeypatch) -> None:
    h3 = DEP.topology.host_ip("h3")
    flows = iter([{"h1": 3, "h2": 1}, {"h1": 1, "h2": 0}, {"h1": 0, "h2": 0}])
    seen: list[list[int]] = []

    def active(env: Env, ip: str) -> dict[str, int]:
        assert ip == h3
        seen.append([s.weight for lb in env.lbs for s in lb.bk.specs if s.ip == ip])  # type: ignore[attr-defined]
        return next(flows)

    monkeypatch.setattr(backend_cmd, "active_flows", active)
    monkeypatch.setattr(backend_cmd.time, "sleep", lambda s: None)
    out = io.StringIO()
    run_change(act("remove", "h3", wait_drained=30.0), env, out)
    assert seen == [[0, 0]] * 3  # drained on both LBs while it waited
    text = out.getvalue()
    assert "backend drain h3: applied" in text and "backend remove h3: applied" in text
    assert "h3: 4 active flows (h1 3, h2 1)" in text
    assert all(s.ip != h3 for lb in env.lbs for s in lb.bk.specs)  # type: ignore[attr-defined]


def test_wait_drained_gives_up_when_the_time_runs_out(env: Env, monkeypatch) -> None:
    monkeypatch.setattr(backend_cmd, "active_flows", lambda env, ip: {"h1": 2, "h2": 0})
    t = [0.0]
    left = backend_cmd.wait_drained(
        env,
        "h3",
        3.0,
        io.StringIO(),
        clock=lambda: t[0],
        sleep=lambda s: t.__setitem__(0, t[0] + s),
    )
    assert left == 2 and t[0] >= 3.0


def test_list_merges_every_lb_per_backend_and_says_which_cannot_be_reached(env: Env) -> None:
    data = gather(env)
    assert data["tables_agree"] and [b["host"] for b in data["backends"]] == [
        "h3",
        "h7",
        "h11",
        "h15",
    ]
    row = data["backends"][0]
    assert set(row["per_lb"]) == {"h1", "h2"} and row["weight"] == 1 and row["state"] == "active"
    text = format_list(data, now=row["health_since"] + 75)
    lines = text.splitlines()
    assert lines[0].startswith("VIP 20.0.0.1:80  load balancers: h1, h2  table 65537 slots")
    assert lines[1].split()[:6] == ["BACKEND", "LB", "WEIGHT", "ADMIN", "HEALTH", "STATE"]
    assert lines[2].split()[:7] == ["10.2.3.2", "(h3)", "total", "1", "up", "unknown", "75s"]
    assert lines[3].split()[:2] == ["h1", "1"]
    env.lbs[1].down = True  # type: ignore[attr-defined]
    data = gather(env)
    assert not data["tables_agree"] and not data["load_balancers"]["h2"]["ok"]
    assert "h2: cannot be reached" in format_list(data)


def test_environment_refuses_without_root_or_network(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(BackendCmdError, match="no network is up"):
        backend_cmd.environment(tmp_path)
    monkeypatch.setattr(backend_cmd.os, "geteuid", lambda: 1000)
    with pytest.raises(BackendCmdError, match="need root"):
        backend_cmd.environment(tmp_path)


# --- the record and the rendered configurations ----------------------------------------------


def test_render_takes_the_backend_set_from_the_record(tmp_path: Path) -> None:
    rec = ClusterRecord(
        "20.0.0.1", (80,), ("h1", "h2"),
        (BackendEntry("h7", DEP.topology.host_ip("h7"), 3, "down"), BackendEntry("h16", H16, 1)),
    )  # fmt: skip
    cfg_ = render.lb_config(DEP, "h1", tmp_path, rec)
    assert cfg_.backends == ((DEP.topology.host_ip("h7"), 3), (H16, 1))
    assert cfg_.backends_down == (DEP.topology.host_ip("h7"),)
    assert (H16, "h16") in cfg_.names  # every host is known by name
    assert render.lb_config(DEP, "h1", tmp_path).backends == FOUR  # no record: the deployment's
    files = render.render(DEP, tmp_path, rec)
    agents = sorted(p.name for p in files if p.name.startswith("agent-"))
    assert len(agents) == 14 and "agent-h16-eth0.json" in agents  # every host but the LBs
    backend_record.write_record(tmp_path, rec)
    assert backend_record.read_record(tmp_path) == rec
    render.write(DEP, tmp_path)
    assert rendered_at(tmp_path, "h2").backends == cfg_.backends


def rendered_at(state_dir: Path, host: str) -> LbConfig:
    iface = DEP.topology.host_interface(host).name
    return cfgfile.load(LbConfig, render.config_path(state_dir, "lb", iface))


def test_a_backend_host_s_services_are_its_agent_and_server() -> None:
    svcs = services.backend_services(DEP, "h16", "fastpath")
    assert [s.name for s in svcs] == ["agent-h16", "www-h16"]
    assert svcs[0].argv[-1].endswith("config/agent-h16-eth0.json")
    assert svcs[1].listen == ("20.0.0.1", 80)


def test_one_backend_command_at_a_time(tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()
    with (
        backend_cmd.one_at_a_time(tmp_path),
        pytest.raises(BackendCmdError, match="another backend command"),
        backend_cmd.one_at_a_time(tmp_path, wait=0.2),
    ):
        pass
    with backend_cmd.one_at_a_time(tmp_path, wait=0.2):  # free again
        pass
