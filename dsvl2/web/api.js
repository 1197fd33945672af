// The client of the server's API: fetch with the API key, its error messages, and the
// streamed chat request.
//
// Streaming reads the server-sent events of POST /v1/chat/completions with fetch and a
// stream reader; Stop aborts that fetch, the server sees the client go and frees the
// request's slot.

import {state} from "./state.js";
import {$, showNotice} from "./dom.js";

// The server's (or the network's) message for the user.
export class ApiError extends Error {}

// fetch with the API key, when the user gave one.
export function api(path, options = {}) {
  const headers = {...(options.headers || {})};
  if (state.apiKey) headers["Authorization"] = `Bearer ${state.apiKey}`;
  return fetch(path, {...options, headers});
}

export function askForKey() {
  $("key-row").hidden = false;
  showNotice("This server needs an API key: enter it in the API key field on the right (it stays in this tab only).");
}

export async function errorMessage(res) {
  try {
    const body = await res.json();
    const msg = body && body.error && body.error.message;
    if (typeof msg === "string" && msg) return msg;
    if (body && typeof body.detail === "string") return body.detail;
  } catch (e) { /* not JSON */ }
  return `The server answered ${res.status} ${res.statusText}.`;
}

// POST a streamed chat request; onChunk(obj) for every `data:` event until [DONE].
export async function streamChat(body, signal, onChunk) {
  let res;
  try {
    res = await api("/v1/chat/completions", {
      method: "POST", headers: {"Content-Type": "application/json", "Accept": "text/event-stream"},
      body: JSON.stringify(body), signal,
    });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError("Could not reach the server; is `dsvl2 serve` still running?");
  }
  if (res.status === 401) askForKey();
  if (!res.ok) {
    let msg = await errorMessage(res);
    if (res.status === 413) msg += " (every message re-sends the conversation's images: Clear starts a new one)";
    throw new ApiError(msg);
  }
  const reader = res.body.getReader();
  try {
    await readEvents(reader, onChunk);
  } finally {
    reader.cancel().catch(() => {});  // a chunk's error, or [DONE]: close the stream
  }
}

async function readEvents(reader, onChunk) {
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buf += decoder.decode(value, {stream: true}).replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      let obj;
      try { obj = JSON.parse(data); } catch (e) { continue; }
      onChunk(obj);
    }
  }
}
