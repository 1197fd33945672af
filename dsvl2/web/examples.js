// The example buttons (from /web/config): each attaches its image and fills in its prompt.

import {state} from "./state.js";
import {$, el, showNotice} from "./dom.js";
import {addFiles} from "./images.js";

export function renderExamples() {
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
