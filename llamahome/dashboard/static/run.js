// One run: headline and stats, curves that follow metrics.jsonl as it grows, checkpoints,
// cache stats and the gin config. Polls quickly while the run is running, slowly after.
"use strict";

const RUN = decodeURIComponent(location.pathname.split("/").pop());
const feed = new MetricsFeed(RUN);
let summary = null;
let configs = null;
let configTab = "operative_config";

const charts = {
  loss: new LinePlot(document.getElementById("chart-loss"), { title: "Loss" }),
  lr: new LinePlot(document.getElementById("chart-lr"), { title: "Learning rate" }),
  tps: new LinePlot(document.getElementById("chart-tps"), { title: "Tokens / s" }),
  mfu: new LinePlot(document.getElementById("chart-mfu"), { title: "MFU", yFormat: fmtPercent }),
  downstream: new LinePlot(document.getElementById("chart-downstream"), { title: "Downstream metrics" }),
};

function running() {
  return summary && summary.status === "running";
}

function drawCharts() {
  const t = feed.train, e = feed.eval, xs = t.xs();
  charts.loss.setSeries([
    { name: "train loss", color: COLORS[0], xs, ys: t.ys("loss") },
    { name: "eval loss", color: COLORS[1], xs: e.xs(), ys: e.ys("loss"), markers: true },
  ]);
  charts.lr.setSeries([{ name: "learning rate", color: COLORS[2], xs, ys: t.ys("learning_rate") }]);
  charts.tps.setSeries([{ name: "tokens/s", color: COLORS[3], xs, ys: t.ys("tokens_per_sec") }]);
  charts.mfu.setSeries([{ name: "MFU", color: COLORS[4], xs, ys: t.ys("mfu") }]);
  drawDownstream();
}

// lm-eval task metrics: a row per task and metric (last, best, where), and their curves.
function drawDownstream() {
  const d = feed.downstream, keys = downstreamKeys(d);
  document.getElementById("downstream-card").hidden = keys.length === 0;
  charts.downstream.setSeries(keys.map((k, i) => (
    { name: k, color: COLORS[i % COLORS.length], xs: d.xs(), ys: d.ys(k), markers: true })));
  const rows = keys.map((k) => {
    const ys = d.ys(k), xs = d.xs();
    const finite = ys.map((y, i) => [y, xs[i]]).filter(([y]) => Number.isFinite(y));
    const lowerIsBetter = /perplexity|bits_per_byte|loss/.test(k);
    const best = finite.reduce((b, p) => (!b || (lowerIsBetter ? p[0] < b[0] : p[0] > b[0]) ? p : b), null);
    const [task, metric] = [k.slice(0, k.lastIndexOf("/")), k.slice(k.lastIndexOf("/") + 1)];
    return el("tr", {}, el("td", {}, task), el("td", {}, metric),
      el("td", { class: "num" }, fmtNum(ys[ys.length - 1])),
      el("td", { class: "num" }, best ? fmtNum(best[0]) : "–"),
      el("td", { class: "num" }, best ? String(best[1]) : "–"));
  });
  document.querySelector("#downstream-table tbody").replaceChildren(...rows);
}

function stat(label, value) {
  return el("div", { class: "stat" }, el("div", { class: "label" }, label),
            el("div", { class: "value" }, value));
}

