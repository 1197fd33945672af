import ast
import builtins
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFont

from dsvl2 import grounding
from dsvl2.errors import ImageError
from dsvl2.grounding import (
    PALETTE,
    GroundingResult,
    Ref,
    draw_grounding,
    grounding_to_json,
    parse_grounding,
    strip_grounding_markup,
    to_pixels,
)
from _paths import GOLDEN, IMAGES

GOLDEN_CASE = GOLDEN / "processor/official/c07_multiturn_system/case.json"
GIRAFFES = IMAGES / "visual_grounding_1.jpeg"
EXAMPLE = "<|ref|>The first stage<|/ref|><|det|>[[12, 40, 330, 960]]<|/det|> prepares the data."


def test_parses_the_golden_assistant_answer():
    if GOLDEN_CASE.exists():
        case = json.loads(GOLDEN_CASE.read_text())
        answer = case["conversations"][0][2]["content"]
        assert answer == EXAMPLE
    result = parse_grounding(EXAMPLE)
    assert result.problems == []
    assert result.refs == [Ref("The first stage", [(12, 40, 330, 960)], (0, 65))]
    assert EXAMPLE[slice(*result.refs[0].span)].endswith("<|/det|>")
    assert strip_grounding_markup(EXAMPLE) == "The first stage prepares the data."


def test_several_refs_and_boxes():
    text = (
        "<|grounding|>Here: <|ref|>The giraffe<|/ref|><|det|>[[12, 40, 330, 960], [400, 10, 999, 999]]"
        "<|/det|> next to\n<|ref|> a tree <|/ref|> <|det|>[ [0,0,1,1] ]<|/det|>, "
        "<|ref|>the sky<|/ref|> (no box) and <|det|>[[5, 6, 7, 8]]<|/det|>"
    )
    result = parse_grounding(text)
    assert result.problems == []
    assert [(r.label, r.boxes) for r in result.refs] == [
        ("The giraffe", [(12, 40, 330, 960), (400, 10, 999, 999)]),
        ("a tree", [(0, 0, 1, 1)]),
        ("the sky", []),
        (None, [(5, 6, 7, 8)]),
    ]
    assert result.boxes[1] == ("The giraffe", (400, 10, 999, 999))
    assert strip_grounding_markup(text) == (
        "Here: The giraffe next to\n a tree  , the sky (no box) and "
    )


@pytest.mark.parametrize(
    "text, boxes, fragment",
    [
        ("<|ref|>cut off", [], "unclosed <|ref|>"),
        ("<|ref|>a<|/ref|><|det|>[[1, 2, 3, 4], [5, 6", [(1, 2, 3, 4)], "unclosed"),
        ("<|det|>[[1, 2, 3, 4]]", [(1, 2, 3, 4)], "unclosed <|det|>"),
        ("<|det|>[[1, two, 3, 4]]<|/det|>", [], "'two' is not a number"),
        ("<|det|>[[1, 2, 3], [1, 2, 3, 4]]<|/det|>", [(1, 2, 3, 4)], "has 3 numbers"),
        ("<|det|>[[1, 2, 3, 4, 5]]<|/det|>", [], "has 5 numbers"),
        ("<|det|>[[1, 2, 1000, 4]]<|/det|>", [(1, 2, 999, 4)], "clamped to 999"),
        ("<|det|>[[-7, 2, 3, 4]]<|/det|>", [(0, 2, 3, 4)], "negative"),
        ("<|det|>[[1.4, 2.5, 3, 4]]<|/det|>", [(1, 3, 3, 4)], "rounded"),
        ("<|det|>[[300, 400, 100, 200]]<|/det|>", [(100, 200, 300, 400)], "swapped"),
        ("<|det|>[1, 2, 3, 4]<|/det|>", [(1, 2, 3, 4)], "not inside [[...]]"),
        ("<|det|> 1, 2, 3, 4 <|/det|>", [(1, 2, 3, 4)], "no brackets"),
        ("<|det|>[]<|/det|>", [], "no boxes"),
        ("<|det|>[[1, 2, 3, 4]] junk <|/det|>", [(1, 2, 3, 4)], "'junk'"),
        ("<|/det|> stray", [], "without an opening tag"),
        ("<|det|>[[1e3, 2, 3, 4]]<|/det|>", [], "not a number"),
    ],
)
def test_malformed_inputs_are_repaired_or_skipped_and_reported(text, boxes, fragment):
    result = parse_grounding(text)
    assert [b for r in result.refs for b in r.boxes] == boxes
    assert any(fragment in p for p in result.problems), result.problems


