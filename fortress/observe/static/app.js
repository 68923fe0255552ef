// Fortress dashboard: polls /dashboard/data and redraws. No framework; uPlot for the charts.
"use strict";

const POLL_MS = 1500;
const HISTORY_S = 3600;
const TIERS = ["primary", "secondary", "standby"];
// Tick spacing of the time axis: whole seconds/minutes only, at least X_SPACE px apart, so
// labels (HH:MM, or HH:MM:SS below a minute) never run into each other.
const X_INCRS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600];
const X_SPACE = 90;
const $ = (id) => document.getElementById(id);
const charts = {};
// The gateway keeps the history (the last hour, a point every 5 s); the page only holds what
// it was sent, and asks for the points after the last one it has.
let hist = [];
let lastT = null;
let uptime = 0;

function secs(v) {
  if (v === null || v === undefined) return "–";
  if (v < 1) return (v * 1000).toFixed(v < 0.01 ? 1 : 0) + " ms";
  return v.toFixed(v < 10 ? 2 : 1) + " s";
}
function num(v, digits) {
  if (v === null || v === undefined) return "–";
  return Number(v).toFixed(digits === undefined ? 0 : digits);
}
function bytes(v) {
  if (!v) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return v.toFixed(v < 10 ? 1 : 0) + " " + units[i];
}
function ago(ts, now) {
  if (!ts) return "–";
  const s = Math.max(0, now - ts);
  return s < 60 ? s.toFixed(0) + " s ago" : (s / 60).toFixed(0) + " min ago";
}
function text(id, value) { const el = $(id); if (el && el.textContent !== String(value)) el.textContent = value; }
function cell(row, value, cls) {
  const td = document.createElement("td");
  td.textContent = value;
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function pad(n) { return String(n).padStart(2, "0"); }
function clock(t, seconds) {
  const d = new Date(t * 1000);  // local time
  return pad(d.getHours()) + ":" + pad(d.getMinutes()) + (seconds ? ":" + pad(d.getSeconds()) : "");
}

// The time axis' labels are HTML under the plot (uPlot draws only the ticks and the grid), so
// they are real elements: one per tick, never wrapped, measurable in a test.
function xValues(u, splits, axisIdx, space, incr) {
  u.xticks = splits.map((t) => [t, clock(t, incr < 60)]);
  return splits.map(() => "");
}
function drawXLabels(u) {
  let box = u.root.querySelector(".xlabels");
  if (!box) {
    box = document.createElement("div");
    box.className = "xlabels";
    u.root.querySelector(".u-wrap").appendChild(box);
  }
  box.style.left = u.over.style.left;
  box.style.top = (parseFloat(u.over.style.top) + parseFloat(u.over.style.height) + 6) + "px";
  box.style.width = u.over.style.width;
  box.replaceChildren();
  for (const [t, label] of u.xticks || []) {
    const x = u.valToPos(t, "x");
    if (x < 0 || x > parseFloat(u.over.style.width)) continue;
    const span = document.createElement("span");
    span.className = "xlabel";
    span.textContent = label;
    span.style.left = x + "px";
    box.appendChild(span);
  }
}

function chart(id, series, opts) {
  const el = $(id);
  const width = Math.max(300, el.clientWidth || el.parentElement.clientWidth - 20);
  const options = Object.assign({
    width: width,
    height: 200,
    series: [{}].concat(series),
    axes: [
      { stroke: "#8795a4", grid: { stroke: "#2a3541" }, ticks: { stroke: "#2a3541" }, size: 30,
        space: X_SPACE, incrs: X_INCRS, values: xValues },
      { stroke: "#8795a4", grid: { stroke: "#2a3541" }, ticks: { stroke: "#2a3541" }, size: 55 },
    ],
    scales: { x: { time: true } },
    legend: { live: false },
    cursor: { drag: { x: false, y: false } },
    hooks: { draw: [drawXLabels] },
  }, opts || {});
  const data = [[]].concat(series.map(() => []));
  charts[id] = new uPlot(options, data, el);
}

function line(label, color, extra) {
  return Object.assign({ label: label, stroke: color, width: 1.5, spanGaps: false, points: { show: false } }, extra || {});
}

function setup() {
  chart("chart-rps", [line("requests/s", "#58a6ff"), line("4xx/s", "#d29922"), line("5xx/s", "#f85149"),
    line("429/s", "#bc8cff")]);
  chart("chart-latency", [line("p50", "#3fb950"), line("p95", "#d29922"), line("p99", "#f85149"),
    line("TTFT p95", "#58a6ff", { dash: [4, 4] })]);
  chart("chart-tokens", [line("out tokens/s", "#3fb950", { fill: "rgba(63,185,80,0.12)" }),
    line("in tokens/s", "#58a6ff")]);
  const stepped = () => ({ paths: uPlot.paths.stepped({ align: 1 }) });
  chart("chart-health", [line("primary", "#3fb950", stepped()), line("secondary", "#58a6ff", stepped()),
    line("standby", "#bc8cff", stepped()), line("unhealthy", "#f85149", Object.assign(stepped(), { dash: [4, 3] }))],
    { scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(2, max + 1)] } } });
  window.addEventListener("resize", () => {
    for (const id in charts) {
      const el = $(id);
      charts[id].setSize({ width: Math.max(300, el.parentElement.clientWidth - 20), height: 200 });
    }
  });
}

