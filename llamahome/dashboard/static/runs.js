// The runs list: one row per run dir, refreshed every few seconds.
"use strict";

const selected = new Set();

function runRow(run) {
  const box = el("input", { type: "checkbox", "aria-label": `select ${run.name}` });
  box.checked = selected.has(run.name);
  box.addEventListener("change", () => {
    box.checked ? selected.add(run.name) : selected.delete(run.name);
    document.getElementById("compare").disabled = selected.size === 0;
  });
  const steps = run.total_steps ? `${fmtNum(run.step)} / ${fmtNum(run.total_steps)}` : fmtNum(run.step);
  return el("tr", { "data-run": run.name },
    el("td", {}, box),
    el("td", {}, el("a", { href: `/runs/${encodeURIComponent(run.name)}` }, run.name)),
    el("td", {}, statusBadge(run.status)),
    el("td", {}, run.model || "–"),
    el("td", { class: "num" }, steps),
    el("td", { class: "num" }, fmtNum(run.last_loss)),
    el("td", { class: "num" }, fmtNum(run.tokens_per_sec, 3)),
    el("td", {}, fmtTime(run.started)),
    el("td", { class: "muted" }, fmtAgo(run.updated)));
}

async function refresh() {
  const data = await fetchJSON("/api/runs");
  document.getElementById("runs-dir").textContent = `in ${data.runs_dir}`;
  const body = document.querySelector("#runs tbody");
  body.replaceChildren(...data.runs.map(runRow));
  document.getElementById("empty").hidden = data.runs.length > 0;
  document.getElementById("refreshed").textContent = `updated ${fmtTime(Date.now() / 1000)}`;
}

navBar("Runs");
document.getElementById("compare").addEventListener("click", () => {
  location.href = `/compare?runs=${[...selected].map(encodeURIComponent).join(",")}`;
});
every(() => 5000, refresh, (e) => {
  document.getElementById("refreshed").textContent = `error: ${e.message}`;
});
