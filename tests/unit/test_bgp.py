"""controller.bgp (BIRD configurations and the BGP part of the services plan), the deployment's
`bgp` keys, and the parsers of BIRD's control-socket replies and of `ip -j route` (no root)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from test_deployment import _write

from controller import bgp, birdctl, fib, render, services
from controller.deployment import DEFAULT_DEPLOYMENT, DeploymentError, load_deployment

STATE = Path("/tmp/l4lb-test-state")


@pytest.fixture(scope="module")
def dep():
    return load_deployment()


# --- deployment keys ------------------------------------------------------------------------


def test_bgp_defaults_when_the_key_is_absent(tmp_path: Path) -> None:
    data = json.loads(DEFAULT_DEPLOYMENT.read_text())
    data.pop("bgp")
    data["topology"] = str(DEFAULT_DEPLOYMENT.parent / data["topology"])
    (tmp_path / "d.json").write_text(json.dumps(data))
    b = load_deployment(tmp_path / "d.json").bgp
    assert (b.tor_asn, b.lb_asn, b.bfd_interval_ms, b.bfd_multiplier) == (65000, 65001, 100, 3)
    assert b.detect_ms == 300


def test_bgp_keys_are_read(tmp_path: Path) -> None:
    b = load_deployment(_write(tmp_path, bgp={"lb_asn": 4200000001, "bfd_multiplier": 5})).bgp
    assert b.lb_asn == 4200000001 and b.bfd_multiplier == 5 and b.tor_asn == 65000


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([], "bgp must be an object"),
        ({"lb_asn": 0}, r"bgp.lb_asn must be an integer in 1..4294967294"),
        ({"tor_asn": "65000"}, r"bgp.tor_asn must be an integer"),
        ({"bfd_interval_ms": 5}, r"bgp.bfd_interval_ms must be an integer in 10..10000"),
        ({"bfd_multiplier": 256}, r"bgp.bfd_multiplier must be an integer in 1..255"),
        ({"bfd_multiplier": True}, r"bgp.bfd_multiplier must be an integer"),
        ({"lb_asn": 65000}, r"bgp.lb_asn and bgp.tor_asn are both 65000"),
        ({"hold": 3}, r"bgp: unknown key\(s\) \['hold'\]"),
    ],
)
def test_bad_bgp_keys_are_refused_naming_the_field(
    tmp_path: Path, value: Any, message: str
) -> None:
    with pytest.raises(DeploymentError, match=message):
        load_deployment(_write(tmp_path, bgp=value))


# --- configurations -------------------------------------------------------------------------


def test_lb_config_announces_the_vip_over_the_tun_with_bfd(dep) -> None:
    conf = bgp.lb_config(dep, "h1")
    assert "router id 10.1.1.2;" in conf
    assert "route 20.0.0.1/32 via 169.254.0.2 bfd;" in conf
    assert 'interface "l4an-h1-eth0", "h1-eth0" { interval 100 ms; multiplier 3; };' in conf
    assert "local as 65001;" in conf and "neighbor 10.1.1.1 as 65000;" in conf
    assert 'export where proto = "vip"; next hop self;' in conf
    assert "protocol bgp t1 {" in conf  # named for the ToR: `show protocols` reads well
    assert bgp.lb_config(dep, "h2").count("10.1.2.2") == 1  # its own router id only
    with pytest.raises(bgp.BgpError, match="'h3' is not a load balancer"):
        bgp.lb_config(dep, "h3")


def test_tor_config_peers_with_each_lb_and_merges_paths(dep) -> None:
    conf = bgp.tor_config(dep, "t1")
    assert "protocol bgp h1 from lb { neighbor 10.1.1.2 as 65001; }" in conf
    assert "protocol bgp h2 from lb { neighbor 10.1.2.2 as 65001; }" in conf
    assert "merge paths on;" in conf and "passive on;" in conf
    assert "if net = 20.0.0.1/32 && source = RTS_BGP then { onlink = true; accept; }" in conf
    assert 'interface "t1-eth1", "t1-eth2"' in conf
    with pytest.raises(bgp.BgpError, match="'t2' has no load balancer"):
        bgp.tor_config(dep, "t2")


def test_timestamps_are_unix_seconds_for_the_parsers(dep) -> None:
    for conf in (bgp.lb_config(dep, "h1"), bgp.tor_config(dep, "t1")):
        for kind in ("base", "protocol", "route"):
            assert f'timeformat {kind} "%s.%3f";' in conf


def test_settings_reach_the_configs(tmp_path: Path) -> None:
    d = load_deployment(
        _write(tmp_path, bgp={"tor_asn": 64512, "lb_asn": 64513, "bfd_interval_ms": 50})
    )
    assert "local as 64513;" in bgp.lb_config(d, "h1")
    assert "neighbor 10.1.1.1 as 64512;" in bgp.lb_config(d, "h1")
    assert "interval 50 ms; multiplier 3;" in bgp.tor_config(d, "t1")
    assert render.lb_config(d, "h1").bfd_interval_ms == 50  # the LB answers BFD as fast


@pytest.mark.skipif(shutil.which("bird") is None, reason="bird (bird2) not installed")
@pytest.mark.parametrize("node", ["t1", "h1", "h2"])
def test_bird_itself_parses_the_rendered_config(dep, tmp_path: Path, node: str) -> None:
    conf = bgp.tor_config(dep, node) if node == "t1" else bgp.lb_config(dep, node)
    path = tmp_path / f"{node}.conf"
    path.write_text(conf)
    res = subprocess.run(["bird", "-p", "-c", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    path.write_text(conf + "protocol nonsense {\n")
    assert subprocess.run(["bird", "-p", "-c", str(path)], capture_output=True).returncode != 0


def test_lb_tors_and_static_route_to_restore(dep) -> None:
    assert bgp.lb_tors(dep) == {"t1": ["h1", "h2"]}
    assert bgp.static_vip_route(dep, "t1") == (
        "ip", "route", "replace", "20.0.0.1/32",
        "nexthop", "via", "10.1.1.2", "dev", "t1-eth1", "weight", "1", "onlink",
        "nexthop", "via", "10.1.2.2", "dev", "t1-eth2", "weight", "1", "onlink",
    )  # fmt: skip


def test_socket_paths_too_long_are_refused() -> None:
    with pytest.raises(bgp.BgpError, match="too long for a unix socket path"):
        bgp.bird_files(Path("/tmp/" + "x" * 100), "t1")


# --- the plan -------------------------------------------------------------------------------


def test_fastpath_plan_runs_bird_first_the_lbs_announce_themselves_and_settles(dep) -> None:
    p = services.plan(dep, "fastpath", STATE, python="/py")
    names = [s.name for s in p.services]
    assert names[:3] == ["bird-t1", "bird-h1", "bird-h2"]
    assert names.index("lb-h1") > names.index("bird-h1")  # BIRD first: BGP needs a second
    assert not [s for s in p.services if "announce" in s.name or "announce_cli" in s.argv]
    bird = next(s for s in p.services if s.name == "bird-t1")
    d = STATE / "bird"
    assert bird.node == "t1" and bird.role == "bgp"
    assert bird.argv == (
        "bird", "-f", "-c", str(d / "t1.conf"), "-s", str(d / "t1.ctl"), "-P", str(d / "t1.pid")
    )  # fmt: skip
    assert bird.ready_file == str(d / "t1.ctl") and bird.files == (
        str(d / "t1.ctl"),
        str(d / "t1.pid"),
    )
    assert bird.log == str(STATE / "logs" / "bird-t1.log")
    assert p.files[str(d / "t1.conf")] == bgp.tor_config(dep, "t1")
    assert p.files[str(d / "h2.conf")] == bgp.lb_config(dep, "h2")
    # each LB announces itself, with the deployment's BFD timers (its rendered configuration)
    lb = render.lb_config(dep, "h1", STATE)
    assert (lb.announce, lb.bfd_interval_ms, lb.bfd_multiplier) == (True, 100, 3)
    # t1's static VIP route goes while BIRD's is there, and comes back at stop
    route = next(c for c in p.setup if c.argv[:3] == ("ip", "route", "del"))
    assert route.node == "t1" and route.argv == ("ip", "route", "del", "20.0.0.1/32")
    assert route.undo == bgp.static_vip_route(dep, "t1")
    assert [(c.node, c.argv) for c in p.settle] == [
        ("t1", ("/py", "-m", "controller.fib", "wait", "20.0.0.1/32",
                "--via", "10.1.1.2", "--via", "10.1.2.2")),
    ]  # fmt: skip


def test_other_modes_keep_the_static_route(dep) -> None:
    for mode in ("scapy", "haproxy", "none"):
        p = services.plan(dep, mode, STATE)
        assert not [s for s in p.services if s.role == "bgp"]
        assert not [c for c in p.setup if c.argv[:2] == ("ip", "route")] and not p.settle


# --- BIRD's replies (recorded from BIRD 2.0.12 with the rendered configs) --------------------

PROTOCOLS = "\n".join(
    [  # BIRD pads its columns with blanks, also at the end of a line
        "2002-Name       Proto      Table      State  Since         Info",
        "1002-device1    Device     ---        up     1796166481.072  ",
        " bfd1       BFD        ---        up     1796166481.072  ",
        " vip        Static     master4    up     1796166481.072  ",
        " t1         BGP        ---        start  1796166833.133  Active        Socket: closed",
        "0000 ",
    ]
)

BFD_SESSIONS = """\
1020-bfd1:
 IP address                Interface  State      Since         Interval  Timeout
 10.1.1.1                  bxh1       Up         1796166481.819    0.100    0.300
 169.254.0.2               l4an-h1-eth0 Down       1796166484.933    1.000    0.000
