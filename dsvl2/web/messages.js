// The history on the page: one exchange (the user's message and the model's answer) at
// a time, the answer's text as it streams, its status line and the dropped-turns note.
//
// The answer is text: model output is never parsed as HTML, so grounding markup and any
// tags in it show as they are.

import {state} from "./state.js";
import {$, el, scrollToEnd} from "./dom.js";
import {thumb} from "./images.js";

// Adds the exchange's elements to the history; `ex.el` keeps the parts later updated.
export function renderExchange(ex) {
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

export function setAnswerText(ex) {
  ex.el.text.textContent = ex.answer.text;
  scrollToEnd();
}

const FINISH = {
  stop: "done", length: "stopped at the token limit (max new tokens or the context window)",
  stopped: "stopped", error: "failed", cancelled: "cancelled",
};

// The line under the answer; the exchange's data-status is what the page's tests wait on.
export function setMeta(ex) {
  const a = ex.answer;
  let text = FINISH[a.status] || (a.status === "streaming" ? "generating…" : a.status);
  if (a.usage) text += ` · ${a.usage.prompt_tokens} prompt + ${a.usage.completion_tokens} answer tokens`;
  if (!a.text && a.status !== "streaming") text += " · no answer (not part of the conversation)";
  ex.el.meta.textContent = text;
  ex.el.wrap.dataset.status = a.status;
}

// Requests ask the server to drop the oldest turns when the history does not fit the
// context window (`truncate_history`); the answer says when it did.
export function showDropped(ex, n) {
  ex.answer.dropped = n;
  const win = state.contextWindow ? ` of ${state.contextWindow} tokens` : "";
  ex.el.note.textContent = `The conversation is longer than the model's context window${win} (images count ` +
    `too): the oldest ${n === 1 ? "message was" : `${n} messages were`} left out of this answer.`;
  ex.el.note.hidden = false;
}
