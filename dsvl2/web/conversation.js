// The messages a request sends: the conversation so far in the API's (OpenAI's) shape.

// The messages sent for exchange `upto` of `exchanges`: the exchanges before it that got
// an answer (a stopped-before-any-text or failed one is not part of the conversation),
// then its own user message. `images[k]` are the images of message k.
export function conversation(exchanges, upto) {
  const messages = [];
  const images = [];
  const add = (user) => {
    const content = user.images.map((im) => ({type: "image_url", image_url: {url: im.dataUrl}}));
    if (user.text) content.push({type: "text", text: user.text});
    messages.push({role: "user", content});
    images.push(user.images);
  };
  for (const ex of exchanges.slice(0, upto)) {
    if (!ex.answer || !ex.answer.text) continue;
    add(ex.user);
    messages.push({role: "assistant", content: ex.answer.text});
    images.push([]);
  }
  add(exchanges[upto].user);
  return {messages, images};
}
