"""The chat page served at `/`: one HTML file with plain JavaScript, no build step, no CDN.

It talks to the same `/v1/chat/completions` as any other client, with `stream: true`, reading
the server-sent events from `fetch` as they arrive. The conversation lives in the page; when the
server answers that it no longer fits the context, the oldest turns are dropped and the request
is sent again (the system prompt is kept), as `azllm chat` does. When the server was started
with --api-key the page shows an "API key" field and sends what is typed there as
`Authorization: Bearer ...` (kept in the page only, never stored); the page itself is open.
"""

from __future__ import annotations

import html
import json

PAGE = """<!doctype html>
<html lang="az">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>azllm chat · __NAME__</title>
<style>
  :root { --fg: #1d232a; --muted: #6b7580; --line: #d9dee3; --user: #e8f0fe; --bot: #f4f5f7; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 15px/1.45 system-ui, sans-serif; color: var(--fg); display: flex;
         height: 100vh; }
  aside { width: 260px; padding: 16px; border-right: 1px solid var(--line); overflow-y: auto; }
  aside h1 { font-size: 17px; margin: 0 0 4px; }
  aside .model { color: var(--muted); font-size: 13px; margin-bottom: 16px; word-break: break-all; }
  label { display: block; font-size: 13px; margin: 12px 0 4px; color: var(--muted); }
  label output { float: right; color: var(--fg); }
  input[type=range], input[type=number], textarea { width: 100%; }
  input[type=password] { width: 100%; }
  input[type=number], input[type=password] { font: inherit; padding: 6px 8px;
                                             border: 1px solid var(--line); border-radius: 6px; }
  textarea { font: inherit; padding: 8px; border: 1px solid var(--line); border-radius: 6px;
             resize: vertical; }
  main { flex: 1; display: flex; flex-direction: column; min-width: 0; }
  #log { flex: 1; overflow-y: auto; padding: 20px; }
  .msg { max-width: 760px; margin: 0 auto 12px; padding: 10px 14px; border-radius: 10px;
         white-space: pre-wrap; word-wrap: break-word; }
  .msg.user { background: var(--user); }
  .msg.assistant { background: var(--bot); }
  .msg.error { background: #fde8e8; color: #8a1c1c; }
  .msg .meta { display: block; color: var(--muted); font-size: 12px; margin-top: 6px; }
  .msg .sources { margin-top: 8px; padding-top: 6px; border-top: 1px solid var(--line);
                  font-size: 13px; white-space: normal; }
  .msg .sources summary { cursor: pointer; color: var(--muted); }
  .msg.assistant[data-state=streaming]::after { content: "▍";
                                                animation: blink 1s steps(2) infinite; }
  @keyframes blink { 50% { opacity: 0; } }
  form { display: flex; gap: 8px; padding: 12px 20px; border-top: 1px solid var(--line); }
  form textarea { flex: 1; height: 48px; }
  button { font: inherit; padding: 0 16px; border: 0; border-radius: 6px; background: #2563eb;
           color: white; cursor: pointer; }
  button.secondary { background: #e5e7eb; color: var(--fg); width: 100%; padding: 8px;
                     margin-top: 16px; }
  button:disabled { opacity: .5; cursor: default; }
</style>
</head>
<body>
<aside>
  <h1>azllm chat</h1>
  <div class="model" id="model">__NAME__ · context __CTX__ tokens</div>
  <div id="key-box" __KEY_HIDDEN__>
    <label for="api-key">API key</label>
    <input id="api-key" type="password" autocomplete="off" placeholder="--api-key of the server">
  </div>
  <label for="system">System prompt</label>
  <textarea id="system" rows="4" placeholder="Sən faydalı köməkçisən."></textarea>
  <label for="temperature">Temperature <output id="temperature-out">0.8</output></label>
  <input id="temperature" type="range" min="0" max="2" step="0.05" value="0.8">
  <label for="top-p">Top-p <output id="top-p-out">0.95</output></label>
  <input id="top-p" type="range" min="0.05" max="1" step="0.05" value="0.95">
  <label for="max-tokens">Max new tokens</label>
  <input id="max-tokens" type="number" min="1" max="__CTX__" value="__MAXTOK__">
  <button class="secondary" id="reset" type="button">New chat</button>
</aside>
<main>
  <div id="log" aria-live="polite"></div>
  <form id="form">
    <textarea id="input" placeholder="Mesajınızı yazın… (Enter: send, Shift+Enter: new line)"
      autofocus></textarea>
    <button id="send" type="submit">Send</button>
    <button id="stop" type="button" hidden>Stop</button>
  </form>
</main>
<script>
const MODEL = __MODEL_JSON__;
const $ = (id) => document.getElementById(id);
let history = [];          // [{role, content}] of finished turns
let controller = null;     // AbortController of the reply being streamed

for (const id of ["temperature", "top-p"]) {
  $(id).addEventListener("input", () => { $(id + "-out").textContent = $(id).value; });
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

function busy(on) {
  $("send").disabled = on;
  $("send").hidden = on;
  $("stop").hidden = !on;
}

// Reads server-sent events from a fetch response; calls onData with each parsed JSON payload.
async function readSSE(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\\n\\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

async function send(text) {
  history.push({ role: "user", content: text });
  bubble("user", text);
  const out = bubble("assistant", "");
  out.dataset.state = "streaming";
  busy(true);
  controller = new AbortController();
  let reply = "", finish = null, usage = null, sources = null;
  try {
    for (;;) {
      const system = $("system").value.trim();
      const messages = (system ? [{ role: "system", content: system }] : []).concat(history);
      const headers = { "Content-Type": "application/json" };
      const key = $("api-key").value.trim();
      if (key) headers["Authorization"] = "Bearer " + key;
      const response = await fetch("/v1/chat/completions", {
        method: "POST",
        headers,
        signal: controller.signal,
        body: JSON.stringify({
          model: MODEL, messages, stream: true, stream_options: { include_usage: true },
          temperature: parseFloat($("temperature").value), top_p: parseFloat($("top-p").value),
          max_tokens: parseInt($("max-tokens").value, 10),
        }),
      });
      if (!response.ok) {
        const err = (await response.json()).error || {};
        // too long: forget the oldest exchange and try again, keeping the newest message
        if (err.code === "context_length_exceeded" && history.length > 1) {
          history.splice(0, history[1] && history[1].role === "assistant" ? 2 : 1);
          continue;
        }
        throw new Error(err.message || response.statusText);
      }
      await readSSE(response, (chunk) => {
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        if (chunk.sources) sources = chunk.sources;  // a server with --rag: what it retrieved
        for (const choice of chunk.choices || []) {
          if (choice.delta && choice.delta.content) {
            reply += choice.delta.content;
            out.textContent = reply;
            $("log").scrollTop = $("log").scrollHeight;
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      });
      break;
    }
    history.push({ role: "assistant", content: reply });
  } catch (e) {
    if (e.name === "AbortError") {
      finish = "stopped";
      history.push({ role: "assistant", content: reply });
    } else {
      history.pop();
      out.className = "msg error";
      out.textContent = reply + (reply ? "\\n" : "") + "Error: " + e.message;
    }
  } finally {
    out.dataset.state = "done";
    if (finish) {
      const meta = document.createElement("span");
      meta.className = "meta";
      meta.textContent = (usage ? usage.completion_tokens + " tokens · " : "") + finish;
      out.appendChild(meta);
    }
    showSources(out, sources);
    controller = null;
    busy(false);
    $("input").focus();
  }
}

// The retrieved chunks under the answer: "[n] source · chunk c", the text folded in each.
function showSources(out, sources) {
  if (!sources || !sources.length) return;
  const box = document.createElement("div");
  box.className = "sources";
  for (const s of sources) {
    const item = document.createElement("details");
    const head = document.createElement("summary");
    head.textContent = "[" + s.n + "] " + s.source + " · chunk " + s.chunk;
    const body = document.createElement("div");
    body.textContent = s.text;
    item.append(head, body);
    box.appendChild(item);
  }
  out.appendChild(box);
}

$("form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("form").requestSubmit(); }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("reset").addEventListener("click", () => {
  if (controller) controller.abort();
  history = [];
  $("log").replaceChildren();
});
</script>
</body>
</html>
"""


def render_page(name: str, context: int, needs_key: bool = False) -> str:
    """The page for this model (its name and context filled in, escaped); `needs_key` shows
    the API key field."""
    return (
        PAGE.replace("__KEY_HIDDEN__", "" if needs_key else "hidden")
        .replace("__MODEL_JSON__", json.dumps(name).replace("<", "\\u003c"))
        .replace("__NAME__", html.escape(name))
        .replace("__CTX__", str(context))
        .replace("__MAXTOK__", str(max(1, min(256, context // 2))))
    )
