// LinePlot: a small SVG line chart (axes with round ticks, legend, hover read-out).
// Each series is drawn as one <path class="series" data-series=NAME data-points=N>; series
// with few points also get circle markers. Long series are thinned to ~2 points per pixel.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";

function svgEl(tag, attrs, parent) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  if (parent) parent.appendChild(el);
  return el;
}

// Round tick values covering [lo, hi], about `count` of them (1, 2, 5 x 10^k steps).
function niceTicks(lo, hi, count) {
  if (!(hi > lo)) {
    const pad = Math.abs(lo) > 0 ? Math.abs(lo) * 0.05 : 1;
    lo -= pad;
    hi += pad;
  }
  const raw = (hi - lo) / Math.max(1, count);
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || 10 * mag;
  const first = Math.floor(lo / step) * step;
  const last = Math.ceil(hi / step) * step;
  const ticks = [];
  for (let v = first, i = 0; v <= last + step / 2 && i < 100; v += step, i++) {
    ticks.push(Math.abs(v) < step * 1e-9 ? 0 : v);
  }
  return ticks;
}

function formatTick(v) {
  const a = Math.abs(v);
  if (a === 0) return "0";
  if (a >= 1e9) return (v / 1e9).toPrecision(3).replace(/\.?0+$/, "") + "G";
  if (a >= 1e6) return (v / 1e6).toPrecision(3).replace(/\.?0+$/, "") + "M";
  if (a >= 1e4) return (v / 1e3).toPrecision(3).replace(/\.?0+$/, "") + "k";
  if (a < 1e-3) return v.toExponential(1);
  return String(Number(v.toPrecision(4)));
}

// Indices of at most `limit` points: evenly strided, always keeping the last one.
function thin(n, limit) {
  if (n <= limit) return [...Array(n).keys()];
  const stride = n / limit;
  const idx = [];
  for (let i = 0; i < limit; i++) idx.push(Math.floor(i * stride));
  if (idx[idx.length - 1] !== n - 1) idx.push(n - 1);
  return idx;
}

class LinePlot {
  constructor(container, opts) {
    this.container = container;
    this.opts = Object.assign({ title: "", xLabel: "step", height: 240, yFormat: formatTick }, opts);
    this.series = [];
    this.container.classList.add("plot");
    this.svg = svgEl("svg", { class: "plot-svg", role: "img", "aria-label": this.opts.title });
    this.container.appendChild(this.svg);
    this.tip = document.createElement("div");
    this.tip.className = "plot-tip";
    this.container.appendChild(this.tip);
    this.svg.addEventListener("mousemove", (e) => this.hover(e));
    this.svg.addEventListener("mouseleave", () => this.unhover());
    window.addEventListener("resize", () => this.render());
  }

  // series: [{name, color, xs, ys, dashed?, markers?}]
  setSeries(series) {
    this.series = series;
    this.render();
  }

  bounds() {
    let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
    for (const s of this.series) {
      for (let i = 0; i < s.xs.length; i++) {
        const x = s.xs[i], y = s.ys[i];
        if (!Number.isFinite(x) || !Number.isFinite(y)) continue;
        if (x < x0) x0 = x;
        if (x > x1) x1 = x;
        if (y < y0) y0 = y;
        if (y > y1) y1 = y;
      }
    }
    return Number.isFinite(x0) ? { x0, x1, y0, y1 } : null;
  }

