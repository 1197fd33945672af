"""Tests of dsvl2.processing: the oracle cases bit for bit, then the pure functions and errors.

The oracle lives in ``tests/data/golden/processor/<set>/<case>/``; every case found there
is checked.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dsvl2.config import ProcessorConfig
from dsvl2.errors import CheckpointError, ConversationError, ImageError
from dsvl2.processing import (BatchInputs, Processor, Tokenizer, load_image, normalize_conversation,
                              num_image_tokens, select_best_resolution)
from dsvl2.processing.conversation import Special, prompt_pieces
from dsvl2.processing.image import image_to_tiles, normalize_tiles, pad_color, tokens_per_tile_side
from _paths import GOLDEN, IMAGES

TOKENIZER_DIR = GOLDEN / "tiny"
CASE_DIRS = sorted(p.parent for p in (GOLDEN / "processor").glob("*/*/case.json"))

REAL_CANDIDATES = [(384, 384), (384, 768), (768, 384), (384, 1152), (1152, 384), (384, 1536), (1536, 384),
                   (768, 768), (384, 1920), (1920, 384), (384, 2304), (2304, 384), (768, 1152), (1152, 768),
                   (384, 2688), (2688, 384), (384, 3072), (3072, 384), (768, 1536), (1536, 768), (384, 3456),
                   (3456, 384), (1152, 1152)]


# ---------------------------------------------------------------------------------------
# fixtures and helpers
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def processor(tokenizer) -> Processor:
    return Processor(tokenizer, ProcessorConfig.from_hf({"candidate_resolutions": REAL_CANDIDATES}))


def _with_image_paths(conversation: list[dict]) -> list[dict]:
    """Oracle conversations name images by file name; point them at the shared images folder."""
    return [dict(m, images=[str(IMAGES / n) for n in m["images"]]) if m.get("images") else dict(m)
            for m in conversation]


def _load_case(case_dir: Path):
    from safetensors.torch import load_file
    case = json.loads((case_dir / "case.json").read_text(encoding="utf-8"))
    return case, load_file(str(case_dir / "processor.safetensors")), np.load(case_dir / "pixels_u8.npz")


def _run_case(case: dict, tokenizer: Tokenizer) -> BatchInputs:
    config = ProcessorConfig.from_hf(case["processor_config"])
    proc = Processor(tokenizer, config)
    return proc([_with_image_paths(c) for c in case["conversations"]])


def _collapsed_decode(tokenizer: Tokenizer, ids: list[int]) -> str:
    """Decode, showing each run of image ids as '[<image> x N]' (the oracle's format)."""
    out, run = [], []
    i = 0
    while i < len(ids):
        if ids[i] == tokenizer.image_id:
            j = i
            while j < len(ids) and ids[j] == tokenizer.image_id:
                j += 1
            out.append(tokenizer.decode(run))
            out.append(f"[<image> x {j - i}]")
            run, i = [], j
        else:
            run.append(ids[i])
            i += 1
    out.append(tokenizer.decode(run))
    return "".join(out)


def _unpadded_row(batch: BatchInputs, b: int) -> dict:
    """Row b of a batch with padding removed (tokens, image rows, real tiles)."""
    L = batch.seq_lens[b]
    n_img = len(batch.num_image_tokens[b])
    return {
        "ids": batch.input_ids[b, -L:],
        "seq_mask": batch.images_seq_mask[b, -L:],
        "crop": batch.images_spatial_crop[b, :max(n_img, 1)],
        "pixels": batch.pixel_values[b, batch.tile_is_real[b]],
        "n_pad_tokens": int((~batch.attention_mask[b]).sum()),
    }


def _png_bytes(size=(8, 6), mode="RGB", color=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------
# the oracle
# ---------------------------------------------------------------------------------------

def test_oracle_cases_found():
    assert CASE_DIRS, f"no processor cases under {GOLDEN / 'processor'}"


@pytest.mark.parametrize("case_dir", CASE_DIRS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_oracle_case(case_dir, tokenizer):
    case, ref, npz = _load_case(case_dir)
    out = _run_case(case, tokenizer)

    for name in ("input_ids", "attention_mask", "images_seq_mask", "images_spatial_crop", "tile_is_real"):
        got, want = getattr(out, name), ref[name]
        assert got.dtype == want.dtype, name
        assert got.shape == want.shape, name
        assert torch.equal(got, want), name
    assert list(out.pixel_values.shape) == ref["images_shape"].tolist()
    assert out.pixel_values.dtype == torch.float32

    # pixels: bit-exact against the uint8 tiles recovered as ((u8 / 255) - mean) / std
    u8 = torch.from_numpy(npz["pixels_u8"])
    real = torch.from_numpy(npz["tile_is_real"])
    assert torch.equal(out.tile_is_real, real)
    mean = torch.tensor(case["processor_config"]["image_mean"], dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(case["processor_config"]["image_std"], dtype=torch.float32).view(3, 1, 1)
    want = (u8.to(torch.float32) / 255 - mean) / std
    assert torch.equal(out.pixel_values[real], want[real])
    assert torch.count_nonzero(out.pixel_values[~real]) == 0  # padding / placeholder tiles are 0.0
    # and the float32 bytes hash the oracle recorded per tile
    hashes = [[hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest() for t in row] for row in out.pixel_values]
    assert hashes == case["tile_float32_sha256"]

    assert out.seq_lens == case["seq_lens"]
    assert out.num_image_tokens == case["num_image_tokens"]
    assert [[list(r) for r in row] for row in out.best_resolutions] == case["best_resolution_wh_per_image"]
    assert [[list(s) for s in row] for row in out.image_sizes] == case["image_sizes_wh"]
    assert [[im.size for im in row] for row in out.images] == [[tuple(s) for s in row] for row in case["image_sizes_wh"]]
    collapsed = case["decoded_input_text_image_runs_collapsed"]
    assert out.prompts == [re.sub(r"\[<image> x \d+\]", "<image>", s) for s in collapsed]
    for b, L in enumerate(out.seq_lens):
        assert _collapsed_decode(tokenizer, out.input_ids[b, -L:].tolist()) == collapsed[b]
        spans = case["image_token_spans_per_row"][b]  # [start, length] in padded positions
        mask = out.images_seq_mask[b]
        assert int(mask.sum()) == sum(n for _, n in spans)
        for start, n in spans:
            assert mask[start:start + n].all()


@pytest.mark.parametrize("case_dir", [d for d in CASE_DIRS if len(json.loads((d / "case.json").read_text())["conversations"]) > 1],
                         ids=lambda p: p.name)
def test_batch_rows_equal_rows_alone(case_dir, tokenizer):
    case, _, _ = _load_case(case_dir)
    batch = _run_case(case, tokenizer)
    proc = Processor(tokenizer, ProcessorConfig.from_hf(case["processor_config"]))
    for b, conv in enumerate(case["conversations"]):
        alone = proc(_with_image_paths(conv))
        row, single = _unpadded_row(batch, b), _unpadded_row(alone, 0)
        assert single["n_pad_tokens"] == 0
        for key in ("ids", "seq_mask", "crop", "pixels"):
            assert torch.equal(row[key], single[key]), key
        assert torch.equal(batch.input_ids[b, :row["n_pad_tokens"]],
                           torch.full((row["n_pad_tokens"],), tokenizer.pad_id))
        assert not batch.attention_mask[b, :row["n_pad_tokens"]].any()
        assert batch.prompts[b] == alone.prompts[0]


# ---------------------------------------------------------------------------------------
# OpenAI-style messages == reference format
# ---------------------------------------------------------------------------------------

def test_openai_style_matches_reference_single_image(processor):
    ref = processor([{"role": "<|User|>", "content": "<image>\nDescribe this image.", "images": [str(IMAGES / "monday.jpg")]},
                     {"role": "<|Assistant|>", "content": ""}])
    data_url = "data:image/jpeg;base64," + base64.b64encode((IMAGES / "monday.jpg").read_bytes()).decode()
    variants = [
        [{"role": "user", "content": [{"type": "image", "image": str(IMAGES / "monday.jpg")},
                                      {"type": "text", "text": "Describe this image."}]}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                      {"type": "text", "text": "Describe this image."}]},
         {"role": "assistant", "content": ""}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": str(IMAGES / "monday.jpg")},
                                      "Describe this image."]}],
    ]
    for messages in variants:
        out = processor(messages)
        assert torch.equal(out.input_ids, ref.input_ids)
        assert torch.equal(out.images_seq_mask, ref.images_seq_mask)
        assert torch.equal(out.pixel_values, ref.pixel_values)
    # a bare image part takes its image from the images argument
    out = processor([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}],
                    images=[Image.open(IMAGES / "monday.jpg")])
    assert torch.equal(out.input_ids, ref.input_ids) and torch.equal(out.pixel_values, ref.pixel_values)
    # reference-format tags with the images passed separately
    out = processor([{"role": "<|User|>", "content": "<image>\nDescribe this image."}], images=[IMAGES / "monday.jpg"])
    assert torch.equal(out.input_ids, ref.input_ids)


