"""`python -m controller lb list|drain|undrain`: the load balancers as the operator sees them.

Read from the running network (`controller up --services`, fastpath mode), never changed
except by drain/undrain:
- each LB host's BIRD, through its control socket (`<state_dir>/bird/<host>.ctl`): whether
  the VIP route is valid (announced) and since when, the BGP session to its ToR, the BFD
  session to the LB process's announcement (169.254.0.2 on its TUN), drained or not;
- each LB ToR's kernel route to the VIP (`ip -j route` inside the ToR): the next hops traffic
  is really spread over;
- each LB process, through its control socket (`<state_dir>/lb-<host>.ctl`, `show`): packets
  forwarded per second, tracked flows, and the announcement as the LB holds it (its BFD state
  and since when). An LB that does not answer (dead, hung) shows no figures and the reason.

`drain hN` disables the VIP's static protocol in hN's BIRD (`birdc disable vip`): the route is
withdrawn by BGP at once and the ToR stops sending new packets to hN, whatever the LB process
does; its tracked flows move to the other LBs, which pick the same backends (same hash seed,
same backend set). It waits until the ToR's kernel no longer uses hN. `undrain hN` enables the
protocol again and waits for hN to be back, if its LB announces. Draining the last announcing
LB would black-hole the VIP: refused unless --force.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from controller import bgp, birdctl, fib, netstate
from controller.deployment import Deployment
from controller.netstate import NetState
from controller.render import control_path
from controller.topology import natural_key
from fastpath.announce import LB_ADDR
from l4lb import control

SHOW_TIMEOUT = 1.0  # s: an LB busier than this with its loop counts as not answering


class LbError(RuntimeError):
    """The network or its BGP part is not there to ask; exit status 1."""


class LbUsageError(ValueError):
    """Not a host, or not a load balancer: exit status 2."""


@dataclass(frozen=True)
class LbStatus:
    host: str
    address: str
    announced: bool
    """The VIP route is valid in the host's BIRD (exported to the ToR)."""
    drained: bool
    """`lb drain`: the VIP's static protocol is disabled."""
    since: float | None
    """Unix time of the last change: the route's, or the protocol's or BFD session's."""
    bgp: str
    """The BGP session to the ToR: "Established", "Active", ... ("-" without BIRD)."""
    bfd: str | None
    """The BFD session to the LB's announcement: "Up", "Down", ... (None: no session)."""
    in_ecmp: bool
    """The ToR's kernel uses this LB as a next hop of the VIP."""
    tor: str
    forwarded_pps: int | None
    """Frames the LB process sent per second (its `show`); None when it does not answer."""
    tracked_flows: int | None
    """Flows in the LB's connection table (its `show`)."""
    lb_bfd: str | None
    """The announcement's BFD state as the LB process holds it (UP, DOWN, ADMIN_DOWN, ...;
    None when it does not announce or does not answer)."""
    lb_since: float | None
    """Unix time the LB's BFD session entered that state."""
    lb_error: str | None = None
    """Why the LB process did not answer its control socket."""
    error: str | None = None


def check_lb(dep: Deployment, host: str) -> None:
    hosts = dep.topology.hosts()
    if host not in hosts:
        raise LbUsageError(f"unknown host {host!r} (hosts: {' '.join(hosts)})")
    if host not in dep.load_balancers:
        raise LbUsageError(
            f"{host} is not a load balancer (load balancers: {', '.join(dep.load_balancers)})"
        )


def running_network(state_dir: Path) -> NetState:
    st = netstate.read_state(state_dir)
    if st is None or not netstate.is_running(st.owner_pid, st.owner_start_time) or not st.ready:
        raise LbError("no network is up; start one with `python -m controller up --services`")
    return st


def _ctl(state_dir: Path, host: str) -> Path:
    ctl = bgp.bird_files(state_dir, host).ctl
    if not ctl.exists():
        raise LbError(
            f"{host} runs no BIRD ({ctl} missing): the VIP is announced by BGP only with the "
            "services in fastpath mode (`python -m controller up --services`)"
        )
    return ctl


def tor_route(st: NetState, tor: str, vip: str) -> fib.FibRoute | None:
    rec = st.nodes[tor]
    return fib.read_route(f"{vip}/32", ["mnexec", "-a", str(rec.pid)])


def lb_status(dep: Deployment, state_dir: Path, host: str, tor_gateways: list[str]) -> LbStatus:
    topo = dep.topology
    tor = topo.gateway(host).node
    addr = topo.host_ip(host)
    base: dict[str, Any] = dict(
        host=host,
        address=addr,
        tor=tor,
        in_ecmp=addr in tor_gateways,
        **_show(state_dir, host),
    )
    try:
        ctl = _ctl(state_dir, host)
        protos = birdctl.parse_protocols(birdctl.query(ctl, "show protocols"))
        sessions = birdctl.parse_bfd_sessions(birdctl.query(ctl, "show bfd sessions"))
        try:
            routes = birdctl.parse_routes(
                birdctl.query(ctl, f"show route {dep.vip}/32 protocol {bgp.STATIC_PROTOCOL}")
            )
        except birdctl.BirdError as e:
            if e.code != 8001:  # "Network not found": not announced
                raise
            routes = []
    except (LbError, birdctl.BirdError) as e:
        return LbStatus(
            announced=False, drained=False, since=None, bgp="-", bfd=None, error=str(e), **base
        )
    static = protos.get(bgp.STATIC_PROTOCOL)
    drained = static is not None and static.state != "up"
    session = next((s for s in sessions if s.address == LB_ADDR), None)
    peer = protos.get(tor)
    if routes:
        since: float | None = routes[0].since
    elif drained and static is not None:
        since = static.since
    else:
        since = session.since if session is not None else None
    return LbStatus(
        announced=bool(routes),
        drained=drained,
        since=since,
        bgp=(peer.info.split()[0] if peer and peer.info else peer.state if peer else "-"),
        bfd=session.state if session is not None else None,
        **base,
    )


