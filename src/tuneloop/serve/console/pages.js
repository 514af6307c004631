// Data, Evaluations and Deployments pages, over /v1/files and /v1/tuneloop/* (console_api.py,
// datasets_api.py).
// Uses $, api and key from console.js.
"use strict";

function cells(row, values) {
  for (const value of values) {
    const cell = document.createElement("td");
    if (value instanceof Node) cell.append(value); else cell.textContent = value ?? "–";
    row.append(cell);
  }
  return row;
}

function clickable(row, action) {
  row.tabIndex = 0;
  row.addEventListener("click", action);
  row.addEventListener("keydown", (e) => { if (e.key === "Enter") action(); });
  return row;
}

const fmt = (value) => typeof value === "number" ? (Number.isInteger(value) ? value : value.toFixed(3)) : value;
const when = (seconds) => seconds ? new Date(seconds * 1000).toLocaleString() : "–";

// Data: upload (checked line by line by the server), files, a paged row browser.
const PAGE_ROWS = 20;
let browsing = null, offset = 0;

async function listFiles() {
  const files = (await (await api("/v1/files")).json()).data;
  // The playground's example source: any of the tenant's files.
  const chosen = $("shots-file").value;
  $("shots-file").replaceChildren(new Option("none (zero-shot)", ""),
    ...files.map((f) => new Option(`${f.filename} (${f.id})`, f.id)));
  $("shots-file").value = files.some((f) => f.id === chosen) ? chosen : "";
  return files;
}

async function loadFiles() {
  const files = await listFiles();
  $("files").replaceChildren(...files.map((f) => clickable(
    cells(document.createElement("tr"), [f.id, f.filename, f.bytes, when(f.created_at)]),
    () => browse(f.id, 0))));
  const chosen = $("prep-file").value;
  $("prep-file").replaceChildren(...files.map((f) => new Option(`${f.filename} (${f.id})`, f.id)));
  if (files.some((f) => f.id === chosen)) $("prep-file").value = chosen;
  await loadVersions();
}

// Dataset versions: an uploaded file cleaned, deduplicated, anonymized and split on the server
// (datasets_api.py); each split is one of the tenant's files, ready to train on.
async function loadVersions() {
  const versions = (await (await api("/v1/tuneloop/datasets")).json()).data;
  $("versions").replaceChildren(...versions.map((v) => clickable(
    cells(document.createElement("tr"), [v.id, v.name, v.task,
      Object.entries(v.splits).map(([s, info]) => `${s} ${info.rows}`).join(" · "),
      v.steps.map((s) => `${s.name} ${s.rows_out}`).join(" → "),
      v.duplicates,
      v.pii ? `${v.pii.rows} rows: ` + (Object.entries(v.pii.by_type)
        .map(([t, n]) => `${t} ${n}`).join(", ") || "none") : "not scanned"]),
    () => showReport(`/v1/tuneloop/datasets/${v.id}/report`, "Report of " + v.id,
                     "version-report", "versions-status"))));
  $("versions-status").textContent = versions.length ? "Choose a version to see its report." :
    "No dataset versions yet: prepare one from a file.";
}

$("prepare").addEventListener("submit", async (event) => {
  event.preventDefault();
  const status = $("prepare-status");
  const body = {task: $("prep-task").value};
  if ($("prep-name").value) body.name = $("prep-name").value;
  if ($("prep-recipe").value.trim()) body.recipe = $("prep-recipe").value;
  status.className = "";
  status.textContent = "Preparing…";
  try {
    const v = await (await api(`/v1/tuneloop/files/${$("prep-file").value}/prepare`, body)).json();
    status.textContent = `${v.created ? "Prepared" : "Already prepared as"} ${v.id}: ` +
      Object.entries(v.splits).map(([s, info]) => `${s} ${info.rows} rows (${info.file_id})`)
        .join(", ") + ".";
    await loadFiles();
    showReport(`/v1/tuneloop/datasets/${v.id}/report`, "Report of " + v.id, "version-report",
               "versions-status");
  } catch (e) {
    status.className = "error";
    status.textContent = "Not prepared: " + e.message;
  }
});

async function browse(id, start) {
  const page = await (await api(`/v1/tuneloop/files/${id}/rows?offset=${start}&limit=${PAGE_ROWS}`)).json();
  browsing = id; offset = start;
  $("browser").hidden = false;
  $("browser-file").textContent = id;
  $("rows").replaceChildren(...page.data.map((r) => {
    const text = document.createElement("pre");
    text.textContent = JSON.stringify(r.row, null, 1);
    const use = document.createElement("button");
    use.type = "button";
    use.textContent = "Try in playground";
    use.setAttribute("aria-label", "try line " + r.line + " in the playground");
    use.addEventListener("click", () => tryRow(r.row));
    return cells(document.createElement("tr"), [r.line, text, use]);
  }));
  $("page-info").textContent = page.total ?
    `rows ${start + 1}–${start + page.data.length} of ${page.total}` : "no rows";
  $("prev").disabled = start === 0;
  $("next").disabled = start + PAGE_ROWS >= page.total;
}

// A row into the playground: its last user turn becomes the prompt (and a system turn, the
// system message); the row's own answer is shown as the reference.
function tryRow(row) {
  const turns = Array.isArray(row.messages) ? row.messages : asTurns(row);
  const users = turns.filter((m) => m.role === "user");
  const system = turns.find((m) => m.role === "system");
  const last = turns.lastIndexOf(users[users.length - 1]);
  const reference = turns.slice(last + 1).find((m) => m.role === "assistant");
  $("system").value = system ? system.content : "";
  $("prompt").value = users.length ? users[users.length - 1].content : "";
  $("reference").textContent = reference ? "Expected: " + reference.content : "";
  location.hash = "#playground";
}

