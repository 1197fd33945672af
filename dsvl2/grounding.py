"""Grounding markup in model answers: parse it, convert it to pixels, draw it, strip it.

With `<|grounding|>` in the prompt the model answers with markup such as

    <|ref|>The giraffe<|/ref|><|det|>[[12, 40, 330, 960], [400, 10, 999, 999]]<|/det|>

one `<|ref|>` label followed by a `<|det|>` list of boxes (x1, y1, x2, y2), integers
normalised to 0..999 of the ORIGINAL image. Notable choices:

* The text is model output, so it is parsed by a small hand-written scanner and never
  evaluated (the reference runs `eval()` on it). Parsing never raises: every malformed
  part is skipped or repaired and described in `GroundingResult.problems`.
* Repairs: values outside 0..999 (negative, >= 1000, or absurdly long digit strings) are
  clamped; decimals are rounded to the nearest integer (half up); x1 > x2 or y1 > y2 are
  swapped. Boxes with a number count other than 4, or with a non-number, are dropped.
  Digit strings are cut to a few digits before conversion, so a 10**6-digit "number"
  costs no more than a short one (and never hits Python's int-string limit).
* A `<|det|>` pairs with the `<|ref|>` right before it when only whitespace lies between
  them; otherwise its label is None. A `<|ref|>` with no `<|det|>` is a plain mention and
  kept with no boxes (not a problem). An unclosed tag (truncated output) ends at the next
  tag or at the end of the text; the complete boxes in it are kept.
* Pixels follow the reference: pixel = int(v / 999 * W) for x, int(v / 999 * H) for y
  (divide by 999, not 1000), so 999 maps to W, one past the last pixel; drawing clamps
  to the image.
* Drawing uses Pillow's built-in scalable font (`ImageFont.load_default(size=...)`), so
  no font file has to exist; without FreeType it falls back to the small bitmap font and
  replaces characters that font cannot encode. Glyphs missing from the default font
  (e.g. CJK) show as boxes; pass `font=` a TrueType path to render them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from PIL import Image, ImageDraw, ImageFont

from .errors import ImageError

Box = tuple[int, int, int, int]

COORD_MAX = 999
MAX_PROBLEMS = 50  # adversarial output could otherwise produce one note per character
_MAX_INT_DIGITS = 6  # anything longer is far outside 0..999 anyway
_SNIPPET = 40

_TAG_RE = re.compile(r"<\|(ref|/ref|det|/det|grounding)\|>")
_BRACKET_RE = re.compile(r"[\[\]]")
_ITEM_SPLIT_RE = re.compile(r"[\s,]+")
_NUMBER_RE = re.compile(r"([+-]?)(?:(\d+)(?:\.(\d*))?|\.(\d+))")
_SEPARATORS = " ,\t\r\n"

# Distinct, saturated colours (one per ref, cycling).
PALETTE = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (0, 160, 160), (240, 50, 230), (128, 128, 0), (170, 110, 40), (0, 0, 128),
)


@dataclass(frozen=True)
class Ref:
    """One referred object: its label (None for a `<|det|>` with no `<|ref|>`), its boxes
    in 0..999 coordinates, and the (start, end) character span of its markup."""

    label: str | None
    boxes: list[Box] = field(default_factory=list)
    span: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class GroundingResult:
    refs: list[Ref]
    problems: list[str]

    @property
    def boxes(self) -> list[tuple[str | None, Box]]:
        """Every (label, box) pair, in order."""
        return [(ref.label, box) for ref in self.refs for box in ref.boxes]


class _Notes:
    """Collects problem messages, capped so that hostile input stays cheap to report."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.dropped = 0

    def add(self, message: str) -> None:
        if len(self.items) < MAX_PROBLEMS:
            self.items.append(message)
        else:
            self.dropped += 1

    @property
    def count(self) -> int:
        return len(self.items) + self.dropped

    def finish(self) -> list[str]:
        if self.dropped:
            return self.items + [f"... and {self.dropped} more problems"]
        return self.items