def _show(state_dir: Path, host: str) -> dict[str, Any]:
    """The LB process's own figures, from `show` on its control socket."""
    empty: dict[str, Any] = dict(forwarded_pps=None, tracked_flows=None, lb_bfd=None, lb_since=None)
    try:
        snap = control.request(control_path(state_dir, "lb", host), "show", timeout=SHOW_TIMEOUT)
        ann = snap.get("announce") or {}
        return dict(
            forwarded_pps=int(snap["tx_pps"]),
            tracked_flows=int(snap["tracked_flows"]),
            lb_bfd=ann.get("bfd_state"),
            lb_since=ann.get("since"),
        )
    except (control.ControlUnavailable, control.RequestRefused) as e:
        return dict(empty, lb_error=str(e))
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        return dict(empty, lb_error=f"unexpected show reply: {e!r}")


def collect(dep: Deployment, state_dir: Path) -> dict[str, Any]:
    """Everything `lb list` shows, as one JSON-able object."""
    st = running_network(state_dir)
    now = time.time()
    tors: dict[str, Any] = {}
    for tor in bgp.lb_tors(dep):
        route = tor_route(st, tor, dep.vip)
        tors[tor] = {
            "protocol": route.protocol if route else None,
            "next_hops": route.live_gateways() if route else [],
        }
    lbs = [
        lb_status(dep, state_dir, h, tors[dep.topology.gateway(h).node]["next_hops"])
        for h in sorted(dep.load_balancers, key=natural_key)
    ]
    return {"vip": dep.vip, "time": round(now, 3), "tors": tors, "lbs": [asdict(s) for s in lbs]}


def _clock(t: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) if t else "-"


def render(report: dict[str, Any]) -> str:
    """The table `lb list` prints."""
    rows = [("LB", "address", "announced", "since", "BGP", "BFD", "in ECMP", "pkt/s", "flows")]
    for s in report["lbs"]:
        state = "drained" if s["drained"] else "yes" if s["announced"] else "no"
        pps = "-" if s["forwarded_pps"] is None else str(s["forwarded_pps"])
        rows.append(
            (
                s["host"],
                s["address"],
                state,
                _clock(s["since"]),
                f"{s['bgp']} ({s['tor']})",
                s["bfd"] or "-",
                "yes" if s["in_ecmp"] else "no",
                pps,
                "-" if s["tracked_flows"] is None else str(s["tracked_flows"]),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    for tor, t in report["tors"].items():
        hops = ", ".join(t["next_hops"]) or "nothing (the VIP is unrouted there)"
        lines.append(f"{tor} routes {report['vip']} via {hops} (proto {t['protocol'] or '-'})")
    lines += [f"{s['host']}: {s['error']}" for s in report["lbs"] if s["error"]]
    lines += [f"{s['host']}: LB: {s['lb_error']}" for s in report["lbs"] if s.get("lb_error")]
    return "\n".join(lines)


def wait_ecmp(st: NetState, dep: Deployment, host: str, present: bool, timeout: float) -> float:
    """Seconds until the ToR's kernel does (not) use `host`; raises LbError after `timeout`."""
    tor = dep.topology.gateway(host).node
    addr = dep.topology.host_ip(host)
    t0 = time.monotonic()
    while True:
        route = tor_route(st, tor, dep.vip)
        if (route is not None and addr in route.live_gateways()) == present:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise LbError(
                f"{tor} still {'lacks' if present else 'uses'} {host} after {timeout:.0f} s "
                f"({fib.describe(route)})"
            )
        time.sleep(0.01)


def drain(dep: Deployment, state_dir: Path, host: str, force: bool = False) -> str:
    check_lb(dep, host)
    st = running_network(state_dir)
    ctl = _ctl(state_dir, host)
    others = [h for h in dep.load_balancers if h != host and bird_route_valid(dep, state_dir, h)]
    if not others and not force:
        raise LbError(
            f"{host} is the last load balancer announcing {dep.vip}: draining it leaves the VIP "
            "unrouted (use --force to drain anyway)"
        )
    reply = birdctl.query(ctl, f"disable {bgp.STATIC_PROTOCOL}")
    if any(code == 8 for code, _ in reply):  # BIRD's reply code 0008: "already disabled"
        return f"{host}: already drained"
    took = wait_ecmp(st, dep, host, present=False, timeout=5.0)
    return (
        f"{host}: drained; out of {dep.topology.gateway(host).node}'s ECMP in {took * 1000:.0f} ms"
    )


def undrain(dep: Deployment, state_dir: Path, host: str) -> str:
    check_lb(dep, host)
    st = running_network(state_dir)
    ctl = _ctl(state_dir, host)
    reply = birdctl.query(ctl, f"enable {bgp.STATIC_PROTOCOL}")
    if any(code == 10 for code, _ in reply):  # 0010: "already enabled"
        return f"{host}: not drained"
    try:
        took = wait_ecmp(st, dep, host, present=True, timeout=5.0)
    except LbError as e:
        return f"{host}: undrained, but not back in ECMP: {e} (is its LB announcing?)"
    tor = dep.topology.gateway(host).node
    return f"{host}: undrained; back in {tor}'s ECMP in {took * 1000:.0f} ms"


def bird_route_valid(dep: Deployment, state_dir: Path, host: str) -> bool:
    from controller.p4follow import bird_announces

    return bird_announces(bgp.bird_files(state_dir, host).ctl, dep.vip)
