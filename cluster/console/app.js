// Tandem console: polls GET v1/cluster, draws models / pools / agents with sparklines kept here in
// the browser, and a playground for chats and agent runs (SSE read with fetch + ReadableStream).
// No framework, no build step. Every URL is relative to the page, so the console works under any
// route prefix. The API key (when the gateway wants one) stays in this tab's sessionStorage and is
// only ever sent as the Authorization header of these API calls.
"use strict";

const POLL_MS = 1500;
const HISTORY_MS = 5 * 60 * 1000;
const KEY_STORAGE = "tandem-api-key";

const $ = (id) => document.getElementById(id);
const state = {
  key: sessionStorage.getItem(KEY_STORAGE) || "",
  waitingForKey: false,
  timer: null,
  history: new Map(), // "model/pool" -> [{t, in_flight, running, waiting, tokens_per_s, kv}]
  targets: "", // the playground's model list, as last drawn
  agents: new Map(), // agent name -> its /v1/cluster entry
  agentNames: "",
  chatAbort: null,
};

// -- API --------------------------------------------------------------------------------------------

class APIError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || (typeof body === "string" && body) || `HTTP ${status}`);
    this.status = status;
    this.code = err.code || null;
  }
  describe() {
    // The API's own message and code, as the OpenAI error body gives them.
    const parts = [this.code, this.status ? `HTTP ${this.status}` : null].filter(Boolean);
    return parts.length ? `${this.message} [${parts.join(", ")}]` : this.message;
  }
}

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  if (state.key) h["Authorization"] = `Bearer ${state.key}`;
  return h;
}

async function api(path, { method = "GET", body, signal } = {}) {
  const res = await fetch(path, {
    method,
    headers: headers(body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
    cache: "no-store",
  });
  if (!res.ok) {
    const text = await res.text();
    let parsed = text;
    try { parsed = JSON.parse(text); } catch (_) { /* not JSON: keep the text */ }
    throw new APIError(res.status, parsed);
  }
  return res;
}

// Server-sent events from a fetch response: yields each event's data (a string). The streaming
// TextDecoder keeps a multi-byte character split across network chunks whole (no U+FFFD).
async function* sseData(res) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder("utf-8");
  let buffer = "";
  const take = function* (final) {
    const parts = buffer.split(/\r?\n\r?\n/);
    buffer = final ? "" : parts.pop();
    for (const part of parts) {
      const data = part.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, ""));
      if (data.length) yield data.join("\n");
    }
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    yield* take(false);
  }
  buffer += decoder.decode();
  yield* take(true);
}

// -- the key ------------------------------------------------------------------------------------------

function askForKey(error) {
  state.waitingForKey = true;
  $("key-panel").hidden = false;
  $("main").hidden = true;
  $("key-error").textContent = error && state.key ? error.describe() : "";
  setRefresh("stale", "API key needed");
  $("api-key").focus();
}

$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  state.key = $("api-key").value.trim();
  sessionStorage.setItem(KEY_STORAGE, state.key);
  $("key-error").textContent = "";
  state.waitingForKey = false;
  poll();
});

$("forget-key").addEventListener("click", () => {
  state.key = "";
  sessionStorage.removeItem(KEY_STORAGE);
  $("api-key").value = "";
  poll();
});

// -- polling ------------------------------------------------------------------------------------------

function setRefresh(kind, text) {
  const el = $("refresh-state");
  el.className = `pill ${kind}`;
  el.textContent = text;
}

async function poll() {
  clearTimeout(state.timer);
  try {
    const res = await api("v1/cluster");
    const cluster = await res.json();
    $("api-error").hidden = true;
    $("key-panel").hidden = true;
    $("main").hidden = false;
    $("forget-key").hidden = !cluster.gateway.auth;
    draw(cluster);
    setRefresh("live", `live · ${new Date(cluster.gateway.time * 1000).toLocaleTimeString()}`);
  } catch (e) {
    if (e instanceof APIError && e.status === 401) {
      askForKey(e);
      return; // until a key is entered
    }
    const banner = $("api-error");
    banner.textContent = e instanceof APIError ? e.describe() : `The gateway did not answer: ${e.message}`;
    banner.hidden = false;
    setRefresh("stale", "stale");
  }
  state.timer = setTimeout(poll, POLL_MS);
}