def _snippet(s: str) -> str:
    if len(s) > _SNIPPET:
        s = s[:_SNIPPET] + "..."
    return repr(s)


def _parse_number(item: str) -> tuple[int, str | None]:
    """(value clamped to 0..999, note or None) for one item of a box that is a number."""
    m = _NUMBER_RE.fullmatch(item)
    sign, whole, frac, only_frac = m.groups()
    whole = (whole or "0").lstrip("0") or "0"
    frac = frac if frac is not None else only_frac
    note = None
    if len(whole) > _MAX_INT_DIGITS:
        value = COORD_MAX + 1  # only its side of the range matters
    elif frac:
        value = int(float(f"{whole}.{frac[:_MAX_INT_DIGITS]}") + 0.5)
        note = f"{_snippet(item)} is not an integer, rounded to {value}"
    else:
        value = int(whole)
    if sign == "-" and value != 0:
        return 0, f"{_snippet(item)} is negative, clamped to 0"
    if value > COORD_MAX:
        return COORD_MAX, f"{_snippet(item)} is above {COORD_MAX}, clamped to {COORD_MAX}"
    return value, note


def _parse_box(content: str, where: int, notes: _Notes) -> Box | None:
    items = [s for s in _ITEM_SPLIT_RE.split(content) if s]
    for item in items:
        if _NUMBER_RE.fullmatch(item) is None:
            notes.add(f"box at {where}: {_snippet(item)} is not a number; skipped")
            return None
    if len(items) != 4:
        notes.add(f"box {_snippet('[' + content + ']')} at {where} has {len(items)} numbers, "
                  "expected 4; skipped")
        return None
    values = []
    for item in items:
        value, note = _parse_number(item)
        if note:
            notes.add(f"box at {where}: {note}")
        values.append(value)
    x1, y1, x2, y2 = values
    if x1 > x2 or y1 > y2:
        notes.add(f"box at {where} has its corners out of order {values}; swapped")
        x1, x2 = min(x1, x2), max(x1, x2)
        y1, y2 = min(y1, y2), max(y1, y2)
    return (x1, y1, x2, y2)


def _parse_det_body(body: str, offset: int, notes: _Notes) -> list[Box]:
    """Boxes from the text between `<|det|>` and `<|/det|>`.

    Every innermost `[...]` is one box; outer brackets, commas and whitespace between
    boxes are structure. Missing outer brackets and even missing box brackets are accepted
    (and noted) as long as the numbers themselves make sense.
    """
    if not body.strip(_SEPARATORS + "[]"):
        notes.add(f"<|det|> at {offset} holds no boxes")
        return []
    if _BRACKET_RE.search(body) is None:
        notes.add(f"<|det|> at {offset} has no brackets; read as one box")
        box = _parse_box(body, offset, notes)
        return [box] if box else []

    before = notes.count
    boxes: list[Box] = []
    outer = 0
    i, n = 0, len(body)
    while i < n:
        c = body[i]
        if c in _SEPARATORS:
            i += 1
        elif c == "]":
            outer -= 1
            i += 1
        elif c == "[":
            nxt = _BRACKET_RE.search(body, i + 1)
            if nxt is None:
                notes.add(f"unclosed box {_snippet(body[i:])} at {offset + i} (truncated?); skipped")
                break
            j = nxt.start()
            inner = body[i + 1:j]
            if body[j] == "[":  # an enclosing list opens here
                if inner.strip(_SEPARATORS):
                    notes.add(f"unexpected text {_snippet(inner)} at {offset + i + 1}; ignored")
                outer += 1
                i = j
            else:
                if outer <= 0:
                    notes.add(f"box at {offset + i} is not inside [[...]]; accepted")
                    outer = 1  # note it once per det
                box = _parse_box(inner, offset + i, notes)
                if box:
                    boxes.append(box)
                i = j + 1
        else:
            nxt = _BRACKET_RE.search(body, i)
            j = nxt.start() if nxt else n
            notes.add(f"unexpected text {_snippet(body[i:j].strip())} at {offset + i}; ignored")
            i = j
    if not boxes and notes.count == before:
        notes.add(f"<|det|> at {offset} holds no boxes")
    return boxes


