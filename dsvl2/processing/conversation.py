"""Conversations -> normalised turns -> the prompt pieces the model sees.

Two input formats are accepted and give identical tokens:

* the reference format: ``{"role": "<|User|>" | "<|Assistant|>" | "system",
  "content": str, "images": [...]}`` with ``<image>`` tags written in ``content``;
* OpenAI-style messages: ``role`` user / assistant / system, ``content`` a string or a
  list of parts ``{"type": "text", "text": ...}``, ``{"type": "image", "image": src}``
  (or a bare ``{"type": "image"}`` whose image is passed separately),
  ``{"type": "image_url", "image_url": {"url": ...}}`` (or ``"image_url": "..."``).
  Each image part becomes an ``<image>`` tag at its position and parts are joined with
  "\\n", so [image, text "Describe"] -> "<image>\\nDescribe", the reference's canonical
  layout.

Tags and images are matched globally in order, as in the reference (the images of one
message may serve the tags of another); each normalised turn then carries the images of
its own tags.

Text stays text in OpenAI-style messages: there images come only from image parts, and
an ``<image>`` written in a text part is those seven characters (tokenised as text, never
the image token). So is one in a string ``content`` when the conversation is OpenAI-style
throughout: roles ``user`` / ``assistant`` / ``system`` only, no message with an
``images`` key, and no ``images`` argument other than the images of bare image parts.
Otherwise (a ``<|User|>`` / ``<|Assistant|>`` role, an ``images`` key, images passed for
tags) the conversation is the reference's and every ``<image>`` in a string is a tag.
A turn records where its real tags are (``Turn.tags``) and ``prompt_pieces`` hands them
on (``Text``) to the processor.

What the model sees (``prompt_pieces``; the reference's ``sft_format`` string is NOT it):
bos; per user turn ``"<|User|>: " + text.strip() + "\\n\\n<|Assistant|>:"``; per assistant
turn ``text.strip()`` + eos; a system message (first only) contributes its stripped text
with no separator, glued to the following ``<|User|>``. A conversation ending in a user
turn gets an empty assistant turn (the generation prompt), which contributes nothing
(the reference emits its eos and then drops it).

Only what cannot be formatted is rejected (``ConversationError``): an empty
conversation, one with nothing to answer (no text but whitespace and no image: the model
would write ``max_new_tokens`` of output to nothing), unknown roles, a system message
that is not first, non-text content, image tags in system / assistant text, tag / image
count mismatch, and a final assistant turn with content (there would be nothing left
for the model to answer). Alternation is not checked, like the reference.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from typing import Any, Iterable, Iterator, Mapping, Sequence

from ..errors import ConversationError

__all__ = ["Turn", "Special", "Text", "normalize_conversation", "prompt_pieces", "IMAGE_TAG"]

IMAGE_TAG = "<image>"
USER_ROLE, ASSISTANT_ROLE = "<|User|>", "<|Assistant|>"

_ROLES = {
    "<|User|>": "user", "user": "user",
    "<|Assistant|>": "assistant", "assistant": "assistant",
    "system": "system",
}
_ALLOWED_ROLES = "'user', 'assistant', 'system' (or the reference's '<|User|>', '<|Assistant|>')"


@dataclasses.dataclass
class Turn:
    """One normalised message. ``role`` is 'system', 'user' or 'assistant'; ``text`` is
    the raw content with ``<image>`` tags; ``images`` the sources of those tags, in order.
    ``tags``: where in ``text`` the image tags start, when only some ``<image>`` in it are
    tags (an OpenAI-style message: the others are literal text); None: every one is (the
    only form when they all are)."""

    role: str
    text: str
    images: list = dataclasses.field(default_factory=list)
    tags: list[int] | None = None

    def tag_count(self) -> int:
        """How many image tags ``text`` holds (literal ``<image>`` text not counted)."""
        return self.text.count(IMAGE_TAG) if self.tags is None else len(self.tags)


class Text(str):
    """A prompt piece whose image tags are only those at ``tags`` (offsets); any other
    ``<image>`` in it is literal text. Plain ``str`` pieces: every ``<image>`` is a tag."""

    tags: tuple[int, ...]

    def __new__(cls, text: str, tags=()):
        obj = super().__new__(cls, text)
        obj.tags = tuple(tags)
        return obj

    def split_tags(self) -> list[str]:
        """The text between the image tags (like ``str.split(IMAGE_TAG)`` on the tags alone)."""
        parts, start = [], 0
        for at in self.tags:
            parts.append(str(self[start:at]))
            start = at + len(IMAGE_TAG)
        parts.append(str(self[start:]))
        return parts


class Special(enum.Enum):
    """Token placeholders in a prompt: the processor substitutes the tokenizer's ids."""

    BOS = "bos"
    EOS = "eos"