function drawSummary() {
  const s = summary, last = feed.train.last() || {}, lastEval = feed.eval.last() || {};
  document.getElementById("run-name").textContent = RUN;
  document.title = `${RUN} · LlamaHome`;
  document.getElementById("run-status").replaceChildren(statusBadge(s.status));
  const frac = s.total_steps ? Math.min(1, (s.step || 0) / s.total_steps) : 0;
  document.getElementById("progress-bar").style.width = `${(100 * frac).toFixed(1)}%`;
  const fact = (k, v) => el("span", {}, `${k} `, el("b", {}, v));
  document.getElementById("facts").replaceChildren(
    fact("model", s.model || "–"),
    fact("step", s.total_steps ? `${fmtNum(s.step)} / ${fmtNum(s.total_steps)}` : fmtNum(s.step)),
    fact("started", fmtTime(s.started)),
    fact("heartbeat", fmtAgo(s.updated)),
    fact("host", s.host ? `${s.host} (pid ${s.pid})` : "–"));
  document.getElementById("stats").replaceChildren(
    stat("train loss", fmtNum(last.loss)),
    stat("eval loss", fmtNum(lastEval.loss)),
    stat("tokens / s", fmtNum(last.tokens_per_sec, 3)),
    stat("MFU", fmtPercent(last.mfu)),
    stat("learning rate", fmtNum(last.learning_rate, 3)),
    stat("tokens seen", fmtNum(last.tokens_seen, 3)));
}

function drawCheckpoints(list) {
  const rows = [...list].reverse().map((c) => el("tr", {},
    el("td", { class: "num" }, String(c.step)),
    el("td", { class: "num" }, fmtBytes(c.bytes)),
    el("td", {}, fmtTime(c.mtime)),
    el("td", {}, el("a", { href: `/playground?run=${encodeURIComponent(RUN)}&step=${c.step}` }, "sample"))));
  document.querySelector("#checkpoints tbody").replaceChildren(...rows);
  document.getElementById("no-checkpoints").hidden = list.length > 0;
}

function drawCacheStats(stats) {
  const body = document.querySelector("#cache-stats tbody");
  document.getElementById("no-cache-stats").hidden = !!stats;
  if (!stats) return body.replaceChildren();
  const rows = Object.entries(stats).map(([k, v]) => el("tr", {}, el("td", {}, k),
    el("td", { class: "num" }, /bytes|size/.test(k) && typeof v === "number" ? fmtBytes(v) :
                               typeof v === "object" ? JSON.stringify(v) : fmtNum(v))));
  const lookups = (stats.hits || 0) + (stats.misses || 0);
  if (lookups) {
    rows.push(el("tr", {}, el("td", {}, "hit rate"),
                 el("td", { class: "num" }, `${(100 * stats.hits / lookups).toFixed(1)} %`)));
  }
  body.replaceChildren(...rows);
}

function drawConfig() {
  for (const b of document.querySelectorAll(".tabs button")) {
    b.classList.toggle("active", b.dataset.tab === configTab);
  }
  const text = configs && configs[configTab];
  document.getElementById("config-text").textContent =
    text || (configTab === "operative_config" ? "(written when the run ends)" : "(none)");
}

async function pollMetrics() {
  if (await feed.poll()) drawCharts();
  if (summary) drawSummary();
}

async function pollSummary() {
  summary = await fetchJSON(runApi(RUN));
  drawSummary();
}

async function pollFiles() {
  drawCheckpoints((await fetchJSON(runApi(RUN, "checkpoints"))).checkpoints);
  drawCacheStats((await fetchJSON(runApi(RUN, "cache_stats"))).cache_stats);
  const first = configs === null;
  configs = await fetchJSON(runApi(RUN, "config"));
  if (first && !configs.operative_config && configs.config) configTab = "config";
  drawConfig();
}

navBar("");
document.getElementById("playground-link").href = `/playground?run=${encodeURIComponent(RUN)}`;
for (const b of document.querySelectorAll(".tabs button")) {
  b.addEventListener("click", () => { configTab = b.dataset.tab; drawConfig(); });
}
drawCharts();
const report = (e) => console.error(e);
pollSummary().catch(report).finally(() => {
  const summaryPeriod = () => (running() ? 5000 : 30000);
  every(summaryPeriod, pollSummary, report, summaryPeriod());
  every(() => (running() ? 2000 : 15000), pollMetrics, report);
  every(() => (running() ? 10000 : 60000), pollFiles, report);
});
