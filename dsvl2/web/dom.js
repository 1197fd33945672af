// Small DOM helpers, the notice (a message for the user) and the status line.
//
// Model output, file names and server messages are always put in the page with
// textContent, never parsed as HTML (the page uses no innerHTML at all).

import {state} from "./state.js";

export const $ = (id) => document.getElementById(id);

// A message for the user (shown as is), as opposed to a bug.
export class UserError extends Error {}

export function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

export function showNotice(message) {
  $("notice-text").textContent = message;
  $("notice").hidden = false;
}

export function hideNotice() {
  $("notice").hidden = true;
  $("notice-text").textContent = "";
}

export function setStatus(text) {
  $("status").textContent = text;
}

export function scrollToEnd() {
  window.scrollTo(0, document.documentElement.scrollHeight);
}

// An image that finished loading made the page taller: keep the end in view while an
// answer is coming or has just come (not when the user scrolled up to read).
export function followEnd() {
  const doc = document.documentElement;
  if (state.busy || doc.scrollHeight - (window.scrollY + window.innerHeight) < 600) scrollToEnd();
}
