"""Images -> tiles, exactly as the reference processor prepares them.

Pure functions, no model code:

* ``load_image(src)``: a path, PIL image, raw bytes or ``data:image/...;base64,`` URL ->
  RGB PIL image. Like the reference: ``Image.open`` + ``convert("RGB")``, and NO EXIF
  transpose (a rotated phone photo is seen as stored). Every failure is an ``ImageError``
  naming the source; decoding is forced inside the guard so a truncated file fails here,
  not later inside the tiler. Remote URLs are never fetched. One difference: images
  with more than 8 bits per sample (16-bit grayscale PNG / TIFF / PGM: modes ``I;16*``,
  ``I``; float ``F``) are scaled to 8 bits (``round(v / 257)``) where ``convert("RGB")``
  clips every value above 255 to white. 48/64-bit RGB(A) PNGs need nothing: Pillow
  already decodes them to 8 bits per channel (the high byte), as the reference sees them.
* ``select_best_resolution``: the reference's candidate choice (max effective area, then
  min waste, first in list wins; strict comparisons).
* ``num_image_tokens``: the closed-form count of ``<image>`` slots of one image.
* ``image_to_tiles``: global view + local canvas cut into tiles, as uint8.
* ``normalize_tiles``: uint8 -> float32 with the reference's exact op order.

Legend: S tile side (384), n tiles of one image (1 global + tw*th local),
tw / th number of local tiles across / down.

Pixel contract (the oracle checks it bit for bit): the global view is
``ImageOps.pad(img, (S, S), color=127)`` and the local canvas
``ImageOps.pad(img, (best_w, best_h), color=127)``; ``ImageOps.pad`` resizes with BICUBIC
(the short side rounded with Python's ``round``) and pastes centred. The pad colour is
``int(mean * 255)`` = 127, not 127.5, so padding normalises to -1/255, not 0. Float
pixels are ``((u8 as float32) / 255 - mean) / std`` evaluated in float32 in that order.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import warnings
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageError, ImageTooLargeError

__all__ = [
    "ImageSource",
    "load_image",
    "select_best_resolution",
    "num_image_tokens",
    "tokens_per_tile_side",
    "pad_color",
    "image_to_tiles",
    "normalize_tiles",
]

ImageSource = Union[str, Path, bytes, bytearray, Image.Image]

_FORMATS_HINT = "JPEG, PNG, WebP, GIF, BMP or TIFF (anything Pillow can decode)"


# ---------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------

def _describe(src) -> str:
    """A short name for an image source, for error messages (never the whole payload)."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    if isinstance(src, str) and src.startswith("data:"):
        return src[:40] + ("..." if len(src) > 40 else "")
    return repr(str(src))


def _decode_data_url(url: str) -> bytes:
    # data:[<mediatype>][;base64],<data>; only base64 image payloads make sense here.
    head, sep, payload = url.partition(",")
    if not sep:
        raise ImageError(f"bad data URL {_describe(url)}: no ',' separating the header from the data")
    if not head.startswith("data:image/") or not head.endswith(";base64"):
        raise ImageError(f"bad data URL {_describe(url)}: expected 'data:image/<format>;base64,<data>'")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"bad data URL {_describe(url)}: the payload is not valid base64 ({e})") from None


# Full-scale value of the high-bit-depth modes that convert("RGB") would clip at 255.
# Pillow's decoders give 16-bit grayscale as I;16* and as I (PGM, 32-bit TIFF), the
# latter already stretched to 0..65535, so both are read as 16-bit.
BLOCK_PIXELS = 1 << 20  # pixels converted at a time by _to_rgb
_FULL_SCALE = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "I": 65535}