$("prev").addEventListener("click", () => browse(browsing, Math.max(0, offset - PAGE_ROWS)));
$("next").addEventListener("click", () => browse(browsing, offset + PAGE_ROWS));
$("upload").addEventListener("submit", async (event) => {
  event.preventDefault();
  const status = $("upload-status");
  const form = new FormData();
  form.append("purpose", "fine-tune");
  form.append("file", $("data-file").files[0]);
  status.className = "";
  status.textContent = "Checking…";
  const response = await fetch("/v1/files", {method: "POST", body: form,
    headers: {"authorization": "Bearer " + key}});
  const body = await response.json();
  if (!response.ok) {
    status.className = "error";
    status.textContent = "Not uploaded: " + body.error.message;
    return;
  }
  status.textContent = `Uploaded ${body.filename} as ${body.id}: every line is usable.`;
  await loadFiles();
  browse(body.id, 0);
});

// Evaluations: the tenant's runs, each run's report, and two runs compared.
let evalRuns = [];

function gateText(gate) {
  if (!gate) return "–";
  return `${gate.passed ? "passed" : "failed"}: ${gate.metric} ${fmt(gate.run_value)} vs ` +
    `${gate.best_baseline} ${fmt(gate.best_baseline_value)}`;
}

async function loadRuns() {
  evalRuns = (await (await api("/v1/tuneloop/runs")).json()).data;
  $("eval-runs").replaceChildren(...evalRuns.map((r) => clickable(
    cells(document.createElement("tr"), [r.id, r.name, r.method, r.status,
      r.headline ? `${r.headline} ${fmt(r.value)}` : "–", gateText(r.gate)]),
    () => showReport(`/v1/tuneloop/runs/${r.id}/report`, "Report of " + r.id))));
  const done = evalRuns.filter((r) => r.status === "done");
  for (const [id, pick] of [["cmp-a", 1], ["cmp-b", 0], ["promote-run", 0]]) {
    $(id).replaceChildren(...done.map((r) => new Option(`${r.id} ${r.name || ""}`, r.id)));
    if (done.length > pick) $(id).selectedIndex = pick;
  }
  $("eval-status").textContent = evalRuns.length ? "Choose a run to see its report." :
    "No runs yet: start one on the Runs page.";
}

async function showReport(path, title, frameId = "report", statusId = "eval-status") {
  const status = $(statusId);
  try {
    const html = await (await api(path)).text();
    const frame = $(frameId);
    frame.title = title;
    frame.srcdoc = html;
    frame.hidden = false;
    status.textContent = title + ".";
  } catch (e) {
    status.textContent = title + ": " + e.message;
  }
}

$("compare").addEventListener("submit", (event) => {
  event.preventDefault();
  const a = $("cmp-a").value, b = $("cmp-b").value;
  showReport(`/v1/tuneloop/compare?a=${encodeURIComponent(a)}&b=${encodeURIComponent(b)}`,
             `${b} against ${a}`);
});

// Deployments: what serves each name, traffic and feedback, promote through the gate, roll back.
async function loadDeployments() {
  const [deploys] = await Promise.all([
    api("/v1/tuneloop/deployments").then((r) => r.json()).then((b) => b.data),
    loadRuns()]);
  $("deploys").replaceChildren(...deploys.map((d) => {
    const t = d.traffic;
    const back = document.createElement("button");
    back.type = "button";
    back.textContent = "Roll back";
    back.disabled = !d.can_roll_back;
    back.setAttribute("aria-label", "roll back " + d.name);
    back.addEventListener("click", () => rollBack(d.name));
    const row = cells(document.createElement("tr"), [d.name, d.run.id,
      d.run.headline ? `${d.run.headline} ${fmt(d.run.value)}` : "–", t.requests,
      t.requests ? `${t.latency_p50_ms} / ${t.latency_p95_ms} ms` : "–",
      `${t.thumbs_up} / ${t.thumbs_down} / ${t.corrections}` +
        (t.feedback_rate !== null ? ` (${(100 * t.feedback_rate).toFixed(0)}% of requests)` : ""),
      back]);
    row.dataset.name = d.name;
    return row;
  }));
  $("deploy-history").replaceChildren(...deploys.flatMap((d) => d.history.map((e) => {
    const item = document.createElement("li");
    item.textContent = `${when(e.created_at)} · ${d.name}: ${e.action} ${e.run_id}` +
      (e.previous_run_id ? ` (was ${e.previous_run_id})` : "") + (e.reason ? ` — ${e.reason}` : "");
    return item;
  })));
}

async function rollBack(name) {
  const status = $("promote-status");
  try {
    const event = await (await api(`/v1/tuneloop/deployments/${encodeURIComponent(name)}/rollback`, {})).json();
    status.className = "";
    status.textContent = `${name} now serves ${event.run_id} again.`;
  } catch (e) {
    status.className = "error";
    status.textContent = "Not rolled back: " + e.message;
  }
  loadDeployments();
}

$("promote").addEventListener("submit", async (event) => {
  event.preventDefault();
  const status = $("promote-status");
  const name = $("promote-name").value.trim();
  try {
    const done = await (await api(`/v1/tuneloop/deployments/${encodeURIComponent(name)}/promote`,
      {run_id: $("promote-run").value, force: $("promote-force").checked})).json();
    status.className = "";
    status.textContent = `${name} now serves ${done.run_id}: ${done.reason}`;
  } catch (e) {
    status.className = "error";
    status.textContent = "Refused: " + e.message;
  }
  loadDeployments();
});

Object.assign(loaders, {playground: listFiles, data: loadFiles, evaluations: loadRuns, deployments: loadDeployments});
