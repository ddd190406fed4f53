"""The monitoring on the fat tree (root, mininet): `up --services --monitor`, a short load of
wget from four clients, then
- Prometheus' HTTP API: every backend has a non-zero packet rate (its recording rule), both LBs
  forward, the DSR byte ratio is far below 1, drops are recorded by reason;
- the status page in Debian's headless chromium (selenium, chromium-driver): all four backends
  and both LBs show non-zero rates that change, a backend whose web server is stopped shows so
  within 2 s; a screenshot goes to bench/figures/dashboard.png for the README.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fatnet import fat_tree, in_node

from controller import monitor, netstate, services
from controller.netstate import NetState

pytestmark = pytest.mark.fattree

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO / "bench" / "figures" / "dashboard.png"
CLIENTS = ("h4", "h8", "h12", "h16")
BACKENDS = ("h3", "h7", "h11", "h15")
PAGE = f"http://127.0.0.1:{monitor.DASHBOARD_PORT}/"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1500,1050",
)  # fmt: skip


@pytest.fixture(scope="module")
def monitored() -> Iterator[NetState]:
    """The fat tree with its services, exporters, status page and Prometheus."""
    with fat_tree(services=True, monitor=True) as st:
        yield st


class Load:
    """wget of `file` in a loop from each client for at most `seconds` (each loop ends by
    itself)."""

    def __init__(self, st: NetState, seconds: float, file: str = "100k.bin") -> None:
        loop = (
            f"end=$(($(date +%s) + {int(seconds)})); while [ $(date +%s) -lt $end ]; do "
            f"wget -q -T 2 -O /dev/null http://20.0.0.1/{file}; done"
        )
        self.procs = [
            subprocess.Popen(in_node(st.nodes[c].pid, ["sh", "-c", loop]),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for c in CLIENTS
        ]  # fmt: skip

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def prom(query: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{monitor.PROMETHEUS_PORT}/api/v1/query?"
    with urllib.request.urlopen(url + urllib.parse.urlencode({"query": query}), timeout=5) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def by(result: list[dict[str, Any]], label: str) -> dict[str, float]:
    return {r["metric"].get(label, ""): float(r["value"][1]) for r in result}


def test_prometheus_scrapes_every_exporter_and_has_per_backend_rates(monitored: NetState) -> None:
    load = Load(monitored, 20)
    try:
        deadline = time.monotonic() + 30
        while True:  # until every series has had two scrapes within its 5 s window
            rates = by(prom("backend:l4lb_backend_packets:rate5s"), "server")
            new_flows = by(prom("backend:l4lb_backend_connections:rate5s"), "server")
            lbs = by(prom("host:l4lb_forwarded_packets:rate5s"), "host")
            decap = by(prom("host:l4lb_agent_decap:rate5s"), "host")
            dsr = prom(":l4lb_dsr_byte_ratio:rate5s")
            ready = [*(rates.get(b, 0) for b in BACKENDS), *(lbs.get(h, 0) for h in ("h1", "h2"))]
            ready += [new_flows.get(b, 0) for b in BACKENDS]
            if (all(ready) and dsr) or time.monotonic() > deadline:
                break
            time.sleep(1)
    finally:
        load.stop()
    assert sorted(rates) == sorted(BACKENDS) and all(rates[b] > 0 for b in BACKENDS), rates
    assert all(new_flows.get(b, 0) > 0 for b in BACKENDS), new_flows  # downloads: new flows
    assert lbs.get("h1", 0) > 0 and lbs.get("h2", 0) > 0, lbs
    assert all(decap.get(b, 0) > 0 for b in BACKENDS), decap
    # Replies bypass the LBs: their hosts send a small fraction of the backends' bytes (100 KB
    # replies: about 2 %, ACKs and requests).
    assert dsr and 0 < float(dsr[0]["value"][1]) < 0.1, dsr
    targets = json.load(
        urllib.request.urlopen(f"http://127.0.0.1:{monitor.PROMETHEUS_PORT}/api/v1/targets")
    )["data"]["activeTargets"]
    assert sorted(t["labels"]["host"] for t in targets) == sorted(["h1", "h2", *BACKENDS])
    assert all(t["health"] == "up" for t in targets), [t["lastError"] for t in targets]
    reasons = by(prom("reason:l4lb_drops:rate5s"), "reason")
    assert "filtered_wrong_port" in reasons and "ttl_expired" in reasons


def _children(pid: int) -> list[int]:
    """Every descendant of `pid` (chromium's processes under chromedriver)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        out += map(int, kids)
        todo += map(int, kids)
    return out


def _chromium_missing() -> str | None:
    for tool in ("chromium", "chromedriver"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (./install.sh installs chromium and chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium not installed (./install.sh installs it from setup.cfg's test extra)"
    return None


@pytest.fixture
def browser() -> Iterator[Any]:
    if why := _chromium_missing():
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="l4lb-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    service = Service(executable_path=shutil.which("chromedriver"))
    driver = None
    pids: list[int] = []
    try:
        driver = webdriver.Chrome(service=service, options=opts)
        pids = [service.process.pid, *_children(service.process.pid)]
        yield driver
    finally:
        if driver is not None:
            pids = sorted(set(pids) | set(_children(service.process.pid)))
            driver.quit()
        for pid in pids:  # whatever quit() left, by PID
            if netstate.proc_start_time(pid) is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(profile, ignore_errors=True)


def page_rows(driver: Any) -> dict[str, dict[str, str]]:
    """The text of every LB's and backend's cells on the page, by host and cell class."""
    script = """
      const out = {};
      for (const tr of document.querySelectorAll('tr[data-lb], tr[data-backend]')) {
        const row = {};
        for (const td of tr.children) row[td.className] = td.textContent;
        out[tr.dataset.lb || tr.dataset.backend] = row;
      }
      return out;"""
    return dict(driver.execute_script(script))


def operator(*argv: str) -> None:
    """An operator's `python -m controller ...` command, which must succeed."""
    res = subprocess.run(
        [sys.executable, "-m", "controller", *argv], capture_output=True, text=True,
        cwd=REPO, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, f"{argv}: {res.stderr}"


def wait_rows(driver: Any, cond: Any, seconds: float = 10.0) -> bool:
    """Polls the page until `cond(page_rows)` holds (True) or `seconds` pass (False)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(KeyError):
            if cond(page_rows(driver)):
                return True
        time.sleep(0.2)
    return False


def nonzero(rate_text: str) -> bool:
    return rate_text not in ("", "-") and not rate_text.startswith("0 ")


def test_status_page_in_a_real_browser(monitored: NetState, browser: Any) -> None:
    load = Load(monitored, 40)
    try:
        browser.get(PAGE)
        deadline = time.monotonic() + 30
        seen: list[dict[str, str]] = []
        while time.monotonic() < deadline:
            rows = page_rows(browser)
            ok = all(h in rows and nonzero(rows[h]["pps"]) for h in ("h1", "h2", *BACKENDS))
            if ok:
                seen.append({h: rows[h]["pps"] for h in rows})
                if len(seen) >= 2 and seen[-1] != seen[0]:
                    break  # every number there, and they moved
            time.sleep(0.5)
        assert len(seen) >= 2 and seen[-1] != seen[0], f"rates never all showed or moved: {seen}"
        rows = page_rows(browser)
        assert all(rows[b]["state"] == "UP" for b in BACKENDS), rows
        assert all(rows[lb]["state"] == "UP" for lb in ("h1", "h2")), rows
        browser.save_screenshot(str(SCREENSHOT))
        assert all(rows[b]["flows"] not in ("", "n/a") for b in BACKENDS), rows

        # The operator drains h7 and withdraws h2's VIP: the page says DRAIN and WITHDRAWN;
        # then both come back.
        operator("backend", "drain", "h7")  # returns once both LBs applied it
        assert wait_rows(browser, lambda r: r["h7"]["state"] == "DRAIN", 2.0), page_rows(browser)
        operator("lb", "drain", "h2")
        assert wait_rows(browser, lambda r: r["h2"]["state"] == "WITHDRAWN"), page_rows(browser)
        operator("backend", "weight", "h7", "1")
        operator("lb", "undrain", "h2")
        assert wait_rows(browser, lambda r: r["h7"]["state"] == "UP"
                         and r["h2"]["state"] == "UP"), page_rows(browser)  # fmt: skip

        # Stop h3's web server (by PID, from the services' record): the page must say so.
        (www,) = [r for r in services.running() if r["name"] == "www-h3"]
        os.kill(www["pid"], signal.SIGTERM)
        stopped = time.monotonic()
        while time.monotonic() - stopped < 5:
            if page_rows(browser)["h3"]["state"] != "UP":
                break
            time.sleep(0.05)
        took = time.monotonic() - stopped
        state = page_rows(browser)["h3"]["state"]
    finally:
        load.stop()
    assert state == "NO SERVER", state
    assert took < 2.0, f"the page showed h3's server stopped after {took:.2f} s"
    assert SCREENSHOT.stat().st_size > 10_000