def _to_rgb(img: Image.Image) -> Image.Image:
    """``img.convert("RGB")``, except that high-bit-depth grayscale is scaled to 8 bits.

    8-bit modes (L, P, RGB, RGBA, CMYK, ...) go through ``convert("RGB")`` unchanged, so
    they stay bit-identical to the reference. A 16-bit value v becomes round(v / 257)
    (0 -> 0, 32768 -> 128, 65535 -> 255) instead of min(v, 255); values outside the
    range are clipped. Float images (F) have no declared range: values all within
    [0, 1] are read as 0..1, anything else on Pillow's own 0..255 scale.
    """
    if img.mode not in _FULL_SCALE and img.mode != "F":
        return img.convert("RGB")
    # Blocks of rows: whole-image int32 / float temporaries cost ~16 bytes a pixel (2.9 GB
    # for a 350 kB 16-bit PNG at the pixel limit); blocks keep them to ~16 MB.
    W, H = img.size
    rows = max(1, BLOCK_PIXELS // max(W, 1))
    blocks = [(y, min(H, y + rows)) for y in range(0, H, rows)]

    def block(y0: int, y1: int) -> np.ndarray:
        return np.asarray(img.crop((0, y0, W, y1)))  # [y1 - y0, W]

    def floats(y0: int, y1: int) -> np.ndarray:
        return np.nan_to_num(block(y0, y1).astype(np.float32), nan=0.0, posinf=255.0, neginf=0.0)

    u8 = np.empty((H, W), np.uint8)
    if img.mode == "F":
        top = 1.0
        for y0, y1 in blocks:
            a = floats(y0, y1)
            if a.min() < 0 or a.max() > 1:
                top = 255.0
                break
        for y0, y1 in blocks:
            u8[y0:y1] = np.rint(np.clip(floats(y0, y1), 0, top) * (255 / top))
    else:
        for y0, y1 in blocks:
            v = np.clip(block(y0, y1).astype(np.int32), 0, _FULL_SCALE[img.mode])  # int32: no overflow
            u8[y0:y1] = (v + 128) // 257  # = round(v / 257): v / 257 is never exactly k + 0.5 (257 is odd)
    return Image.fromarray(u8).convert("RGB")  # [H, W] uint8 -> L -> RGB


def _open_rgb(fp, name: str) -> Image.Image:
    """Open, fully decode and convert to RGB, turning every Pillow failure into ImageError."""
    try:
        with warnings.catch_warnings():
            # Pillow warns between MAX_IMAGE_PIXELS (~89 MP) and twice that, and refuses
            # beyond. Photos from today's phones (100+ MP) sit in the warning band and are
            # legitimate input (they are downscaled to at most a few tiles anyway), so the
            # warning is silenced and only Pillow's hard limit (~179 MP) is an error.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fp) as img:
                img.load()  # force decoding here: truncated / corrupt data fails now
                return _to_rgb(img)
    except Image.DecompressionBombError as e:  # from the declared size, before decoding
        raise ImageTooLargeError(f"image {name} is too large to decode safely ({e}); "
                                 f"the limit is {2 * Image.MAX_IMAGE_PIXELS} pixels") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name} is not an image Pillow can read; use {_FORMATS_HINT}") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise ImageError(f"image {name} is corrupt or truncated and cannot be decoded ({e})") from None


def load_image(src: ImageSource) -> Image.Image:
    """Load one image as an RGB PIL image, like the reference (no EXIF transpose).

    ``src`` is a file path (``str`` / ``Path``), a PIL image, raw encoded bytes or a
    ``data:image/<format>;base64,...`` URL. http(s) URLs are refused (nothing is fetched).

    Example::

        >>> load_image("photo.jpg").size          # doctest: +SKIP
        (878, 620)
        >>> load_image(Image.new("L", (3, 2))).mode
        'RGB'
        >>> load_image("https://example.com/a.png")
        Traceback (most recent call last):
        ...
        dsvl2.errors.ImageError: remote URLs are not fetched; download the file and pass its path: 'https://example.com/a.png'
    """
    if isinstance(src, Image.Image):
        try:
            return _to_rgb(src)
        except (OSError, ValueError) as e:
            raise ImageError(f"the PIL image ({src.mode}, {src.size}) cannot be converted to RGB ({e})") from None
    if isinstance(src, (bytes, bytearray, memoryview)):
        return _open_rgb(io.BytesIO(bytes(src)), _describe(src))
    if isinstance(src, str):
        lowered = src[:8].lower()
        if lowered.startswith(("http://", "https://")):
            raise ImageError(f"remote URLs are not fetched; download the file and pass its path: {src!r}")
        if lowered.startswith("data:"):
            return _open_rgb(io.BytesIO(_decode_data_url(src)), _describe(src))
    if not isinstance(src, (str, Path)):
        raise ImageError(f"cannot load an image from a {type(src).__name__}; pass a path, "
                         "a PIL image, bytes or a data:image/...;base64 URL")
    path = Path(src)
    if not path.exists():
        raise ImageError(f"image file not found: {str(path)!r}")
    if not path.is_file():
        raise ImageError(f"image path is not a file: {str(path)!r}")
    try:
        with open(path, "rb") as f:
            return _open_rgb(f, repr(str(path)))
    except PermissionError as e:
        raise ImageError(f"image file {str(path)!r} cannot be read ({e.strerror})") from None


# ---------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------

