"""SYN flood against the real load balancer while long downloads run (root):

    python -m bench.synflood [--syns 1000000] [--downloads 4] [--conn-capacity 20000] ...

    client c0 ---\\                       /--- l0 LB (python -m fastpath.lb)
                   r1 [router] r2
    flooder f0 ---/     r3     \\--- (the VIP routed to the LB)
                         |
                        b0 backend (python -m agent.decap + an HTTP server bound to the VIP)

The downloads (curl, rate-limited, 10 MB each, each from its own source port; the client's
tcp_rmem capped so a download stays on the wire) start first and get tracked as established;
then the flooder sends `--syns` TCP SYNs from random spoofed sources (bench.frames.syn_frames)
to VIP:80 as fast as it goes (bench.blast: sendmmsg on an AF_PACKET socket). The LB runs with a
small connection table (`--conn-capacity`, `--conn-half-open-capacity`): the flood is many
times what it holds. The router blackholes the spoofed sources, so the backend's SYN-ACKs
die there. While the flood runs, the LB's `show` is sampled (the established flows must
never drop, the established generations must not rotate); afterwards each download's flow is
looked up (`flow` control request: it must still be established, on its backend), and the
downloads' sha256 checked. Prints the figures, and one JSON line last. Bounded: every
process has a timeout; namespaces and processes are removed on exit, failure and Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.host import tun_name
from bench.frames import pack_frames, syn_frames
from bench.netns import PY, Netns, NsProc, Procs, install_signal_handlers, missing, sh
from l4lb import control
from l4lb.errors import L4lbError

VIP = "20.0.0.1"
CLIENT, LB, BACKEND, FLOODER = "10.82.1.2", "10.82.2.2", "10.82.3.2", "10.82.4.2"
SPOOFED = "10.96.0.0/12"  # the flood's sources: blackholed at the router
MSS = 1440
FILE_SIZE = 10 << 20
RMEM_CAP = "4096 131072 262144"  # the client's tcp_rmem: keeps a download on the wire
FIRST_PORT = 41000  # download i comes from CLIENT:FIRST_PORT + i

# The backend's HTTP server (threads: the downloads run at once).
SERVER = r"""
import http.server, socketserver, sys
class H(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a): pass
handler = lambda *a, **k: H(*a, directory=sys.argv[2], **k)
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer.daemon_threads = True
with socketserver.ThreadingTCPServer((sys.argv[1], 80), handler) as srv:
    print("serving", flush=True); srv.serve_forever()
"""


@dataclass(frozen=True)
class Options:
    syns: int = 1_000_000
    """SYNs the flooder sends (random spoofed sources)."""
    downloads: int = 4
    """10 MB downloads running during the flood."""
    rate: str = "800k"
    """Each download's curl --limit-rate (bytes/s): 10 MB in about 13 s."""
    conn_capacity: int = 20_000
    """The LB's --conn-capacity: established flows it may hold."""
    half_open_capacity: int = 10_000
    """The LB's --conn-half-open-capacity."""
    insert_rate: int | None = None
    """The LB's --conn-insert-rate (None: its default)."""
    timeout: float = 240.0
    """The whole run's bound, in seconds."""


STALL_AFTER = 20.0
TAP_SECONDS = 25
AGENT_KEYS = ("frames", "delivered", "dropped", "partial_checksums", "drops", "ring_drops")
"""Seconds after the flood by which the downloads should be done (each needs about 13 s in
all); later, the run records what each hop holds (`stall`) to say where they stopped."""


