// What this tab knows: its conversation, the images being attached, the request in
// flight, and what the server said about itself.
//
// The conversation lives here only (in this tab's memory); every request carries the
// history, so each tab is its own conversation and the server keeps none.

export const state = {
  exchanges: [],       // {user: {text, images: [{name, dataUrl, width, height}]}, answer, el}
  pending: [],         // images attached to the message being written
  controller: null,    // AbortController of the request in flight
  busy: false,
  model: null,         // id from /v1/models
  apiKey: "",          // only when the server was started with --api-key (kept in this tab only)
  contextWindow: null,
  // Replaced by /web/config; these are used when it cannot be read.
  config: {defaults: {temperature: 0, top_p: 1, max_new_tokens: 512},
           limits: {max_image_bytes: 20 * 1024 * 1024, max_image_pixels: 40e6, max_images_per_message: 8},
           examples: []},
};