def parse_grounding(text: str) -> GroundingResult:
    """Every ref and box in a model answer; never raises.

    >>> r = parse_grounding("<|ref|>cat<|/ref|><|det|>[[0, 10, 500, 999]]<|/det|> sits")
    >>> r.refs[0].label, r.refs[0].boxes, r.problems
    ('cat', [(0, 10, 500, 999)], [])
    """
    if not isinstance(text, str):
        return GroundingResult([], [f"expected a string, got {type(text).__name__}"])
    notes = _Notes()
    refs: list[Ref] = []
    tags = list(_TAG_RE.finditer(text))
    pending: tuple[str, int, int] | None = None  # (label, start, end) of a ref awaiting its det

    def flush() -> None:
        nonlocal pending
        if pending is not None:
            refs.append(Ref(pending[0], [], (pending[1], pending[2])))
            pending = None

    k = 0
    while k < len(tags):
        tag = tags[k]
        kind = tag.group(1)
        nxt = tags[k + 1] if k + 1 < len(tags) else None
        body_end = nxt.start() if nxt else len(text)
        if kind == "ref":
            flush()
            label = text[tag.end():body_end].strip()
            if nxt is not None and nxt.group(1) == "/ref":
                pending = (label, tag.start(), nxt.end())
                k += 2
                continue
            notes.add(f"unclosed <|ref|> at {tag.start()}: label {_snippet(label)}")
            pending = (label, tag.start(), body_end)
        elif kind == "det":
            closed = nxt is not None and nxt.group(1) == "/det"
            label, start = None, tag.start()
            if pending is not None and not text[pending[2]:tag.start()].strip():
                label, start = pending[0], pending[1]
                pending = None
            flush()
            if not closed:
                notes.add(f"unclosed <|det|> at {tag.start()} (truncated?)")
            boxes = _parse_det_body(text[tag.end():body_end], tag.end(), notes)
            end = nxt.end() if closed else body_end
            refs.append(Ref(label, boxes, (start, end)))
            k += 2 if closed else 1
            continue
        elif kind in ("/ref", "/det"):
            notes.add(f"<|{kind}|> at {tag.start()} without an opening tag; ignored")
        k += 1
    flush()
    return GroundingResult(refs, notes.finish())


def strip_grounding_markup(text: str) -> str:
    """The answer for people to read: labels kept, boxes and tags removed.

    >>> strip_grounding_markup("<|ref|>The cat<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|> sleeps.")
    'The cat sleeps.'
    """
    out: list[str] = []
    pos = 0
    skipping = False  # inside a det body
    for tag in _TAG_RE.finditer(text):
        if not skipping:
            out.append(text[pos:tag.start()])
        skipping = tag.group(1) == "det"
        pos = tag.end()
    if not skipping:
        out.append(text[pos:])
    return "".join(out)


def to_pixels(box: Sequence[int], width: int, height: int) -> Box:
    """A 0..999 box in pixels of a width x height image, with the reference's rule.

    >>> to_pixels((0, 0, 999, 500), 1000, 600)
    (0, 0, 1000, 300)
    """
    if width <= 0 or height <= 0:
        raise ImageError(f"image size must be positive, got {width}x{height}")
    if len(box) != 4:
        raise ValueError(f"a box has 4 values (x1, y1, x2, y2), got {len(box)}: {box!r}")
    x1, y1, x2, y2 = box
    return (int(x1 / COORD_MAX * width), int(y1 / COORD_MAX * height),
            int(x2 / COORD_MAX * width), int(y2 / COORD_MAX * height))


def grounding_to_json(result: GroundingResult | str, width: int, height: int) -> dict:
    """{"boxes": [{"label", "box_norm", "box_px"}, ...], "problems": [...]}, JSON-ready.

    One entry per box (a ref with two boxes gives two entries); plain mentions are left out.
    """
    if isinstance(result, str):
        result = parse_grounding(result)
    boxes = [
        {"label": label, "box_norm": list(box), "box_px": list(to_pixels(box, width, height))}
        for label, box in result.boxes
    ]
    return {"boxes": boxes, "problems": list(result.problems)}


