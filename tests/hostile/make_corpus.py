"""The hostile-input corpus: small files and requests that attack the input path, each with
the outcome dsvl2 promises for it.

    python tests/hostile/make_corpus.py OUT_DIR     # writes the files + manifest.json
    python tests/hostile/make_corpus.py --table     # the README's table of items

``build(dir)`` writes every file (all generated here, deterministically, none over ~70 kB)
and returns the ``Item`` list; ``manifest.json`` holds the same list for tools in other
languages or processes (the server's tests). README.md in this folder is the table of
decisions.

Three kinds of item:

* ``image``: one file, fed as the only image of a one-turn chat. ``size`` is the size of
  the RGB image it must load as (ok items) and ``pixels`` optional exact RGB values at
  points, where the behaviour is defined.
* ``request``: a whole request, ``{"messages", "images", "sampling"}``. Messages are
  OpenAI style (parts ``{"type": "image", "image": NAME}``) or reference style
  (``"images": [NAME, ...]`` beside ``<image>`` tags); NAME is a file of the corpus,
  ``resolve`` turns names into paths. ``prompt`` (a plain string) is used instead of
  ``messages`` for the prompt-string convenience.
* ``grounding``: model output text with markup; ``boxes`` are the boxes (0..999) that
  ``parse_grounding`` must find.

``expect`` is ``"ok"`` or the name of a ``dsvl2.errors`` class; ``match`` a regular
expression the error message must contain (it names the problem); ``check`` names a
property an ok request must show (implemented by tests/test_hostile.py, explained in
README.md). ``cli`` marks the items also run through the real ``python -m dsvl2`` process
(the rest go through the CLI in-process: every subprocess costs seconds of imports).

Sampling values such as NaN are Python floats here; manifest.json writes them as the
non-standard JSON tokens NaN / Infinity, which Python's json module reads back.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import struct
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["Item", "items", "build", "resolve", "table", "SMALL"]

SMALL = "small.png"  # the ordinary image of the request items (64 x 48 -> 1 local tile)


@dataclasses.dataclass(frozen=True)
class Item:
    name: str
    kind: str  # "image" | "request" | "grounding"
    expect: str  # "ok" or a dsvl2.errors class name
    behaviour: str  # one sentence for the README table: what happens and why
    match: str = ""  # regex the error message must contain
    file: str | None = None  # image items: file name in the corpus folder
    size: tuple[int, int] | None = None  # image items: size of the loaded RGB image
    pixels: tuple = ()  # image items: ((x, y), (r, g, b)) pairs the RGB image must hold
    request: dict | None = None  # request items
    check: str = ""  # request items: a named property (see README.md)
    text: str | None = None  # grounding items: the model output
    boxes: tuple = ()  # grounding items: expected boxes, 0..999
    noted: bool = False  # grounding items: the parse must report problems (malformed markup)
    cli: bool = False  # also run through the real CLI process


# ---------------------------------------------------------------------------- encoders


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height 1-bit pixels, with one row of data:
    Pillow refuses it by its declared size, before any decompression."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, greyscale
    row = b"\x00" + b"\x00" * ((width + 7) // 8)  # filter byte + one row
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(row, 9)) + _png_chunk(b"IEND", b""))


def _png_text_bomb() -> bytes:
    """A small valid PNG with a zTXt chunk that inflates to 8 MB of zeros."""
    ok = _encode(Image.new("L", (4, 4)), "PNG")
    ztxt = b"Comment\x00\x00" + zlib.compress(b"\x00" * 8_000_000, 9)
    return ok[:33] + _png_chunk(b"zTXt", ztxt) + ok[33:]  # after the signature (8) and IHDR (25)


def _gif_bomb(width: int, height: int) -> bytes:
    """A GIF whose logical screen and only frame claim width x height."""
    head = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return head + frame + b"\x3b"


def _jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    """Patch the frame header (SOF0) of a baseline JPEG to declare another size."""
    i = data.index(b"\xff\xc0")
    # SOF0: marker, length (2), precision (1), height (2), width (2)
    return data[:i + 5] + struct.pack(">HH", height, width) + data[i + 9:]


def _flip(data: bytes, start: int, n: int = 16) -> bytes:
    b = bytearray(data)
    for k in range(start, min(start + n, len(b))):
        b[k] ^= 0xFF
    return bytes(b)


def _zero(data: bytes, start: int, n: int = 16) -> bytes:
    return data[:start] + b"\x00" * n + data[start + n:]


def _exif_rotated_jpeg() -> bytes:
    """A 40 x 20 JPEG, left half red, right half blue, with EXIF Orientation 6 ("rotate
    90 degrees clockwise to display")."""
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(img, "JPEG", quality=95, exif=exif.tobytes())


def _animation(fmt: str) -> bytes:
    frames = [Image.new("RGB", (32, 24), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return _encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def _mode_image(mode: str) -> Image.Image:
    """A 16 x 8 image of ``mode``: left half the mode's lowest value, right half its highest."""
    w, h = 16, 8
    if mode == "I;16":
        arr = np.zeros((h, w), np.uint16)
        arr[:, w // 2:] = 65535
        return Image.fromarray(arr)  # mode I;16
    if mode == "I":
        arr = np.zeros((h, w), np.int32)
        arr[:, w // 2:] = 70000  # beyond 8 bits: clipped to 255
        return Image.fromarray(arr)
    if mode == "F":
        arr = np.zeros((h, w), np.float32)
        arr[:, w // 2:] = 300.0  # clipped to 255
        return Image.fromarray(arr)
    low = {"1": 0, "L": 0, "LA": (0, 255), "RGBA": (0, 0, 0, 255), "CMYK": (0, 0, 0, 255)}
    high = {"1": 1, "L": 255, "LA": (255, 0), "RGBA": (255, 255, 255, 0), "CMYK": (0, 0, 0, 0)}
    img = Image.new(mode, (w, h), low[mode])
    img.paste(high[mode], (w // 2, 0, w, h))
    return img


def _palette_with_transparency() -> bytes:
    img = Image.new("P", (16, 8), 0)
    img.putpalette([10, 20, 30, 200, 100, 50] + [0, 0, 0] * 254)
    img.paste(1, (8, 0, 16, 8))
    return _encode(img, "PNG", transparency=1)  # palette entry 1 is fully transparent


# ---------------------------------------------------------------------------- items


def _image_items(files: dict[str, bytes]) -> list[Item]:
    """The image items; their files go into ``files`` (name -> bytes)."""
    items: list[Item] = []

    def add(name: str, data: bytes, expect: str, behaviour: str, match: str = "", size=None,
            pixels: tuple = (), cli: bool = False) -> None:
        files[name] = data
        items.append(Item(name.replace(".", "_").replace(";", "_"), "image", expect, behaviour, match,
                          file=name, size=size, pixels=pixels, cli=cli))

    base = _noise(64, 48)
    files[SMALL] = _encode(base, "PNG")
    encoded = {fmt: _encode(base, fmt) for fmt in ("JPEG", "PNG", "GIF", "WEBP")}
    corrupt = "corrupt or truncated"
    unknown = "not an image Pillow can read"
    for fmt, data in encoded.items():
        ext = fmt.lower()
        add(f"truncated.{ext}", data[:len(data) // 2], "ImageError",
            f"{fmt} cut in half: decoding is forced inside the loader, so the error names the file", corrupt)
    add("corrupt_header.jpeg", _zero(encoded["JPEG"], 8), "ImageError",
        "JPEG with zeroed header segments: libjpeg refuses the stream", corrupt)
    add("corrupt_header.png", _zero(encoded["PNG"], 8), "ImageError",
        "PNG with a zeroed IHDR: not recognised as a PNG", unknown)
    add("corrupt_data.png", _flip(encoded["PNG"], len(encoded["PNG"]) // 3), "ImageError",
        "PNG with flipped bytes in IDAT: zlib stream error", corrupt)
    add("corrupt_data.gif", _flip(encoded["GIF"], len(encoded["GIF"]) // 3), "ImageError",
        "GIF with flipped bytes in the LZW data", corrupt)
    add("corrupt_header.gif", _zero(encoded["GIF"], 6), "ImageError",
        "GIF with a zeroed logical screen descriptor", unknown)
    add("corrupt_header.webp", _zero(encoded["WEBP"], 8), "ImageError",
        "WebP with a zeroed RIFF form type", unknown)
    add("corrupt_data.jpeg", _flip(encoded["JPEG"], len(encoded["JPEG"]) // 3), "ok",
        "JPEG with flipped bytes in the entropy-coded data: libjpeg conceals the damage and "
        "returns an image (as the reference would); the model sees the damaged pixels", size=(64, 48))
    add("corrupt_data.webp", _flip(encoded["WEBP"], len(encoded["WEBP"]) // 3), "ok",
        "WebP with flipped bytes in the VP8 data: libwebp decodes it with damage, like JPEG", size=(64, 48))

    add("empty.png", b"", "ImageError", "zero bytes", unknown)
    add("text.txt", b"this is not an image\n" * 10, "ImageError", "a text file", unknown)
    add("data.json", json.dumps({"image": [1, 2, 3]}).encode(), "ImageError", "a JSON file", unknown)
    add("random.bin", np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(), "ImageError",
        "4 kB of random bytes", unknown)
    add("vector.svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="48">'
        b'<rect width="64" height="48" fill="red"/></svg>', "ImageError",
        "SVG: Pillow has no SVG decoder and dsvl2 renders no vector graphics (nothing is executed)", unknown)

    too_large = "too large to decode safely"
    add("bomb.png", _png_bomb(100_000, 100_000), "ImageTooLargeError",
        "PNG of ~100 bytes declaring 100000 x 100000 (10^10 pixels): refused from its header, "
        "before any decompression (Pillow's limit: 2 x MAX_IMAGE_PIXELS = 178956970 pixels)", too_large, cli=True)
    add("bomb.gif", _gif_bomb(65535, 65535), "ImageTooLargeError",
        "GIF declaring 65535 x 65535: refused from its header", too_large)
    add("bomb.jpeg", _jpeg_with_size(encoded["JPEG"], 65500, 65500), "ImageTooLargeError",
        "JPEG whose frame header declares 65500 x 65500: refused from its header", too_large)
    add("text_bomb.png", _png_text_bomb(), "ImageError",
        "PNG with a zTXt chunk inflating to 8 MB (2 kB on disk): Pillow stops at its 1 MB text-chunk limit",
        "corrupt or truncated.*too large")

    for w, h in ((1, 1), (1, 20000), (20000, 1)):
        add(f"size_{w}x{h}.png", _encode(Image.new("RGB", (w, h), (200, 30, 30)), "PNG"), "ok",
            f"a {w} x {h} image: tiled like any other (the sliver becomes a thin line on the grey canvas; "
            "best resolution 384 x 384, 421 image tokens)", size=(w, h))

    white, black = (255, 255, 255), (0, 0, 0)
    left, right = (0, 0), (15, 7)
    modes = {
        "1": ("1-bit", black, white),
        "L": ("8-bit grey", black, white),
        "LA": ("grey + alpha: alpha dropped, no compositing (a transparent white pixel stays white)", black, white),
        "RGBA": ("RGBA: alpha dropped, no compositing (transparent white stays white)", black, white),
        "I;16": ("16-bit grey: extremes map to 0 and 255", black, white),
        "I": ("32-bit int grey: values clipped to 0..255", black, white),
        "F": ("32-bit float grey: values clipped to 0..255", black, white),
    }
    for mode, (what, lo, hi) in modes.items():
        fmt = "TIFF" if mode in ("I", "F") else "PNG"
        name = "mode_" + mode.replace(";", "_") + "." + fmt.lower()
        add(name, _encode(_mode_image(mode), fmt), "ok", f"mode {mode} ({what}), converted with convert('RGB') "
            "as the reference does", size=(16, 8), pixels=((left, lo), (right, hi)))
    add("mode_CMYK.jpeg", _encode(_mode_image("CMYK"), "JPEG", quality=100), "ok",
        "mode CMYK (JPEG): Pillow's CMYK -> RGB conversion (K=255 black, all-zero white)", size=(16, 8),
        pixels=((left, black), (right, white)))
    add("mode_P_transparent.png", _palette_with_transparency(), "ok",
        "mode P with a transparent palette entry: the entry's colour is kept, transparency dropped",
        size=(16, 8), pixels=((left, (10, 20, 30)), (right, (200, 100, 50))))

    add("exif_rotated.jpeg", _exif_rotated_jpeg(), "ok",
        "EXIF Orientation 6: NOT applied (the reference opens + convert('RGB') with no exif_transpose), "
        "so the image stays 40 x 20 as stored, red on the left", size=(40, 20),
        pixels=(((2, 10), (255, 0, 0)), ((37, 10), (0, 0, 255))), cli=True)
    add("animated.gif", _animation("GIF"), "ok", "animated GIF (red, green, blue frames): the first frame only",
        size=(32, 24), pixels=(((5, 5), (255, 0, 0)),))
    add("animated.png", _animation("PNG"), "ok", "APNG (red, green, blue frames): the default image (first frame) only",
        size=(32, 24), pixels=(((5, 5), (255, 0, 0)),))
    return items


def _img(name: str = SMALL) -> dict:
    return {"type": "image", "image": name}


def _user(*parts) -> dict:
    return {"role": "user", "content": [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]}


def _request_items() -> list[Item]:
    R = []

    def add(name, expect, behaviour, *, match="", messages=None, prompt=None, images=None, sampling=None,
            check="", cli=False):
        req: dict[str, Any] = {"sampling": {"max_new_tokens": 2, **(sampling or {})}}
        if prompt is not None:
            req["prompt"] = prompt
        else:
            req["messages"] = messages
        if images is not None:
            req["images"] = images
        R.append(Item(name, "request", expect, behaviour, match, request=req, check=check, cli=cli))

    one = [_user(_img(), "Describe this image.")]
    add("baseline", "ok", "one image and a question: answered", messages=one, check="answers")
    add("images_100", "ConversationError",
        "100 images in one conversation: refused before any image is decoded (at most 16 images; with more "
        "than 2 images each costs 421 tokens, so 10 already exceed the 4096-token window)",
        match="100 images.*at most 16", messages=[_user(*[_img()] * 100, "Compare.")], check="no_decode")
    add("images_over_window", "GenerationError",
        "10 images (10 x 421 image tokens > 4096): refused before the model runs, naming the count and the window",
        match="prompt tokens.*context window is 4096", messages=[_user(*[_img()] * 10, "Compare.")])
    add("tags_more_than_images", "ConversationError", "two <image> tags, one image",
        match="2 '<image>' tag.*1 image", messages=[{"role": "user", "content": "<image>\n<image>\nCompare.",
                                                     "images": [SMALL]}])
    add("images_more_than_tags", "ConversationError", "one <image> tag, two images",
        match="1 '<image>' tag.*2 image", messages=[{"role": "user", "content": "<image>\nDescribe.",
                                                     "images": [SMALL, SMALL]}])
    add("prompt_tag_mismatch", "ConversationError",
        "prompt string with one <image> tag and two images (the convenience adds tags only when there are none)",
        match="1 '<image>' tag.*2 image", prompt="<image> Describe.", images=[SMALL, SMALL])
    data_url = "data:image/png;base64,"
    add("data_url_bomb", "ImageTooLargeError", "the 100000 x 100000 PNG bomb as a data: URL: refused from its header",
        match="too large to decode safely", messages=[_user({"type": "image_url", "image_url": {
            "url": data_url + base64.b64encode(_png_bomb(100_000, 100_000)).decode()}}, "Describe.")])
    add("data_url_bad_base64", "ImageError", "a data: URL whose payload is not base64",
        match="not valid base64", messages=[_user({"type": "image_url", "image_url": {"url": data_url + "!!!"}}, "x")])
    add("data_url_not_image", "ImageError", "a data: URL of another media type (text/html)",
        match="expected 'data:image/", messages=[_user({"type": "image_url", "image_url": {
            "url": "data:text/html;base64," + base64.b64encode(b"<script>1</script>").decode()}}, "x")])
    add("remote_url", "ImageError", "an http URL: never fetched (no outbound request), the error says so",
        match="remote URLs are not fetched", messages=[_user({"type": "image_url", "image_url": {
            "url": "http://127.0.0.1:9/cat.png"}}, "x")])
    add("file_url", "ImageError", "a file:// URL: not a URL scheme dsvl2 reads; looked up as a (missing) path",
        match="not found", messages=[_user({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}, "x")])
    add("bare_image_part_without_image", "ConversationError", "a bare {'type': 'image'} part and no images",
        match="image part has no image", messages=[_user({"type": "image"}, "Describe.")])
    add("role_unknown", "ConversationError", "role 'robot'", match="unknown role 'robot'",
        messages=[{"role": "robot", "content": "hi"}])
    add("role_missing", "ConversationError", "a message without 'role'", match="unknown role None",
        messages=[{"content": "hi"}])
    add("role_not_a_string", "ConversationError", "role 7", match="unknown role 7",
        messages=[{"role": 7, "content": "hi"}])
    add("content_missing", "ConversationError", "a message without 'content'", match="no 'content'",
        messages=[{"role": "user"}])
    add("content_not_text", "ConversationError", "content 42", match="must be a string or a list of parts",
        messages=[{"role": "user", "content": 42}])
    add("part_type_unknown", "ConversationError", "a part of type 'audio'", match="unknown part type 'audio'",
        messages=[{"role": "user", "content": [{"type": "audio", "audio": "x.wav"}]}])
    add("system_not_first", "ConversationError", "a system message after a user message",
        match="'system' message is only allowed as the first", messages=[_user("hi"),
                                                                          {"role": "system", "content": "x"}])
    add("image_in_assistant", "ConversationError", "an image in an assistant message",
        match="images are only allowed in user messages",
        messages=[_user("hi"), {"role": "assistant", "content": [_img()]}, _user("and?")])
    add("ends_with_assistant", "ConversationError",
        "the conversation ends with a non-empty assistant message (nothing left to answer)",
        match="ends with a non-empty assistant", messages=[_user("hi"), {"role": "assistant", "content": "hello"}])
    add("ends_with_empty_assistant", "ok", "ends with an empty assistant message: that is the generation prompt",
        messages=[_user("hi"), {"role": "assistant", "content": ""}], check="answers")
    add("system_only", "ok",
        "only a system message: formatted as the reference does (bos + system text) and answered",
        messages=[{"role": "system", "content": "You are terse."}], check="answers")
    add("no_alternation", "ok", "two user messages in a row: accepted, like the reference (no alternation check)",
        messages=[_user("hi"), _user("again")], check="answers")
    add("empty_conversation", "ConversationError", "an empty message list", match=r"got list \[\]", messages=[])
    add("empty_prompt", "ConversationError",
        "an empty prompt (no text, no image): nothing to answer, refused (not max_new_tokens of output to nothing)",
        match="no text and no image", prompt="")
    add("blank_messages", "ConversationError", "messages whose text is only whitespace and no image: refused",
        match="no text and no image", messages=[{"role": "system", "content": " "}, _user("\n", " ")])
    add("image_tag_typed_as_text", "ok",
        "'<image>' typed in an OpenAI text part with no image part: text (its characters' ids), answered",
        messages=[_user("look at <image> here")], check="answers")
    add("text_over_window", "GenerationError", "5000 words (> 4096 tokens) of text: refused before the model runs",
        match="prompt tokens.*context window is 4096", prompt="word " * 5000)

    bad_values = [
        ("temperature", float("nan"), "a finite number >= 0"), ("temperature", float("inf"), "a finite number >= 0"),
        ("temperature", -1.0, "a finite number >= 0"), ("temperature", "0.7", "a finite number >= 0"),
        ("top_p", float("nan"), "0 < top_p <= 1"), ("top_p", 0.0, "0 < top_p <= 1"),
        ("top_p", 1.5, "0 < top_p <= 1"), ("top_p", "high", "0 < top_p <= 1"),
        ("top_k", -1, "an integer >= 0"), ("top_k", 2.5, "an integer >= 0"), ("top_k", "5", "an integer >= 0"),
        ("repetition_penalty", 0.0, "a finite number > 0"), ("repetition_penalty", float("-inf"), "finite number > 0"),
        ("repetition_penalty", float("nan"), "a finite number > 0"),
        ("seed", "abc", "an integer or None"), ("seed", 1.5, "an integer or None"),
        ("max_new_tokens", 0, "an integer >= 1"), ("max_new_tokens", -5, "an integer >= 1"),
        ("max_new_tokens", 2.0, "an integer >= 1"), ("max_new_tokens", True, "an integer >= 1"),
        ("stop", [""], "non-empty strings"), ("stop", [None], "non-empty strings"), ("stop", 5, "non-empty strings"),
        ("stop_token_ids", [-1], "integers >= 0"),
    ]
    for field, value, allowed in bad_values:
        label = {float("nan"): "nan", float("inf"): "inf", float("-inf"): "-inf"}.get(value, value) \
            if isinstance(value, float) else value
        add(f"sampling_{field}_{label}".replace(" ", "").replace("'", "").replace("[", "").replace("]", ""),
            "GenerationError", f"{field} = {value!r}: refused, naming the field and the allowed range",
            match=f"{field} must be .*{allowed}", messages=one, sampling={field: value})
    add("temperature_tiny", "ok", "temperature 1e-50 (valid, > 0): greedy, like anything below 1e-5 (dividing "
        "by it in float32 rounded it to 0 and sampled at temperature 1)", messages=one,
        sampling={"temperature": 1e-50, "seed": 3}, check="same_as_greedy")
    add("repetition_penalty_tiny", "ok", "repetition_penalty 1e-308 (valid, > 0): seen tokens' logits become +inf "
        "and share the mass; answered (the draw crashed with IndexError on the NaN softmax)", messages=one,
        sampling={"temperature": 1.0, "repetition_penalty": 1e-308, "seed": 3}, check="answers")
    add("top_k_huge", "ok", "top_k 10^30: more than the vocabulary, so off (torch.tensor overflowed with ValueError)",
        messages=one, sampling={"temperature": 0.8, "top_k": 10**30, "seed": 3}, check="same_as_top_k_off")
    add("seed_huge", "ok", "seed 2^70 and -1: accepted (reduced modulo 2^64 for torch's generator)", messages=one,
        sampling={"temperature": 0.8, "seed": 2**70}, check="answers")
    add("max_new_tokens_1", "ok", "max_new_tokens 1: exactly one token", messages=one,
        sampling={"max_new_tokens": 1}, check="one_token")
    add("max_new_tokens_huge", "ok",
        "max_new_tokens 10^9: accepted; generation ends at the context window with finish_reason 'length'",
        messages=one, sampling={"max_new_tokens": 10**9}, check="context_capped")
    add("stop_100_unmatched", "ok", "100 stop strings, none in the answer: the answer is unchanged",
        messages=one, sampling={"max_new_tokens": 12, "stop": [f"\x00never {i}" for i in range(100)]},
        check="stops_ignored")
    add("stop_100_long", "ok",
        "100 stop strings of 2000 characters (99 built to defeat naive suffix matching): the answer is "
        "unchanged and matching stays linear in the text (KMP)",
        messages=one, sampling={"max_new_tokens": 12, "stop": ["\x01" * 2000] * 99 + ["\x02" * 1999 + "\x03"]},
        check="stops_ignored")
    add("stop_100_last_matches", "ok",
        "100 stop strings, the last one occurs in the answer: the answer is cut before it, finish_reason 'stop'",
        messages=one, sampling={"max_new_tokens": 12, "stop": [f"\x00never {i}" for i in range(99)]},
        check="stop_cuts")
    return R


def _grounding_items() -> list[Item]:
    G = []

    def add(name, text, boxes, behaviour):
        clean = name in ("well_formed", "nested_brackets", "det_without_ref", "many_boxes")
        G.append(Item(name, "grounding", "ok", behaviour, text=text, boxes=tuple(tuple(b) for b in boxes),
                      noted=not clean))

    ref = "<|ref|>cat<|/ref|>"
    add("well_formed", f"{ref}<|det|>[[10, 20, 300, 400]]<|/det|>", [(10, 20, 300, 400)],
        "a well-formed ref + det: one box, no problem")
    add("unclosed_det", f"{ref}<|det|>[[10, 20, 300, 400], [5, 6", [(10, 20, 300, 400)],
        "truncated output: the complete box is kept, the partial one dropped, both noted")
    add("unclosed_ref", "<|ref|>cat<|det|>[[1, 2, 3, 4]]<|/det|>", [(1, 2, 3, 4)],
        "an unclosed ref: ends at the next tag; the det's box is kept")
    add("nested_det", f"{ref}<|det|>[[1, 2, 3, 4] <|det|>[[5, 6, 7, 8]]<|/det|><|/det|>", [(1, 2, 3, 4), (5, 6, 7, 8)],
        "a det inside a det: each tag starts a new det; both boxes kept, the stray closing tag noted")
    add("nested_brackets", f"{ref}<|det|>[[[[1, 2, 3, 4]]]]<|/det|>", [(1, 2, 3, 4)],
        "extra bracket levels: the innermost [...] is the box")
    add("three_numbers", f"{ref}<|det|>[[1, 2, 3]]<|/det|>", [], "a box of 3 numbers: dropped and noted")
    add("five_numbers", f"{ref}<|det|>[[1, 2, 3, 4, 5]]<|/det|>", [], "a box of 5 numbers: dropped and noted")
    add("huge_number", f"{ref}<|det|>[[1{'0' * 30}, 2, 3, 4]]<|/det|>", [(3, 2, 999, 4)],
        "10^30: clamped to 999 (then corners swapped); long digit strings cost nothing")
    add("long_digits", f"{ref}<|det|>[[{'9' * 10**5}, 0, 0, 0]]<|/det|>", [(0, 0, 999, 0)],
        "a 100000-digit number: clamped without converting it (no int-string limit error, no cost)")
    add("negative", f"{ref}<|det|>[[-5, -10, 300, 400]]<|/det|>", [(0, 0, 300, 400)],
        "negative values: clamped to 0")
    add("nan_inf", f"{ref}<|det|>[[nan, 1, 2, 3], [inf, 1, 2, 3], [1, 2, 3, 4]]<|/det|>", [(1, 2, 3, 4)],
        "NaN / inf are not numbers of the grammar: those boxes are dropped, the good one kept")
    add("decimals", f"{ref}<|det|>[[1.4, 2.5, 3.6, 999.9]]<|/det|>", [(1, 3, 4, 999)],
        "decimals: rounded half up, then clamped")
    add("code_injection", f"{ref}<|det|>[[__import__('os').system('touch /tmp/pwned'), 1, 2, 3]]<|/det|>", [],
        "Python code where numbers belong: never evaluated (no eval), the box is dropped")
    add("det_without_ref", "<|det|>[[1, 2, 3, 4]]<|/det|>", [(1, 2, 3, 4)],
        "a det with no ref: the box is kept with label None")
    add("closing_tags_only", "<|/ref|><|/det|> text", [], "closing tags with no opening: ignored and noted")
    add("empty_det", f"{ref}<|det|><|/det|>", [], "an empty det: no box, noted")
    add("many_boxes", f"{ref}<|det|>[" + ", ".join(["[1, 2, 3, 4]"] * 2000) + "]<|/det|>", [(1, 2, 3, 4)] * 2000,
        "2000 boxes: all kept; problems are capped at 50 notes")
    return G


def _corpus() -> tuple[list[Item], dict[str, bytes]]:
    files: dict[str, bytes] = {}
    found = _image_items(files) + _request_items() + _grounding_items()
    names = [it.name for it in found]
    dupes = {n for n in names if names.count(n) > 1}
    assert not dupes, f"duplicate item names {dupes}"
    return found, files


def items() -> list[Item]:
    """Every item, without writing anything (e.g. to parametrize tests)."""
    return _corpus()[0]


def build(d: str | Path) -> list[Item]:
    """Write the corpus files and manifest.json into ``d`` (created if needed); return every item."""
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    items, files = _corpus()
    for name, data in files.items():
        (d / name).write_bytes(data)
    (d / "manifest.json").write_text(json.dumps([dataclasses.asdict(it) for it in items], indent=1,
                                                ensure_ascii=True))
    return items


def resolve(request: dict, d: str | Path) -> dict:
    """A request with every corpus file name (image parts, ``images`` lists) made a path in ``d``."""
    d = Path(d)

    def fix(x):
        if isinstance(x, dict):
            out = {k: fix(v) for k, v in x.items()}
            if x.get("type") == "image" and isinstance(x.get("image"), str):
                out["image"] = str(d / x["image"])
            if isinstance(x.get("images"), list):
                out["images"] = [str(d / n) for n in x["images"]]
            return out
        if isinstance(x, list):
            return [fix(v) for v in x]
        return x

    out = fix(request)
    if isinstance(request.get("images"), list):
        out["images"] = [str(d / n) for n in request["images"]]
    return out


def table() -> str:
    """The README's table: one row per item (name, kind, outcome, behaviour)."""
    rows = ["| item | kind | outcome | behaviour |", "|---|---|---|---|"]
    for it in items():
        outcome = f"`{it.expect}`" if it.expect != "ok" else "ok" + (f" ({it.check})" if it.check else "")
        rows.append(f"| `{it.name}` | {it.kind} | {outcome} | {it.behaviour.replace('|', '/')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    if sys.argv[1:] == ["--table"]:
        print(table())
    elif len(sys.argv) == 2 and not sys.argv[1].startswith("-"):
        built = build(sys.argv[1])
        print(f"wrote {len(built)} items to {sys.argv[1]}")
    else:
        sys.exit("usage: python tests/hostile/make_corpus.py OUT_DIR | --table")
