// The dsvl2 chat page: a client of the server's own OpenAI-compatible API.
//
// Notable choices:
// * The conversation lives in this tab's memory only (`state.exchanges`); every request
//   carries the history, so each tab is its own conversation and the server keeps none.
// * Model output, file names and server messages are always put in the page with
//   textContent, never parsed as HTML (the page uses no innerHTML at all).
// * Streaming reads the server-sent events of POST /v1/chat/completions with fetch and a
//   stream reader; Stop aborts that fetch, the server sees the client go and frees the
//   request's slot.
// * Requests ask the server to drop the oldest turns when the history does not fit the
//   context window (`truncate_history`); the answer says when it did.
// * Images are checked here before they are attached (a real image by its first bytes,
//   file size, pixel count) so that a wrong file gets a plain message at once; the
//   server checks them again and its error messages are shown the same way.
"use strict";

const state = {
  exchanges: [],       // {user: {text, images: [{name, dataUrl, width, height}]}, answer, el}
  pending: [],         // images attached to the message being written
  controller: null,    // AbortController of the request in flight
  busy: false,
  model: null,         // id from /v1/models
  apiKey: "",          // only when the server was started with --api-key (kept in this tab only)
  contextWindow: null,
  config: {defaults: {temperature: 0, top_p: 1, max_new_tokens: 512},
           limits: {max_image_bytes: 20 * 1024 * 1024, max_image_pixels: 40e6, max_images_per_message: 8},
           examples: []},
};

const $ = (id) => document.getElementById(id);

// A message for the user (shown as is), as opposed to a bug.
class UserError extends Error {}

// ---------------------------------------------------------------------------- small DOM

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function showNotice(message) {
  $("notice-text").textContent = message;
  $("notice").hidden = false;
}

function hideNotice() {
  $("notice").hidden = true;
  $("notice-text").textContent = "";
}

function setStatus(text) {
  $("status").textContent = text;
}

function scrollToEnd() {
  window.scrollTo(0, document.documentElement.scrollHeight);
}

// An image that finished loading made the page taller: keep the end in view while an
// answer is coming or has just come (not when the user scrolled up to read).
function followEnd() {
  const doc = document.documentElement;
  if (state.busy || doc.scrollHeight - (window.scrollY + window.innerHeight) < 600) scrollToEnd();
}

function megabytes(n) {
  return (n / (1024 * 1024)).toFixed(1) + " MB";
}

// ---------------------------------------------------------------------------- images

// Formats both the browser and the server (Pillow) read, told by their first bytes
// (a file's name or its claimed type may lie).
function sniffType(b) {
  const starts = (sig, at = 0) => sig.every((v, i) => b[at + i] === v);
  if (starts([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a])) return "image/png";
  if (starts([0xff, 0xd8, 0xff])) return "image/jpeg";
  if (starts([0x47, 0x49, 0x46, 0x38])) return "image/gif";
  if (starts([0x52, 0x49, 0x46, 0x46]) && starts([0x57, 0x45, 0x42, 0x50], 8)) return "image/webp";
  if (starts([0x42, 0x4d])) return "image/bmp";
  return null;
}

function readAsDataUrl(blob) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(r.error);
    r.readAsDataURL(blob);
  });
}

// Width and height from the image's header: an Image that is never painted is not
// decoded in full, so a decompression bomb costs nothing here.
function imageSize(url) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    const timer = setTimeout(() => reject(new Error("timeout")), 15000);
    img.onload = () => { clearTimeout(timer); resolve([img.naturalWidth, img.naturalHeight]); };
    img.onerror = () => { clearTimeout(timer); reject(new Error("undecodable")); };
    img.src = url;
  });
}

async function readImage(file) {
  const name = file.name || "pasted image";
  const lim = state.config.limits;
  if (file.size === 0) throw new UserError(`"${name}" is empty.`);
  if (file.size > lim.max_image_bytes) {
    throw new UserError(`"${name}" is ${megabytes(file.size)}; the limit is ${megabytes(lim.max_image_bytes)} per image.`);
  }
  const type = sniffType(new Uint8Array(await file.slice(0, 12).arrayBuffer()));
  if (type === null) {
    throw new UserError(`"${name}" is not an image this page can send; use PNG, JPEG, GIF, WebP or BMP.`);
  }
  const blob = new Blob([file], {type});
  const probe = URL.createObjectURL(blob);
  let width, height;
  try {
    [width, height] = await imageSize(probe);
  } catch (e) {
    throw new UserError(`"${name}" could not be read as an image (the file may be damaged).`);
  } finally {
    URL.revokeObjectURL(probe);
  }
  if (width * height > lim.max_image_pixels) {
    throw new UserError(`"${name}" is ${width}×${height} pixels (${(width * height / 1e6).toFixed(0)} megapixels); ` +
                        `the limit is ${(lim.max_image_pixels / 1e6).toFixed(0)} megapixels. Make it smaller and try again.`);
  }
  return {name, width, height, dataUrl: await readAsDataUrl(blob)};
}