def test_openai_style_matches_oracle_system_multiturn(tokenizer):
    case_dir = next((d for d in CASE_DIRS if d.name.startswith("c07")), None)
    assert case_dir is not None, "c07 not in the oracle"
    case, ref, _ = _load_case(case_dir)
    proc = Processor(tokenizer, ProcessorConfig.from_hf(case["processor_config"]))
    src = case["conversations"][0]
    role = {"system": "system", "<|User|>": "user", "<|Assistant|>": "assistant"}
    messages = []
    for m in src:
        content = m["content"]
        if m.get("images"):
            assert content.startswith("<image>\n")
            content = [{"type": "image", "image": str(IMAGES / m["images"][0])},
                       {"type": "text", "text": content[len("<image>\n"):]}]
        messages.append({"role": role[m["role"]], "content": content})
    out = proc(messages[:-1])  # ends with a user message: the empty assistant turn is implied
    assert torch.equal(out.input_ids, ref["input_ids"])
    assert torch.equal(out.images_seq_mask, ref["images_seq_mask"])


def test_openai_two_images_match_oracle_row(tokenizer):
    case_dir = next((d for d in CASE_DIRS if d.name.startswith("c09")), None)
    assert case_dir is not None, "c09 not in the oracle"
    case, ref, _ = _load_case(case_dir)
    proc = Processor(tokenizer, ProcessorConfig.from_hf(case["processor_config"]))
    names = case["conversations"][1][0]["images"]
    out = proc([{"role": "user", "content": [{"type": "image", "image": str(IMAGES / names[0])},
                                             {"type": "image", "image": (IMAGES / names[1]).read_bytes()},
                                             {"type": "text", "text": "Compare the two images."}]}])
    assert torch.equal(out.input_ids[0], ref["input_ids"][1])
    assert torch.equal(out.images_spatial_crop[0], ref["images_spatial_crop"][1])


