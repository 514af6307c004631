// The playground: one prompt to 2-4 models at once over the OpenAI-compatible API, answers
// streamed side by side, and feedback (rating or correction) into the feedback store.
"use strict";
const $ = (id) => document.getElementById(id);
let key = sessionStorage.getItem("tuneloop-key") || "";
const baseModels = new Set();  // served base models ("owned_by": "tuneloop"), not adapters

async function api(path, body) {
  const response = await fetch(path, {
    method: body ? "POST" : "GET",
    headers: {"authorization": "Bearer " + key, "content-type": "application/json"},
    body: body ? JSON.stringify(body) : undefined,
  });
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { message = (await response.json()).error.message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

async function loadModels() {
  const box = $("models");
  try {
    const models = (await (await api("/v1/models")).json()).data;
    box.replaceChildren();
    const legend = document.createElement("legend");
    legend.className = "sr-only";
    legend.textContent = "models to compare";
    box.append(legend);
    baseModels.clear();
    models.filter((m) => m.owned_by === "tuneloop").forEach((m) => baseModels.add(m.id));
    models.forEach((m, i) => {
      const label = document.createElement("label");
      const input = document.createElement("input");
      input.type = "checkbox"; input.name = "model"; input.value = m.id; input.checked = i < 2;
      label.append(input, " " + m.id);
      box.append(label);
    });
    $("who").textContent = models.length + " model(s) available";
    $("error").textContent = "";
  } catch (e) {
    $("who").textContent = "";
    $("error").textContent = "Could not list models: " + e.message;
  }
}

function card(model) {
  const node = $("answer-tpl").content.firstElementChild.cloneNode(true);
  node.querySelector(".model").textContent = model;
  node.dataset.model = model;
  $("answers").append(node);
  return node;
}

async function stream(model, messages, node, extra) {
  const text = node.querySelector(".text");
  const started = performance.now();
  let first = null, chunks = 0, id = null, usage = null;
  const response = await api("/v1/chat/completions", {
    model, messages, stream: true, stream_options: {include_usage: true},
    max_tokens: Number($("max-tokens").value), temperature: Number($("temperature").value),
    ...extra,
  });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    const events = buffer.split("\n\n");
    buffer = events.pop();
    for (const event of events) {
      const data = event.replace(/^data: /, "").trim();
      if (!data || data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      id = chunk.id;
      if (chunk.usage) usage = chunk.usage;
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta.content;
      if (delta) {
        if (first === null) first = performance.now() - started;
        chunks += 1;
        text.textContent += delta;
      }
    }
  }
  const total = performance.now() - started;
  const tokens = usage ? usage.completion_tokens : chunks;
  node.dataset.completionId = id;
  node.querySelector(".stats").textContent =
    `first token ${Math.round(first ?? total)} ms · total ${Math.round(total)} ms · ${tokens} tokens`;
  highlight(node, messages[messages.length - 1].content, text.textContent);
  node.dataset.done = "1";
}

// An extraction's answer (a JSON object) shown in its input: each value found in the prompt
// (case, spacing and punctuation aside, as a span head copies it) marked with its field's name.
function highlight(node, prompt, answer) {
  let fields;
  try { fields = JSON.parse(answer); } catch (e) { return; }
  if (!fields || typeof fields !== "object" || Array.isArray(fields)) return;
  const found = [];
  for (const [name, value] of Object.entries(fields)) {
    for (const v of (Array.isArray(value) ? value : [value])) {
      const words = String(v ?? "").match(/[^\W_]+/gu);
      if (!words) continue;
      const escape = (w) => w.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
      const match = new RegExp(words.map(escape).join("[\\W_]+"), "iu").exec(prompt);
      if (match && !found.some((f) => match.index < f.end && f.start < match.index + match[0].length)) {
        found.push({start: match.index, end: match.index + match[0].length, name});
      }
    }
  }
  if (!found.length) return;
  const box = node.querySelector(".found");
  let at = 0;
  for (const f of found.sort((a, b) => a.start - b.start)) {
    box.append(prompt.slice(at, f.start));
    const mark = document.createElement("mark");
    mark.dataset.field = f.name;
    mark.title = f.name;
    mark.textContent = prompt.slice(f.start, f.end);
    box.append(mark);
    at = f.end;
  }
  box.append(prompt.slice(at));
  box.hidden = false;
}

async function feedback(node, body) {
  const saved = node.querySelector(".saved");
  try {
    await api("/v1/feedback", {completion_id: node.dataset.completionId, ...body});
    saved.textContent = body.correction ? "Correction saved." : "Rating saved.";
  } catch (e) {
    saved.textContent = "Not saved: " + e.message;
  }
}

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  key = $("key").value.trim();
  sessionStorage.setItem("tuneloop-key", key);
  loadModels();
  show();
});