// -- drawing ------------------------------------------------------------------------------------------

function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function sparkline(points, key, max) {
  const w = 80, h = 20;
  if (points.length < 2) return `<svg class="spark" width="${w}" height="${h}"></svg>`;
  const t0 = points[0].t, span = Math.max(points[points.length - 1].t - t0, 1);
  const top = max ?? Math.max(...points.map((p) => p[key]), 1e-9);
  const xy = points.map((p) => `${((p.t - t0) / span * w).toFixed(1)},${(h - 1 - (p[key] / top) * (h - 2)).toFixed(1)}`);
  return `<svg class="spark" width="${w}" height="${h}" viewBox="0 0 ${w} ${h}" role="img" aria-label="${esc(key)}, last ${Math.round(span / 1000)} s"><polyline points="${xy.join(" ")}"/></svg>`;
}

function remember(id, pool, now) {
  const s = pool.engine_stats || {};
  const points = state.history.get(id) || [];
  points.push({ t: now, in_flight: pool.in_flight, running: s.running || 0, waiting: s.waiting || 0, tokens_per_s: s.tokens_per_s || 0, kv: s.kv_cache_usage || 0 });
  while (points.length && points[0].t < now - HISTORY_MS) points.shift();
  state.history.set(id, points);
  return points;
}

function accelerator(a) {
  if (!a) return "";
  return `${a.kind}${a.count > 1 ? ` ×${a.count}` : ""}${a.type ? ` ${a.type}` : ""}`;
}

function replicas(r) {
  const n = (v) => (v === null || v === undefined ? "?" : v);
  return `${n(r.running)} running, ${n(r.starting)} starting (min ${r.min}, max ${r.max})`;
}

function drawModels(models) {
  const now = Date.now();
  const html = models.map((m) => {
    const rows = m.pools.map((p) => {
      const id = `${m.model}/${p.pool}`;
      const h = remember(id, p, now);
      const s = p.engine_stats || {};
      const msg = p.message ? `<tr class="message-row"><td></td><td colspan="9" class="message" data-field="message">${esc(p.message)}</td></tr>` : "";
      return `<tr class="pool" data-pool="${esc(p.pool)}" data-deployment="${esc(p.deployment)}">
        <td data-field="pool">${esc(p.pool)}</td>
        <td data-field="engine">${esc(p.engine)}</td>
        <td data-field="accelerator">${esc(accelerator(p.accelerator))}</td>
        <td data-field="replicas">${esc(replicas(p.replicas))}</td>
        <td data-field="status" class="status-${esc(p.status)}">${esc(p.status)}</td>
        <td class="num"><span data-field="in_flight">${esc(p.in_flight)}</span>${sparkline(h, "in_flight")}</td>
        <td class="num"><span data-field="running">${esc(s.running ?? 0)}</span>${sparkline(h, "running")}</td>
        <td class="num"><span data-field="waiting">${esc(s.waiting ?? 0)}</span>${sparkline(h, "waiting")}</td>
        <td class="num"><span data-field="tokens_per_s">${esc((s.tokens_per_s ?? 0).toFixed(1))}</span>${sparkline(h, "tokens_per_s")}</td>
        <td class="num"><span data-field="kv_cache_usage">${esc(((s.kv_cache_usage ?? 0) * 100).toFixed(1))} %</span>${sparkline(h, "kv", 1)}</td>
      </tr>${msg}`;
    }).join("");
    return `<div class="model" data-model="${esc(m.model)}"><h3>${esc(m.model)}</h3>
      <table class="pools"><thead><tr><th>pool</th><th>engine</th><th>accelerator</th><th>replicas</th><th>status</th>
      <th title="this gateway's requests in flight">in flight</th><th title="requests in the engines' running batches">engine running</th>
      <th title="requests queued in the engines">waiting</th><th>tokens/s</th><th title="mean over the replicas">KV cache</th></tr></thead>
      <tbody>${rows}</tbody></table></div>`;
  }).join("");
  $("models").innerHTML = html;
}

function seconds(s) {
  return s === null || s === undefined ? "–" : `${s.toFixed(2)} s`;
}