def test_whitespace_and_newlines_are_tolerated():
    text = "<|ref|>\n  a  cat \n<|/ref|>\n\n<|det|>\n[\n[ 1 ,2,\t3 , 4 ]\n,\n[5 6 7 8]\n]\n<|/det|>"
    result = parse_grounding(text)
    assert result.problems == []
    assert result.refs == [Ref("a  cat", [(1, 2, 3, 4), (5, 6, 7, 8)], (0, len(text)))]


def test_huge_numbers_are_clamped():
    # beyond Python's int-from-string limit (4300 digits): converting it would raise
    digits = "9" * 1_000_000
    text = f"<|det|>[[{digits}, 00000000000000000000000012, -{digits}, 4.{digits}]]<|/det|>"
    result = parse_grounding(text)
    # [999, 12, 0, 5] after clamping and rounding, then both pairs swapped
    assert result.refs[0].boxes == [(0, 5, 999, 12)]
    assert all(len(p) < 200 for p in result.problems)  # messages quote a short snippet
    assert any("above 999" in p for p in result.problems)


def test_problem_list_is_capped():
    result = parse_grounding("<|det|>[[x,1,2,3]]<|/det|>" * 500)
    assert len(result.problems) == grounding.MAX_PROBLEMS + 1
    assert result.problems[-1] == "... and 450 more problems"


def test_model_output_is_never_executed(tmp_path, monkeypatch):
    calls = []

    def forbidden(*args, **kwargs):
        calls.append(args)
        raise RuntimeError("model output must not be evaluated")

    sentinel = tmp_path / "pwned"
    payload = f"__import__('os').system('touch {sentinel}')"
    text = f"<|ref|>x<|/ref|><|det|>[[{payload}, 1, 2, 3]]<|/det|><|det|>[{payload}]<|/det|>"
    with monkeypatch.context() as patch:
        for name in ("eval", "exec", "compile"):
            patch.setattr(builtins, name, forbidden)
        patch.setattr(ast, "literal_eval", forbidden)
        result = parse_grounding(text)
    assert calls == []
    assert not sentinel.exists()
    assert result.boxes == []
    assert any("is not a number" in p for p in result.problems)


MARKUP_ALPHABET = [
    "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>", "<|", "|>", "<", "|",
    "[", "]", "[[", "]]", ",", ", ", " ", "\n", "\t", "0", "1", "12", "999", "1000", "-", ".",
    "5.5", "e", "x", "giraffe", "é", "树", "9" * 50, "__import__", "(", ")", "'",
]


def test_fuzz_never_raises_and_results_are_sane():
    rng = random.Random(1234)
    tiny = Image.new("RGB", (40, 30), "white")
    for i in range(3000):
        text = "".join(rng.choice(MARKUP_ALPHABET) for _ in range(rng.randint(0, 40)))
        result = parse_grounding(text)
        assert all(isinstance(p, str) for p in result.problems)
        for ref in result.refs:
            assert ref.label is None or isinstance(ref.label, str)
            assert 0 <= ref.span[0] <= ref.span[1] <= len(text)
            for x1, y1, x2, y2 in ref.boxes:
                assert all(type(v) is int for v in (x1, y1, x2, y2))
                assert 0 <= x1 <= x2 <= 999 and 0 <= y1 <= y2 <= 999
        stripped = strip_grounding_markup(text)
        assert "<|det|>" not in stripped and "<|ref|>" not in stripped
        json.dumps(grounding_to_json(result, 37, 23))
        if i % 20 == 0:
            assert draw_grounding(tiny, result).size == tiny.size


def test_non_string_input_is_reported():
    assert parse_grounding(None).problems == ["expected a string, got NoneType"]


def test_to_pixels_uses_999_as_the_full_size():
    assert to_pixels((0, 0, 999, 999), 1000, 600) == (0, 0, 1000, 600)
    assert to_pixels((500, 500, 998, 1), 1000, 600) == (500, 300, 998, 0)
    # 500/999*1000 = 500.5 -> 500; 500/999*600 = 300.3 -> 300; 998/999*1000 = 998.99 -> 998
    assert to_pixels((12, 40, 330, 960), 724, 1086) == (8, 43, 239, 1043)
    with pytest.raises(ImageError):
        to_pixels((0, 0, 1, 1), 0, 10)
    with pytest.raises(ValueError):
        to_pixels((0, 0, 1), 10, 10)