async function addFiles(files) {
  const problems = [];
  const lim = state.config.limits.max_images_per_message;
  for (const file of files) {
    if (state.pending.length >= lim) {
      problems.push(`At most ${lim} images per message; "${file.name || "image"}" was not added.`);
      continue;
    }
    try {
      state.pending.push(await readImage(file));
    } catch (e) {
      problems.push(e instanceof UserError ? e.message : `"${file.name}" could not be read.`);
    }
  }
  renderPending();
  if (problems.length) showNotice(problems.join(" "));
  else hideNotice();
}

function thumb(image) {
  const img = el("img", "thumb");
  img.addEventListener("load", followEnd);
  img.src = image.dataUrl;
  img.alt = image.name;
  img.title = `${image.name} (${image.width}×${image.height})`;
  return img;
}

function renderPending() {
  const box = $("pending");
  box.replaceChildren();
  state.pending.forEach((image, i) => {
    const item = el("span", "pending-item");
    const remove = el("button", "remove", "×");
    remove.type = "button";
    remove.title = `Remove ${image.name}`;
    remove.setAttribute("aria-label", `Remove ${image.name}`);
    remove.addEventListener("click", () => { state.pending.splice(i, 1); renderPending(); });
    item.append(thumb(image), remove);
    box.append(item);
  });
}

// ---------------------------------------------------------------------------- history

function renderExchange(ex) {
  const wrap = el("div", "exchange");
  const user = el("div", "msg user");
  user.append(el("div", "who", "You"));
  if (ex.user.images.length) {
    const thumbs = el("div", "thumbs");
    ex.user.images.forEach((image) => thumbs.append(thumb(image)));
    user.append(thumbs);
  }
  if (ex.user.text) user.append(el("div", "text", ex.user.text));
  const answer = el("div", "msg assistant");
  answer.append(el("div", "who", "Model"));
  const text = el("div", "text answer");
  const meta = el("div", "meta");
  const note = el("div", "dropped");
  note.hidden = true;
  const grounding = el("div", "grounding");
  answer.append(text, note, grounding, meta);
  wrap.append(user, answer);
  ex.el = {wrap, text, meta, note, grounding};
  $("empty-hint").hidden = true;
  $("history").append(wrap);
  scrollToEnd();
}

function setAnswerText(ex) {
  ex.el.text.textContent = ex.answer.text;
  scrollToEnd();
}

const FINISH = {
  stop: "done", length: "stopped at the token limit (max new tokens or the context window)",
  stopped: "stopped", error: "failed", cancelled: "cancelled",
};

function setMeta(ex) {
  const a = ex.answer;
  let text = FINISH[a.status] || (a.status === "streaming" ? "generating…" : a.status);
  if (a.usage) text += ` · ${a.usage.prompt_tokens} prompt + ${a.usage.completion_tokens} answer tokens`;
  if (!a.text && a.status !== "streaming") text += " · no answer (not part of the conversation)";
  ex.el.meta.textContent = text;
  ex.el.wrap.dataset.status = a.status;
}

function showDropped(ex, n) {
  ex.answer.dropped = n;
  const win = state.contextWindow ? ` of ${state.contextWindow} tokens` : "";
  ex.el.note.textContent = `The conversation is longer than the model's context window${win} (images count ` +
    `too): the oldest ${n === 1 ? "message was" : `${n} messages were`} left out of this answer.`;
  ex.el.note.hidden = false;
}

function hasImage(b) {
  return b.image_index !== null && b.image_index !== undefined;
}