function drawAgents(agents) {
  state.agents = new Map(agents.map((a) => [a.name, a]));
  $("agents").tBodies[0].innerHTML = agents.map((a) => {
    const required = new Set(a.required || []);
    const args = (a.arguments || []).map((n) => required.has(n) ? `<code class="required">${esc(n)}</code>` : `<code class="optional">${esc(n)}?</code>`).join(" ");
    const r = a.replicas || {};
    return `<tr class="agent" data-agent="${esc(a.name)}">
      <td data-field="name">${esc(a.name)}</td><td data-field="program"><code>${esc(a.program)}</code></td>
      <td data-field="arguments">${args}</td>
      <td data-field="replicas">${esc(r.running ?? "?")} running${r.starting ? `, ${esc(r.starting)} starting` : ""}${a.message ? `<div class="message">${esc(a.message)}</div>` : ""}</td>
      <td class="num" data-field="runs">${esc(a.runs)}</td><td class="num" data-field="errors">${esc(a.errors)}</td>
      <td class="num" data-field="p50">${esc(seconds(a.p50_run_s))}</td></tr>`;
  }).join("");
}

function fillSelect(select, values) {
  const current = select.value;
  select.innerHTML = values.map((v) => `<option value="${esc(v)}">${esc(v)}</option>`).join("");
  if (values.includes(current)) select.value = current;
}

function draw(cluster) {
  const g = cluster.gateway;
  const up = Math.max(0, Math.round(g.time - g.started));
  $("gateway-info").textContent = `gateway ${g.version} · Ray ${g.ray_version} · up ${Math.floor(up / 60)} min ${up % 60} s`;
  drawModels(cluster.models);
  drawAgents(cluster.agents);
  const targets = cluster.models.map((m) => m.model).concat(cluster.agents.map((a) => `agent:${a.name}`));
  if (targets.join("\n") !== state.targets) {
    state.targets = targets.join("\n");
    fillSelect($("chat-model"), targets);
  }
  const names = cluster.agents.map((a) => a.name);
  if (names.join("\n") !== state.agentNames) {
    state.agentNames = names.join("\n");
    fillSelect($("agent-name"), names);
    drawAgentForm();
  }
}

// -- playground: chat ---------------------------------------------------------------------------------

$("chat-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const out = $("chat-output"), err = $("chat-error"), thought = $("chat-reasoning");
  out.textContent = "";
  thought.textContent = "";
  thought.hidden = true;
  err.textContent = "";
  $("chat-ttft").textContent = "";
  $("chat-usage").textContent = "";
  $("chat-finish").textContent = "";
  out.dataset.state = "streaming";
  const abort = new AbortController();
  state.chatAbort = abort;
  $("chat-send").disabled = true;
  $("chat-stop").disabled = false;
  const body = {
    model: $("chat-model").value,
    messages: [{ role: "user", content: $("chat-input").value }],
    stream: true,
    stream_options: { include_usage: true },
    max_tokens: Number($("chat-max-tokens").value),
    temperature: Number($("chat-temperature").value),
  };
  const started = performance.now();
  let first = null;
  try {
    const res = await api("v1/chat/completions", { method: "POST", body, signal: abort.signal });
    for await (const data of sseData(res)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new APIError(0, chunk);
      for (const choice of chunk.choices || []) {
        const text = choice.delta && choice.delta.content;
        // A reasoning model's thinking (the model's reasoning_parser) streams first, shown apart.
        const reasoning = choice.delta && choice.delta.reasoning_content;
        if ((text || reasoning) && first === null) {
          first = performance.now() - started;
          $("chat-ttft").textContent = `time to first token ${Math.round(first)} ms`;
        }
        if (reasoning) {
          thought.hidden = false;
          thought.textContent += reasoning;
        }
        if (text) out.textContent += text;
        if (choice.finish_reason) $("chat-finish").textContent = `finish: ${choice.finish_reason}`;
      }
      if (chunk.usage) {
        const u = chunk.usage;
        const details = u.completion_tokens_details;
        const thinking = details && details.reasoning_tokens ? ` (${details.reasoning_tokens} reasoning)` : "";
        $("chat-usage").textContent = `usage: ${u.prompt_tokens} prompt + ${u.completion_tokens} completion${thinking} = ${u.total_tokens} tokens`;
      }
    }
    out.dataset.state = "done";
  } catch (e2) {
    out.dataset.state = "error";
    if (e2.name === "AbortError") err.textContent = "stopped";
    else err.textContent = e2 instanceof APIError ? e2.describe() : String(e2.message || e2);
    if (e2 instanceof APIError && e2.status === 401) askForKey(e2);
  } finally {
    $("chat-send").disabled = false;
    $("chat-stop").disabled = true;
    state.chatAbort = null;
  }
});