0000 """

ROUTES = """\
1007-Table master4:
 20.0.0.1/32          unicast [h1 1796166484.111] * (100) [AS65001i]
 \tvia 10.1.1.2 on t1-eth1
                      unicast [h2 1796166485.5] (100) [AS65001i]
 \tvia 10.1.2.2 on t1-eth2
1008-\tType: BGP univ
0000 """


def lines(text: str) -> list[birdctl.Line]:
    out, done = birdctl.parse_reply(text.splitlines())
    assert done
    return out


def test_reply_framing() -> None:
    out, done = birdctl.parse_reply(["0001 BIRD 2.0.12 ready."])
    assert done and out == [(1, "BIRD 2.0.12 ready.")]
    out, done = birdctl.parse_reply(["1002-a", " b"])
    assert not done and out == [(1002, "a"), (1002, "b")]
    with pytest.raises(birdctl.BirdError, match="unexpected line"):
        birdctl.parse_reply(["garbage"])


def test_parse_protocols() -> None:
    p = birdctl.parse_protocols(lines(PROTOCOLS))
    assert set(p) == {"device1", "bfd1", "vip", "t1"}
    assert p["vip"] == birdctl.Protocol("vip", "Static", "master4", "up", 1796166481.072, "")
    assert p["t1"].state == "start" and p["t1"].info.startswith("Active")


def test_parse_bfd_sessions() -> None:
    s = birdctl.parse_bfd_sessions(lines(BFD_SESSIONS))
    assert [(x.address, x.interface, x.state) for x in s] == [
        ("10.1.1.1", "bxh1", "Up"),
        ("169.254.0.2", "l4an-h1-eth0", "Down"),
    ]
    assert s[0].since == 1796166481.819 and s[0].interval == 0.1 and s[0].timeout == 0.3


def test_parse_routes_with_two_paths() -> None:
    r = birdctl.parse_routes(lines(ROUTES))
    assert [(x.network, x.protocol, x.primary, x.via) for x in r] == [
        ("20.0.0.1/32", "h1", True, (("10.1.1.2", "t1-eth1"),)),
        ("20.0.0.1/32", "h2", False, (("10.1.2.2", "t1-eth2"),)),
    ]
    assert r[0].since == 1796166484.111


def test_query_against_a_fake_bird_socket(tmp_path: Path) -> None:
    import socket
    import threading

    path = tmp_path / "b.ctl"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen()
    seen: list[bytes] = []

    def serve() -> None:
        for reply in (b"0000 \n", b"8001 Network not found\n"):
            conn, _ = srv.accept()
            with conn:
                conn.sendall(b"0001 BIRD 2.0.12 ready.\n")
                seen.append(conn.recv(100))
                conn.sendall(reply)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    assert birdctl.query(path, "disable vip") == [(0, "")]
    with pytest.raises(birdctl.BirdError, match=r"Network not found \(8001\)") as e:
        birdctl.query(path, "show route 1.2.3.4/32")
    assert e.value.code == 8001
    t.join(2)
    srv.close()
    assert seen == [b"disable vip\n", b"show route 1.2.3.4/32\n"]
    with pytest.raises(birdctl.BirdError, match="no BIRD control socket"):
        birdctl.query(tmp_path / "none.ctl", "show status")


# --- ip -j route ----------------------------------------------------------------------------


def test_fib_parses_single_and_multipath_routes() -> None:
    single = '[{"dst":"20.0.0.1","gateway":"10.1.1.2","dev":"t1-eth1","protocol":"bird",'
    single += '"metric":32,"flags":[]}]'
    (r,) = fib.parse_routes(single)
    assert r.protocol == "bird" and r.live_gateways() == ["10.1.1.2"]
    multi = json.dumps(
        [
            {
                "dst": "20.0.0.1",
                "protocol": "bird",
                "flags": [],
                "nexthops": [
                    {"gateway": "10.1.2.2", "dev": "t1-eth2", "weight": 1, "flags": []},
                    {"gateway": "10.1.1.2", "dev": "t1-eth1", "weight": 1,
                     "flags": ["dead", "linkdown"]},
                ],
            }
        ]
    )  # fmt: skip
    (r,) = fib.parse_routes(multi)
    assert r.live_gateways() == ["10.1.2.2"] and len(r.next_hops) == 2
    assert fib.describe(r) == "proto bird via 10.1.2.2, 10.1.1.2 (dead)"
    assert fib.parse_routes("") == [] and fib.describe(None) == "no route"
    assert fib.parse_routes('[{"type":"blackhole","dst":"20.0.0.1"}]') == []