  render() {
    const svg = this.svg;
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const width = Math.max(240, this.container.clientWidth || 480);
    const height = this.opts.height;
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    svg.setAttribute("width", width);
    svg.setAttribute("height", height);
    const m = { left: 58, right: 14, top: 30, bottom: 34 };
    const pw = width - m.left - m.right, ph = height - m.top - m.bottom;
    svgEl("text", { x: m.left, y: 18, class: "plot-title" }, svg).textContent = this.opts.title;
    this.frame = null;
    const b = this.bounds();
    if (!b) {
      svgEl("text", { x: m.left + pw / 2, y: m.top + ph / 2, class: "plot-empty" }, svg)
        .textContent = "no data yet";
      return;
    }
    const xt = niceTicks(b.x0, b.x1, Math.max(2, Math.floor(pw / 90)));
    const yt = niceTicks(b.y0, b.y1, Math.max(2, Math.floor(ph / 40)));
    const xlo = b.x1 > b.x0 ? b.x0 : xt[0], xhi = b.x1 > b.x0 ? b.x1 : xt[xt.length - 1];
    const ylo = yt[0], yhi = yt[yt.length - 1];
    const sx = (x) => m.left + ((x - xlo) / (xhi - xlo)) * pw;
    const sy = (y) => m.top + ph - ((y - ylo) / (yhi - ylo)) * ph;
    this.frame = { m, pw, ph, sx, sy, xlo, xhi };

    const grid = svgEl("g", { class: "plot-grid" }, svg);
    for (const v of yt) {
      svgEl("line", { x1: m.left, x2: m.left + pw, y1: sy(v), y2: sy(v) }, grid);
      svgEl("text", { x: m.left - 6, y: sy(v) + 4, class: "plot-ylabel" }, svg).textContent =
        this.opts.yFormat(v);
    }
    for (const v of xt) {
      if (v < xlo - 1e-9 || v > xhi + 1e-9) continue;
      svgEl("line", { x1: sx(v), x2: sx(v), y1: m.top, y2: m.top + ph }, grid);
      svgEl("text", { x: sx(v), y: m.top + ph + 16, class: "plot-xlabel" }, svg).textContent =
        formatTick(v);
    }
    svgEl("rect", { x: m.left, y: m.top, width: pw, height: ph, class: "plot-frame" }, svg);
    svgEl("text", { x: m.left + pw, y: height - 4, class: "plot-axis-name" }, svg).textContent =
      this.opts.xLabel;

    const limit = Math.max(50, Math.floor(pw * 2));
    this.series.forEach((s) => {
      const idx = thin(s.xs.length, limit).filter(
        (i) => Number.isFinite(s.xs[i]) && Number.isFinite(s.ys[i]));
      const d = idx.map((i, k) => `${k ? "L" : "M"}${sx(s.xs[i]).toFixed(1)},${sy(s.ys[i]).toFixed(1)}`);
      svgEl("path", {
        d: d.join(""), class: "series", stroke: s.color, "data-series": s.name,
        "data-points": idx.length, "stroke-dasharray": s.dashed ? "5 3" : "none",
      }, svg);
      if (s.markers || idx.length <= 30) {
        const g = svgEl("g", { fill: s.color }, svg);
        for (const i of idx) svgEl("circle", { cx: sx(s.xs[i]), cy: sy(s.ys[i]), r: 2.6 }, g);
      }
    });

    const legend = svgEl("g", { class: "plot-legend" }, svg);
    let lx = m.left + pw;
    for (const s of [...this.series].reverse()) {
      const label = svgEl("text", { x: lx, y: 18, "text-anchor": "end" }, legend);
      label.textContent = s.name;
      const w = label.getComputedTextLength ? label.getComputedTextLength() : s.name.length * 7;
      svgEl("line", { x1: lx - w - 22, x2: lx - w - 6, y1: 14, y2: 14, stroke: s.color,
                      "stroke-dasharray": s.dashed ? "5 3" : "none" }, legend);
      lx -= w + 34;
    }
    this.cursor = svgEl("line", { class: "plot-cursor", y1: m.top, y2: m.top + ph, visibility: "hidden" }, svg);
  }

  hover(event) {
    const f = this.frame;
    if (!f) return;
    const rect = this.svg.getBoundingClientRect();
    const px = event.clientX - rect.left;
    if (px < f.m.left || px > f.m.left + f.pw) return this.unhover();
    const x = f.xlo + ((px - f.m.left) / f.pw) * (f.xhi - f.xlo);
    const rows = [];
    let nearestX = null;
    for (const s of this.series) {
      let best = -1;
      for (let i = 0; i < s.xs.length; i++) {
        if (best < 0 || Math.abs(s.xs[i] - x) < Math.abs(s.xs[best] - x)) best = i;
      }
      if (best < 0) continue;
      nearestX = nearestX === null ? s.xs[best] : nearestX;
      rows.push(`<span style="color:${s.color}">\u25CF</span> ${escapeHtml(s.name)}: ` +
                `<b>${this.opts.yFormat(s.ys[best])}</b> @ ${formatTick(s.xs[best])}`);
    }
    if (!rows.length) return this.unhover();
    this.cursor.setAttribute("x1", f.sx(nearestX));
    this.cursor.setAttribute("x2", f.sx(nearestX));
    this.cursor.setAttribute("visibility", "visible");
    this.tip.innerHTML = rows.join("<br>");
    this.tip.style.display = "block";
    const left = Math.min(px + 12, rect.width - this.tip.offsetWidth - 4);
    this.tip.style.left = `${Math.max(0, left)}px`;
    this.tip.style.top = `${f.m.top + 4}px`;
  }

  unhover() {
    this.tip.style.display = "none";
    if (this.cursor) this.cursor.setAttribute("visibility", "hidden");
  }
}

function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;",
                                                 '"': "&quot;", "'": "&#39;" })[c]);
}