$("ask").addEventListener("submit", async (event) => {
  event.preventDefault();
  const chosen = [...document.querySelectorAll("input[name=model]:checked")].map((i) => i.value);
  if (chosen.length < 1 || chosen.length > 4) {
    $("error").textContent = "Choose between one and four models.";
    return;
  }
  let extra = {}, shots = [];
  try {
    extra = responseFormat();
    shots = await examples();
  } catch (e) {
    $("error").textContent = e.message;
    return;
  }
  $("error").textContent = "";
  $("answers").replaceChildren();
  const messages = [];
  if ($("system").value.trim()) messages.push({role: "system", content: $("system").value.trim()});
  messages.push({role: "user", content: $("prompt").value});
  $("send").disabled = true;
  await Promise.all(chosen.map((model) => {
    const node = card(model);
    node.dataset.messages = JSON.stringify(messages);
    // Base models get the examples as earlier turns, after any system message.
    const sent = baseModels.has(model) && shots.length ?
      [...messages.slice(0, -1), ...shots, messages[messages.length - 1]] : messages;
    return stream(model, sent, node, extra).catch((e) => {
      node.querySelector(".text").textContent = "Error: " + e.message;
    });
  }));
  $("send").disabled = false;
});

function responseFormat() {
  const text = $("schema").value.trim();
  if (!text) return {};
  let schema;
  try { schema = JSON.parse(text); } catch (e) {
    throw new Error("The JSON schema is not valid JSON: " + e.message);
  }
  return {response_format: {type: "json_schema", json_schema: {name: "reply", schema}}};
}

// A dataset row as a conversation: chat rows as they are, text/label and prompt/completion rows
// as one user turn and one assistant turn.
function asTurns(row) {
  if (Array.isArray(row.messages)) return row.messages.filter((m) => m.role !== "system");
  const ask = row.text ?? row.prompt ?? row.input, answer = row.label ?? row.completion ?? row.output;
  if (ask === undefined || answer === undefined) return [];
  return [{role: "user", content: String(ask)},
          {role: "assistant", content: typeof answer === "string" ? answer : JSON.stringify(answer)}];
}

async function examples() {
  const file = $("shots-file").value, k = Number($("shots").value);
  if (!file || !k) return [];
  const page = await (await api(`/v1/tuneloop/files/${file}/rows?offset=0&limit=${k}`)).json();
  return page.data.flatMap((r) => asTurns(r.row));
}

$("answers").addEventListener("click", (event) => {
  const node = event.target.closest(".answer");
  if (!node) return;
  if (event.target.classList.contains("case")) saveCase(node);
  if (event.target.classList.contains("up")) feedback(node, {rating: 1});
  if (event.target.classList.contains("down")) {
    feedback(node, {rating: -1});
    const form = node.querySelector(".correct");
    form.hidden = false;
    form.querySelector("textarea").focus();
  }
});

async function saveCase(node) {
  const saved = node.querySelector(".saved");
  const answer = node.querySelector(".correction").value.trim() ||
    node.querySelector(".text").textContent;
  try {
    const file = await (await api("/v1/tuneloop/test_cases", {
      messages: JSON.parse(node.dataset.messages), answer})).json();
    saved.textContent = `Saved as test case ${file.rows} in ${file.filename} (${file.id}).`;
  } catch (e) {
    saved.textContent = "Not saved: " + e.message;
  }
}

