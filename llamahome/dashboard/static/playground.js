// Sample from a checkpoint: POST the form, read the server-sent events as they stream in.
"use strict";

const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);
let controller = null;

async function loadRuns() {
  const runs = (await fetchJSON("/api/runs")).runs;
  const want = params.get("run");
  $("run").replaceChildren(...runs.map((r) => el("option", { value: r.name }, r.name)));
  if (want && runs.some((r) => r.name === want)) $("run").value = want;
  await loadCheckpoints(params.get("step"));
}

async function loadCheckpoints(wantStep) {
  if (!$("run").value) return;
  const list = (await fetchJSON(runApi($("run").value, "checkpoints"))).checkpoints;
  $("step").replaceChildren(...[...list].reverse().map((c) =>
    el("option", { value: c.step }, `step ${c.step} (${fmtBytes(c.bytes)})`)));
  if (wantStep && list.some((c) => String(c.step) === wantStep)) $("step").value = wantStep;
  $("state").textContent = list.length ? "" : "this run has no checkpoint yet";
}

function numberOrNull(id) {
  const v = $(id).value;
  return v === "" ? null : Number(v);
}

// Splits a text/event-stream body into {event, data} messages.
async function* readEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      yield { event, data: JSON.parse(data || "{}") };
    }
  }
}

async function generate(e) {
  e.preventDefault();
  const out = $("output");
  out.replaceChildren(el("span", { class: "prompt" }, $("prompt").value));
  const body = {
    step: numberOrNull("step"), prompt: $("prompt").value,
    max_new_tokens: numberOrNull("max_new_tokens"), temperature: numberOrNull("temperature"),
    top_k: numberOrNull("top_k"), top_p: numberOrNull("top_p"), seed: numberOrNull("seed") || 0,
  };
  controller = new AbortController();
  $("generate").disabled = true;
  $("stop").disabled = false;
  $("state").textContent = "generating…";
  try {
    const response = await fetch(runApi($("run").value, "generate"), {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) throw new Error((await response.json()).error || `HTTP ${response.status}`);
    for await (const { event, data } of readEvents(response)) {
      if (event === "error") throw new Error(data.message);
      if (event === "done") break;
      out.append(data.text);
    }
    $("state").textContent = "done";
  } catch (err) {
    $("state").textContent = err.name === "AbortError" ? "stopped" : "";
    if (err.name !== "AbortError") out.append(el("div", { class: "error" }, `error: ${err.message}`));
  } finally {
    $("generate").disabled = false;
    $("stop").disabled = true;
  }
}

navBar("Playground");
$("run").addEventListener("change", () => loadCheckpoints(null).catch(console.error));
$("form").addEventListener("submit", generate);
$("stop").addEventListener("click", () => controller && controller.abort());
loadRuns().catch((e) => { $("state").textContent = `error: ${e.message}`; });