$("chat-stop").addEventListener("click", () => state.chatAbort && state.chatAbort.abort());

// -- playground: agent programs -----------------------------------------------------------------------

const DEFAULT_ARGS = { question: "What is the capital of France?" };

function drawAgentForm() {
  const agent = state.agents.get($("agent-name").value);
  const box = $("agent-args");
  if (!agent) { box.innerHTML = ""; return; }
  const required = new Set(agent.required || []);
  box.innerHTML = (agent.arguments || []).map((n) => `<label>${esc(n)}${required.has(n) ? " *" : ' <span class="optional">(optional)</span>'}
      <input data-arg="${esc(n)}" data-required="${required.has(n)}" value="${esc(DEFAULT_ARGS[n] ?? "")}" size="${n === "question" ? 40 : 8}"></label>`).join("");
}

$("agent-name").addEventListener("change", drawAgentForm);

// A form value as JSON: numbers, booleans, null, arrays and objects as typed; anything else a string.
function argValue(text) {
  if (/^\s*(-?\d+(\.\d+)?([eE][-+]?\d+)?|true|false|null|\[[\s\S]*\]|\{[\s\S]*\})\s*$/.test(text)) {
    try { return JSON.parse(text); } catch (_) { /* a string after all */ }
  }
  return text;
}

function variableCell(name) {
  let dd = document.querySelector(`#agent-variables dd[data-variable="${CSS.escape(name)}"]`);
  if (!dd) {
    const dt = document.createElement("dt");
    dt.textContent = name;
    dd = document.createElement("dd");
    dd.dataset.variable = name;
    dd.dataset.deltas = "0";
    $("agent-variables").append(dt, dd);
  }
  return dd;
}

$("agent-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const name = $("agent-name").value;
  const args = {};
  for (const input of $("agent-args").querySelectorAll("input[data-arg]")) {
    if (input.value === "" && input.dataset.required !== "true") continue;
    args[input.dataset.arg] = argValue(input.value);
  }
  $("agent-variables").innerHTML = "";
  $("agent-error").textContent = "";
  const summary = $("agent-summary");
  summary.textContent = "running…";
  summary.dataset.state = "running";
  $("agent-run").disabled = true;
  const started = performance.now();
  try {
    const res = await api(`v1/agents/${encodeURIComponent(name)}`, { method: "POST", body: { ...args, stream: true } });
    for await (const data of sseData(res)) {
      if (data === "[DONE]") break;
      const event = JSON.parse(data);
      if (event.error) throw new APIError(0, event);
      if (event.variable !== undefined) {
        const dd = variableCell(event.variable);
        dd.textContent = event.replace ? event.delta : dd.textContent + event.delta;
        dd.dataset.deltas = String(Number(dd.dataset.deltas) + 1);
        dd.dataset.source = "stream";
      }
      if (event.done) {
        // The final values: variables that did not stream (lists of forks, numbers) appear now;
        // a streamed one that differs is corrected (and marked so).
        for (const [k, v] of Object.entries(event.variables || {})) {
          const dd = variableCell(k);
          const text = typeof v === "string" ? v : JSON.stringify(v);
          if (dd.textContent !== text) {
            dd.textContent = text;
            dd.dataset.source = dd.dataset.source === "stream" ? "corrected" : "final";
          }
        }
        const secs = ((performance.now() - started) / 1000).toFixed(2);
        summary.textContent = `done in ${secs} s · ${event.calls} model calls · session ${event.session_id}`;
        summary.dataset.state = "done";
      }
    }
  } catch (e2) {
    summary.textContent = "";
    summary.dataset.state = "error";
    $("agent-error").textContent = e2 instanceof APIError ? e2.describe() : String(e2.message || e2);
    if (e2 instanceof APIError && e2.status === 401) askForKey(e2);
  } finally {
    $("agent-run").disabled = false;
  }
});

poll();