def test_grounding_to_json():
    out = grounding_to_json(EXAMPLE + "<|det|>[[1, 2, 3]]<|/det|>", 1000, 600)
    assert out["boxes"] == [
        {"label": "The first stage", "box_norm": [12, 40, 330, 960], "box_px": [12, 24, 330, 576]}
    ]
    assert len(out["problems"]) == 1 and "has 3 numbers" in out["problems"][0]
    json.dumps(out)


def _giraffes():
    return Image.open(GIRAFFES)


def test_drawing_changes_the_outline_and_nothing_far_away():
    image = _giraffes()
    before = image.convert("RGB")
    box = (200, 300, 700, 800)
    drawn = draw_grounding(image, [Ref("giraffe", [box])])
    assert drawn is not image and drawn.mode == "RGB" and drawn.size == image.size
    assert image.convert("RGB").tobytes() == before.tobytes()  # input untouched

    w, h = image.size
    x1, y1, x2, y2 = to_pixels(box, w, h)
    red = PALETTE[0]
    ym, xm = (y1 + y2) // 2, (x1 + x2) // 2
    for point in [(x1, ym), (x2, ym), (xm, y1 + 1), (xm, y2), (x1 + 1, y1 + 1)]:
        assert drawn.getpixel(point) == red, point
    # The label tag sits right above the box's top-left corner and is filled with the colour.
    assert drawn.getpixel((x1 + 1, y1 - 2)) == red
    # Well inside the box, and far outside it, nothing changed.
    for point in [(xm, ym), (x1 + 20, ym), (5, h - 5), (w - 5, 5), (x2 + 20, ym), (xm, y2 + 20)]:
        assert drawn.getpixel(point) == before.getpixel(point), point
    changed = int((np.asarray(drawn) != np.asarray(before)).any(axis=2).sum())
    assert 0 < changed < 0.15 * w * h


def test_box_at_the_edges_stays_visible_and_tag_goes_inside():
    image = Image.new("RGB", (300, 200), "white")
    drawn = draw_grounding(image, "<|ref|>whole<|/ref|><|det|>[[0, 0, 999, 999]]<|/det|>")
    red = PALETTE[0]
    for point in [(0, 100), (299, 100), (150, 0), (150, 199)]:
        assert drawn.getpixel(point) == red, point
    # The tag is inside the image, under the top edge, with white text on it.
    tag_pixels = [drawn.getpixel((x, y)) for x in range(2, 40) for y in range(4, 16)]
    assert red in tag_pixels and (255, 255, 255) in tag_pixels
    assert drawn.getpixel((150, 100)) == (255, 255, 255)


def test_each_ref_gets_its_own_colour():
    image = Image.new("RGB", (200, 200), "white")
    refs = [Ref("a", [(100, 100, 400, 400)]), Ref(None, [(600, 600, 900, 900)])]
    drawn = draw_grounding(image, GroundingResult(refs, []))
    assert drawn.getpixel((20, 50)) == PALETTE[0]
    assert drawn.getpixel((120, 150)) == PALETTE[1]


@pytest.mark.parametrize("label", ["长颈鹿 giraffe", "Żyrafa — ünïcödé ✓ 🦒", "multi\nline\tlabel"])
def test_non_ascii_labels_draw(label):
    drawn = draw_grounding(_giraffes(), [Ref(label, [(10, 10, 500, 500)])])
    assert drawn.size == _giraffes().size


def test_non_ascii_labels_with_the_bitmap_fallback_font(monkeypatch):
    original = ImageFont.load_default

    def no_sizes(size=None):
        if size is not None:
            raise ValueError("no FreeType")
        return original()

    monkeypatch.setattr(ImageFont, "load_default", no_sizes)
    image = Image.new("RGB", (120, 80), "white")
    drawn = draw_grounding(image, [Ref("长颈鹿 ü", [(100, 400, 900, 900)])])
    assert drawn.getpixel((12, 50)) == PALETTE[0]  # left edge: int(100 / 999 * 120) = 12


def test_multi_image_draws_on_the_last_by_default():
    first = Image.new("RGB", (100, 100), "white")
    last = Image.new("L", (50, 80), 255)
    refs = [Ref("x", [(0, 0, 999, 999)])]
    drawn = draw_grounding([first, last], refs)
    assert drawn.size == (50, 80) and drawn.mode == "RGB"
    assert drawn.getpixel((0, 40)) == PALETTE[0]
    assert draw_grounding([first, last], refs, image_index=0).size == (100, 100)
    with pytest.raises(ImageError, match="out of range"):
        draw_grounding([first, last], refs, image_index=2)