_MISSING = object()  # a bare {"type": "image"} part: its image comes from the images argument


def _image_part_source(part: Mapping, where: str):
    kind = part.get("type")
    if kind == "image":
        return part.get("image", _MISSING)
    url = part.get("image_url")
    if isinstance(url, Mapping):
        url = url.get("url")
    if not isinstance(url, str) or not url:
        raise ConversationError(f"{where}: an 'image_url' part needs {{'image_url': {{'url': ...}}}} "
                                f"or {{'image_url': '...'}}, got {part!r:.200}")
    return url


def _flatten_content(content: Any, where: str, literal: bool) -> tuple[str, list, list[int] | None]:
    """content -> (text with <image> tags, image sources in part order, where the tags are:
    None when every <image> in the text is one). A list's text parts are literal text;
    so is a string when ``literal`` (an OpenAI-style conversation)."""
    if isinstance(content, str):
        return content, [], [] if literal else None
    if not isinstance(content, (list, tuple)):
        raise ConversationError(f"{where}: 'content' must be a string or a list of parts, "
                                f"got {type(content).__name__}")
    pieces, images, tags = [], [], []
    at = 0  # where the next piece starts in the joined text

    def add(piece: str) -> None:
        nonlocal at
        pieces.append(piece)
        at += len(piece) + 1  # joined with "\n"

    for j, part in enumerate(content):
        if isinstance(part, str):
            add(part)
            continue
        if not isinstance(part, Mapping):
            raise ConversationError(f"{where}, part {j}: expected a dict like {{'type': 'text', 'text': ...}}, "
                                    f"got {type(part).__name__}")
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise ConversationError(f"{where}, part {j}: a text part needs a string 'text', got {text!r:.100}")
            add(text)
        elif kind in ("image", "image_url"):
            images.append(_image_part_source(part, f"{where}, part {j}"))
            tags.append(at)
            add(IMAGE_TAG)
        else:
            raise ConversationError(f"{where}, part {j}: unknown part type {kind!r}; "
                                    "allowed: 'text', 'image', 'image_url'")
    return "\n".join(pieces), images, tags


def _all_tags(text: str) -> list[int]:
    return [m.start() for m in re.finditer(re.escape(IMAGE_TAG), text)]


def _is_bare_image_part(part: Any) -> bool:
    return isinstance(part, Mapping) and part.get("type") == "image" and "image" not in part


def _openai_style(messages: list, images: Sequence | None) -> bool:
    """Is every string ``content`` of this conversation literal text (module docstring)?"""
    bare = False
    for m in messages:
        if not isinstance(m, Mapping):
            continue
        if m.get("role") in (USER_ROLE, ASSISTANT_ROLE) or "images" in m:
            return False
        content = m.get("content")
        if isinstance(content, (list, tuple)) and any(_is_bare_image_part(p) for p in content):
            bare = True
    return bare or not images