$("answers").addEventListener("submit", (event) => {
  event.preventDefault();
  const node = event.target.closest(".answer");
  feedback(node, {correction: node.querySelector(".correction").value});
});

// Pages, switched by the address's fragment; pages.js registers the loaders of the others.
const PAGES = ["playground", "runs", "data", "evaluations", "deployments"];
const loaders = {runs: () => loadJobs()};
function show() {
  const wanted = location.hash.slice(1);
  const page = PAGES.includes(wanted) ? wanted : "playground";
  for (const name of PAGES) {
    $("page-" + name).hidden = name !== page;
    const link = $("nav-" + name);
    if (name === page) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (key && loaders[page]) {
    Promise.resolve().then(loaders[page]).catch((e) => {
      $("who").textContent = "Could not load this page: " + e.message;
    });
  }
}
window.addEventListener("hashchange", show);

// Runs: fine-tuning jobs of this key's tenant, over /v1/files and /v1/fine_tuning/jobs.
let openJob = null, timer = null;
const FINAL = ["succeeded", "failed", "cancelled"];

async function loadBases() {
  const models = (await (await api("/v1/models")).json()).data;
  const select = $("base");
  // Base models are owned by "tuneloop"; the others are this tenant's fine-tuned adapters.
  select.replaceChildren(...models.filter((m) => m.owned_by === "tuneloop")
    .map((m) => new Option(m.id, m.id)));
}

async function loadJobs() {
  try {
    await loadBases();
    const jobs = (await (await api("/v1/fine_tuning/jobs?limit=50")).json()).data;
    $("jobs").replaceChildren(...jobs.map((job) => {
      const row = document.createElement("tr");
      row.tabIndex = 0;
      row.dataset.job = job.id;
      for (const value of [job.id, job.model, job.status, job.fine_tuned_model || "–",
                           job.trained_tokens ?? "–"]) {
        const cell = document.createElement("td");
        cell.textContent = value;
        row.append(cell);
      }
      row.addEventListener("click", () => openRun(job.id));
      row.addEventListener("keydown", (e) => { if (e.key === "Enter") openRun(job.id); });
      return row;
    }));
  } catch (e) {
    $("start-status").textContent = "Could not list runs: " + e.message;
  }
}

function curveSvg(points) {
  if (points.length < 1) return "";
  const w = 640, h = 220, xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  const sx = (x) => 50 + (w - 60) * (x - x0) / Math.max(1, x1 - x0);
  const sy = (y) => 10 + (h - 40) * (1 - (y - y0) / Math.max(1e-9, y1 - y0));
  const line = points.map((p) => sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1)).join(" ");
  return `<svg width="${w}" height="${h}" xmlns="http://www.w3.org/2000/svg" font-size="11">` +
    `<text x="4" y="14">${y1.toFixed(3)}</text><text x="4" y="${h - 30}">${y0.toFixed(3)}</text>` +
    `<text x="50" y="${h - 8}">step ${x0}</text><text x="${w - 70}" y="${h - 8}">step ${x1}</text>` +
    `<polyline fill="none" stroke="#3b6ea8" stroke-width="1.5" points="${line}"/></svg>`;
}

