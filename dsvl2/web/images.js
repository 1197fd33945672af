// Images: checking a file before it is attached, the attached (pending) images, thumbnails.
//
// Images are checked here before they are attached (a real image by its first bytes,
// file size, pixel count) so that a wrong file gets a plain message at once; the server
// checks them again and its error messages are shown the same way.

import {state} from "./state.js";
import {$, UserError, el, followEnd, hideNotice, showNotice} from "./dom.js";

function megabytes(n) {
  return (n / (1024 * 1024)).toFixed(1) + " MB";
}

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

// Attach files to the message being written; the ones that cannot be are named in a notice.
export async function addFiles(files) {
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

export function thumb(image) {
  const img = el("img", "thumb");
  img.addEventListener("load", followEnd);
  img.src = image.dataUrl;
  img.alt = image.name;
  img.title = `${image.name} (${image.width}×${image.height})`;
  return img;
}

export function renderPending() {
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