def normalize_conversation(messages: Sequence[Mapping[str, Any]], images: Sequence | None = None) -> list[Turn]:
    """Validate one conversation and return its turns, ending with an assistant turn.

    ``images`` (optional) supplies the images of bare ``{"type": "image"}`` parts, in
    order; if there are no such parts they are appended after the images attached to the
    messages (so a reference-format conversation may pass its images separately).

    Example::

        >>> turns = normalize_conversation([{"role": "user", "content": [
        ...     {"type": "image", "image": "cat.jpg"}, {"type": "text", "text": "Describe"}]}])
        >>> [(t.role, t.text, t.images) for t in turns]
        [('user', '<image>\\nDescribe', ['cat.jpg']), ('assistant', '', [])]
    """
    if isinstance(messages, (Mapping, str, bytes)) or not isinstance(messages, Iterable):
        raise ConversationError("a conversation is a list of messages (dicts with 'role' and 'content'), "
                                f"got a {type(messages).__name__}")
    if images is not None and not isinstance(images, (list, tuple)):
        raise ConversationError(f"images must be a list of image sources (or None), got a {type(images).__name__}")
    messages = list(messages)
    if not messages:
        raise ConversationError("the conversation is empty; it needs at least one message")

    extra = list(images) if images is not None else []
    literal = _openai_style(messages, extra)
    extra_iter: Iterator = iter(extra)
    used_extra = 0
    turns: list[Turn] = []
    sources: list = []  # every image of the conversation, in tag order
    for i, msg in enumerate(messages):
        where = f"message {i}"
        if not isinstance(msg, Mapping):
            raise ConversationError(f"{where}: expected a dict with 'role' and 'content', got {type(msg).__name__}")
        raw_role = msg.get("role")
        role = _ROLES.get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            raise ConversationError(f"{where}: unknown role {raw_role!r}; allowed roles: {_ALLOWED_ROLES}")
        if role == "system" and i != 0:
            raise ConversationError(f"{where}: a 'system' message is only allowed as the first message")
        if "content" not in msg:
            raise ConversationError(f"{where} ({raw_role}): has no 'content'")
        text, msg_images, tags = _flatten_content(msg["content"], f"{where} ({raw_role})", literal)
        for k, src in enumerate(msg_images):
            if src is _MISSING:
                try:
                    msg_images[k] = next(extra_iter)
                    used_extra += 1
                except StopIteration:
                    raise ConversationError(
                        f"{where}: an image part has no image and the images argument has only "
                        f"{len(extra)}; give the part an 'image' key or pass one image per bare part") from None
        attached = msg.get("images")
        if attached is None:
            attached = []
        elif not isinstance(attached, (list, tuple)):
            attached = [attached]  # a single path / PIL image / bytes
        msg_images = list(msg_images) + list(attached)
        if tags is not None and tags == _all_tags(text):
            tags = None  # every <image> in it is a tag: the plain form
        turn = Turn(role, text, [], tags)
        if role != "user" and (turn.tag_count() or msg_images):
            raise ConversationError(f"{where}: images are only allowed in user messages, not in a "
                                    f"{role!r} message")
        turns.append(turn)
        sources.extend(msg_images)
    if used_extra == 0:
        sources.extend(extra)
    elif used_extra < len(extra):
        raise ConversationError(f"{len(extra)} images were passed but only {used_extra} image parts need one")

    n_tags = sum(t.tag_count() for t in turns)
    if n_tags != len(sources):
        raise ConversationError(
            f"the conversation has {n_tags} '{IMAGE_TAG}' tag(s) but {len(sources)} image(s); "
            f"there must be exactly one image per tag ({'add images' if n_tags > len(sources) else 'add tags'})")
    k = 0
    for t in turns:  # give each turn the images of its own tags (global order, as the reference)
        n = t.tag_count()
        t.images = sources[k:k + n]
        k += n

    if not sources and not any(t.text.strip() for t in turns):
        raise ConversationError("the conversation has no text and no image: there is nothing to answer "
                                "(an empty prompt)")
    last = turns[-1]
    if last.role == "assistant":
        if last.text.strip():
            raise ConversationError(
                "the conversation ends with a non-empty assistant message; end it with a user message "
                "(or an empty assistant message) so that the model has something to answer")
    else:
        turns.append(Turn("assistant", ""))
    return turns


def prompt_pieces(turns: Sequence[Turn]) -> list[str | Special]:
    """The pieces the model sees: text (with ``<image>`` tags) and bos / eos placeholders.
    A turn with literal ``<image>`` text (``Turn.tags`` set) gives a ``Text`` piece that
    says which ``<image>`` in it are tags.

    Example (c07 of the oracle)::

        system "You are helpful."; user "<image>\\nHi"; assistant "Hello"; user "More?"; assistant ""
        -> [BOS, "You are helpful.", "<|User|>: <image>\\nHi\\n\\n<|Assistant|>:", "Hello", EOS,
            "<|User|>: More?\\n\\n<|Assistant|>:"]
    """
    pieces: list[str | Special] = [Special.BOS]
    for idx, t in enumerate(turns):
        if t.role == "system":
            pieces.append(_piece(t, ""))
        elif t.role == "user":
            pieces.append(_piece(t, f"{USER_ROLE}: ", f"\n\n{ASSISTANT_ROLE}:"))
        else:
            if idx == len(turns) - 1:
                continue  # the generation prompt: its eos is dropped (inference mode)
            pieces.append(_piece(t, ""))
            pieces.append(Special.EOS)
    return pieces


def _piece(t: Turn, before: str, after: str = "") -> str:
    """``before + t.text.strip() + after``; a ``Text`` with the tags' new offsets when only
    some ``<image>`` in the turn are tags."""
    body = t.text.strip()
    text = before + body + after
    if t.tags is None:
        return text
    shift = len(before) - (len(t.text) - len(t.text.lstrip()))
    return Text(text, [at + shift for at in t.tags])
