// Streams one answer with the chosen method, then the same prompt plainly, from the gateway's
// OpenAI-compatible API. Each chunk's `token_marks` say how many of its tokens were accepted
// proposals (they come first) and how many code points of its text they make.
"use strict";

const $ = (id) => document.getElementById(id);
let modelName = null;

async function api(path, options = {}) {
  const headers = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch(path, { ...options, headers });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error.message || message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

function fmt(value, digits) {
  return Number.isFinite(value) ? value.toFixed(digits) : "–";
}

class Pane {
  constructor(prefix) {
    this.prefix = prefix;
    this.section = $(prefix);
    this.output = $(`${prefix}-output`);
  }
  reset() {
    this.output.textContent = "";
    for (const name of ["tps", "tau", "acceptance", "tokens"]) $(`${this.prefix}-${name}`).textContent = "–";
    this.section.dataset.state = "idle";
    this.tokens = 0; this.chunks = 0; this.firstTokens = 0; this.proposed = 0; this.accepted = 0;
    this.final = null;
  }
  append(text, marks) {
    const chars = Array.from(text); // code points, as the server counts them
    const split = Math.min(marks.accepted_text_length || 0, chars.length);
    if (split > 0) this.span(chars.slice(0, split).join(""), "accepted", marks.accepted_tokens);
    if (split < chars.length) this.span(chars.slice(split).join(""), "own", 0);
    this.chunks += 1;
    if (this.chunks === 1) this.firstTokens = marks.tokens;
    this.tokens += marks.tokens;
    this.proposed += marks.proposed_tokens || 0;
    this.accepted += marks.accepted_tokens || 0;
  }
  span(text, kind, accepted) {
    const span = document.createElement("span");
    span.className = `tok ${kind}`;
    span.textContent = text;
    span.title = kind === "accepted" ? `${accepted} accepted proposal token(s)` : "the target's own token";
    this.output.appendChild(span);
  }
  show(elapsedMs) {
    // tau: tokens per target decoding pass; each chunk after the first is one verification.
    const tau = this.chunks > 1 ? (this.tokens - this.firstTokens) / (this.chunks - 1) : NaN;
    const stats = this.final;
    $(`${this.prefix}-tps`).textContent = fmt(this.tokens / (elapsedMs / 1000), 1);
    $(`${this.prefix}-tau`).textContent = fmt(stats ? stats.mean_accepted_length : tau, 2);
    const rate = this.proposed ? this.accepted / this.proposed : NaN;
    $(`${this.prefix}-acceptance`).textContent = this.proposed ? `${fmt(100 * rate, 0)}%` : "–";
    $(`${this.prefix}-tokens`).textContent = String(this.tokens);
  }
}

async function stream(pane, prompt, method, maxTokens) {
  pane.reset();
  pane.section.dataset.state = "running";
  const began = performance.now();
  const response = await api("/v1/chat/completions", {
    method: "POST",
    body: JSON.stringify({
      model: modelName, messages: [{ role: "user", content: prompt }], max_tokens: maxTokens, temperature: 0,
      stream: true, stream_options: { include_usage: true }, speculation: { method },
    }),
  });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (!event.startsWith("data: ")) continue;
      const data = event.slice(6);
      if (data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.speculation) pane.final = chunk.speculation;
      const choice = chunk.choices[0];
      if (choice && chunk.token_marks) pane.append(choice.delta.content || "", chunk.token_marks);
      pane.show(performance.now() - began);
    }
  }
  pane.section.dataset.state = "done";
  return pane.tokens / ((performance.now() - began) / 1000);
}

const spec = new Pane("spec");
const plain = new Pane("plain");

$("method").addEventListener("change", () => {
  document.querySelector("#spec .method-name").textContent = $("method").selectedOptions[0].textContent;
});

$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("run").disabled = true;
  $("error").hidden = true;
  $("summary").textContent = "";
  try {
    if (modelName === null) modelName = (await (await api("/v1/models")).json()).data[0].id;
    const prompt = $("prompt").value;
    const maxTokens = parseInt($("max-tokens").value, 10) || 128;
    plain.reset();
    const fast = await stream(spec, prompt, $("method").value, maxTokens);
    if ($("compare").checked) {
      const slow = await stream(plain, prompt, "autoregressive", maxTokens);
      $("summary").textContent = `${fmt(fast / slow, 2)}x the plain decoding's tokens/s`;
    }
  } catch (error) {
    $("error").textContent = error.message;
    $("error").hidden = false;
    for (const pane of [spec, plain]) if (pane.section.dataset.state === "running") pane.section.dataset.state = "failed";
  } finally {
    $("run").disabled = false;
  }
});
