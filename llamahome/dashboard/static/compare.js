// Overlays the loss curves of the runs chosen in ?runs=a,b (or ticked on the page).
"use strict";

const params = new URLSearchParams(location.search);
const chosen = (params.get("runs") || "").split(",").filter(Boolean);
const feeds = new Map();  // run name -> MetricsFeed
let runs = [];
const chart = new LinePlot(document.getElementById("chart-compare"), { title: "Loss", height: 420 });
const downstreamChart = new LinePlot(document.getElementById("chart-downstream"), { title: "Downstream" });

function color(name) {
  return COLORS[runs.findIndex((r) => r.name === name) % COLORS.length] || COLORS[0];
}

function draw() {
  const xKey = document.getElementById("x-axis").value;
  const showEval = document.getElementById("show-eval").checked;
  chart.opts.xLabel = xKey === "step" ? "step" : "tokens seen";
  const series = [];
  for (const name of chosen) {
    const feed = feeds.get(name);
    if (!feed) continue;
    series.push({ name, color: color(name), xs: feed.train.xs(xKey), ys: feed.train.ys("loss") });
    if (showEval && feed.eval.records.length) {
      const xs = xKey === "step" ? feed.eval.xs() : feed.eval.records.map((r) => tokensAt(feed, r.step));
      series.push({ name: `${name} (eval)`, color: color(name), xs, ys: feed.eval.ys("loss"),
                    dashed: true, markers: true });
    }
  }
  chart.setSeries(series);
  const rows = chosen.map((name) => {
    const run = runs.find((r) => r.name === name) || { name, status: "unknown" };
    const feed = feeds.get(name);
    const evals = feed ? feed.eval.ys("loss").filter(Number.isFinite) : [];
    return el("tr", {},
      el("td", {}, el("span", { style: `color:${color(name)}` }, "● "),
         el("a", { href: `/runs/${encodeURIComponent(name)}` }, name)),
      el("td", {}, statusBadge(run.status)), el("td", {}, run.model || "–"),
      el("td", { class: "num" }, fmtNum(run.step)), el("td", { class: "num" }, fmtNum(run.last_loss)),
      el("td", { class: "num" }, evals.length ? fmtNum(Math.min(...evals)) : "–"),
      el("td", { class: "num" }, fmtNum(run.tokens_per_sec, 3)));
  });
  document.querySelector("#compare-table tbody").replaceChildren(...rows);
  drawDownstream();
}

// lm-eval task metrics: the chosen metric's curve per run, and a table of every metric's
// last value (a column per run).
function drawDownstream() {
  const keys = [...new Set(chosen.flatMap((n) => (feeds.has(n) ? downstreamKeys(feeds.get(n).downstream) : [])))].sort();
  document.getElementById("downstream-card").hidden = keys.length === 0;
  const select = document.getElementById("downstream-metric");
  const picked = keys.includes(select.value) ? select.value : keys[0];
  select.replaceChildren(...keys.map((k) => el("option", { value: k }, k)));
  if (picked) select.value = picked;
  downstreamChart.opts.title = picked || "Downstream";
  downstreamChart.setSeries(chosen.filter((n) => feeds.has(n)).map((n) => {
    const d = feeds.get(n).downstream;
    return { name: n, color: color(n), xs: d.xs(), ys: d.ys(picked), markers: true };
  }));
  document.querySelector("#downstream-table thead").replaceChildren(el("tr", {},
    el("th", {}, "Task / metric"), ...chosen.map((n) => el("th", { class: "num" }, n))));
  document.querySelector("#downstream-table tbody").replaceChildren(...keys.map((k) => el("tr", {},
    el("td", {}, k), ...chosen.map((n) => {
      const last = feeds.has(n) ? feeds.get(n).downstream.last() : null;
      return el("td", { class: "num" }, fmtNum(last ? last[k] : undefined));
    }))));
}

// Eval records carry no tokens_seen: take the train record's at the same (or last earlier) step.
function tokensAt(feed, step) {
  let best = NaN;
  for (const r of feed.train.records) { if (r.step <= step) best = r.tokens_seen; else break; }
  return Number(best);
}

function drawPicker() {
  const picker = document.getElementById("run-picker");
  picker.replaceChildren(el("span", { class: "muted" }, "runs:"), ...runs.map((r) => {
    const box = el("input", { type: "checkbox" });
    box.checked = chosen.includes(r.name);
    box.addEventListener("change", () => {
      if (box.checked) chosen.push(r.name); else chosen.splice(chosen.indexOf(r.name), 1);
      history.replaceState(null, "", `?runs=${chosen.map(encodeURIComponent).join(",")}`);
      refresh().catch(console.error);
    });
    return el("label", { class: "check" }, box, r.name);
  }));
}

async function refresh() {
  runs = (await fetchJSON("/api/runs")).runs;
  for (const name of chosen) {
    if (!feeds.has(name)) feeds.set(name, new MetricsFeed(name));
    await feeds.get(name).poll();
  }
  drawPicker();
  draw();
}

navBar("Compare");
document.getElementById("x-axis").addEventListener("change", draw);
document.getElementById("show-eval").addEventListener("change", draw);
document.getElementById("downstream-metric").addEventListener("change", drawDownstream);
every(() => 10000, refresh, console.error);