function tierCount(p, tier, key) {
  const h = p.health[tier];
  return h && h.total ? h[key] : null;  // no line for a tier without replicas
}

function drawCharts() {
  const h = hist;
  const xs = h.map((p) => p.t);
  const per = (key) => h.map((p) => p[key] / p.seconds);
  charts["chart-rps"].setData([xs, per("requests"), per("errors_4xx"), per("errors_5xx"), per("rate_limited")]);
  charts["chart-latency"].setData([xs, h.map((p) => p.p50), h.map((p) => p.p95), h.map((p) => p.p99),
    h.map((p) => p.ttft_p95)]);
  charts["chart-tokens"].setData([xs, per("tokens_out"), per("tokens_in")]);
  const unhealthy = h.map((p) => TIERS.reduce((a, t) => a + (p.health[t] ? p.health[t].unhealthy : 0), 0));
  charts["chart-health"].setData([xs].concat(TIERS.map((t) => h.map((p) => tierCount(p, t, "healthy"))),
    [unhealthy]));
  // What the chart holds, for whoever checks the page (tests, scripts).
  const healthy = h.map((p) => TIERS.reduce((a, t) => a + (p.health[t] ? p.health[t].healthy : 0), 0));
  const el = $("chart-health");
  el.dataset.points = h.length;
  el.dataset.first = h.length ? h[0].t : "";
  el.dataset.minHealthy = h.length ? Math.min(...healthy) : "";
  el.dataset.maxHealthy = h.length ? Math.max(...healthy) : "";
  el.dataset.lastHealthy = h.length ? healthy[healthy.length - 1] : "";
  el.dataset.maxUnhealthy = h.length ? Math.max(...unhealthy) : "";
  drawFleet(h, xs);
}

const FLEET_COLOURS = ["#3fb950", "#58a6ff", "#bc8cff", "#d29922", "#f85149"];
let fleetPools = [];

