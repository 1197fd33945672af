// The dsvl2 chat page: a client of the server's own OpenAI-compatible API. This module
// starts it: it reads the page's config and the served model, and wires the controls.
//
// The page is ES modules loaded by the browser as they are (no build step), one idea each:
//   state.js         what this tab knows (its conversation lives here only)
//   dom.js           DOM helpers, the notice and the status line
//   api.js           fetch with the API key, error messages, the streamed chat request
//   conversation.js  the messages a request sends
//   chat.js          Send, Stop, Regenerate, Clear: running an exchange's request
//   messages.js      the history: user messages, answers, their status lines
//   grounding.js     boxes drawn on the image they name, and as text to copy
//   images.js        checking and attaching images, thumbnails
//   settings.js      the sampling controls and their defaults
//   examples.js      the example buttons

import {state} from "./state.js";
import {$, hideNotice, setStatus, showNotice} from "./dom.js";
import {api, askForKey, errorMessage} from "./api.js";
import {clearAll, regenerate, send, stop} from "./chat.js";
import {renderExamples} from "./examples.js";
import {addFiles} from "./images.js";
import {applyDefaults} from "./settings.js";

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