# ---------------------------------------------------------------------------------------
# text only, batches, shapes
# ---------------------------------------------------------------------------------------

def test_text_only_and_all_text_batch(processor, tokenizer):
    conv = [{"role": "user", "content": "What is the capital of France? Answer briefly."}]
    one = processor(conv)
    expect = ([tokenizer.bos_id] + tokenizer.encode("<|User|>: What is the capital of France? Answer briefly."
                                                    "\n\n<|Assistant|>:"))
    assert one.input_ids[0].tolist() == expect
    assert one.pixel_values.shape == (1, 1, 3, 384, 384) and not one.tile_is_real.any()
    assert one.images_spatial_crop.tolist() == [[[0, 0]]]
    assert not one.images_seq_mask.any()
    batch = processor([conv, [{"role": "user", "content": "Hi"}]])
    assert batch.pixel_values.shape == (2, 1, 3, 384, 384)
    assert batch.images_spatial_crop.tolist() == [[[0, 0]], [[0, 0]]]
    assert batch.input_ids.shape == (2, len(expect))
    assert batch.attention_mask.dtype == torch.bool and batch.images_seq_mask.dtype == torch.bool
    assert batch.seq_lens[1] < batch.seq_lens[0] and not batch.attention_mask[1, 0]


def test_three_images_disable_cropping(processor, tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGB", (2000, 300), (200, 10, 10)).save(path)
    two = processor([{"role": "user", "content": "<image><image>", "images": [path, path]}])
    assert two.images_spatial_crop[0].tolist() == [[6, 1], [6, 1]]
    three = processor([{"role": "user", "content": "<image><image>"},
                       {"role": "assistant", "content": "ok"},
                       {"role": "user", "content": "<image>", "images": [path, path, path]}])
    assert three.images_spatial_crop[0].tolist() == [[1, 1]] * 3  # counted over all turns
    assert three.best_resolutions == [[(384, 384)] * 3]
    assert three.num_image_tokens == [[421] * 3]
    px = three.pixel_values[0]
    assert torch.equal(px[0], px[1])  # the single local tile duplicates the global view


@pytest.mark.parametrize("size", [(1, 1), (10000, 10), (10, 10000), (13, 9)])
def test_extreme_image_sizes(processor, tmp_path, size):
    path = tmp_path / "img.png"
    Image.new("RGB", size, (0, 255, 0)).save(path)
    out = processor([{"role": "user", "content": [{"type": "image", "image": str(path)}, {"type": "text", "text": "?"}]}])
    tw, th = out.images_spatial_crop[0, 0].tolist()
    assert out.best_resolutions[0][0] == (tw * 384, th * 384)
    assert out.pixel_values.shape == (1, 1 + tw * th, 3, 384, 384)
    assert int(out.images_seq_mask.sum()) == num_image_tokens(tw, th)
    assert torch.isfinite(out.pixel_values).all()


def test_processor_config_checks(tokenizer):
    from dsvl2.errors import ConfigError
    with pytest.raises(ConfigError, match="not multiples of the tile size 384"):
        Processor(tokenizer, ProcessorConfig.from_hf({"candidate_resolutions": [[384, 384], [500, 384]]}))
    raw = Processor(tokenizer, ProcessorConfig.from_hf({"candidate_resolutions": REAL_CANDIDATES, "normalize": False}))
    out = raw([{"role": "user", "content": "<image>", "images": [Image.new("RGB", (384, 384), (255, 0, 0))]}])
    assert out.pixel_values[0, 0, 0].eq(1.0).all() and out.pixel_values[0, 0, 1].eq(0.0).all()


def test_batchinputs_to():
    b = BatchInputs(input_ids=torch.zeros(1, 2, dtype=torch.int64), attention_mask=torch.ones(1, 2, dtype=torch.bool),
                    images_seq_mask=torch.zeros(1, 2, dtype=torch.bool),
                    images_spatial_crop=torch.zeros(1, 1, 2, dtype=torch.int64),
                    pixel_values=torch.zeros(1, 1, 3, 4, 4), tile_is_real=torch.zeros(1, 1, dtype=torch.bool),
                    seq_lens=[2], num_image_tokens=[[]], best_resolutions=[[]], image_sizes=[[]], images=[[]],
                    prompts=[""])
    moved = b.to("cpu", dtype=torch.bfloat16)
    assert moved.pixel_values.dtype == torch.bfloat16 and moved.input_ids.dtype == torch.int64
    assert b.pixel_values.dtype == torch.float32 and len(moved) == 1


# ---------------------------------------------------------------------------------------
# pure image functions
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("size, expected", [
    ((1, 1), (384, 384)),          # every candidate holds 1 pixel: least waste wins
    ((13, 9), (384, 384)),
    ((10000, 10), (3456, 384)),    # fitted 3456 x int(3.456) = 3 rows: the widest canvas
    ((10, 10000), (384, 3456)),
    ((878, 620), (1152, 768)),     # c01
    ((724, 1086), (768, 1152)),    # c02
    ((2000, 300), (2304, 384)),    # c04
    ((300, 1600), (384, 1920)),    # c05
    ((1504, 601), (1536, 768)),    # c07
    ((450, 308), (768, 384)),      # c08
])
def test_select_best_resolution_real_candidates(size, expected):
    assert select_best_resolution(*size, REAL_CANDIDATES) == expected


def test_select_best_resolution_exact_candidate_sizes():
    for w, h in REAL_CANDIDATES:
        assert select_best_resolution(w, h, REAL_CANDIDATES) == (w, h)


def test_select_best_resolution_ties():
    # equal effective area and equal waste: the first in the list wins
    assert select_best_resolution(100, 100, [(768, 384), (384, 768)]) == (768, 384)
    assert select_best_resolution(100, 100, [(384, 768), (768, 384)]) == (384, 768)
    # equal effective area, different waste: the smaller waste wins wherever it is listed
    assert select_best_resolution(100, 100, [(768, 768), (384, 384)]) == (384, 384)
    # a larger effective area beats a smaller waste
    assert select_best_resolution(800, 800, [(384, 384), (768, 768)]) == (768, 768)
    # the fitted size is truncated, not rounded: 33 x 16 into 16 x 8 -> 16 x int(7.76) = 112 px,
    # into 17 x 8 -> int(16.5) x 8 = 128 px (rounding would make both 128 and pick 16 x 8)
    assert select_best_resolution(33, 16, [(16, 8), (17, 8)]) == (17, 8)
    with pytest.raises(ValueError):
        select_best_resolution(10, 10, [])


def test_num_image_tokens():
    assert tokens_per_tile_side(384, 14, 2) == 14
    assert num_image_tokens(1, 1) == 421
    assert num_image_tokens(3, 2) == 1415
    assert num_image_tokens(4, 2) == 1807
    assert num_image_tokens(2, 3) == 1429
    assert num_image_tokens(6, 1) == 1401
    assert num_image_tokens(1, 5) == 1261
    assert num_image_tokens(2, 1, side=2) == 2 * 3 + 1 + 2 * 5


def test_image_to_tiles_layout():
    # a 768 x 384 image with a distinct colour per half: the two local tiles are the halves
    img = Image.new("RGB", (768, 384), (255, 0, 0))
    img.paste((0, 0, 255), (384, 0, 768, 384))
    tiles, (tw, th) = image_to_tiles(img, (768, 384), 384, pad_color((0.5, 0.5, 0.5)))
    assert tiles.dtype == np.uint8 and tiles.shape == (3, 3, 384, 384) and (tw, th) == (2, 1)
    assert (tiles[1, 0] == 255).all() and (tiles[1, 2] == 0).all()
    assert (tiles[2, 2] == 255).all() and (tiles[2, 0] == 0).all()
    # the global view is letterboxed with the pad colour 127 (int(0.5 * 255))
    assert pad_color((0.5, 0.5, 0.5)) == (127, 127, 127)
    assert (tiles[0, :, 0, 0] == 127).all() and (tiles[0, :, 383, 383] == 127).all()
    # a grid of 2 x 2: row-major order
    img = Image.new("RGB", (768, 768))
    for k, (x, y) in enumerate([(0, 0), (384, 0), (0, 384), (384, 384)]):
        img.paste((k * 60, 0, 0), (x, y, x + 384, y + 384))
    tiles, grid = image_to_tiles(img, (768, 768), 384)
    assert grid == (2, 2)
    assert [int(tiles[1 + k, 0, 100, 100]) for k in range(4)] == [0, 60, 120, 180]
    with pytest.raises(ValueError):
        image_to_tiles(img, (700, 384), 384)


def test_normalize_tiles_values():
    u8 = torch.tensor([0, 127, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    x = normalize_tiles(u8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert x.dtype == torch.float32
    assert x[0, 0, 0, 0] == -1.0 and x[0, 2, 0, 0] == 1.0
    assert x[0, 1, 0, 0] == torch.tensor(127 / 255, dtype=torch.float32).sub(0.5).div(0.5)


# ---------------------------------------------------------------------------------------
# loading images
# ---------------------------------------------------------------------------------------

def test_load_image_sources(tmp_path):
    data = _png_bytes((8, 6), "L", 50)
    path = tmp_path / "a.png"
    path.write_bytes(data)
    for src in (path, str(path), data, bytearray(data), "data:image/png;base64," + base64.b64encode(data).decode(),
                Image.open(path)):
        img = load_image(src)
        assert img.mode == "RGB" and img.size == (8, 6)
        assert img.getpixel((0, 0)) == (50, 50, 50)


def test_load_image_ignores_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees": the reference does not apply it, neither do we
    path = tmp_path / "rot.jpg"
    Image.new("RGB", (40, 20), (1, 2, 3)).save(path, "JPEG", exif=exif)
    assert load_image(path).size == (40, 20)


def test_load_image_errors(tmp_path, monkeypatch):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(ImageError, match="not found.*nope.jpg"):
        load_image(missing)
    text = tmp_path / "notes.txt"
    text.write_text("hello, not an image")
    with pytest.raises(ImageError, match=r"notes\.txt.*not an image.*PNG"):
        load_image(text)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(_png_bytes((300, 300), color=(1, 2, 3))[:-300])
    with pytest.raises(ImageError, match=r"cut\.png.*(corrupt|truncated)"):
        load_image(truncated)
    jpeg = io.BytesIO()
    Image.effect_noise((256, 256), 50).convert("RGB").save(jpeg, "JPEG")
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    with pytest.raises(ImageError, match="not a file"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match="remote URLs are not fetched"):
        load_image("https://example.com/cat.png")
    with pytest.raises(ImageError, match="remote URLs"):
        load_image("HTTP://example.com/cat.png")
    with pytest.raises(ImageError, match="bad data URL"):
        load_image("data:image/png;base64,@@@not base64@@@")
    with pytest.raises(ImageError, match="bad data URL"):
        load_image("data:text/plain;base64,aGVsbG8=")
    with pytest.raises(ImageError, match="bad data URL"):
        load_image("data:image/png;base64")
    with pytest.raises(ImageError, match="cannot load an image from a int"):
        load_image(42)
    # decompression bombs: beyond Pillow's hard limit (twice MAX_IMAGE_PIXELS) -> ImageError;
    # in the warning band (a 100 MP phone photo) the image loads, without a warning
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_bytes((100, 100)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(bomb).size == (100, 100)  # 10000 px: between the limit and twice it
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    with pytest.raises(ImageError, match="too large"):
        load_image(bomb)  # over twice the limit (Pillow raises)


# ---------------------------------------------------------------------------------------
# bit depth: 8-bit images exactly as the reference, 16-bit scaled (the reference clips)
# ---------------------------------------------------------------------------------------

def _png16(samples: np.ndarray) -> bytes:
    """A 16-bit PNG written by hand (Pillow cannot write 48/64-bit RGB(A)): ``samples`` is
    uint16 [H, W] (gray), [H, W, 2] (gray + alpha), [H, W, 3] (RGB) or [H, W, 4] (RGBA)."""
    h, w = samples.shape[:2]
    channels = 1 if samples.ndim == 2 else samples.shape[2]
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = samples.reshape(h, w * channels).astype(">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 on each row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


# 16-bit samples around every rounding boundary, and the ends of the range
SAMPLES16 = np.array([[0, 1, 128, 129, 257, 385, 386, 1000], [32767, 32768, 40000, 65278, 65279, 65534, 65535, 0]],
                     dtype=np.uint16)


def _expected8(v: np.ndarray) -> np.ndarray:
    return np.floor(v.astype(np.float64) / 257 + 0.5).astype(np.uint8)  # round(v / 257), half up


def test_16bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "gray16.png"
    Image.fromarray(SAMPLES16).save(path)  # Pillow writes mode I;16 as a 16-bit grayscale PNG
    with Image.open(path) as im:
        assert im.mode == "I;16"
        clipped = np.asarray(im.convert("RGB"))[..., 0]
    assert (clipped[SAMPLES16 > 255] == 255).all()  # what the reference sees: white
    got = np.asarray(load_image(path))  # [H, W, 3]
    assert got.dtype == np.uint8 and (got == _expected8(SAMPLES16)[..., None]).all()
    assert got[1, 1].tolist() == [128, 128, 128] and got[1, 6].tolist() == [255, 255, 255]
    assert (np.asarray(load_image(path.read_bytes())) == got).all()  # the same from bytes


def test_other_16bit_sources_are_scaled():
    big_endian = Image.new("I;16B", (2, 1), 1000)
    assert np.asarray(load_image(big_endian)).tolist() == [[[4, 4, 4]] * 2]
    # Pillow opens a 16-bit PGM as mode I, stretched to 0..65535
    pgm = b"P5\n3 1\n65535\n" + np.array([0, 32768, 65535], dtype=">u2").tobytes()
    with Image.open(io.BytesIO(pgm)) as im:
        assert im.mode == "I"
    assert np.asarray(load_image(pgm))[0, :, 0].tolist() == [0, 128, 255]
    # mode I outside 0..65535 is clipped to the range first
    wide = Image.fromarray(np.array([[-5, 70000, 257 * 100]], dtype=np.int32))
    assert wide.mode == "I" and np.asarray(load_image(wide))[0, :, 0].tolist() == [0, 255, 100]


def test_float_images_are_scaled():
    unit = Image.fromarray(np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32))  # a 0..1 float image
    assert unit.mode == "F"
    assert np.asarray(load_image(unit))[0, :, 0].tolist() == [0, 64, 128, 255]
    eight = Image.fromarray(np.array([[0.0, 2.0, 100.4, 300.0, -3.0, np.nan]], dtype=np.float32))  # 0..255 scale
    assert np.asarray(load_image(eight))[0, :, 0].tolist() == [0, 2, 100, 255, 0, 0]


@pytest.mark.parametrize("channels", [3, 4, 2])
def test_48_and_64_bit_pngs_keep_pillows_8_bits(channels):
    # Pillow itself decodes 16-bit RGB / RGBA / gray+alpha PNGs to 8 bits per channel
    # (the high byte): nothing is clipped, and the result is the reference's bit for bit.
    rng = np.random.default_rng(channels)
    samples = rng.integers(0, 65536, size=(5, 7, channels), dtype=np.uint16)
    samples[0, :4, 0] = [0, 255, 32768, 65535]
    data = _png16(samples)
    got = np.asarray(load_image(data))
    with Image.open(io.BytesIO(data)) as im:
        reference = np.asarray(im.convert("RGB"))
    assert (got == reference).all()
    color = samples[..., :3] if channels >= 3 else np.repeat(samples[..., :1], 3, axis=2)
    assert (got == (color >> 8)).all()
    assert got[0, :4, 0].tolist() == [0, 0, 128, 255]


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr"])
def test_8bit_modes_are_the_reference_bit_for_bit(mode, tmp_path):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(9, 13, 3), dtype=np.uint8))
    img = rgb.convert(mode)
    assert load_image(img).tobytes() == img.convert("RGB").tobytes()
    if mode in ("CMYK", "YCbCr"):
        return  # PNG cannot hold these; JPEG / TIFF files go through the same convert
    path = tmp_path / f"{mode}.png"
    img.save(path)
    with Image.open(path) as im:
        assert load_image(path).tobytes() == im.convert("RGB").tobytes()


def test_test_images_load_as_the_reference():
    files = sorted(p for p in IMAGES.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    assert len(files) >= 10
    for path in files:
        with Image.open(path) as im:
            assert load_image(path).tobytes() == im.convert("RGB").tobytes(), path


# ---------------------------------------------------------------------------------------
# conversations
# ---------------------------------------------------------------------------------------

def test_normalize_conversation_formats():
    turns = normalize_conversation([{"role": "user", "content": [{"type": "image", "image": "cat.jpg"},
                                                                 {"type": "text", "text": "Describe"}]}])
    assert [(t.role, t.text, t.images) for t in turns] == [("user", "<image>\nDescribe", ["cat.jpg"]),
                                                            ("assistant", "", [])]
    ref = normalize_conversation([{"role": "<|User|>", "content": "<image>\nDescribe", "images": ["cat.jpg"]},
                                  {"role": "<|Assistant|>", "content": ""}])
    assert ref == turns
    # tags and images are matched globally in order; each turn gets its own tags' images
    turns = normalize_conversation([{"role": "user", "content": "<image> and <image>", "images": ["a", "b", "c"]},
                                    {"role": "assistant", "content": "ok"},
                                    {"role": "user", "content": "<image>?"}])
    assert [t.images for t in turns] == [["a", "b"], [], ["c"], []]
    # a final empty (or blank) assistant turn is the generation prompt
    turns = normalize_conversation([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}])
    assert len(turns) == 2


def test_prompt_pieces_layout():
    turns = normalize_conversation([{"role": "system", "content": " Be brief. "},
                                    {"role": "user", "content": " <image>\nHi "},
                                    {"role": "assistant", "content": " Hello "},
                                    {"role": "user", "content": "More?"}], images=["x.png"])
    assert prompt_pieces(turns) == [Special.BOS, "Be brief.", "<|User|>: <image>\nHi\n\n<|Assistant|>:",
                                    "Hello", Special.EOS, "<|User|>: More?\n\n<|Assistant|>:"]


def test_prompt_ids_layout(processor, tokenizer):
    out = processor([{"role": "system", "content": "Sys."}, {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "Again"}])
    enc = tokenizer.encode
    expect = ([tokenizer.bos_id] + enc("Sys.") + enc("<|User|>: Hi\n\n<|Assistant|>:") + enc("Yo") + [tokenizer.eos_id]
              + enc("<|User|>: Again\n\n<|Assistant|>:"))
    assert out.input_ids[0].tolist() == expect
    assert out.prompts == ["<｜begin▁of▁sentence｜>Sys.<|User|>: Hi\n\n<|Assistant|>:Yo<｜end▁of▁sentence｜>"
                           "<|User|>: Again\n\n<|Assistant|>:"]
    # each piece around an image is encoded on its own: a space before an image stays a token
    img = Image.new("RGB", (20, 20))
    out = processor([{"role": "user", "content": "look <image> here", "images": [img]}])
    ids = out.input_ids[0].tolist()
    first = ids.index(tokenizer.image_id)
    assert ids[1:first] == enc("<|User|>: look ")
    assert ids[first + 421:] == enc(" here\n\n<|Assistant|>:")


@pytest.mark.parametrize("messages, images, pattern", [
    ([], None, "empty"),
    ([{"role": "robot", "content": "hi"}], None, r"unknown role 'robot'.*'user', 'assistant', 'system'"),
    ([{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}], None, "system.*only allowed as the first"),
    ([{"role": "user", "content": 5}], None, "'content' must be a string or a list"),
    ([{"role": "user"}], None, "no 'content'"),
    ([{"role": "user", "content": "<image><image>", "images": ["a.png"]}], None, "2 '<image>' tag.*1 image"),
    ([{"role": "user", "content": "<image>", "images": ["a.png", "b.png"]}], None, "1 '<image>' tag.*2 image"),
    ([{"role": "user", "content": "no tag"}], ["a.png"], "0 '<image>' tag.*1 image"),
    ([{"role": "user", "content": [{"type": "image"}]}], None, "image part has no image"),
    ([{"role": "user", "content": [{"type": "image"}]}], ["a.png", "b.png"], "2 images were passed but only 1"),
    ([{"role": "user", "content": [{"type": "audio"}]}], None, "unknown part type 'audio'"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], None, "'image_url' part needs"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<image>", "images": ["a"]}], None,
     "only allowed in user messages"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "an answer"}], None,
     "ends with a non-empty assistant message"),
    ({"role": "user", "content": "hi"}, None, "list of messages"),
    # an empty prompt: nothing to answer (not a whole answer of max_new_tokens to nothing)
    ([{"role": "user", "content": ""}], None, "no text and no image"),
    ([{"role": "<|User|>", "content": " \n ", "images": []}], None, "no text and no image"),
    ([{"role": "user", "content": [{"type": "text", "text": ""}]}], None, "no text and no image"),
    ([{"role": "system", "content": ""}, {"role": "user", "content": [" "]}, {"role": "assistant", "content": ""}],
     None, "no text and no image"),
])
def test_conversation_errors(messages, images, pattern):
    with pytest.raises(ConversationError, match=pattern) as info:
        normalize_conversation(messages, images)
    assert isinstance(info.value, ValueError)