// Replicas over time per managed pool: current (solid) and desired (dashed), stepped.
function drawFleet(h, xs) {
  const pools = [...new Set(h.flatMap((p) => Object.keys(p.fleet || {})))].sort();
  if (!pools.length) return;
  $("fleet-chart-box").hidden = false;
  if (pools.join() !== fleetPools.join()) {
    fleetPools = pools;
    if (charts["chart-fleet"]) { charts["chart-fleet"].destroy(); delete charts["chart-fleet"]; }
    const stepped = () => ({ paths: uPlot.paths.stepped({ align: 1 }) });
    const series = [];
    pools.forEach((pool, i) => {
      const c = FLEET_COLOURS[i % FLEET_COLOURS.length];
      series.push(line(pool, c, stepped()), line(pool + " desired", c, Object.assign(stepped(), { dash: [4, 3] })));
    });
    chart("chart-fleet", series, { scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(2, max + 1)] } } });
  }
  const at = (p, pool, k) => (p.fleet && p.fleet[pool] ? p.fleet[pool][k] : null);
  const data = [xs];
  for (const pool of pools) data.push(h.map((p) => at(p, pool, 1)), h.map((p) => at(p, pool, 0)));
  charts["chart-fleet"].setData(data);
  const current = h.map((p) => pools.reduce((a, pool) => a + (at(p, pool, 1) || 0), 0));
  const el = $("chart-fleet");
  el.dataset.maxCurrent = Math.max(...current);
  el.dataset.lastCurrent = current[current.length - 1];
}

function renderFleet(d) {
  if (!d.fleet || !d.fleet.length) return;
  $("fleet-section").hidden = false;
  const rows = d.fleet.flatMap((p) => p.recent_decisions.map((x) => Object.assign({ pool: p.pool }, x)));
  rows.sort((a, b) => (a.at < b.at ? 1 : -1));
  const body = $("fleet-decisions").tBodies[0];
  body.replaceChildren();
  for (const x of rows.slice(0, 15)) {
    const row = document.createElement("tr");
    row.dataset.kind = x.kind;
    cell(row, x.at.replace("T", " ").replace("+00:00", " UTC"));
    cell(row, x.pool);
    cell(row, x.from + " → " + x.to);
    cell(row, x.kind);
    cell(row, x.reason, "muted");
    body.appendChild(row);
  }
}