function duration(seconds) {
  const s = Math.round(seconds);
  return s < 60 ? `${s} s` : s < 3600 ? `${Math.floor(s / 60)} min ${s % 60} s` :
    `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

let settingsShown = {};
async function showSettings(id, job) {
  // The resolved recipe is fetched until training has resolved it (then it no longer changes);
  // checkpoints while the run trains and once more when it ends.
  if (!settingsShown[id]) {
    try {
      const settings = await (await api(`/v1/tuneloop/jobs/${id}/recipe`)).json();
      if (id !== openJob) return;
      $("job-recipe").textContent = settings.yaml;
      $("job-recipe").dataset.resolved = settings.resolved;
      if (settings.resolved) settingsShown[id] = true;
    } catch (e) {
      $("job-recipe").textContent = "Recipe not available: " + e.message;
    }
  }
  const checkpoints = (await (await api(`/v1/fine_tuning/jobs/${id}/checkpoints?limit=20`)).json()).data;
  if (id !== openJob) return;
  $("checkpoints").replaceChildren(...(checkpoints.length ? checkpoints.map((c) => {
    const item = document.createElement("li");
    item.textContent = `step ${c.step_number} · ${c.fine_tuned_model_checkpoint}`;
    return item;
  }) : [Object.assign(document.createElement("li"), {className: "muted", textContent: "none yet"})]));
}

async function refreshRun() {
  const id = openJob;
  const job = await (await api("/v1/fine_tuning/jobs/" + id)).json();
  const events = (await (await api(`/v1/fine_tuning/jobs/${id}/events?limit=200`)).json()).data;
  if (id !== openJob) return;
  $("job-status").textContent = job.status;
  $("job-status").dataset.status = job.status;
  const steps = events.filter((e) => e.data && e.data.train_loss !== undefined)
    .map((e) => [e.data.step, e.data.train_loss]).sort((a, b) => a[0] - b[0]);
  const last = steps[steps.length - 1];
  const latest = events.find((e) => e.data && e.data.total_steps);
  const eta = job.estimated_finish ? Math.max(0, job.estimated_finish - Date.now() / 1000) : null;
  $("job-progress").textContent = latest ? `step ${latest.data.step} of ${latest.data.total_steps}` +
    (latest.data.tokens_per_s ? ` · ${Math.round(latest.data.tokens_per_s)} tokens/s` : "") +
    (eta !== null && job.status === "running" ? ` · training ends in about ${duration(eta)}` : "") : "";
  await showSettings(id, job);
  $("curve").innerHTML = curveSvg(steps);
  $("curve").dataset.points = steps.length;
  if (last) $("curve").setAttribute("aria-label", `training loss by step; last ${last[1].toFixed(3)}`);
  $("events").replaceChildren(...events.map((e) => {
    const item = document.createElement("li");
    item.textContent = e.message;
    return item;
  }));
  $("cancel").hidden = FINAL.includes(job.status);
  if (FINAL.includes(job.status)) { clearInterval(timer); timer = null; loadJobs(); }
}

function openRun(id) {
  openJob = id;
  $("job").hidden = false;
  $("job-id").textContent = id;
  clearInterval(timer);
  refreshRun().catch((e) => { $("job-status").textContent = "error: " + e.message; });
  // A refusal is shown (the status stays as last read), not swallowed while the page waits.
  timer = setInterval(() => refreshRun().catch((e) => {
    $("job-progress").textContent = "could not refresh: " + e.message;
  }), 1000);
}

$("start").addEventListener("submit", async (event) => {
  event.preventDefault();
  const status = $("start-status");
  try {
    const form = new FormData();
    form.append("purpose", "fine-tune");
    form.append("file", $("train-file").files[0]);
    status.textContent = "Uploading…";
    const uploaded = await fetch("/v1/files", {method: "POST", body: form,
      headers: {"authorization": "Bearer " + key}});
    const file = await uploaded.json();
    if (!uploaded.ok) throw new Error(file.error.message);
    const body = {model: $("base").value, training_file: file.id};
    if ($("epochs").value) body.hyperparameters = {n_epochs: Number($("epochs").value)};
    if ($("suffix").value) body.suffix = $("suffix").value;
    if ($("recipe").value.trim()) body.recipe = $("recipe").value;
    const job = await (await api("/v1/fine_tuning/jobs", body)).json();
    status.textContent = "Started " + job.id + ".";
    await loadJobs();
    openRun(job.id);
  } catch (e) {
    status.textContent = "Not started: " + e.message;
  }
});
$("refresh").addEventListener("click", loadJobs);
$("cancel").addEventListener("click", async () => {
  await api(`/v1/fine_tuning/jobs/${openJob}/cancel`, {});
  refreshRun();
});

if (key) { $("key").value = key; loadModels(); }
document.addEventListener("DOMContentLoaded", show);