def _wait(pred: Any, timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Sampler(threading.Thread):
    """The LB's `show` every 0.25 s while the flood runs: the least established flows seen
    and the established generations' rotations."""

    def __init__(self, ctl: Path) -> None:
        super().__init__(daemon=True)
        self.ctl = ctl
        self.stop = threading.Event()
        self.samples: list[dict[str, int]] = []
        self.errors = 0

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                flows = control.request(self.ctl, "show", timeout=5.0)["flows"]
                self.samples.append(flows)
            except L4lbError:
                self.errors += 1  # a busy loop may answer late: counted, not fatal
            self.stop.wait(0.25)


def _show(ctl: Path) -> dict[str, Any]:
    result: dict[str, Any] = control.request(ctl, "show", timeout=5.0)
    return result


def run(
    opts: Options, workdir: Path, log: Any = print, netns: Netns | None = None
) -> dict[str, Any]:
    """The whole drill in `workdir` (files, sockets); its figures as a dict. Its namespaces
    are made in `netns` (the caller removes them) or in a Netns of its own (removed here)."""
    began = time.monotonic()
    www = workdir / "www"
    www.mkdir()
    body = os.urandom(FILE_SIZE)
    (www / "10m.bin").write_bytes(body)
    want = hashlib.sha256(body).hexdigest()
    os.chmod(workdir, 0o755)
    os.chmod(www, 0o755)
    frames_file = workdir / "syns.bin"
    procs = Procs()
    downloads: list[subprocess.Popen[bytes]] = []
    with contextlib.nullcontext(netns) if netns is not None else Netns() as bed:
        try:
            t = bed.tag
            c, r, lb, b, f = (bed.add(x) for x in ("c", "r", "l", "b", "f"))
            n = {"c0": f"ec{t}", "l0": f"el{t}", "b0": f"eb{t}", "f0": f"ef{t}"}
            n |= {"r1": f"rc{t}", "r2": f"rl{t}", "r3": f"rb{t}", "r4": f"rf{t}"}
            bed.veth(c, n["c0"], r, n["r1"], ip_a=f"{CLIENT}/24", ip_b="10.82.1.1/24")
            bed.veth(lb, n["l0"], r, n["r2"], ip_a=f"{LB}/24", ip_b="10.82.2.1/24")
            bed.veth(b, n["b0"], r, n["r3"], ip_a=f"{BACKEND}/24", ip_b="10.82.3.1/24")
            bed.veth(f, n["f0"], r, n["r4"], ip_a=f"{FLOODER}/24", ip_b="10.82.4.1/24")
            for ns, gw in ((c, "10.82.1.1"), (lb, "10.82.2.1"), (b, "10.82.3.1")):
                sh("ip", "route", "add", "default", "via", gw, ns=ns)
            bed.sysctl(r, "net.ipv4.ip_forward", "1")
            # DSR replies enter the router from the backend, the flood from sources it has no
            # route back to: no reverse-path filtering.
            for key in ("all", "default", *(n[x] for x in ("r1", "r2", "r3", "r4"))):
                bed.sysctl(r, f"net.ipv4.conf.{key}.rp_filter", "0")
            sh("ip", "route", "add", f"{VIP}/32", "via", LB, ns=r)
            sh("ip", "route", "add", "blackhole", SPOOFED, ns=r)  # the SYN-ACKs end here
            # The LB taps frames of one MTU at most: the router port facing it segments.
            sh("ethtool", "-K", n["r2"], "tso", "off", "gso", "off", ns=r)
            bed.sysctl(c, "net.ipv4.tcp_rmem", RMEM_CAP)
            r2_mac = sh("cat", f"/sys/class/net/{n['r2']}/address", ns=r).strip()
            r4_mac = sh("cat", f"/sys/class/net/{n['r4']}/address", ns=r).strip()
            f0_mac = sh("cat", f"/sys/class/net/{n['f0']}/address", ns=f).strip()

            t0 = time.monotonic()
            syns = syn_frames(opts.syns, f0_mac, r4_mac, VIP, 80, SPOOFED)
            frames_file.write_bytes(pack_frames(syns))
            del syns
            log(f"{opts.syns:,} SYN frames built in {time.monotonic() - t0:.1f} s")

            agent = procs.start(
                b,
                [
                    *(PY, "-m", "agent.decap", "--iface", n["b0"], "--vip", VIP),
                    *("--allow-lb", LB, "--server-mss", str(MSS), "--stats-interval", "1"),
                    *("--stats-file", str(workdir / "agent.json")),
                    *("--control-socket", str(workdir / "agent.ctl")),
                ],
            )
            agent.wait_event("ready")
            server = procs.start(b, [PY, "-c", SERVER, VIP, str(www)])
            _wait(lambda: server.lines, 10, "the HTTP server")
            ctl = workdir / "lb.ctl"
            lb_argv = [
                *(PY, "-m", "fastpath.lb", n["l0"], "--vip", f"{VIP}:80"),
                *("--backend", BACKEND, "--next-hop-mac", r2_mac, "--stats-interval", "1"),
                *("--stats-file", str(workdir / "lb.json"), "--control-socket", str(ctl)),
                *("--conn-capacity", str(opts.conn_capacity)),
                *("--conn-half-open-capacity", str(opts.half_open_capacity)),
            ]
            if opts.insert_rate is not None:
                lb_argv += ["--conn-insert-rate", str(opts.insert_rate)]
            lb_proc = procs.start(lb, lb_argv)
            lb_proc.wait_event("")  # the first counters line: forwarding
            _wait(ctl.exists, 10, "the LB's control socket")

            for i in range(opts.downloads):
                argv = [
                    *("ip", "netns", "exec", c, "curl", "-sS", "--max-time", "150"),
                    *("--limit-rate", opts.rate, "--local-port", str(FIRST_PORT + i)),
                    *("-o", str(workdir / f"dl{i}.bin"), f"http://{VIP}/10m.bin"),
                ]
                downloads.append(subprocess.Popen(argv, stderr=subprocess.PIPE))

            def flow(i: int) -> dict[str, Any]:
                result: dict[str, Any] = control.request(
                    ctl, "flow", timeout=5.0, src=CLIENT, sport=FIRST_PORT + i, dst=VIP,
                    dport=80, proto="tcp",
                )  # fmt: skip
                return result

            def all_established() -> bool:
                return all(flow(i)["state"] == "established" for i in range(opts.downloads))

            _wait(all_established, 15, "every download's flow established on the LB")
            time.sleep(1.0)  # the downloads well under way
            before = _show(ctl)

            sampler = Sampler(ctl)
            sampler.start()
            blast = NsProc(
                f,
                [
                    *(PY, "-m", "bench.blast", n["f0"], "--frames", str(frames_file)),
                    *("--count", str(opts.syns), "--duration", "120"),
                ],
            )
            procs.items.append(blast)
            sent = blast.wait_event("", timeout=150)
            time.sleep(1.5)  # the LB's ring drained, a last sample or two
            sampler.stop.set()
            sampler.join(10)
            after = _show(ctl)
            flows_after = [flow(i) for i in range(opts.downloads)]
            stall = None
            deadline = time.monotonic() + STALL_AFTER
            while any(p.poll() is None for p in downloads) and time.monotonic() < deadline:
                time.sleep(0.5)
            if any(p.poll() is None for p in downloads):  # what each hop holds of the stall
                # What crosses each end for a while: do the server's probes leave it, arrive?
                filt = "tcp port 80 or ip proto 4"
                taps = {}
                ends = (("client", c, n["c0"]), ("backend", b, n["b0"]),
                        ("backend_tun", b, tun_name(n["b0"])))  # fmt: skip
                for where, ns, dev in ends:
                    argv = ["ip", "netns", "exec", ns, "timeout", str(TAP_SECONDS), "tcpdump",
                            "-n", "-l", "-i", dev, "-c", "40", filt]  # fmt: skip
                    taps[where] = subprocess.Popen(
                        argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
                    )
                agent_before = json.loads((workdir / "agent.json").read_text())
                tapped = {w: t.communicate(timeout=TAP_SECONDS + 10)[0] for w, t in taps.items()}
                now_show = _show(ctl)
                agent_stats = json.loads((workdir / "agent.json").read_text())
                try:  # is the agent's loop turning (it answers from between batches)?
                    agent_ping: Any = control.request(workdir / "agent.ctl", "ping", timeout=2.0)
                except (L4lbError, OSError) as exc:
                    agent_ping = f"no answer: {exc!r}"
                stall = {
                    "agent_ping": agent_ping,
                    "agent_stats_age_s": round(time.time() - agent_stats.get("time", 0), 1),
                    "agent_while_tapped": {
                        k: agent_stats.get(k, 0) - agent_before.get(k, 0)
                        for k in ("frames", "delivered", "dropped", "ring_drops")
                    },
                    "lb_rx_since_flood": now_show["io"]["rx_frames"] - after["io"]["rx_frames"],
                    "lb_ring_waiting": now_show["io"]["ring_waiting"],
                    "lb_kernel_drops_since": now_show["kernel_drops"] - after["kernel_drops"],
                    "agent": {k: agent_stats.get(k) for k in AGENT_KEYS},
                    "client_tcp": sh("ss", "-tni", "state", "established", ns=c, check=False),
                    "server_tcp": sh("ss", "-tni", "state", "established", ns=b, check=False),
                    "links": {
                        ns: sh("ip", "-s", "link", ns=ns, check=False) for ns in (c, r, lb, b)
                    },
                    "neighbours": {
                        ns: sh("ip", "-s", "neigh", ns=ns, check=False) for ns in (c, r, b)
                    },
                    "router_ip_stats": sh("nstat", "-asz", ns=r, check=False),
                    "backend_ip_stats": sh("nstat", "-asz", ns=b, check=False),
                    "tcpdump": tapped,
                }

            results = []
            for i, p in enumerate(downloads):
                left = max(1.0, opts.timeout - (time.monotonic() - began))
                try:
                    _, err = p.communicate(timeout=left)
                except subprocess.TimeoutExpired:
                    p.kill()
                    _, err = p.communicate()
                path = workdir / f"dl{i}.bin"
                ok = path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() == want
                results.append({"port": FIRST_PORT + i, "rc": p.returncode, "sha256_ok": ok,
                                "stderr": err.decode(errors="replace").strip()})  # fmt: skip
            final = _show(ctl)
            # A download can only stall if something on its path did: which of them still runs.
            alive = {name: x.proc.poll() is None for name, x in
                     (("lb", lb_proc), ("agent", agent), ("server", server))}  # fmt: skip
        finally:
            for p in downloads:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            procs.stop_all()
    fl_b, fl_a = before["flows"], after["flows"]
    samples = sampler.samples
    min_established = min([s["established"] for s in samples] + [fl_a["established"]])
    tracked = [x["state"] == "established" for x in flows_after]
    return {
        "syns": opts.syns,
        "syns_sent": sent["sent"],
        "syn_seconds": sent["seconds"],
        "syn_pps": sent["pps"],
        "downloads": opts.downloads,
        "downloads_ok": sum(1 for x in results if x["rc"] == 0 and x["sha256_ok"]),
        "download_flows_tracked_after": sum(tracked),
        "download_backends_kept": all(
            x["backend"] == BACKEND for x in flows_after if x["state"] == "established"
        ),
        "established_before": fl_b["established"],
        "established_min_during": min_established,
        "established_after": fl_a["established"],
        "rotations_during": fl_a["rotations"] - fl_b["rotations"],
        "half_open_after": fl_a["half_open"],
        "new_flows": fl_a["new_flows"] - fl_b["new_flows"],
        "flood_bypass": fl_a["flood_bypass"] - fl_b["flood_bypass"],
        "evictions": fl_a["evictions"] - fl_b["evictions"],
        "nonsyn_miss": fl_a["nonsyn_miss"] - fl_b["nonsyn_miss"],
        "insert_rate": fl_a["insert_rate"],
        "conn_capacity": opts.conn_capacity,
        "half_open_capacity": opts.half_open_capacity,
        "lb_frames": after["core"]["frames"] - before["core"]["frames"],
        "lb_kernel_drops": after["kernel_drops"] - before["kernel_drops"],
        "lb_frames_after_flood": final["core"]["frames"] - after["core"]["frames"],
        "lb_rx_after_flood": final["io"]["rx_frames"] - after["io"]["rx_frames"],
        "lb_internal_errors": final["core"]["drops"]["internal_error"],
        "samples": len(samples),
        "sample_errors": sampler.errors,
        "failed_downloads": [x for x in results if x["rc"] != 0 or not x["sha256_ok"]],
        "seconds": round(time.monotonic() - began, 1),
        "ring_resyncs": {
            "lb": final["io"].get("ring_resyncs"),
            "agent": json.loads((workdir / "agent.json").read_text()).get("ring_resyncs"),
        },
        "alive_after": alive,
        "stall": stall,
    }


def report(res: dict[str, Any]) -> None:
    print(f"SYNs sent: {res['syns_sent']:,} in {res['syn_seconds']} s ({res['syn_pps']:,}/s)")
    print(f"LB: {res['lb_frames']:,} frames handled during the flood, {res['lb_kernel_drops']:,} "
          "dropped by the kernel (ring full)")  # fmt: skip
    print(f"downloads completed with the right sha256: {res['downloads_ok']} of "
          f"{res['downloads']}")  # fmt: skip
    print(f"their flows still tracked as established afterwards: "
          f"{res['download_flows_tracked_after']} of {res['downloads']}")  # fmt: skip
    print(f"established flows: {res['established_before']} before, at least "
          f"{res['established_min_during']} during, {res['established_after']} after; "
          f"established rotations during the flood: {res['rotations_during']}")  # fmt: skip
    print(f"new_flows {res['new_flows']:,}, flood_bypass {res['flood_bypass']:,}, "
          f"evictions {res['evictions']:,} (half-open), nonsyn_miss {res['nonsyn_miss']:,}; "
          f"cap {res['insert_rate']:,}/s, half-open capacity {res['half_open_capacity']:,}, "
          f"capacity {res['conn_capacity']:,}")  # fmt: skip
    if not all(res["alive_after"].values()):
        print(f"exited during the run: {[k for k, v in res['alive_after'].items() if not v]}")
    if res["stall"] is not None:
        print(f"downloads still running {STALL_AFTER:g} s after the flood:\n"
              + json.dumps(res["stall"], indent=1))  # fmt: skip
    for x in res["failed_downloads"]:
        print(f"download from port {x['port']} failed: curl exit {x['rc']}, sha256 "
              f"{'right' if x['sha256_ok'] else 'wrong'}: {x['stderr'] or '-'}")  # fmt: skip
    print(json.dumps({k: v for k, v in res.items() if k != "failed_downloads"}
                     | {"failed_downloads": len(res["failed_downloads"])}))  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = Options()
    p.add_argument("--syns", type=int, default=d.syns, help=f"SYNs to send (default {d.syns:,})")
    p.add_argument("--downloads", type=int, default=d.downloads,
                   help=f"10 MB downloads during the flood (default {d.downloads})")  # fmt: skip
    p.add_argument("--rate", default=d.rate, help=f"curl --limit-rate per download ({d.rate})")
    p.add_argument("--conn-capacity", type=int, default=d.conn_capacity,
                   help=f"the LB's --conn-capacity (default {d.conn_capacity:,})")  # fmt: skip
    p.add_argument("--half-open-capacity", type=int, default=d.half_open_capacity,
                   help="the LB's --conn-half-open-capacity "
                   f"(default {d.half_open_capacity:,})")  # fmt: skip
    p.add_argument("--insert-rate", type=int, default=None,
                   help="the LB's --conn-insert-rate (default: the LB's own)")  # fmt: skip
    p.add_argument("--timeout", type=float, default=d.timeout,
                   help=f"bound on the whole run, seconds (default {d.timeout:g})")  # fmt: skip
    args = p.parse_args(argv)
    if args.syns < 1 or not 1 <= args.downloads <= 50:
        p.error("--syns must be >= 1 and --downloads 1..50")
    if why := missing("curl", "ethtool", tun=True):
        print(f"bench.synflood: cannot run: {why}", file=sys.stderr)
        return 2
    install_signal_handlers()
    opts = Options(
        syns=args.syns, downloads=args.downloads, rate=args.rate,
        conn_capacity=args.conn_capacity, half_open_capacity=args.half_open_capacity,
        insert_rate=args.insert_rate, timeout=args.timeout,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="l4lb-synflood-") as tmp:
        res = run(opts, Path(tmp))
    report(res)
    ok = res["downloads_ok"] == res["downloads"] == res["download_flows_tracked_after"]
    ok = ok and all(res["alive_after"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