def select_best_resolution(width: int, height: int,
                           candidates: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """Pick the candidate canvas (w, h) for an image of ``width`` x ``height``.

    For each candidate in list order: scale = min(w / W, h / H); the image fitted into
    it is (int(W * scale), int(H * scale)); effective = min(fitted area, W * H) (upscaling
    adds no information); waste = w * h - effective. The best candidate has the largest
    effective area, then the smallest waste; on a full tie the earlier one stays.

    Example (878 x 620 photo, the real 23 candidates): 1152 x 768 gives scale
    min(1.312, 1.239) = 1.239 -> fitted 1087 x 768 -> effective = min(834816, 544360) =
    544360 (every candidate that can hold the whole image reaches this), waste =
    884736 - 544360 = 340376, the smallest among them -> ``(1152, 768)``, i.e. 3 x 2 tiles.

        >>> select_best_resolution(878, 620, [(384, 384), (768, 768), (1152, 768)])
        (1152, 768)
    """
    best: tuple[int, int] | None = None
    best_effective, best_waste = -1, math.inf
    for w, h in candidates:
        scale = min(w / width, h / height)
        fitted_w, fitted_h = int(width * scale), int(height * scale)
        effective = min(fitted_w * fitted_h, width * height)
        waste = w * h - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (int(w), int(h)), effective, waste
    if best is None:
        raise ValueError("select_best_resolution: the candidate list is empty")
    return best


def tokens_per_tile_side(image_size: int = 384, patch_size: int = 14, downsample_ratio: int = 2) -> int:
    """Image tokens along one side of a tile: ceil((384 // 14) / 2) = ceil(27 / 2) = 14."""
    return math.ceil((image_size // patch_size) / downsample_ratio)


def num_image_tokens(num_width_tiles: int, num_height_tiles: int, side: int = 14) -> int:
    """Number of ``<image>`` slots of one image with a tw x th local grid.

    Global view: ``side`` rows of ``side`` tokens + 1 newline = side * (side + 1);
    one view separator; local grid: (th * side) rows of (tw * side) tokens + 1 newline.

        >>> num_image_tokens(1, 1)          # 210 + 1 + 14 * 15
        421
        >>> num_image_tokens(3, 2)          # 210 + 1 + 28 * 43
        1415
        >>> num_image_tokens(4, 2)          # 210 + 1 + 28 * 57
        1807
    """
    return side * (side + 1) + 1 + (num_height_tiles * side) * (num_width_tiles * side + 1)


def pad_color(mean: Sequence[float]) -> tuple[int, int, int]:
    """The canvas colour: int(m * 255) per channel (127 for mean 0.5, truncated not rounded)."""
    return tuple(int(m * 255) for m in mean)


# ---------------------------------------------------------------------------------------
# tiles
# ---------------------------------------------------------------------------------------

def _to_chw(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)  # [H, W, 3] -> [3, H, W]


def image_to_tiles(img: Image.Image, best: tuple[int, int], tile_size: int = 384,
                   color: tuple[int, int, int] = (127, 127, 127)) -> tuple[np.ndarray, tuple[int, int]]:
    """Cut one RGB image into [global view, local tiles row-major] as uint8.

    ``best`` = (best_w, best_h) from ``select_best_resolution`` (or (S, S) when cropping is
    off), both multiples of ``tile_size``. Returns (tiles [1 + tw * th, 3, S, S] uint8,
    (tw, th)).

    Example: an 878 x 620 photo with best (1152, 768) and S = 384: the global view is the
    photo resized to 384 x 271 (271 = round(620 / 878 * 384)) pasted at y = 56 on a grey
    384 x 384 canvas; the local canvas is the photo resized to 1088 x 768 pasted at x = 32
    on a grey 1152 x 768 canvas, cut into 3 x 2 tiles -> 7 tiles, (tw, th) = (3, 2).
    """
    best_w, best_h = best
    if best_w % tile_size or best_h % tile_size:
        raise ValueError(f"image_to_tiles: best resolution {best} is not a multiple of the tile size {tile_size}")
    tw, th = best_w // tile_size, best_h // tile_size
    global_view = ImageOps.pad(img, (tile_size, tile_size), color=color)
    local_view = ImageOps.pad(img, (best_w, best_h), color=color)
    local = _to_chw(local_view)  # [3, th*S, tw*S]
    # Row-major tiles: (row i, column j) is the crop at (j*S, i*S), as the reference crops.
    local = local.reshape(3, th, tile_size, tw, tile_size).transpose(1, 3, 0, 2, 4)  # [th, tw, 3, S, S]
    tiles = np.concatenate([_to_chw(global_view)[None], local.reshape(th * tw, 3, tile_size, tile_size)])
    return np.ascontiguousarray(tiles), (tw, th)  # [1 + tw*th, 3, S, S]


def normalize_tiles(tiles_u8: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [..., 3, S, S] -> float32, ((x / 255) - mean) / std in float32, in that order.

    The op order is the reference's (ToTensor, then Normalize) and is what makes the
    result bit-exact: with mean = std = 0.5, 0 -> -1.0, 127 -> -1/255, 255 -> 1.0.
    ``out`` (float32, same shape) receives the result, e.g. a slice of the batch tensor.
    """
    # In place on one float copy: the same ops in the same order (same bits), without
    # tile-sized temporaries (16 images: 57 MB each).
    x = tiles_u8.to(torch.float32) if out is None else out.copy_(tiles_u8)
    x.div_(255)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return x.sub_(m).div_(s)