// Box list -> text a user can copy: one JSON object per line; "image" numbers the
// conversation's images from 1, as the captions do.
function boxesText(boxes, offset) {
  const lines = boxes.map((b) => "  " + JSON.stringify({
    label: b.label, box: b.box, box_px: b.box_px ?? null, image: hasImage(b) ? offset + b.image_index + 1 : null,
  }));
  return "[\n" + lines.join(",\n") + "\n]";
}

async function copyText(text, area, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch (e) {  // no clipboard permission: select the text for Ctrl+C and try the old way
    area.focus();
    area.select();
    document.execCommand("copy");
  }
  button.textContent = "Copied";
  setTimeout(() => { button.textContent = "Copy boxes"; }, 1500);
}

// One figure per referenced image: the image the box names (see imageOffset), the
// boxes drawn at their 0..999 coordinates as percentages, each with its label.
function renderGrounding(ex, boxes, images, offset) {
  const g = ex.el.grounding;
  g.replaceChildren();
  if (!boxes || !boxes.length) return;
  ex.answer.grounding = boxes;
  const byImage = new Map();
  boxes.forEach((b) => {
    if (!hasImage(b) || !images[offset + b.image_index]) return;
    const i = offset + b.image_index;
    if (!byImage.has(i)) byImage.set(i, []);
    byImage.get(i).push(b);
  });
  const labels = [...new Set(boxes.map((b) => b.label))];
  for (const [i, list] of [...byImage.entries()].sort((a, b) => a[0] - b[0])) {
    const fig = el("figure", "annotated");
    fig.dataset.imageIndex = String(i - offset);  // the server's image_index
    const stage = el("div", "stage");
    const img = el("img");
    img.addEventListener("load", followEnd);
    img.src = images[i].dataUrl;
    img.alt = images[i].name;
    stage.append(img);
    for (const b of list) {
      const [x1, y1, x2, y2] = b.box;
      const box = el("div", `box c${labels.indexOf(b.label) % 6}`);
      box.style.left = `${(x1 / 999) * 100}%`;
      box.style.top = `${(y1 / 999) * 100}%`;
      box.style.width = `${(Math.max(x2 - x1, 0) / 999) * 100}%`;
      box.style.height = `${(Math.max(y2 - y1, 0) / 999) * 100}%`;
      box.append(el("span", "box-label", b.label));
      stage.append(box);
    }
    fig.append(stage, el("figcaption", null, `Image ${i + 1} of the conversation (${images[i].name}): ` +
                         `${list.length} box${list.length === 1 ? "" : "es"}`));
    g.append(fig);
  }
  const text = boxesText(boxes, offset);
  const area = el("textarea", "boxes-text");
  area.readOnly = true;
  area.value = text;
  area.rows = Math.min(boxes.length + 2, 10);
  const copy = el("button", "link", "Copy boxes");
  copy.type = "button";
  copy.addEventListener("click", () => copyText(text, area, copy));
  const row = el("div", "boxes-row");
  row.append(el("span", "boxes-title", "Boxes (label, box in 0..999, box in pixels, image number):"), copy);
  g.append(row, area);
}

// ---------------------------------------------------------------------------- requests

// The messages sent for exchange `upto`: the exchanges before it that got an answer (a
// stopped-before-any-text or failed one is not part of the conversation), then its own
// user message. `images[k]` are the images of message k.
function conversation(upto) {
  const messages = [];
  const images = [];
  const add = (user) => {
    const content = user.images.map((im) => ({type: "image_url", image_url: {url: im.dataUrl}}));
    if (user.text) content.push({type: "text", text: user.text});
    messages.push({role: "user", content});
    images.push(user.images);
  };
  for (const ex of state.exchanges.slice(0, upto)) {
    if (!ex.answer || !ex.answer.text) continue;
    add(ex.user);
    messages.push({role: "assistant", content: ex.answer.text});
    images.push([]);
  }
  add(state.exchanges[upto].user);
  return {messages, images};
}

// A box's image_index counts the images of the messages the server kept; it reports how
// many of the oldest messages it dropped, so the image is number offset + image_index of
// all the images sent (`images[k]`: those of message k).
function imageOffset(images, dropped) {
  return images.slice(0, dropped || 0).flat().length;
}

function number(id, integer) {
  const input = $(id);
  const raw = input.value.trim();
  if (raw === "") return state.config.defaults[id];
  const v = Number(raw);
  if (!Number.isFinite(v) || (integer && !Number.isInteger(v))) {
    throw new UserError(`${input.labels[0].firstChild.textContent.trim()} must be ${integer ? "a whole number" : "a number"}, got "${raw}".`);
  }
  return v;
}