def test_an_image_alone_or_a_system_message_alone_is_a_prompt(processor):
    img = Image.new("RGB", (20, 20))
    assert processor([{"role": "user", "content": [{"type": "image", "image": img}]}]).seq_lens[0] > 421
    assert len(normalize_conversation([{"role": "system", "content": "Be brief."}, {"role": "user", "content": ""}])) == 3


LITERAL = "look at <image> here"


def _text_ids(tokenizer, text: str) -> list[int]:
    return [tokenizer.bos_id] + tokenizer.encode(f"<|User|>: {text}\n\n<|Assistant|>:", image_tag_is_text=True)


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": [{"type": "text", "text": LITERAL}]}],
    [{"role": "user", "content": LITERAL}],  # a string in an OpenAI-style conversation
    [{"role": "system", "content": "Say <image>."}, {"role": "user", "content": LITERAL},
     {"role": "assistant", "content": "An <image> tag."}, {"role": "user", "content": [LITERAL]}],
])
def test_image_tag_typed_in_openai_messages_is_text(processor, tokenizer, messages):
    """OpenAI-style messages take images from image parts only: an ``<image>`` in their
    text is those characters, tokenised as text (not the image token, not an error)."""
    turns = normalize_conversation(messages)
    assert all(t.tag_count() == 0 and not t.images for t in turns)
    out = processor(messages)
    ids = out.input_ids[0].tolist()
    assert tokenizer.image_id not in ids and not out.images_seq_mask.any()
    assert LITERAL in tokenizer.decode(ids) and tokenizer.decode(ids).count("<image>") == str(messages).count("<image>")
    if len(messages) == 1:
        assert ids == _text_ids(tokenizer, LITERAL)
        assert tokenizer.decode(ids) == f"{tokenizer.bos_token}<|User|>: {LITERAL}\n\n<|Assistant|>:"


