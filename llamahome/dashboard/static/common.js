// Helpers shared by the dashboard pages: fetching the JSON API, formatting, metric series.
"use strict";

const COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#db2777", "#0891b2",
                "#65a30d", "#475569", "#ea580c"];
const MAX_METRIC_PAGES = 50;  // one poll reads at most this many pages of metrics.jsonl

async function fetchJSON(url, options) {
  const response = await fetch(url, Object.assign({ cache: "no-store" }, options));
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return response.json();
}

function runApi(name, what) {
  return `/api/runs/${encodeURIComponent(name)}${what ? "/" + what : ""}`;
}

function fmtNum(v, digits = 4) {
  if (v === null || v === undefined || !Number.isFinite(Number(v))) return "–";
  v = Number(v);
  const a = Math.abs(v);
  if (a >= 1e9) return (v / 1e9).toFixed(2) + "G";
  if (a >= 1e6) return (v / 1e6).toFixed(2) + "M";
  if (a >= 1e4) return (v / 1e3).toFixed(1) + "k";
  if (Number.isInteger(v)) return String(v);
  if (a !== 0 && a < 1e-3) return v.toExponential(2);
  return String(Number(v.toPrecision(digits)));
}

// MFU and other fractions, as percentages.
function fmtPercent(v) {
  if (v === null || v === undefined || !Number.isFinite(Number(v))) return "–";
  return `${Number((100 * v).toPrecision(3))}%`;
}

function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

function fmtTime(unix) {
  if (!unix) return "–";
  const d = new Date(unix * 1000);
  const pad = (x) => String(x).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
         `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

function fmtAgo(unix) {
  if (!unix) return "–";
  const s = Math.max(0, Date.now() / 1000 - unix);
  if (s < 90) return `${Math.round(s)} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  if (s < 172800) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : String(c));
  return node;
}

const STATUS_HINTS = {
  stale: "status.json says running, but its heartbeat stopped: the process probably died",
  unknown: "no status.json in this run dir",
};

function statusBadge(status) {
  return el("span", { class: `badge status-${status}`, title: STATUS_HINTS[status] || status },
            status === "stale" ? "stale / failed" : status);
}

// A split's records in step order. A record whose step is not past the last one means the
// run resumed from an earlier checkpoint: the points from that step on are replaced.
class MetricSeries {
  constructor() { this.records = []; }

  add(record) {
    const r = this.records;
    if (r.length && record.step <= r[r.length - 1].step) {
      let keep = r.length;
      while (keep > 0 && r[keep - 1].step >= record.step) keep--;
      r.length = keep;
    }
    r.push(record);
  }

  xs(key = "step") { return this.records.map((r) => Number(r[key])); }
  ys(key) { return this.records.map((r) => (r[key] === undefined || r[key] === null ? NaN : Number(r[key]))); }
  last() { return this.records[this.records.length - 1]; }
}

// Incremental reader of one run's metrics.jsonl: `poll()` fetches what was appended since.
class MetricsFeed {
  constructor(name) {
    this.name = name;
    this.reset();
  }

  reset() {
    this.since = 0;
    this.train = new MetricSeries();
    this.eval = new MetricSeries();
    this.downstream = new MetricSeries();  // lm-eval task metrics: {"<task>/<metric>": value}
  }

  // Returns true when new records arrived.
  async poll() {
    let changed = false;
    for (let page = 0; page < MAX_METRIC_PAGES; page++) {
      const data = await fetchJSON(`${runApi(this.name, "metrics")}?since=${this.since}`);
      if (data.reset) { this.reset(); changed = true; }
      for (const r of data.records) {
        if (typeof r.step !== "number") continue;
        (r.split === "eval" ? this.eval : r.split === "downstream" ? this.downstream : this.train).add(r);
        changed = true;
      }
      const advanced = data.next !== this.since;
      this.since = data.next;
      if (!advanced || data.next >= data.size) break;
    }
    return changed;
  }
}

// The "<task>/<metric>" keys of downstream records, sorted.
function downstreamKeys(series) {
  const keys = new Set();
  for (const r of series.records) {
    for (const k of Object.keys(r)) if (k.includes("/")) keys.add(k);
  }
  return [...keys].sort();
}

function navBar(active) {
  const links = [["/", "Runs"], ["/compare", "Compare"], ["/playground", "Playground"]];
  const nav = el("nav", { class: "topnav" }, el("a", { class: "brand", href: "/" }, "LlamaHome"));
  for (const [href, label] of links) {
    nav.append(el("a", { href, class: label === active ? "active" : "" }, label));
  }
  document.body.prepend(nav);
}

// Runs `fn` after `firstDelayMs`, then every `periodMs()` ms after each call ends (never two
// at once); errors go to `onError`.
function every(periodMs, fn, onError, firstDelayMs = 0) {
  const tick = async () => {
    try { await fn(); } catch (e) { if (onError) onError(e); }
    setTimeout(tick, periodMs());
  };
  setTimeout(tick, firstDelayMs);
}
