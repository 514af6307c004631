// The playground: one prompt to 2-4 models at once over the OpenAI-compatible API, answers
// streamed side by side, and feedback (rating or correction) into the feedback store.
"use strict";
const $ = (id) => document.getElementById(id);
let key = sessionStorage.getItem("tuneloop-key") || "";

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

async function stream(model, messages, node) {
  const text = node.querySelector(".text");
  const started = performance.now();
  let first = null, chunks = 0, id = null, usage = null;
  const response = await api("/v1/chat/completions", {
    model, messages, stream: true, stream_options: {include_usage: true},
    max_tokens: Number($("max-tokens").value), temperature: Number($("temperature").value),
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
  node.dataset.done = "1";
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
});

$("ask").addEventListener("submit", async (event) => {
  event.preventDefault();
  const chosen = [...document.querySelectorAll("input[name=model]:checked")].map((i) => i.value);
  if (chosen.length < 1 || chosen.length > 4) {
    $("error").textContent = "Choose between one and four models.";
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
    return stream(model, messages, node).catch((e) => {
      node.querySelector(".text").textContent = "Error: " + e.message;
    });
  }));
  $("send").disabled = false;
});

$("answers").addEventListener("click", (event) => {
  const node = event.target.closest(".answer");
  if (!node) return;
  if (event.target.classList.contains("up")) feedback(node, {rating: 1});
  if (event.target.classList.contains("down")) {
    feedback(node, {rating: -1});
    const form = node.querySelector(".correct");
    form.hidden = false;
    form.querySelector("textarea").focus();
  }
});

$("answers").addEventListener("submit", (event) => {
  event.preventDefault();
  const node = event.target.closest(".answer");
  feedback(node, {correction: node.querySelector(".correction").value});
});

if (key) { $("key").value = key; loadModels(); }