def test_image_parts_are_tags_and_typed_tags_stay_text(processor, tokenizer):
    img = Image.new("RGB", (20, 20))
    msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": " a <image> b"}]}]
    (turn, _) = normalize_conversation(msgs)
    assert turn.text == "<image>\n a <image> b" and turn.tags == [0] and turn.images == [img]
    pieces = prompt_pieces(normalize_conversation(msgs))
    assert pieces[1] == "<|User|>: <image>\n a <image> b\n\n<|Assistant|>:" and pieces[1].split_tags() == [
        "<|User|>: ", "\n a <image> b\n\n<|Assistant|>:"]
    out = processor(msgs)
    ids = out.input_ids[0].tolist()
    n = out.num_image_tokens[0][0]
    first = ids.index(tokenizer.image_id)
    assert ids.count(tokenizer.image_id) == n == int(out.images_seq_mask.sum())
    assert ids[1:first] == tokenizer.encode("<|User|>: ")
    assert ids[first + n:] == tokenizer.encode("\n a <image> b\n\n<|Assistant|>:", image_tag_is_text=True)
    assert tokenizer.decode(ids[first + n:]) == "\n a <image> b\n\n<|Assistant|>:"
    # a bare image part served by the images argument: the conversation stays OpenAI-style
    bare = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": LITERAL}]}]
    assert processor(bare, images=[img]).input_ids[0].tolist() == ids[:first + n] + tokenizer.encode(
        f"\n{LITERAL}\n\n<|Assistant|>:", image_tag_is_text=True)


