// Grounding boxes: drawn on the image they name, and listed as text a user can copy.
//
// A box's image_index counts the images of the messages the server kept; it reports how
// many of the oldest messages it dropped (see imageOffset), so the box is drawn on image
// offset + image_index of all the images sent.

import {el, followEnd} from "./dom.js";

// `images[k]`: the images of message k of the request; `dropped`: how many of the oldest
// messages the server left out.
export function imageOffset(images, dropped) {
  return images.slice(0, dropped || 0).flat().length;
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

// One figure per referenced image: the image the box names, the boxes drawn at their
// 0..999 coordinates as percentages, each with its label. `images`: all the images sent.
export function renderGrounding(ex, boxes, images, offset) {
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