function render(d) {
  const l10 = d.last_10s, l60 = d.last_60s, tot = d.totals;
  // Tiles.
  let healthy = 0, total = 0;
  const tierText = [];
  for (const tier of TIERS) {
    const t = d.tiers[tier];
    healthy += t.healthy; total += t.total;
    if (t.total) tierText.push(tier + " " + t.healthy + "/" + t.total);
  }
  text("healthy", healthy + " / " + total);
  text("healthy-tiers", tierText.join(" · "));
  $("tile-healthy").className = "tile " + (healthy < 1 || healthy < total ? "bad" : "good");
  text("rps", num(l10.rps, 1));
  text("total-requests", tot.requests);
  text("p50", secs(l60.p50)); text("p95", secs(l60.p95)); text("p99", secs(l60.p99));
  text("avg-latency", secs(l60.avg_latency));
  text("ttft-p50", secs(l60.ttft_p50)); text("ttft-p95", secs(l60.ttft_p95));
  text("tokens-per-s", num(l10.tokens_per_s, 0));
  text("tokens-in", l60.tokens_in); text("tokens-out", l60.tokens_out);
  text("errors-4xx", l60.errors_4xx); text("errors-5xx", l60.errors_5xx); text("rate-limited", l60.rate_limited);
  text("total-4xx", tot.errors_4xx); text("total-5xx", tot.errors_5xx); text("total-429", tot.rate_limited);
  $("tile-errors").className = "tile" + (l60.errors_5xx > 0 ? " bad" : "");
  let inFlight = 0, running = 0, waiting = 0, engines = 0;
  for (const r of d.replicas) {
    inFlight += r.in_flight;
    if (r.engine && r.engine.ok) {
      engines++;
      running += r.engine.running || 0;
      waiting += r.engine.waiting || 0;
    }
  }
  text("in-flight", inFlight);
  text("engine-queue", engines ? "engines: " + num(running) + " running · " + num(waiting) + " waiting" : "");
  const m = d.machine;
  if (m.gpus.length) {
    const util = m.gpus.reduce((a, g) => a + g.utilization, 0) / m.gpus.length;
    const used = m.gpus.reduce((a, g) => a + g.memory_used, 0), cap = m.gpus.reduce((a, g) => a + g.memory_total, 0);
    text("machine-label", "GPU utilisation (" + m.gpus.length + ")");
    text("machine", num(util) + " %");
    text("machine-sub", "GPU memory " + num(100 * used / cap) + " % of " + bytes(cap));
  } else {
    text("machine-label", "Gateway CPU");
    text("machine", num(m.cpu_percent) + " %");
    const host = m.host_memory ? " · host memory " + num(100 * m.host_memory.used / m.host_memory.total) + " %" : "";
    text("machine-sub", "RSS " + bytes(m.rss_bytes) + host);
  }
  text("ready", d.models && Object.values(d.models).every((x) => x.healthy > 0) ? "ready" : "NOT READY");
  $("ready").className = "pill " + ($("ready").textContent === "ready" ? "pill-ok" : "pill-bad");

  // Charts: from the gateway's history.
  if (d.uptime < uptime) { hist = []; lastT = null; }  // the gateway restarted
  uptime = d.uptime;
  if (d.history.length) {
    hist = hist.concat(d.history).filter((p) => p.t > d.now - HISTORY_S);
    lastT = hist[hist.length - 1].t;
    drawCharts();
  }

  // Replica table.
  const body = $("replicas").tBodies[0];
  body.replaceChildren();
  for (const r of d.replicas) {
    const row = document.createElement("tr");
    row.dataset.replica = r.name;
    row.dataset.url = r.url;
    row.dataset.state = r.state;
    cell(row, r.name);
    cell(row, r.model);
    cell(row, r.tier);
    cell(row, r.state, "state state-" + r.state).title = r.reason;
    cell(row, r.in_flight);
    cell(row, r.served);
    cell(row, r.failures);
    const e = r.engine;
    let engine = "–";
    if (e && e.ok) {
      engine = e.engine + ": " + num(e.running) + " run · " + num(e.waiting) + " wait";
      if (e.kv_usage !== null) engine += " · KV " + num(100 * e.kv_usage) + " %";
    } else if (e) {
      engine = "scrape failed (" + e.error + ")";
    }
    cell(row, engine);
    const check = r.last_check_at ? (r.last_check_ok ? "ok " : "FAIL ") + r.last_check_detail + ", " +
      ago(r.last_check_at, d.now) : "–";
    cell(row, check);
    cell(row, r.url, "muted");
    body.appendChild(row);
  }

  // Alarms.
  const ab = $("alarms").tBodies[0];
  ab.replaceChildren();
  for (const a of d.alarms) {
    const row = document.createElement("tr");
    row.dataset.alarm = a.name;
    row.dataset.state = a.state;
    cell(row, a.name).title = a.description;
    cell(row, a.state.toUpperCase(), "alarm-state alarm-" + a.state);
    cell(row, a.severity + (a.action !== "notify" ? " → " + a.action : ""));
    let cond = a.metric + " " + a.op + " " + a.threshold + (a.unit ? " " + a.unit : "");
    if (a.for_seconds) cond += " for " + a.for_seconds + " s";
    cell(row, cond);
    let value = "no data";
    if (a.value !== null) value = a.unit === "s" ? secs(a.value) : num(a.value, a.value < 10 ? 2 : 0) + (a.unit ? " " + a.unit : "");
    cell(row, value);
    cell(row, a.since ? ago(a.since, d.now) : "–");
    ab.appendChild(row);
  }
  renderFleet(d);
  text("updated", "updated " + new Date(d.now * 1000).toLocaleTimeString());
}

async function poll() {
  try {
    const url = "/dashboard/data" + (lastT === null ? "" : "?since=" + lastT);
    const resp = await fetch(url, { credentials: "same-origin", cache: "no-store" });
    if (!resp.ok) throw new Error("HTTP " + resp.status);
    render(await resp.json());
    $("conn").textContent = "live";
    $("conn").className = "pill pill-ok";
  } catch (err) {
    $("conn").textContent = "disconnected: " + err.message;
    $("conn").className = "pill pill-bad";
  }
  setTimeout(poll, POLL_MS);
}

setup();
poll();