@pytest.mark.parametrize("messages, images", [
    ([{"role": "<|User|>", "content": LITERAL, "images": ["IMG"]}], None),  # the reference's format
    ([{"role": "user", "content": LITERAL, "images": ["IMG"]}], None),  # an images key: tags
    ([{"role": "user", "content": LITERAL}], ["IMG"]),  # images passed for tags
])
def test_reference_format_keeps_its_tags(processor, tokenizer, messages, images):
    img = Image.new("RGB", (20, 20))
    swap = [{**m, "images": [img]} if "images" in m else m for m in messages]
    out = processor(swap, images=None if images is None else [img])
    assert out.input_ids[0].tolist().count(tokenizer.image_id) == out.num_image_tokens[0][0] > 0
    with pytest.raises(ConversationError, match="1 '<image>' tag.*0 image"):
        normalize_conversation([{"role": "<|User|>", "content": LITERAL}])


def test_encode_image_tag_as_text(tokenizer):
    for text in ("plain text", "a <|ref|>cat<|/ref|> b", "<|grounding|>x\n<|User|>"):
        assert tokenizer.encode(text, image_tag_is_text=True) == tokenizer.encode(text)  # no <image>: the same
    text = "<|ref|>a<|/ref|> <image><image> x <|grounding|><image>"
    ids = tokenizer.encode(text, image_tag_is_text=True)
    assert tokenizer.image_id not in ids and tokenizer.decode(ids) == text
    ref, grounding = tokenizer.token_to_id("<|ref|>"), tokenizer.token_to_id("<|grounding|>")
    assert ids[0] == ref and ids.count(grounding) == 1  # the other special tokens are still recognised
    assert ids[:3] == tokenizer.encode("<|ref|>a<|/ref|>")


