// gptjax playground: streams /v1/completions (stream, logprobs, echo) and draws each token as a
// span coloured by its probability, with its top alternatives on hover or tap.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "gptjax-api-key"; // kept in this tab's sessionStorage only
const state = { controller: null, tops: [], generated: 0, firstAt: 0, lastAt: 0 };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function errorText(r) {
  try {
    const body = await r.json();
    if (body && body.error && body.error.message) return `${r.status}: ${body.error.message}`;
  } catch (_) { /* not JSON */ }
  return `${r.status} ${r.statusText}`;
}

async function getJSON(path) {
  const r = await fetch(path, { headers: headers() });
  if (!r.ok) throw new Error(await errorText(r));
  return r.json();
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function loadInfo() {
  try {
    const info = await getJSON("/info");
    $("info").textContent = `run ${info.model} · step ${info.step} · tokenizer ` +
      `${info.tokenizer} · context ${info.context_length}`;
    $("info").dataset.step = info.step;
    const models = await getJSON("/v1/models");
    const select = $("model");
    const chosen = select.value || info.model;
    select.replaceChildren(...models.data.map((m) => new Option(m.id, m.id)));
    select.value = models.data.some((m) => m.id === chosen) ? chosen : info.model;
    showError("");
  } catch (e) {
    $("info").textContent = "not connected";
    showError(`cannot reach the server: ${e.message}`);
  }
}

function colour(p) {
  return `hsl(${Math.round(120 * p)} ${p > 0.5 ? 60 : 75}% 80%)`;
}

function tokenLabel(bytes) {
  const text = new TextDecoder("utf-8", { fatal: false }).decode(Uint8Array.from(bytes));
  if (text.includes("\ufffd")) { // part of a character: show its bytes
    return bytes.map((b) => "\\x" + b.toString(16).padStart(2, "0")).join("");
  }
  return JSON.stringify(text);
}

function addTokens(lp, decoder, promptBytes) {
  const out = $("output");
  for (let k = 0; k < lp.tokens.length; k++) {
    const bytes = lp.token_bytes[k];
    const span = document.createElement("span");
    span.className = "tok";
    span.textContent = decoder.decode(Uint8Array.from(bytes), { stream: true });
    if (span.textContent === "") span.classList.add("partial");
    const logprob = lp.token_logprobs[k];
    if (promptBytes.left > 0) {
      span.classList.add("prompt");
      promptBytes.left -= bytes.length;
    } else {
      state.generated += 1;
    }
    if (logprob === null || logprob === undefined) {
      span.classList.add("given"); // the first prompt token: nothing came before it
    } else {
      span.dataset.logprob = String(logprob);
      span.style.background = colour(Math.exp(logprob));
    }
    span.dataset.bytes = tokenLabel(bytes);
    span.dataset.top = String(state.tops.length);
    state.tops.push(lp.top_tokens ? lp.top_tokens[k] : null);
    out.appendChild(span);
  }
}

function showTip(span, x, y) {
  const tip = $("tip");
  const lp = span.dataset.logprob;
  const rows = [`<div class="chosen">${escapeHtml(span.dataset.bytes)}  ` +
    (lp === undefined ? "(first token: no probability)" :
      `p = ${(100 * Math.exp(Number(lp))).toFixed(2)}%  (log p ${Number(lp).toFixed(3)})`) +
    "</div>"];
  const top = state.tops[Number(span.dataset.top)];
  if (top) {
    rows.push("<table>" + top.map((t) =>
      `<tr><td>${escapeHtml(tokenLabel(t.bytes))}</td>` +
      `<td>${(100 * Math.exp(t.logprob)).toFixed(2)}%</td></tr>`).join("") + "</table>");
  }
  tip.innerHTML = rows.join("");
  tip.hidden = false;
  tip.style.left = Math.min(x + 12, window.innerWidth - 320) + "px";
  tip.style.top = (y + 16) + "px";
}

function escapeHtml(s) {
  return s.replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]));
}

