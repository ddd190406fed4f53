// The status page: asks /api/topology once and /api/state every REFRESH_MS, and draws them.
// Vanilla JavaScript and SVG, nothing loaded from elsewhere. The state's fields are documented
// in controller/dashboard/model.py.
"use strict";

const REFRESH_MS = 500;
const SVGNS = "http://www.w3.org/2000/svg";
const LAYERS = { core: 40, agg: 140, tor: 240, host: 340 };
const COLORS = ["#4e79a7", "#f28e2b", "#76b7b2", "#59a14f", "#edc948", "#b07aa1"];
let topo = null;
let positions = {};
let lastTime = 0;
window.l4lbState = null; // the latest state, for a look from the browser's console

function el(tag, attrs = {}, text) {
  const e = tag.startsWith("svg:") ? document.createElementNS(SVGNS, tag.slice(4))
    : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function si(x, unit) {
  if (x === null || x === undefined) return "-";
  const steps = [[1e9, "G"], [1e6, "M"], [1e3, "k"]];
  for (const [f, p] of steps) if (Math.abs(x) >= f) return (x / f).toFixed(1) + " " + p + unit;
  return (Math.abs(x) < 10 && x % 1 ? x.toFixed(1) : Math.round(x)) + " " + unit;
}
const bits = (x) => si(x, "bit/s");
const pps = (x) => si(x, "pkt/s");

function spark(values, cls = "spark") {
  const svg = el("svg:svg", { class: cls, viewBox: "0 0 120 24", preserveAspectRatio: "none" });
  const known = values.filter((v) => v !== null && v !== undefined);
  if (!known.length) return svg;
  const max = Math.max(...known, 1e-9);
  const n = values.length;
  const pts = [];
  values.forEach((v, i) => {
    if (v === null || v === undefined) return;
    pts.push(`${(i / Math.max(n - 1, 1)) * 120},${23 - (v / max) * 22}`);
  });
  svg.appendChild(el("svg:polyline", { points: pts.join(" ") }));
  return svg;
}

function layout(t) {
  const layers = {};
  for (const n of t.nodes) {
    const layer = n.kind === "host" ? "host" : n.role;
    (layers[layer] = layers[layer] || []).push(n.name);
  }
  const pos = {};
  for (const [layer, names] of Object.entries(layers)) {
    names.forEach((name, i) => {
      pos[name] = { x: ((i + 0.5) / names.length) * 1000, y: LAYERS[layer] ?? 20 };
    });
  }
  return pos;
}

function linkStyle(bps) {
  if (!bps || bps < 1000) return { w: 1, c: "#cfd4de" };
  const level = Math.min(1, Math.log10(bps / 1000) / 7); // 1 kbit/s .. 10 Gbit/s
  return { w: 1.5 + level * 7, c: `hsl(${210 - 210 * level}, 75%, 45%)` };
}

function drawTree(state) {
  const svg = document.getElementById("fabric");
  svg.replaceChildren();
  const down = new Set(state.backends.filter((b) => b.state !== "UP").map((b) => b.host));
  for (const l of state.links) {
    const a = positions[l.a], b = positions[l.b];
    if (!a || !b) continue;
    const mid = { x: (a.x + b.x) / 2, y: (a.y + b.y) / 2 };
    // Each direction is one half of the line, drawn from its sender to the middle.
    for (const [from, rate, dir] of [[a, l.ab_bps, `${l.a} → ${l.b}`], [b, l.ba_bps, `${l.b} → ${l.a}`]]) {
      const s = linkStyle(rate);
      const line = el("svg:line", { x1: from.x, y1: from.y, x2: mid.x, y2: mid.y,
        stroke: s.c, "stroke-width": s.w });
      line.appendChild(el("svg:title", {}, `${dir}: ${bits(rate)}`));
      svg.appendChild(line);
    }
  }
  for (const n of topo.nodes) {
    const p = positions[n.name];
    if (n.kind === "host") {
      const cls = down.has(n.name) ? "down" : n.role;
      const c = el("svg:circle", { cx: p.x, cy: p.y, r: 11, class: cls, "data-node": n.name });
      c.appendChild(el("svg:title", {}, `${n.name} (${n.role})`));
      svg.appendChild(c);
      svg.appendChild(el("svg:text", { x: p.x, y: p.y + 26 }, n.name));
    } else {
      svg.appendChild(el("svg:rect", { x: p.x - 17, y: p.y - 11, width: 34, height: 22, rx: 4 }));
      svg.appendChild(el("svg:text", { x: p.x, y: p.y + 4, fill: "#fff", style: "fill:#fff" }, n.name));
    }
  }
}

function badge(state) {
  return el("span", { class: "badge " + state.replace(/ /g, "-") }, state);
}

function row(tbody, key, attr, cells) {
  let tr = tbody.querySelector(`tr[${attr}="${key}"]`);
  if (!tr) {
    tr = el("tr", { [attr]: key });
    tbody.appendChild(tr);
  }
  tr.replaceChildren(...cells.map(([cls, content]) => {
    const td = el("td", { class: cls });
    if (content instanceof Node) td.appendChild(content); else td.textContent = content;
    return td;
  }));
}

function drawLbs(state) {
  const tbody = document.querySelector("#lbs tbody");
  const split = document.getElementById("split");
  split.replaceChildren();
  state.lbs.forEach((lb, i) => {
    const share = lb.share === null ? "-" : (lb.share * 100).toFixed(0) + " %";
    const bar = el("div", { style: `flex-grow:${lb.share || 0};background:${COLORS[i % COLORS.length]}` },
      lb.share ? `${lb.host} ${share}` : "");
    split.appendChild(bar);
    row(tbody, lb.host, "data-lb", [
      ["host", lb.host], ["state", badge(!lb.up ? "LB DOWN" : lb.announced === 0 ? "WITHDRAWN" : "UP")], ["share", share],
      ["pps", pps(lb.fwd_pps)], ["rx", pps(lb.rx_pps)], ["drops", pps(lb.drop_pps)],
      ["flows", lb.flows ?? "-"], ["cpu", lb.cpu === null ? "-" : lb.cpu.toFixed(0) + " %"],
      ["rss", lb.rss_mb === null ? "-" : lb.rss_mb.toFixed(0) + " MB"],
      ["spark", spark(state.history["lb:" + lb.host] || [])],
    ]);
  });
}

function drawBackends(state) {
  const tbody = document.querySelector("#backends tbody");
  for (const b of state.backends) {
    const perLb = Object.entries(b.per_lb).map(([lb, v]) => `${lb} ${pps(v)}`).join(", ");
    row(tbody, b.host, "data-backend", [
      ["host", b.host], ["ip", b.ip], ["state", badge(b.state)], ["weight", b.weight ?? "-"],
      ["flows", b.active_flows ?? "n/a"], ["pps", pps(b.pps)], ["perlb", perLb],
      ["decap", pps(b.decap_pps)], ["spark", spark(state.history["backend:" + b.host] || [])],
    ]);
  }
}

function drawDsr(state) {
  const d = state.dsr;
  document.getElementById("dsr-lb").textContent = bits(d.lb_bps);
  document.getElementById("dsr-backend").textContent = bits(d.backend_bps);
  document.getElementById("dsr-ratio").textContent =
    d.ratio === null ? "-" : d.ratio.toFixed(4);
  document.getElementById("dsr-lb-spark").replaceChildren(spark(state.history["dsr:lb"] || []));
  document.getElementById("dsr-backend-spark")
    .replaceChildren(spark(state.history["dsr:backend"] || []));
  const bar = document.getElementById("dsrbar");
  const lb = d.lb_bps || 0, bk = d.backend_bps || 0;
  bar.replaceChildren(
    el("div", { style: `flex-grow:${lb};background:${COLORS[1]}` }, lb > (lb + bk) / 8 ? "LB hosts" : ""),
    el("div", { style: `flex-grow:${bk};background:${COLORS[3]}` }, bk ? "backends (replies, direct)" : ""));
}

function drawDrops(state) {
  const tbody = document.querySelector("#drops tbody");
  tbody.replaceChildren();
  if (!state.drops.length) {
    tbody.appendChild(el("tr", {}, "")).appendChild(el("td", { colspan: 4 }, "no drops"));
  }
  for (const d of state.drops) {
    const tr = el("tr", { "data-drop": `${d.where}:${d.reason}` });
    for (const v of [d.where, d.reason, Math.round(d.total), d.rate === null ? "-" : d.rate]) {
      tr.appendChild(el("td", {}, String(v)));
    }
    tbody.appendChild(tr);
  }
  const h = state.history.drops || [];
  document.getElementById("drops-spark").replaceChildren(spark(h));
  const now = h.length ? h[h.length - 1] : null;
  document.getElementById("droprate").textContent = now === null ? "" : `(${now} per second now)`;
}

function draw(state) {
  window.l4lbState = state;
  const errs = Object.entries(state.errors || {}).map(([k, v]) => `${k}: ${v}`);
  document.getElementById("errors").textContent = errs.join("; ");
  if (!state.links || !topo) return;
  document.getElementById("vip").textContent = state.vip;
  document.getElementById("updated").textContent =
    "updated " + new Date().toLocaleTimeString() + ` (every ${state.interval ?? "?"} s)`;
  drawTree(state);
  drawLbs(state);
  drawBackends(state);
  drawDsr(state);
  drawDrops(state);
}

async function refresh() {
  const status = document.getElementById("status");
  try {
    if (!topo || !topo.nodes) {
      topo = await (await fetch("/api/topology", { cache: "no-store" })).json();
      if (topo.nodes) positions = layout(topo);
    }
    const state = await (await fetch("/api/state", { cache: "no-store" })).json();
    if (state.time && state.time !== lastTime) {
      lastTime = state.time;
      status.textContent = "live";
      status.className = "live";
    }
    if (!state.links) topo = null; // no network yet, or a new one: ask again
    draw(state);
  } catch (e) {
    status.textContent = "no answer from the dashboard";
    status.className = "stale";
  }
  setTimeout(refresh, REFRESH_MS);
}

refresh();