def test_processor_image_errors(processor, tmp_path):
    bad = tmp_path / "readme.txt"
    bad.write_text("not an image")
    cut = tmp_path / "cut.png"
    cut.write_bytes(_png_bytes((200, 200))[:-200])
    cases = [(bad, r"readme\.txt.*not an image"), (cut, r"cut\.png.*(corrupt|truncated)"),
             (tmp_path / "missing.jpg", r"not found.*missing\.jpg"), ("https://x.org/a.jpg", "remote URLs")]
    for src, pattern in cases:
        with pytest.raises(ImageError, match=pattern) as info:
            processor([{"role": "user", "content": "<image>\nWhat?", "images": [src]}])
        assert isinstance(info.value, ValueError)
    # in a batch, the message says which conversation failed
    ok = [{"role": "user", "content": "hi"}]
    with pytest.raises(ImageError, match=r"conversation 1: .*not found"):
        processor([ok, [{"role": "user", "content": "<image>", "images": [tmp_path / "missing.jpg"]}]])
    with pytest.raises(ConversationError, match="conversation 0: .*unknown role"):
        processor([[{"role": "bot", "content": "x"}], ok])
    with pytest.raises(ConversationError, match="2 conversations but 1 image lists"):
        processor([ok, ok], images=[None])
    with pytest.raises(ConversationError):
        processor([])
    with pytest.raises(ConversationError):
        processor("hello")


