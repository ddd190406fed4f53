"""The forwarding benchmark: fastpath against the course-style scapy LB and against the kernel
forwarding the same traffic, on the veth testbed of bench/testbed.py. Run it as bench/pps.sh.

Per round, interleaved (every system sees the same machine state within a round):
  kernel    the DUT forwards the VIP traffic as a plain router (ip_forward=1)
  fastpath  `python -m fastpath.lb d0` on the DUT, encapsulating to the sink
  paced     fastpath offered a paced 300,000 packets/s: loss_at_paced
  scapy     bench/scapy_lb.py with one persistent conf.L2socket (the fair scapy baseline), and
            briefly the course's sendp (a socket per packet)
  agent     `python -m agent.decap` on the DUT offered IP-in-IP: inner datagrams reaching the
            local UDP layer, where bench/udp_sink.py holds the port (its /proc/net/snmp
            counters) per second
  latency   UDP request/reply one at a time through LB + agent vs routed by the kernel
  scraped   fastpath as in its phase, while the exporter beside it (controller.exporter.exporter) is
            scraped --scrape-hz times a second (the cost of being watched: compare with
            fastpath, same placements, same round)
Once per run: the LB's resident memory with 100,000 and 1,000,000 tracked flows.

Saturation: bench/blast.py (sendmmsg on the generator core; trafgen's TX ring dies with EAGAIN
once frames queue behind RPS, see there) sends 64-byte UDP frames over --flows flows as fast as
it can; delivered = what the DUT sent to its next hop: g0's rx counter, gen dropping the frames
at g0's ingress (--count-at next-hop, the default), offered = the generator's tx counter (sent +
dropped at the DUT's backlog); the first --warmup seconds are not counted. With --count-at sink
gen routes them on to the sink, which counts them on s0 and discards them (addressed to a MAC it
does not own): that routing then runs on the generator core too, which made the generator the
limit of both fastpath and the kernel (offered = delivered, about 425,000 and 500,000/s) instead
of the DUT. Each window also records per-core busy/softirq shares from /proc/stat (whole
machine: shows which core is the limit).

CPU placements (the receive-livelock trap). The LB or agent is pinned to the DUT core (0), the
generator to the other (1); a veth frame is processed on the core that sent it unless RPS
steers it:
  split     no steering: the DUT's input is received on the generator's core, its output
            handled by the next hop on the DUT's core (in the sending syscall, as on the fat
            tree)
  dut-core  the DUT's input steered to the DUT core (RPS on d0): the kernel router gets a core
            of its own; the LB shares its core with its receive softirq (the livelock case)
  gen-core  the DUT's output steered to the generator core too (RPS on g0): the DUT core runs
            nothing but the LB process, as an operator deploys it (the LB on a core of its own,
            the next hop's receive work elsewhere); the generator core then does all the
            kernel's work besides generating, so it may limit what is offered
A system's rate in a round is its best placement; every placement is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import frames, stats
from bench import testbed as tbm
from bench.procs import ProcError, Procs

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
PLACEMENTS = ("split", "dut-core", "gen-core")
PHASES = (
    "kernel",
    "fastpath",
    "paced",
    "scapy",
    "scapy_sendp",
    "agent",
    "latency",
    "scraped",
    "memory",
    "lb_memory",
    "workers",
)
UDP_PORT = 9  # discard; the agent phase binds it on the DUT (bench/udp_sink.py)
PING_PORT = 7777

Counter = Callable[[], int]


@dataclass
class Ctx:
    """Everything a phase needs."""

    tb: tbm.Testbed
    procs: Procs
    args: argparse.Namespace
    cfg_udp: Path  # frames (bench.frames.pack_frames): 64-byte UDP to the VIP, one per flow
    cfg_ipip: Path  # the same flows as IP-in-IP from the LB's address, for the agent
    cfg_probe: Path  # a few frames, for readiness probes
    cfg_probe_ipip: Path


def last_json(text: str) -> dict[str, Any]:
    """The last line of a log that parses as a JSON object ({} if none does)."""
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                return obj
    return {}


def cpu_note(res: dict[str, Any]) -> str:
    """' [cpu0 100% si 35%, cpu1 ...]': how busy each core was, softirq share included."""
    parts = [f"{c} {v['busy']:.0%} si {v['softirq']:.0%}" for c, v in res.get("cpu", {}).items()]
    return f" [{', '.join(parts)}]" if parts else ""


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo, as `lscpu | grep 'Model name'` shows it)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def say(text: str) -> None:
    print(f"[pps {time.strftime('%H:%M:%S')}] {text}", flush=True)


# -- counters -------------------------------------------------------------------------------
def delivered_frames(ctx: Ctx) -> int:
    """Frames delivered: what the DUT sent to its next hop (g0's rx counter), or with
    --count-at sink what reached the sink after gen routed it (s0's)."""
    if ctx.args.count_at == "next-hop":
        return ctx.tb.link_stats(ctx.tb.gen, "g0")["rx_packets"]
    return ctx.tb.link_stats(ctx.tb.sink, "s0")["rx_packets"]


def counting(ctx: Ctx, on: bool) -> None:
    """Counting mode (on: frames are counted and discarded where delivered_frames reads them)
    or served mode (off: gen routes the DUT's output to the sink, which answers; latency)."""
    ctx.tb.set_sink_drop(on)
    if ctx.args.count_at == "next-hop":
        ctx.tb.set_next_hop_drop(on)


def gen_offered(ctx: Ctx) -> int:
    st = ctx.tb.link_stats(ctx.tb.gen, "g0")
    return st["tx_packets"] + st["tx_dropped"]


def dut_udp_delivered(ctx: Ctx) -> int:
    """Datagrams that reached the DUT's UDP layer: bench.udp_sink's full socket drops them
    (InErrors); NoPorts and InDatagrams are added should it not (yet) be bound."""
    udp = ctx.tb.snmp(ctx.tb.dut, "Udp")
    return udp["NoPorts"] + udp["InDatagrams"] + udp["InErrors"]


# -- traffic --------------------------------------------------------------------------------
def generator(
    ctx: Ctx, name: str, cfg: Path, rate: int = 0, count: int = 0, duration: float = 0.0
) -> subprocess.Popen[bytes]:
    """bench.blast on g0, pinned to the generator core."""
    argv = [PY, "-m", "bench.blast", "g0", "--frames", str(cfg), "--rate", str(rate)]
    argv += ["--count", str(count), "--duration", str(duration)]
    return ctx.procs.start(name, ctx.tb.gen, argv, cpu=ctx.args.gen_cpu)


def saturate(
    ctx: Ctx, name: str, delivered: Counter, cfg: Path, seconds: float, rate: int | None = None
) -> dict[str, Any]:
    """Offers traffic as fast as the generator goes (or at `rate` packets/s) for warmup +
    seconds; rates over the last part."""
    bound = ctx.args.warmup + seconds + 5  # the generator stops by itself even if we die
    tg = generator(ctx, f"gen-{name}", cfg, rate=rate or 0, duration=bound)
    try:
        time.sleep(ctx.args.warmup)
        ctx.procs.check_alive(tg)
        d0, o0, t0 = delivered(), gen_offered(ctx), time.monotonic()
        c0 = stats.parse_proc_stat(Path("/proc/stat").read_text())
        time.sleep(seconds)
        c1 = stats.parse_proc_stat(Path("/proc/stat").read_text())
        d1, o1, t1 = delivered(), gen_offered(ctx), time.monotonic()
    finally:
        ctx.procs.stop(tg)
    dt = t1 - t0
    return {
        "offered_pps": round((o1 - o0) / dt),
        "delivered_pps": round((d1 - d0) / dt),
        "loss": round(stats.loss(o1 - o0, d1 - d0), 5),
        "seconds": round(dt, 3),
        # Whole-machine view per core (other tenants included): is the generator core full?
        "cpu": stats.cpu_shares(c0, c1),
    }


def paced(ctx: Ctx, name: str, delivered: Counter, rate: int, seconds: float) -> dict[str, Any]:
    """Offers rate x seconds packets at `rate`, waits for the queues to drain, and compares
    what arrived with what was offered."""
    count = int(rate * seconds)
    d0, o0 = delivered(), gen_offered(ctx)
    tg = generator(ctx, f"gen-{name}", ctx.cfg_udp, rate=rate, count=count, duration=seconds * 3)
    try:
        tg.wait(timeout=seconds * 3 + 10)
    except subprocess.TimeoutExpired:
        say(f"{name}: the generator did not finish in time; stopping it")
    finally:
        ctx.procs.stop(tg)
    time.sleep(0.5)  # drain
    d1, o1 = delivered(), gen_offered(ctx)
    gen = last_json(ctx.procs.log(f"gen-{name}"))
    return {
        "target_pps": rate,
        "offered": o1 - o0,
        "offered_pps": gen.get("pps", 0),  # the generator's own clock: sent / its seconds
        "delivered": d1 - d0,
        "loss": round(stats.loss(o1 - o0, d1 - d0), 6),
    }


def wait_ready(ctx: Ctx, proc: subprocess.Popen[bytes], delivered: Counter, probe: Path) -> float:
    """Sends a few probe frames at a time until some arrive: the forwarder under test is
    working. Returns the seconds it took; raises ProcError if it died or never forwarded."""
    start = time.monotonic()
    deadline = start + ctx.args.ready_timeout
    while time.monotonic() < deadline:
        ctx.procs.check_alive(proc)
        before = delivered()
        tg = generator(ctx, "gen-probe", probe, rate=1000, count=20, duration=3)
        try:
            tg.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        finally:
            ctx.procs.stop(tg)
        time.sleep(0.1)
        if delivered() > before:
            return time.monotonic() - start
        time.sleep(0.3)
    raise ProcError(f"nothing forwarded within {ctx.args.ready_timeout:.0f} s of starting")


# -- DUT programs ---------------------------------------------------------------------------
def backend_args(backends: Sequence[str]) -> list[str]:
    return [arg for ip in backends for arg in ("--backend", ip)]


def lb_argv(ctx: Ctx, backends: Sequence[str] = tbm.BACKEND_IPS) -> list[str]:
    argv = [PY, "-m", "fastpath.lb", "d0", "--vip", tbm.VIP, *backend_args(backends)]
    argv += ["--stats-file", str(ctx.procs.log_dir / "lb-d0.json")]
    # The placement (place()) sets RPS; the LB's own --rps-cpus auto would undo dut-core.
    argv += ["--rps-cpus", "off"]
    return [*argv, *ctx.args.lb_arg]


def run_scraped(ctx: Ctx) -> dict[str, Any]:
    """fastpath from a configuration file like lb_argv's, its exporter beside it on the DUT's
    address, and bench.scrape asking the exporter --scrape-hz times a second throughout."""
    from controller.exporter.config import ExporterConfig
    from fastpath.config import LbConfig
    from l4lb import cfgfile

    tb, log_dir = ctx.tb, ctx.procs.log_dir
    lb_cfg, exp_cfg = log_dir / "lb-scraped.json", log_dir / "exporter-scraped.json"
    lb = LbConfig(
        iface="d0", vips=((tbm.VIP, None),), backends=tuple((ip, 1) for ip in tbm.BACKEND_IPS),
        stats_file=str(log_dir / "lb-d0.json"), control_socket=str(log_dir / "lb-d0.ctl"),
        rps_cpus="off",  # as lb_argv: the placement sets RPS
    )  # fmt: skip
    lb_cfg.write_text(cfgfile.dump(lb))
    exp_cfg.write_text(cfgfile.dump(ExporterConfig("lb", str(lb_cfg), tbm.DUT_IP)))
    exporter = ctx.procs.start("exporter", tb.dut, [PY, "-m", "controller.exporter", "--config",
                                                    str(exp_cfg)])  # fmt: skip
    bound = (ctx.args.warmup + ctx.args.duration + ctx.args.ready_timeout + 10) * 3
    url = f"http://{tbm.DUT_IP}:9180/metrics"
    scraper = ctx.procs.start(
        "scraper", tb.dut,
        [PY, "-m", "bench.scrape", "--url", url, "--hz", str(ctx.args.scrape_hz),
         "--seconds", str(bound)],
    )  # fmt: skip
    try:
        argv = [PY, "-m", "fastpath.lb", "d0", "--config", str(lb_cfg), *ctx.args.lb_arg]
        out = run_forwarder(ctx, "scraped", argv, ctx.args.duration, ctx.args.placements)
    finally:
        ctx.procs.stop(scraper)
        ctx.procs.stop(exporter)
    out["scrapes"] = last_json(ctx.procs.log("scraper"))
    out["scrape_hz"] = ctx.args.scrape_hz
    say(f"scraped   {out['scrapes']} scrapes at {ctx.args.scrape_hz} Hz")
    return out


def scraped_ratio(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per placement: delivered pps scraped / not scraped, per round and the median."""
    out: dict[str, Any] = {}
    for placement in PLACEMENTS:
        ratios = []
        for r in rounds:
            a = (r.get("fastpath") or {}).get(placement, {}).get("delivered_pps")
            b = (r.get("scraped") or {}).get(placement, {}).get("delivered_pps")
            if a and b:
                ratios.append(round(b / a, 4))
        if ratios:
            out[placement] = {"rounds": ratios, "median": sorted(ratios)[len(ratios) // 2]}
    return out


def scapy_argv(persistent: bool) -> list[str]:
    argv = [PY, "-m", "bench.scapy_lb", "d0", "--vip", tbm.VIP, *backend_args(tbm.BACKEND_IPS)]
    argv += ["--next-hop-mac", tbm.GEN_MAC, "--local-ip", tbm.DUT_IP]
    return [*argv, "--persistent-socket"] if persistent else argv


def agent_argv(ctx: Ctx, iface: str, allow: str) -> list[str]:
    stats_file = ctx.procs.log_dir / f"agent-{iface}.json"
    return [
        PY,
        "-m",
        "agent.decap",
        "--iface",
        iface,
        "--vip",
        tbm.VIP,
        "--allow-lb",
        allow,
        "--stats-file",
        str(stats_file),
        *ctx.args.agent_arg,
    ]


def place(ctx: Ctx, placement: str) -> None:
    """Sets where the DUT's receive work runs (see the module docstring)."""
    tb, gen_cpu, dut_cpu = ctx.tb, ctx.args.gen_cpu, ctx.args.dut_cpu
    d0, g0 = {"split": ([], []), "dut-core": ([dut_cpu], []), "gen-core": ([], [gen_cpu])}[
        placement
    ]
    tb.set_rps(tb.dut, "d0", d0)
    tb.set_rps(tb.gen, "g0", g0)


def run_forwarder(
    ctx: Ctx,
    name: str,
    argv: list[str] | None,
    seconds: float,
    placements: Sequence[str],
    cpu: int | str | None = None,
) -> dict[str, Any]:
    """Saturation per placement for one forwarder on the DUT (argv None: the kernel router),
    pinned to `cpu` (default the DUT core)."""
    cpu = ctx.args.dut_cpu if cpu is None else cpu
    tb = ctx.tb
    counting(ctx, True)
    tb.set_dut_forwarding(argv is None)
    out: dict[str, Any] = {}
    for placement in placements:
        place(ctx, placement)
        proc = None
        try:
            if argv is not None:
                proc = ctx.procs.start(f"{name}-{placement}", tb.dut, argv, cpu=cpu)
                ready = wait_ready(ctx, proc, lambda: delivered_frames(ctx), ctx.cfg_probe)
            else:
                ready = 0.0
            res = saturate(
                ctx, f"{name}-{placement}", lambda: delivered_frames(ctx), ctx.cfg_udp, seconds
            )
            res["ready_s"] = round(ready, 2)
            if proc is not None:
                ctx.procs.check_alive(proc)
            out[placement] = res
            say(
                f"{name:9} {placement:8} delivered {res['delivered_pps']:>9,} pps of "
                f"{res['offered_pps']:>9,} offered (loss {res['loss']:.1%}){cpu_note(res)}"
            )
        except ProcError as exc:
            out[placement] = {"error": str(exc)}
            say(f"{name} {placement}: FAILED: {exc}")
        finally:
            if proc is not None:
                ctx.procs.stop(proc)
                final = last_json(ctx.procs.log(f"{name}-{placement}"))
                if isinstance(out.get(placement), dict) and final:
                    out[placement]["program_stats"] = final  # its own counters at exit
    tb.set_dut_forwarding(False)
    place(ctx, "split")
    return out


def worker_cpus(ncpu: int, gen_cpu: int) -> str:
    """The CPUs the workers may use (fastpath.workers pins worker i to the i-th of them): every
    CPU but the generator's when there are more than two; on two, both (worker 1 then shares
    the generator's core: README-pps.md says what that figure means)."""
    cpus = [c for c in range(ncpu) if ncpu <= 2 or c != gen_cpu]
    return ",".join(map(str, cpus))


def run_workers(ctx: Ctx) -> dict[str, Any]:
    """fastpath with `--workers N` for each N > 1 of --workers, as the fastpath phase measures
    one (same placements, same round; N = 1 is that phase)."""
    a = ctx.args
    cpus = a.worker_cpus or worker_cpus(os.cpu_count() or 1, a.gen_cpu)
    out: dict[str, Any] = {"cpus": cpus}
    for n in a.workers:
        if n > 1:
            argv = [*lb_argv(ctx), "--workers", str(n)]
            out[str(n)] = run_forwarder(ctx, f"workers{n}", argv, a.duration, a.placements, cpus)
    return out


def run_scapy(ctx: Ctx, name: str, persistent: bool) -> dict[str, Any]:
    """The scapy LB at saturation and at modest paced rates (a flood can livelock a slow
    receiver below what it manages when offered less); its rate is the best of them, which
    only makes fastpath's ratio to it smaller."""
    tb = ctx.tb
    counting(ctx, True)
    tb.set_dut_forwarding(False)
    place(ctx, "split")
    proc = ctx.procs.start(name, tb.dut, scapy_argv(persistent), cpu=ctx.args.dut_cpu)
    out: dict[str, Any] = {}
    try:
        wait_ready(ctx, proc, lambda: delivered_frames(ctx), ctx.cfg_probe)
        for rate in (None, *ctx.args.scapy_rates):
            res = saturate(
                ctx, name, lambda: delivered_frames(ctx), ctx.cfg_udp, ctx.args.scapy_duration, rate
            )
            ctx.procs.check_alive(proc)
            out[f"offered_{rate}" if rate else "saturation"] = res
            say(
                f"{name:9} {'paced' if rate else 'flood':8} delivered {res['delivered_pps']:>9,}"
                f" pps of {res['offered_pps']:>9,} offered"
            )
    except ProcError as exc:
        out["error"] = str(exc)
        say(f"{name}: FAILED: {exc}")
    finally:
        ctx.procs.stop(proc)
        out["program_stats"] = last_json(ctx.procs.log(name))
    rates = [m["delivered_pps"] for m in out.values() if isinstance(m, dict) and "offered_pps" in m]
    if rates:
        out["delivered_pps"] = max(rates)
    return out


def run_paced(ctx: Ctx, placement: str) -> dict[str, Any]:
    tb = ctx.tb
    counting(ctx, True)
    place(ctx, placement)
    proc = ctx.procs.start("fastpath-paced", tb.dut, lb_argv(ctx), cpu=ctx.args.dut_cpu)
    try:
        wait_ready(ctx, proc, lambda: delivered_frames(ctx), ctx.cfg_probe)
        res = paced(
            ctx, "paced", lambda: delivered_frames(ctx), ctx.args.paced_rate, ctx.args.duration
        )
        res["placement"] = placement
        say(
            f"paced     {placement:8} {res['delivered']:,} of {res['offered']:,} delivered at "
            f"{res['offered_pps']:,} pps offered (loss {res['loss']:.3%})"
        )
        return res
    except ProcError as exc:
        say(f"paced: FAILED: {exc}")
        return {"error": str(exc)}
    finally:
        ctx.procs.stop(proc)
        place(ctx, "split")


def run_agent(ctx: Ctx) -> dict[str, Any]:
    """IP-in-IP from the LB's address to the DUT running agent.decap on d0."""
    tb = ctx.tb
    tb.set_dut_forwarding(False)
    place(ctx, "split")
    proc = ctx.procs.start("agent", tb.dut, agent_argv(ctx, "d0", tbm.GEN_IP), ctx.args.dut_cpu)
    # The server of the inner datagrams: a bound socket (see bench/udp_sink.py for why).
    sink_argv = [PY, "-m", "bench.udp_sink", "--bind", tbm.VIP, "--port", str(UDP_PORT)]
    server = ctx.procs.start("udp-sink", tb.dut, sink_argv)
    res: dict[str, Any] = {}
    try:
        wait_log(ctx, server, "udp-sink", "bound")
        wait_ready(ctx, proc, lambda: dut_udp_delivered(ctx), ctx.cfg_probe_ipip)
        res = saturate(
            ctx, "agent", lambda: dut_udp_delivered(ctx), ctx.cfg_ipip, ctx.args.duration
        )
        ctx.procs.check_alive(proc)
        say(
            f"agent     split    delivered {res['delivered_pps']:>9,} pps of "
            f"{res['offered_pps']:>9,} offered (loss {res['loss']:.1%}){cpu_note(res)}"
        )
    except ProcError as exc:
        say(f"agent: FAILED: {exc}")
        res = {"error": str(exc)}
    finally:
        ctx.procs.stop(proc)
        ctx.procs.stop(server)
    res["program_stats"] = last_json(ctx.procs.log("agent"))
    return res


def wait_log(ctx: Ctx, proc: subprocess.Popen[bytes], name: str, text: str) -> None:
    deadline = time.monotonic() + ctx.args.ready_timeout
    while text not in ctx.procs.log(name):
        ctx.procs.check_alive(proc)
        if time.monotonic() > deadline:
            raise ProcError(f"{name} did not print {text!r} in time")
        time.sleep(0.05)


def pingpong(ctx: Ctx, count: int) -> dict[str, Any]:
    argv = [
        PY,
        "-m",
        "bench.pingpong",
        "client",
        "--server",
        tbm.VIP,
        "--port",
        str(PING_PORT),
        "--count",
        str(count),
    ]
    out = ctx.tb.ns(ctx.tb.cli, *argv, timeout=count * 0.3 + 30)
    return dict(json.loads(out.strip().splitlines()[-1]))


def start_server(ctx: Ctx, name: str) -> subprocess.Popen[bytes]:
    argv = [PY, "-m", "bench.pingpong", "serve", "--bind", tbm.VIP, "--port", str(PING_PORT)]
    server = ctx.procs.start(name, ctx.tb.sink, argv)
    wait_log(ctx, server, name, "serving")
    return server


def run_latency(ctx: Ctx) -> dict[str, Any]:
    """The same request/reply path, routed by the kernel (the DUT as router, the VIP on the
    sink's lo) and through LB + agent (DSR: replies go straight back through gen). Each path
    gets its own server process, started once the VIP is in place."""
    tb, count = ctx.tb, ctx.args.pings
    counting(ctx, False)
    place(ctx, "split")
    out: dict[str, Any] = {}
    try:
        # Kernel: the DUT routes, the sink owns the VIP.
        tb.ns(tb.sink, "ip", "addr", "add", f"{tbm.VIP}/32", "dev", "lo")
        tb.set_dut_forwarding(True)
        kernel_server = start_server(ctx, "pingpong-kernel")
        try:
            pingpong(ctx, 20)  # warm caches and neighbours
            out["kernel"] = pingpong(ctx, count)
        finally:
            ctx.procs.stop(kernel_server)
            tb.set_dut_forwarding(False)
            tb.ns(tb.sink, "ip", "addr", "del", f"{tbm.VIP}/32", "dev", "lo", check=False)
        # LB + agent.
        agent = ctx.procs.start("agent-latency", tb.sink, agent_argv(ctx, "s0", tbm.DUT_IP))
        lb_args = lb_argv(ctx, [tbm.SINK_IP])
        lb = ctx.procs.start("fastpath-latency", tb.dut, lb_args, cpu=ctx.args.dut_cpu)
        server: subprocess.Popen[bytes] | None = None
        try:
            wait_log(ctx, agent, "agent-latency", '"ready"')
            server = start_server(ctx, "pingpong-lb")
            deadline = time.monotonic() + ctx.args.ready_timeout
            while pingpong(ctx, 5)["answered"] == 0:
                ctx.procs.check_alive(lb)
                ctx.procs.check_alive(agent)
                if time.monotonic() > deadline:
                    udp = tb.snmp(tb.sink, "Udp")
                    raise ProcError(f"no echo through LB + agent (sink Udp counters {udp})")
                time.sleep(0.3)
            pingpong(ctx, 20)
            out["lb"] = pingpong(ctx, count)
        finally:
            for proc in (server, lb, agent):
                if proc is not None:
                    ctx.procs.stop(proc)
        out["kernel_rps"] = out["kernel"]["rps"]
        out["lb_rps"] = out["lb"]["rps"]
        say(
            f"latency   kernel {out['kernel_rps']:,.0f} req/s "
            f"(p50 {out['kernel']['p50_us']:.0f} us), LB+agent {out['lb_rps']:,.0f} req/s "
            f"(p50 {out['lb']['p50_us']:.0f} us)"
        )
    except (ProcError, subprocess.SubprocessError, tbm.TestbedError, ValueError) as exc:
        out["error"] = str(exc)
        say(f"latency: FAILED: {exc}")
    finally:
        counting(ctx, True)
    return out


def vm_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def lb_stat(ctx: Ctx, key: str) -> Any:
    """One value from the running LB's stats file (None if it cannot be read)."""
    try:
        return json.loads((ctx.procs.log_dir / "lb-d0.json").read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def run_lb_memory(ctx: Ctx) -> dict[str, Any]:
    """The running fastpath.lb process's VmRSS, idle and after it has seen 100,000 and then
    1,000,000 distinct flows (offered paced, so it sees them all)."""
    tb = ctx.tb
    out: dict[str, Any] = {}
    counting(ctx, True)
    place(ctx, "split")
    sizes = sorted(ctx.args.memory_flows)
    blob = ctx.procs.log_dir / "memory.frames"
    blob.write_bytes(
        frames.pack_frames(
            frames.udp_frames(sizes[-1], tbm.GEN_MAC, tbm.DUT_MAC, tbm.VIP, UDP_PORT)
        )
    )
    proc = ctx.procs.start("fastpath-memory", tb.dut, lb_argv(ctx), cpu=ctx.args.dut_cpu)
    try:
        wait_ready(ctx, proc, lambda: delivered_frames(ctx), ctx.cfg_probe)
        out["idle"] = vm_rss_mb(proc.pid)
        for n in sizes:  # the first n frames of the file are n distinct flows
            before = delivered_frames(ctx)
            gen = generator(
                ctx,
                f"gen-memory-{n}",
                blob,
                rate=ctx.args.memory_rate,
                count=n,
                duration=n / ctx.args.memory_rate * 3 + 30,
            )
            gen.wait(timeout=n / ctx.args.memory_rate * 3 + 60)
            time.sleep(0.5)
            ctx.procs.check_alive(proc)
            time.sleep(ctx.args.memory_settle)  # the next stats-file snapshot
            res = {"rss_mb": vm_rss_mb(proc.pid), "delivered": delivered_frames(ctx) - before}
            res["tracked_flows"] = lb_stat(ctx, "tracked_flows")
            out[str(n)] = res
            say(
                f"lb memory {n:,} flows offered, {res['tracked_flows']} tracked: "
                f"VmRSS {res['rss_mb']} MB"
            )
    except (ProcError, subprocess.TimeoutExpired) as exc:
        out["error"] = str(exc)
        say(f"lb memory: FAILED: {exc}")
    finally:
        ctx.procs.stop(proc)
        blob.unlink(missing_ok=True)
    return out


def run_memory(ctx: Ctx) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for flows in ctx.args.memory_flows:
        try:
            text = subprocess.run(
                [PY, "-m", "bench.conntrack_rss", "--flows", str(flows)],
                capture_output=True,
                text=True,
                timeout=600,
                check=True,
                cwd=REPO,
            ).stdout
            res = json.loads(text.strip().splitlines()[-1])
            res.pop("counters", None)
            out[str(flows)] = res
            say(f"memory    {flows:,} tracked flows: VmRSS {res['rss_mb']} MB")
        except (subprocess.SubprocessError, ValueError, IndexError) as exc:
            out[str(flows)] = {"error": str(exc)}
            say(f"memory {flows}: FAILED: {exc}")
    return out


# -- the run --------------------------------------------------------------------------------
def run_round(ctx: Ctx, i: int, r: dict[str, Any]) -> None:
    """Runs round i's phases into r (filled as they finish, so Ctrl-C keeps what was done)."""
    a = ctx.args
    r["round"] = i
    phases: list[tuple[str, Callable[[], Any]]] = [
        ("kernel", lambda: run_forwarder(ctx, "kernel", None, a.duration, a.placements)),
        (
            "fastpath",
            lambda: run_forwarder(ctx, "fastpath", lb_argv(ctx), a.duration, a.placements),
        ),
        ("paced", lambda: run_paced(ctx, a.paced_placement)),
        ("scapy", lambda: run_scapy(ctx, "scapy", True)),
        ("scapy_sendp", lambda: run_scapy(ctx, "scapy-sendp", False)),
        ("agent", lambda: run_agent(ctx)),
        ("latency", lambda: run_latency(ctx)),
        ("scraped", lambda: run_scraped(ctx)),
        ("workers", lambda: run_workers(ctx)),
    ]
    # Rotate the order each round, so no system always runs first (or always after scapy).
    order = [p for p in phases if p[0] in a.phases]
    if a.interleave and order:
        k = i % len(order)
        order = order[k:] + order[:k]
    for name, fn in order:
        say(f"round {i + 1}: {name}")
        r[name] = guarded(name, fn)
    for n, res in (r.pop("workers", None) or {}).items():  # as phases of their own
        r["workers_cpus" if n == "cpus" else f"workers{n}"] = res


def guarded(name: str, fn: Callable[[], Any]) -> Any:
    """Runs one phase; a bug in it costs that phase's figures, never the whole run's."""
    try:
        return fn()
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:
        say(f"{name}: FAILED with {type(exc).__name__}: {exc}")
        return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}


def chart(summary: dict[str, Any], rounds: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    systems = [
        ("kernel", "kernel_pps"),
        ("fastpath", "fastpath_pps"),
        ("scapy (L2socket)", "scapy_pps"),
        ("agent decap", "agent_pps"),
    ]
    per = summary["per_round"]
    for x, (label, key) in enumerate(systems):
        vals = [f[key] for f in per if f[key]]
        med = summary.get(key) or 0
        ax1.bar(x, med, color=["#888", "#2a7", "#c63", "#27a"][x], label=label)
        ax1.plot([x] * len(vals), vals, "k.", ms=5)
        if med:
            ax1.annotate(f"{med:,.0f}", (x, med), ha="center", va="bottom", fontsize=8)
    ax1.set_xticks(range(len(systems)), [s[0] for s in systems], fontsize=8)
    if any(summary.get(key) for _label, key in systems):
        ax1.set_yscale("log")
        ax1.set_ylim(bottom=10)
    ax1.set_ylabel("delivered packets/s (median; dots: rounds)")
    ax1.set_title("64-byte UDP, saturation")
    for placement, style in (("split", "o-"), ("dut-core", "s--"), ("gen-core", "^:")):
        for system, color in (("kernel", "#888"), ("fastpath", "#2a7")):
            ys = [(r.get(system) or {}).get(placement, {}).get("delivered_pps") for r in rounds]
            pts = [(i + 1, y) for i, y in enumerate(ys) if y]
            if pts:
                ax2.plot(*zip(*pts, strict=True), style, color=color, label=f"{system} {placement}")
    ax2.set_xlabel("round")
    ax2.set_xticks(range(1, len(rounds) + 1))
    ax2.set_ylabel("delivered packets/s")
    ax2.set_title("per round and CPU placement")
    if ax2.get_legend_handles_labels()[0]:
        ax2.legend(fontsize=7)
    text = (
        f"ratio to kernel {fmt(summary.get('ratio_to_kernel'))}, to scapy "
        f"{fmt(summary.get('ratio_to_scapy'))}; loss at paced "
        f"{fmt(summary.get('loss_at_paced'))}; latency ratio "
        f"{fmt(summary.get('latency_ratio'))}"
    )
    fig.suptitle(text, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Forwarding benchmark: fastpath vs scapy vs kernel.")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per run (5)")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first (1)")
    p.add_argument("--scapy-duration", type=float, default=3.0)
    p.add_argument(
        "--scapy-rates",
        type=lambda s: [int(x) for x in s.split(",") if x],
        default=[2000],
        help="paced rates also offered to scapy (2000)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="2 s runs, the split placement only, memory at 100,000 flows only",
    )
    p.add_argument("--flows", type=int, default=4096, help="distinct UDP flows (4096)")
    p.add_argument(
        "--count-at",
        choices=("next-hop", "sink"),
        default="next-hop",
        help="where delivered frames are counted: at the DUT's next hop, which discards them "
        "(default: the DUT alone is measured), or at the sink after the next hop routed them "
        "(the generator core then also routes every delivered frame)",
    )
    p.add_argument("--paced-rate", type=int, default=300_000)
    p.add_argument(
        "--scrape-hz", type=float, default=10.0, help="scrapes per second in `scraped` (10)"
    )
    p.add_argument(
        "--paced-placement",
        choices=PLACEMENTS,
        default="gen-core",
        help="placement of the paced phase (gen-core: the LB's core runs the LB alone)",
    )
    p.add_argument(
        "--placements",
        type=lambda s: s.split(","),
        default=list(PLACEMENTS),
        help="CPU placements to measure (default: all: split,dut-core,gen-core)",
    )
    p.add_argument(
        "--phases",
        type=lambda s: s.split(","),
        default=list(PHASES),
        help=f"comma-separated phases to run (default: all: {','.join(PHASES)})",
    )
    p.add_argument("--no-interleave", dest="interleave", action="store_false")
    p.add_argument(
        "--trafgen-configs",
        action="store_true",
        help="also write the frames as trafgen configurations into the log dir",
    )
    p.add_argument("--pings", type=int, default=20000, help="sequential requests per path")
    p.add_argument(
        "--memory-flows",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[100_000, 1_000_000],
    )
    p.add_argument(
        "--memory-rate",
        type=int,
        default=100_000,
        help="paced rate for the lb_memory phase (100000)",
    )
    p.add_argument(
        "--memory-settle",
        type=float,
        default=1.5,
        help="seconds for the LB's stats file to catch up in lb_memory (1.5)",
    )
    p.add_argument("--dut-cpu", type=int, default=0, help="core of the LB / agent (0)")
    p.add_argument("--gen-cpu", type=int, default=1, help="core of the generator (1)")
    p.add_argument("--ready-timeout", type=float, default=25.0)
    p.add_argument("--lb-arg", action="append", default=[], help="extra fastpath.lb argument")
    p.add_argument("--agent-arg", action="append", default=[], help="extra agent.decap argument")
    p.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    p.add_argument(
        "--workers",
        type=lambda s: sorted({int(x) for x in s.split(",") if x}),
        default=None,
        metavar="N,N,...",
        help="also measure fastpath.lb --workers N for each N (1 is the fastpath phase): "
        "workers_pps per count and workers_scaling (N / 1, paired per round); adds the "
        "workers and fastpath phases",
    )
    p.add_argument(
        "--worker-cpus",
        metavar="LIST",
        help="taskset CPU list for the --workers runs (default: every CPU but the generator's, "
        "both on a 2-CPU machine); e.g. the DUT core alone (0) measures what N processes on "
        "one core cost against one",
    )
    a = p.parse_args(argv)
    if a.quick:
        a.duration, a.warmup, a.scapy_duration = 2.0, 0.5, 2.0
        a.pings = min(a.pings, 5000)
        a.placements = ["split"]
        a.memory_flows = [100_000]
    unknown = [x for x in a.phases if x not in PHASES]
    if unknown:
        p.error(f"--phases: unknown {unknown}; choose from {', '.join(PHASES)}")
    bad = [x for x in a.placements if x not in PLACEMENTS]
    if bad:
        p.error(f"--placements: unknown {bad}; choose from {', '.join(PLACEMENTS)}")
    if a.workers is not None:
        if not a.workers or min(a.workers) < 1:
            p.error("--workers: counts must be integers >= 1, e.g. 1,2")
        a.phases += [x for x in ("fastpath", "workers") if x not in a.phases]
    elif "workers" in a.phases:
        a.phases.remove("workers")  # it needs --workers
    if a.rounds < 1 or a.duration <= 0 or a.flows < 1:
        p.error("--rounds, --duration and --flows must be positive")
    ncpu = os.cpu_count() or 1
    if not (0 <= a.dut_cpu < ncpu and 0 <= a.gen_cpu < ncpu):
        p.error(f"--dut-cpu/--gen-cpu must be in 0..{ncpu - 1}")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("pps: needs root (network namespaces, AF_PACKET)", file=sys.stderr)
        return 2
    tbm.install_signal_handlers()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    work = args.out_dir / f"pps-{stamp}.d"  # logs, frames, and the same frames for trafgen
    work.mkdir()
    procs = Procs(work)
    for name in tbm.remove_stale():
        say(f"removed stale namespace {name}")
    gen_frames = frames.udp_frames(args.flows, tbm.GEN_MAC, tbm.DUT_MAC, tbm.VIP, UDP_PORT)
    ipip = frames.ipip_frames(
        args.flows, tbm.GEN_MAC, tbm.DUT_MAC, tbm.GEN_IP, tbm.DUT_IP, tbm.VIP, UDP_PORT
    )
    paths = {}
    for name, fr in (
        ("udp", gen_frames),
        ("ipip", ipip),
        ("probe", gen_frames[:16]),
        ("probe_ipip", ipip[:16]),
    ):
        paths[name] = work / f"{name}.frames"
        paths[name].write_bytes(frames.pack_frames(fr))
        if args.trafgen_configs:  # for runs by hand: trafgen -i <name>.cfg -o g0
            (work / f"{name}.cfg").write_text(frames.trafgen_config(fr))
    rounds: list[dict[str, Any]] = []
    memory: dict[str, Any] = {}
    started = time.monotonic()
    meta = {
        "started": stamp,
        "flows": args.flows,
        "count_at": args.count_at,
        "frame_bytes": len(gen_frames[0]) + 4,
        "duration_s": args.duration,
        "placements": args.placements,
        "dut_cpu": args.dut_cpu,
        "gen_cpu": args.gen_cpu,
        "cpus": os.cpu_count(),
        "kernel": os.uname().release,
        "cpu_model": cpu_model(),
        "loadavg_start": os.getloadavg(),
    }
    say(f"{args.rounds} rounds, {args.flows} flows, {args.duration} s per run; logs in {work}")
    say(f"CPU: {meta['cpu_model']}, {meta['cpus']} CPUs")
    interrupted = False
    try:
        with tbm.Testbed() as tb:
            ctx = Ctx(
                tb, procs, args, paths["udp"], paths["ipip"], paths["probe"], paths["probe_ipip"]
            )
            counting(ctx, True)
            for i in range(args.rounds):
                rounds.append({})
                run_round(ctx, i, rounds[-1])
            if "memory" in args.phases:
                memory = guarded("memory", lambda: run_memory(ctx))
            if "lb_memory" in args.phases:
                memory["lb_process"] = guarded("lb_memory", lambda: run_lb_memory(ctx))
    except KeyboardInterrupt:
        interrupted = True
        say("interrupted: cleaning up")
    finally:
        procs.stop_all()
        for path in work.glob("*.frames"):  # megabytes each, rebuilt by every run
            path.unlink()
    summary = stats.summarize(rounds)
    mem_of = {str(n): (memory.get(str(n)) or {}).get("rss_mb") for n in args.memory_flows}
    line: dict[str, Any] = {k: summary[k] for k in stats.FIGURES}
    line["rss_mb_100k"] = mem_of.get("100000")
    line["rss_mb_1m"] = mem_of.get("1000000")
    lb_mem = memory.get("lb_process") or {}
    # The running LB's own VmRSS: idle, and after N distinct flows were offered to it.
    line["lb_process_rss_mb"] = {
        k: v.get("rss_mb") if isinstance(v, dict) else v
        for k, v in lb_mem.items()
        if isinstance(v, dict | float | int)
    }
    line["pps_by_placement"] = summary["by_placement"]
    if args.workers:
        line.update(stats.workers_figures(rounds, args.workers))
    line["cpu_model"] = meta["cpu_model"]
    line["rounds"] = len(rounds)
    if "scraped" in args.phases:
        line["scraped_ratio"] = scraped_ratio(rounds)
    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    meta["loadavg_end"] = os.getloadavg()
    meta["interrupted"] = interrupted
    result = {
        "summary": line,
        "per_round": summary["per_round"],
        "rounds": rounds,
        "memory": memory,
        "meta": meta,
    }
    out_json = args.out_dir / f"pps-{stamp}.json"
    out_json.write_text(json.dumps(result, indent=1, default=str))
    try:
        chart(summary, rounds, args.out_dir / f"pps-{stamp}.png")
    except Exception as exc:  # the chart must never cost the figures
        say(f"chart failed: {exc}")
    say(f"results: {out_json}")
    line["results"] = str(out_json)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in line.items()}))
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
