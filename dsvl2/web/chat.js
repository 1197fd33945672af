// The chat actions: Send, Stop, Regenerate, Clear, and running one exchange's request.
//
// Requests ask the server to drop the oldest turns when the history does not fit the
// context window (`truncate_history`). A message the server refuses before answering is
// taken back out of the history and put back in the composer, to fix and resend.

import {state} from "./state.js";
import {$, hideNotice, setStatus, showNotice} from "./dom.js";
import {ApiError, streamChat} from "./api.js";
import {conversation} from "./conversation.js";
import {imageOffset, renderGrounding} from "./grounding.js";
import {renderPending} from "./images.js";
import {renderExchange, setAnswerText, setMeta, showDropped} from "./messages.js";
import {samplingOptions} from "./settings.js";

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
  const {messages, images} = conversation(state.exchanges, index);
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

export function send() {
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

export function stop() {
  if (state.controller) state.controller.abort();
}

export function regenerate() {
  if (state.busy || !state.exchanges.length) return;
  run(state.exchanges.length - 1, false);
}

export function clearAll() {
  stop();
  state.exchanges = [];
  for (const wrap of [...$("history").querySelectorAll(".exchange")]) wrap.remove();
  $("empty-hint").hidden = false;
  hideNotice();
  setBusy(false);
}