function samplingOptions() {
  return {temperature: number("temperature", false), top_p: number("top_p", false),
          max_tokens: number("max_new_tokens", true)};
}

class ApiError extends Error {}

// fetch with the API key, when the user gave one.
function api(path, options = {}) {
  const headers = {...(options.headers || {})};
  if (state.apiKey) headers["Authorization"] = `Bearer ${state.apiKey}`;
  return fetch(path, {...options, headers});
}

function askForKey() {
  $("key-row").hidden = false;
  showNotice("This server needs an API key: enter it in the API key field on the right (it stays in this tab only).");
}

async function errorMessage(res) {
  try {
    const body = await res.json();
    const msg = body && body.error && body.error.message;
    if (typeof msg === "string" && msg) return msg;
    if (body && typeof body.detail === "string") return body.detail;
  } catch (e) { /* not JSON */ }
  return `The server answered ${res.status} ${res.statusText}.`;
}

// POST a streamed chat request; onChunk(obj) for every `data:` event until [DONE].
async function streamChat(body, signal, onChunk) {
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

function setBusy(busy) {
  state.busy = busy;
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("regenerate").disabled = busy || state.exchanges.length === 0;
  if (!busy) $("prompt").focus();
}

// Run exchange `index` (a new message, or the last one again for Regenerate).
async function run(index, fresh) {
  const ex = state.exchanges[index];
  let options;
  try {
    options = samplingOptions();
  } catch (e) {
    showNotice(e.message);
    if (fresh) withdraw(index);
    return;
  }
  const {messages, images} = conversation(index);
  ex.answer = {text: "", status: "streaming"};
  ex.el.note.hidden = true;
  ex.el.grounding.replaceChildren();
  setAnswerText(ex);
  setMeta(ex);
  hideNotice();
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  setStatus("generating…");
  const body = {messages, stream: true, stream_options: {include_usage: true}, truncate_history: true, ...options};
  if (state.model) body.model = state.model;
  let finish = null;
  let dropped = 0;
  try {
    await streamChat(body, controller.signal, (chunk) => {
      if (chunk.error) throw new ApiError(chunk.error.message || "the server reported an error");
      if (chunk.dropped_turns > 0 && !ex.answer.dropped) showDropped(ex, chunk.dropped_turns);
      if (typeof chunk.dropped_turns === "number") dropped = chunk.dropped_turns;
      const choice = chunk.choices && chunk.choices[0];
      const delta = choice && choice.delta && choice.delta.content;
      if (delta) {
        ex.answer.text += delta;
        setAnswerText(ex);
      }
      if (choice && choice.finish_reason) finish = choice.finish_reason;
      if (chunk.usage) ex.answer.usage = chunk.usage;
      const boxes = choice && choice.delta && choice.delta.grounding;
      if (boxes) renderGrounding(ex, boxes, images.flat(), imageOffset(images, dropped));
    });
    ex.answer.status = finish || "stop";
  } catch (e) {
    if (e.name === "AbortError") {
      ex.answer.status = "stopped";
    } else if (fresh && !ex.answer.text && e instanceof ApiError) {
      withdraw(index);  // the server refused the message: give it back to fix and resend
      showNotice(e.message);
      return;
    } else {
      ex.answer.status = "error";
      showNotice(e instanceof ApiError ? e.message : "Something went wrong while reading the answer; try again.");
      if (!(e instanceof ApiError)) console.error(e);
    }
  } finally {
    if (state.controller === controller) {
      state.controller = null;
      setBusy(false);
      setStatus("");
    }
  }
  setMeta(ex);
}

// Take exchange `index` (the last) out of the conversation and put it back in the composer.
function withdraw(index) {
  const [ex] = state.exchanges.splice(index, 1);
  ex.el.wrap.remove();
  if (!$("prompt").value) $("prompt").value = ex.user.text;
  if (!state.pending.length) state.pending = ex.user.images;
  renderPending();
  $("empty-hint").hidden = state.exchanges.length > 0;
  $("regenerate").disabled = state.busy || state.exchanges.length === 0;
}

function send() {
  if (state.busy) return;
  const text = $("prompt").value.trim();
  if (!text && !state.pending.length) {
    showNotice("The message is empty: type a question (and attach images if you like).");
    return;
  }
  const ex = {user: {text, images: state.pending}, answer: null};
  state.pending = [];
  renderPending();
  $("prompt").value = "";
  state.exchanges.push(ex);
  renderExchange(ex);
  run(state.exchanges.length - 1, true);
}

function stop() {
  if (state.controller) state.controller.abort();
}

function regenerate() {
  if (state.busy || !state.exchanges.length) return;
  run(state.exchanges.length - 1, false);
}

function clearAll() {
  stop();
  state.exchanges = [];
  for (const wrap of [...$("history").querySelectorAll(".exchange")]) wrap.remove();
  $("empty-hint").hidden = false;
  hideNotice();
  setBusy(false);
}

// ---------------------------------------------------------------------------- set-up

function applyDefaults() {
  const d = state.config.defaults;
  for (const id of ["temperature", "top_p", "max_new_tokens"]) {
    $(id).value = String(d[id]);
    $(`${id}-default`).textContent = `default ${d[id]}`;
  }
}

function renderExamples() {
  const box = $("examples");
  box.replaceChildren();
  for (const ex of state.config.examples) {
    const b = el("button", "example");
    b.type = "button";
    const img = el("img");
    img.src = ex.url;
    img.alt = "";
    b.append(img, el("span", null, ex.title));
    b.title = ex.prompt;
    b.addEventListener("click", async () => {
      try {
        const res = await fetch(ex.url);
        if (!res.ok) throw new Error(String(res.status));
        const blob = await res.blob();
        await addFiles([new File([blob], ex.url.split("/").pop(), {type: blob.type})]);
        $("prompt").value = ex.prompt;
        $("prompt").focus();
      } catch (e) {
        showNotice("The example image could not be loaded.");
      }
    });
    box.append(b);
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Which model the server serves (its name, the demo flag, the context window); while
// it is still loading (503) ask again every 2 s, for at most 10 minutes.
async function loadModel() {
  for (let tries = 0; tries < 300; tries++) {
    let res;
    try {
      res = await api("/v1/models");
    } catch (e) {
      showNotice("Could not reach the server; is `dsvl2 serve` still running?");
      return;
    }
    if (res.status === 401) { askForKey(); return; }
    if (res.status === 503) { setStatus("the model is loading…"); await sleep(2000); continue; }
    if (!res.ok) { showNotice(await errorMessage(res)); return; }
    const m = (await res.json()).data[0];
    state.model = m.id;
    $("model-name").textContent = m.id;
    const ext = m.dsvl2 || {};
    $("demo-banner").hidden = !ext.demo;
    if (ext.context_window) {
      state.contextWindow = ext.context_window;
      $("max_new_tokens").max = String(ext.context_window);
    }
    setStatus("");
    document.body.dataset.ready = "1";
    return;
  }
}

async function loadInfo() {
  try {
    const res = await fetch("/web/config");
    if (res.ok) state.config = await res.json();
  } catch (e) { /* keep the built-in defaults */ }
  applyDefaults();
  renderExamples();
  await loadModel();
}

function wire() {
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  $("attach").addEventListener("click", () => $("file-input").click());
  $("file-input").addEventListener("change", async (e) => {
    const files = [...e.target.files];
    e.target.value = "";  // choosing the same file again fires change again
    await addFiles(files);
  });
  $("stop").addEventListener("click", stop);
  $("regenerate").addEventListener("click", regenerate);
  $("clear").addEventListener("click", clearAll);
  $("reset-settings").addEventListener("click", applyDefaults);
  $("notice-close").addEventListener("click", hideNotice);
  $("api-key").addEventListener("change", (e) => { state.apiKey = e.target.value.trim(); hideNotice(); loadModel(); });
  // Drag and drop anywhere on the page; paste anywhere (images from the clipboard).
  document.addEventListener("dragover", (e) => { e.preventDefault(); document.body.classList.add("dragging"); });
  document.addEventListener("dragleave", (e) => { if (!e.relatedTarget) document.body.classList.remove("dragging"); });
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    document.body.classList.remove("dragging");
    const files = [...(e.dataTransfer ? e.dataTransfer.files : [])];
    if (files.length) addFiles(files);
  });
  document.addEventListener("paste", (e) => {
    const files = [...(e.clipboardData ? e.clipboardData.files : [])];
    if (files.length) { e.preventDefault(); addFiles(files); }
  });
}

wire();
loadInfo();