function stops() {
  return $("stop").value.split("\n").filter((s) => s !== "").map((s) => s.replace(/\\n/g, "\n"));
}

function setRunning(running) {
  $("generate").disabled = running;
  $("stop_button").disabled = !running;
  document.body.dataset.state = running ? "running" : "idle";
}

async function readEvents(response, onChunk) {
  const reader = response.body.getReader();
  const text = new TextDecoder();
  let buffer = "";
  let done = false;
  for (;;) {
    const { value, done: end } = await reader.read();
    if (end) break;
    buffer += text.decode(value, { stream: true });
    let i;
    while ((i = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, i);
      buffer = buffer.slice(i + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") { done = true; continue; }
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        onChunk(chunk);
      }
    }
  }
  return done;
}

async function generate() {
  showError("");
  $("output").replaceChildren();
  state.tops = [];
  state.generated = 0;
  state.firstAt = 0;
  const echo = $("score_prompt").checked;
  const prompt = $("prompt").value;
  const body = {
    model: $("model").value || undefined, prompt, stream: true, logprobs: 5, echo,
    max_tokens: Number($("max_tokens").value), temperature: Number($("temperature").value),
    top_k: Number($("top_k").value), top_p: Number($("top_p").value),
    seed: Number($("seed").value), stop: stops(),
  };
  const controller = new AbortController();
  state.controller = controller;
  setRunning(true);
  $("status").textContent = "generating…";
  const started = performance.now();
  const decoder = new TextDecoder("utf-8", { fatal: false });
  const promptBytes = { left: echo ? new TextEncoder().encode(prompt).length : 0 };
  let finish = null;
  try {
    const r = await fetch("/v1/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!r.ok) throw new Error(await errorText(r));
    const done = await readEvents(r, (chunk) => {
      const c = chunk.choices[0];
      if (!c) return;
      if (c.logprobs) {
        const before = state.generated;
        addTokens(c.logprobs, decoder, promptBytes);
        if (state.generated > before) {
          state.lastAt = performance.now();
          if (!state.firstAt) state.firstAt = state.lastAt;
        }
      }
      if (c.finish_reason) finish = c.finish_reason;
    });
    if (!done || !finish) throw new Error("the connection dropped before the completion ended");
    document.body.dataset.finish = finish;
    $("status").textContent = summary(`done (${finish})`, started);
  } catch (e) {
    if (e.name === "AbortError") {
      document.body.dataset.finish = "stopped";
      $("status").textContent = summary("stopped", started);
    } else {
      document.body.dataset.finish = "error";
      showError(e.message);
      $("status").textContent = summary("failed", started);
    }
  } finally {
    state.controller = null;
    setRunning(false);
  }
}

function summary(what, started) {
  const n = state.generated;
  const span = (state.lastAt - state.firstAt) / 1000;
  const rate = n > 1 && span > 0 ? `, ${((n - 1) / span).toFixed(1)} tokens/s` : "";
  const secs = ((performance.now() - started) / 1000).toFixed(2);
  $("status").dataset.tokens = String(n);
  return `${what}: ${n} tokens in ${secs} s${rate}`;
}

$("key").value = sessionStorage.getItem(KEY) || "";
$("key").addEventListener("change", () => {
  sessionStorage.setItem(KEY, $("key").value);
  loadInfo();
});
$("generate").addEventListener("click", generate);
$("stop_button").addEventListener("click", () => state.controller && state.controller.abort());
$("output").addEventListener("mouseover", (e) => {
  if (e.target.classList.contains("tok")) showTip(e.target, e.clientX, e.clientY);
});
$("output").addEventListener("mouseout", () => { $("tip").hidden = true; });
$("output").addEventListener("click", (e) => { // tap, on touch screens
  if (e.target.classList.contains("tok")) showTip(e.target, e.clientX, e.clientY);
});
setRunning(false);
loadInfo();
