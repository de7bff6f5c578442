// The Larder console: polls /console/data every two seconds and draws it.
// Every value from the server goes into the page as text (textContent),
// never as HTML: URLs and errors come from clients and origins.
"use strict";

const byId = (id) => document.getElementById(id);

function text(value) {
  return value === null || value === undefined ? "–" : String(value);
}

function bytes(n) {
  if (typeof n !== "number") return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
}

function percent(ratio) {
  return typeof ratio === "number" ? Math.round(ratio * 1000) / 10 + "%" : "–";
}

function ago(iso) {
  if (!iso) return "never";
  const seconds = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
  if (seconds < 120) return seconds + " s ago";
  if (seconds < 7200) return Math.round(seconds / 60) + " min ago";
  return Math.round(seconds / 3600) + " h ago";
}

// Replaces a table body's rows; each row is a list of [text, className].
function rows(id, list, emptyText, columns) {
  const body = byId(id);
  body.replaceChildren();
  if (list.length === 0) {
    const tr = document.createElement("tr");
    const td = document.createElement("td");
    td.colSpan = columns;
    td.className = "empty";
    td.textContent = emptyText;
    tr.append(td);
    body.append(tr);
    return;
  }
  for (const cells of list) {
    const tr = document.createElement("tr");
    for (const [value, className] of cells) {
      const td = document.createElement("td");
      td.textContent = text(value);
      if (className) td.className = className;
      tr.append(td);
    }
    body.append(tr);
  }
}

function chart(series) {
  const svg = byId("chart");
  svg.replaceChildren();
  const ns = "http://www.w3.org/2000/svg";
  const width = 600, height = 160, pad = 6;
  const peak = Math.max(1, ...series.map((p) => p.rps));
  byId("peak").textContent = Math.round(peak * 10) / 10;
  const x = (i) => (series.length < 2 ? width : (i / (series.length - 1)) * width);
  const line = (points, color) => {
    if (points.length === 0) return;
    // One interval so far: a level line across the chart.
    if (points.length === 1) points = [[0, points[0][1]], [width, points[0][1]]];
    const path = document.createElementNS(ns, "polyline");
    path.setAttribute("points", points.map(([px, py]) => px.toFixed(1) + "," + py.toFixed(1)).join(" "));
    path.setAttribute("fill", "none");
    path.setAttribute("stroke", color);
    path.setAttribute("stroke-width", "2");
    path.setAttribute("vector-effect", "non-scaling-stroke");
    svg.append(path);
  };
  const css = getComputedStyle(document.documentElement);
  line(series.map((p, i) => [x(i), height - pad - (p.rps / peak) * (height - 2 * pad)]), css.getPropertyValue("--accent"));
  line(series.flatMap((p, i) => (typeof p.hit_ratio === "number" ? [[x(i), height - pad - p.hit_ratio * (height - 2 * pad)]] : [])), css.getPropertyValue("--good"));
}

function render(data) {
  const series = data.series || [];
  const last = series[series.length - 1];
  byId("rps").textContent = last ? text(last.rps >= 100 ? Math.round(last.rps) : last.rps) : "–";
  const recent = series.slice(-15).filter((p) => typeof p.hit_ratio === "number");
  byId("hit-ratio").textContent = recent.length ? percent(recent[recent.length - 1].hit_ratio) : "–";
  byId("cache-size").textContent = bytes(data.cache.bytes);
  byId("cache-entries").textContent = text(data.cache.entries);
  byId("waiters").textContent = text(data.cache.waiting);
  byId("total").textContent = text(data.requests_total);
  byId("state").textContent = "live · updated " + new Date().toLocaleTimeString();
  chart(series);

  const stats = data.cache.stats || {};
  const req = stats.requests || {};
  const stale = stats.stale_served || {};
  rows("cache-table", [
    [["hits"], [req.hit, "num"]],
    [["misses"], [req.miss, "num"]],
    [["revalidated"], [req.revalidate, "num"]],
    [["not cacheable (bypass)"], [req.bypass, "num"]],
    [["coalesced into another's fill"], [stats.coalesced, "num"]],
    [["stale: while revalidating"], [stale.swr, "num"]],
    [["stale: origin failed (stale-if-error)"], [stale.error, "num"]],
    [["stale: client asked (max-stale)"], [stale["max-stale"], "num"]],
    [["stale: origin unreachable"], [stale.disconnected, "num"]],
  ], "", 2);

  rows("routes", (data.routes || []).map((r) => [[r.route], [r.rps, "num"], [r.total, "num"]]), "no requests yet", 3);
  rows("urls", (data.urls || []).map((u) => [[u.url, "url"], ["≈" + u.requests, "num"]]), "no requests yet", 2);

  const servers = [];
  for (const [name, upstream] of Object.entries(data.upstreams || {})) {
    for (const server of upstream.servers || []) {
      const state = server.skipped ? ["ejected (failing)", "bad"] : server.healthy ? ["healthy", "ok"] : ["unhealthy", "bad"];
      servers.push([[name], [server.server], state, [server.in_flight, "num"]]);
    }
  }
  rows("upstreams", servers, "no upstreams", 4);

  rows("sources", ((data.sources || {}).sources || []).map((s) => [
    [s.name],
    [ago(s.last_success), s.last_error ? "warn" : ""],
    [s.etag ? s.etag.replace(/"/g, "").slice(0, 12) : "–"],
    [s.runs, "num"],
    [s.failures, s.failures ? "num bad" : "num"],
  ]), "no sources", 5);

  const p99 = data.plugin_p99_ms || {};
  rows("plugins", Object.entries((data.plugins || {}).plugins || {}).map(([name, p]) => [
    [name],
    [p.invocations, "num"],
    [p.failures, p.failures ? "num bad" : "num"],
    [name in p99 ? p99[name] + " ms" : "–", "num"],
    p.circuit_open ? ["open", "bad"] : ["closed", "ok"],
  ]), "no plugins", 5);

  const shared = byId("shared");
  if (data.shared) {
    shared.className = data.shared.state === "ok" ? "ok" : "bad";
    shared.textContent = "Redis: " + data.shared.state + (data.shared.purge_pending ? " · purges waiting: " + data.shared.purge_pending : "");
  } else {
    shared.className = "empty";
    shared.textContent = "not configured";
  }
}

async function refresh() {
  try {
    const response = await fetch("/console/data", { credentials: "same-origin", cache: "no-store" });
    if (response.status === 401 || response.status === 403) {
      location.reload();
      return;
    }
    render(await response.json());
  } catch (error) {
    byId("state").textContent = "cannot reach Larder: " + error;
  }
}

byId("purge-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const kind = byId("purge-kind").value;
  const value = byId("purge-value").value.trim();
  const result = byId("purge-result");
  if (kind === "all" || !value) return;
  result.textContent = "purging…";
  try {
    const response = await fetch("/purge", {
      method: "POST",
      credentials: "same-origin",
      headers: { "content-type": "application/json", "x-larder-console": "1" },
      body: JSON.stringify({ [kind]: value }),
    });
    const answer = await response.json();
    result.textContent = response.ok
      ? "purged " + answer.purged + " response(s)" + (answer.shared ? " · shared tier: " + answer.shared : "")
      : "refused: " + (answer.detail || answer.title || response.status);
    refresh();
  } catch (error) {
    result.textContent = "failed: " + error;
  }
});

refresh();
setInterval(refresh, 2000);