# ---------------------------------------------------------------- drawing


def _load_font(font: str | ImageFont.ImageFont | ImageFont.FreeTypeFont | None, size: int):
    if font is not None and not isinstance(font, str):
        return font
    if font is not None:
        try:
            return ImageFont.truetype(font, size)
        except OSError as e:
            raise ImageError(f"cannot load font {font!r}: {e}") from e
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError, ImportError):
        # No FreeType: the fixed-size bitmap font is always there.
        return ImageFont.load_default()


def _display_label(label: str, font, max_chars: int = 60) -> str:
    label = " ".join(label.split())
    if len(label) > max_chars:
        label = label[:max_chars - 3] + "..."
    if not isinstance(font, ImageFont.FreeTypeFont):
        # The bitmap font encodes text as Latin-1 and raises on anything else.
        label = label.encode("latin-1", "replace").decode("latin-1")
    return label


def _text_colour(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return (0, 0, 0) if luminance > 150 else (255, 255, 255)


def draw_grounding(
    images: Image.Image | Sequence[Image.Image],
    refs: GroundingResult | Iterable[Ref] | str,
    *,
    image_index: int = -1,
    line_width: int | None = None,
    font_size: int | None = None,
    font: str | ImageFont.ImageFont | ImageFont.FreeTypeFont | None = None,
    palette: Sequence[tuple[int, int, int]] = PALETTE,
) -> Image.Image:
    """A copy (RGB) of one image with every ref's boxes and label drawn on it.

    `images` is one image or the conversation's images; like the reference the boxes go
    on the last one unless `image_index` says otherwise. `refs` may be a parse result, a
    list of refs, or the raw answer text. Each ref gets its own colour; its label sits in
    a filled tag above the box's top-left corner (inside the box when there is no room
    above). Line width and font size scale with the image unless given.
    """
    if isinstance(images, Image.Image):
        images = [images]
    images = list(images)
    if not -len(images) <= image_index < len(images):
        raise ImageError(f"image_index {image_index} is out of range for {len(images)} image(s)")
    if isinstance(refs, str):
        refs = parse_grounding(refs)
    if isinstance(refs, GroundingResult):
        refs = refs.refs

    image = images[image_index].convert("RGB")  # convert always returns a new image
    width, height = image.size
    short = min(width, height)
    if line_width is None:
        line_width = max(2, round(short / 200))
    if font_size is None:
        font_size = max(12, round(short / 32))
    font = _load_font(font, font_size)
    draw = ImageDraw.Draw(image)
    pad = max(2, font_size // 5)

    for n, ref in enumerate(refs):
        colour = tuple(palette[n % len(palette)])
        for box in ref.boxes:
            px1, py1, px2, py2 = to_pixels(box, width, height)
            # 999 maps to W (one past the last pixel): keep the outline on the image.
            x1, x2 = sorted((min(max(px1, 0), width - 1), min(max(px2, 0), width - 1)))
            y1, y2 = sorted((min(max(py1, 0), height - 1), min(max(py2, 0), height - 1)))
            draw.rectangle((x1, y1, x2, y2), outline=colour, width=line_width)
            if not ref.label:
                continue
            label = _display_label(ref.label, font)
            left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
            tag_w = right - left + 2 * pad
            tag_h = bottom - top + 2 * pad
            tx = min(max(x1, 0), max(width - tag_w, 0))
            ty = y1 - tag_h
            if ty < 0:  # no room above: put the tag just inside the box's top edge
                ty = min(y1, max(height - tag_h, 0))
            draw.rectangle((tx, ty, tx + tag_w - 1, ty + tag_h - 1), fill=colour)
            draw.text((tx + pad - left, ty + pad - top), label, fill=_text_colour(colour), font=font)
    return image