# ---------------------------------------------------------------------------------------
# tokenizer and checkpoint loading
# ---------------------------------------------------------------------------------------

def test_tokenizer(tokenizer):
    assert len(tokenizer) == 2633
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.image_id) == (0, 1, 2, 2625)
    assert {0, 1, 2, *range(2625, 2633)} <= tokenizer.special_ids
    assert tokenizer.token_to_id("<|grounding|>") == 2630 and tokenizer.token_to_id("<nope>") is None
    assert tokenizer.id_to_token(2631) == "<|User|>" and tokenizer.id_to_token(2700) is None
    assert tokenizer.id_to_token(-1) is None
    ids = tokenizer.encode("Hello <|ref|>cat<|/ref|>")
    assert tokenizer.token_to_id("<|ref|>") in ids and tokenizer.bos_id not in ids
    assert tokenizer.decode(ids) == "Hello <|ref|>cat<|/ref|>"
    # ids the model has but the tokenizer lacks decode to nothing, never raise
    assert tokenizer.decode([2700, *ids, 2687, -3, 10 ** 9]) == "Hello <|ref|>cat<|/ref|>"
    assert tokenizer.decode([0, *ids, 1], skip_special_tokens=True) == "Hello cat"
    assert tokenizer.encode("") == []
    assert tokenizer.decode(torch.tensor([0, 1])) == "<｜begin▁of▁sentence｜><｜end▁of▁sentence｜>"


def test_from_pretrained_and_errors(tmp_path):
    proc = Processor.from_pretrained(TOKENIZER_DIR)
    assert proc.image_size == 384 and proc.tokens_per_side == 14
    assert len(proc.config.candidate_resolutions) == 23
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        Processor.from_pretrained(tmp_path / "absent")
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
