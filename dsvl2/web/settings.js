// The sampling controls: their defaults (the engine's, from /web/config) and the values
// a request sends. An empty field means its default.

import {state} from "./state.js";
import {$, UserError} from "./dom.js";

const FIELDS = ["temperature", "top_p", "max_new_tokens"];

export function applyDefaults() {
  const d = state.config.defaults;
  for (const id of FIELDS) {
    $(id).value = String(d[id]);
    $(`${id}-default`).textContent = `default ${d[id]}`;
  }
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

// The request's sampling fields; a UserError names a field that is not a number.
export function samplingOptions() {
  return {temperature: number("temperature", false), top_p: number("top_p", false),
          max_tokens: number("max_new_tokens", true)};
}
