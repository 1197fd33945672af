"""DeepSeek-VL2: vision tower + projector + image-token assembly + language model.

Legend: B rows, T tokens, N tiles, P patches per tile, D language width, h = w = 14
image tokens per tile side, (tw, th) local tiles across / down.

Assembly per image (tile_tag "2D"; docs/reference-quirks.md, "Image tokens"): the global
view [h, w, D] gets an ``image_newline`` column -> h * (w + 1) tokens; the tw x th local
tiles are stitched into one (th * h) x (tw * w) grid plus a newline column; then global,
``view_seperator``, locals (``global_view_pos: head``) or locals, separator, global
(``tail``). The images of a row are concatenated and written, in order, into the row's
``images_seq_mask`` slots (``scatter_image_tokens``; the ``<image>`` token embeddings
there are ignored).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..config import ModelConfig
from .language import LanguageModel, LMOutput
from .vision import Projector, VisionTransformer


@dataclass
class ImageFeatures:
    """Vision / projector outputs for every real tile, in tower order (row, image, global then locals)."""

    vision: torch.Tensor | None  # [N, P, W]
    projected: torch.Tensor | None  # [N, h * w, D]
    per_row: list[torch.Tensor]  # B entries of [n_image_tokens_of_row, D]


def used_crops(row: list[list[int]]) -> list[tuple[int, int]]:
    """A row of ``images_spatial_crop`` -> the (tw, th) of its images (a zero entry ends it)."""
    used = []
    for tw, th in row:
        if tw == 0 or th == 0:
            break
        used.append((int(tw), int(th)))
    return used


def num_tiles(crops: list[tuple[int, int]]) -> int:
    """Tiles fed to the tower for these images: a global view plus tw * th locals each."""
    return sum(1 + tw * th for tw, th in crops)


def scatter_image_tokens(embeds: torch.Tensor, seq_mask: torch.Tensor, feats: torch.Tensor, where: str = "") -> None:
    """Write one row's image tokens ``feats`` [n, D] into its embeddings ``embeds`` [L, D]
    (in place, cast to their dtype) at the slots where ``seq_mask`` [T] (T <= L: the
    prompt's part) is true, in order. The engine's runner and ``prepare_inputs_embeds``
    both assemble through this. ``where`` starts the error message."""
    slots = seq_mask.nonzero().squeeze(-1)
    if feats.shape[0] != slots.numel():
        raise ValueError(f"{where}{slots.numel()} image slots in the prompt but "
                         f"{feats.shape[0]} image tokens from the images")
    embeds[slots] = feats.to(embeds.dtype)


class DeepseekVL2(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTransformer(cfg.vision)
        self.projector = Projector(cfg.projector)
        d = cfg.language.hidden_size
        self.image_newline = nn.Parameter(torch.zeros(d))
        self.view_seperator = nn.Parameter(torch.zeros(d))  # (sic) the checkpoint's name
        self.language = LanguageModel(cfg.language)

    @property
    def compute_dtype(self) -> torch.dtype:
        """Activations dtype: float32 on CPU (bf16 GEMMs are slow there), else the weights'."""
        w = self.language.lm_head.weight
        return torch.float32 if w.device.type == "cpu" else w.dtype

    # ---- images -----------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor, images_spatial_crop: torch.Tensor,
                      keep_tower_outputs: bool = False, tile_batch: int = 4,
                      progress: Callable[[int, int], None] | None = None) -> ImageFeatures:
        """pixel_values [B, Nmax, 3, S, S], images_spatial_crop [B, I, 2] -> image tokens per row.

        ``progress(tiles_done, tiles_total)`` is called after every batch of tiles.
        """
        dtype = self.compute_dtype
        crops = images_spatial_crop.tolist()
        tiles, layout = [], []  # layout[b] = list of (tw, th)
        for b, row in enumerate(crops):
            used = used_crops(row)
            layout.append(used)
            n = num_tiles(used)
            if n:
                tiles.append(pixel_values[b, :n])
        d = self.cfg.language.hidden_size
        if not tiles:
            empty = pixel_values.new_zeros(0, d, dtype=dtype)
            return ImageFeatures(None, None, [empty for _ in crops])
        flat = torch.cat(tiles).to(dtype)  # [N, 3, S, S]
        vis, proj = [], []
        if progress is not None:
            progress(0, flat.shape[0])
        for i in range(0, flat.shape[0], tile_batch):  # bounded memory for many tiles
            v = self.vision(flat[i:i + tile_batch])
            proj.append(self.projector(v))
            if keep_tower_outputs:
                vis.append(v)
            if progress is not None:
                progress(min(i + tile_batch, flat.shape[0]), flat.shape[0])
        projected = torch.cat(proj)  # [N, h*w, D]
        per_row, k = [], 0
        for used in layout:
            n = num_tiles(used)
            per_row.append(self.assemble_images(projected[k:k + n], used))
            k += n
        return ImageFeatures(torch.cat(vis) if keep_tower_outputs else None, projected, per_row)

    def warm_vision(self, max_tiles: int) -> None:
        """Create, at load, the oneDNN kernels a photo's vision would create in its request:
        for batches of 1 .. ``max_tiles`` tiles, the patch embedding, one tower block's
        prepacked products (``VisionTransformer.warm``) and the projector, on zeros. oneDNN
        builds a kernel for each new row count (~7-25 ms a product shape) and keeps it
        process-wide, whatever the thread: the first photo of the real tiny size (c01, a
        2-thread AMX Xeon, then in batches of 4, 1 and 2) spent 0.12 s of its vision on them
        (12 inner products). Each size costs one block's products here: on that model and
        machine 0.63-0.78 s for 1-4 tiles, 1.95-2.16 s for 1-8 (``api.load`` warms the
        runner's ``tile_batch``, 8, since a 7-tile photo now runs as one batch). Nothing of
        the model changes. For a model on the CPU (``api.load`` calls it there)."""
        dtype = self.compute_dtype
        side = self.cfg.vision.image_size // self.cfg.vision.patch_size
        with torch.inference_mode():
            for tiles in range(1, max_tiles + 1):
                self.vision.warm(tiles, dtype)
                self.projector(torch.zeros(tiles, side * side, self.cfg.vision.width, dtype=dtype))

    def tile_features(self, tiles: torch.Tensor) -> torch.Tensor:
        """Vision tower + projector for tiles [N, 3, S, S] -> [N, h * w, D] (compute dtype)."""
        return self.projector(self.vision(tiles.to(self.compute_dtype)))

    def assemble_images(self, projected: torch.Tensor, crops: list[tuple[int, int]]) -> torch.Tensor:
        """One row's projected tiles [N, h * w, D] (per image: global, then locals) laid out
        as its image tokens [n_image_tokens, D] for the images' (tw, th) in ``crops``."""
        d = self.cfg.language.hidden_size
        side = int(round(projected.shape[1] ** 0.5))
        newline = self.image_newline.to(projected.dtype)
        sep = self.view_seperator.to(projected.dtype)[None]
        parts, k = [], 0
        for tw, th in crops:
            g = projected[k].view(side, side, d)
            g = torch.cat([g, newline.expand(side, 1, d)], dim=1).reshape(-1, d)  # [h*(w+1), D]
            loc = projected[k + 1: k + 1 + tw * th].view(th, tw, side, side, d)
            loc = loc.permute(0, 2, 1, 3, 4).reshape(th * side, tw * side, d)  # stitched grid
            loc = torch.cat([loc, newline.expand(th * side, 1, d)], dim=1).reshape(-1, d)
            parts += [g, sep, loc] if self.cfg.global_view_pos == "head" else [loc, sep, g]
            k += 1 + tw * th
        return torch.cat(parts) if parts else projected.new_zeros(0, d)

    def prepare_inputs_embeds(self, input_ids: torch.Tensor, images_seq_mask: torch.Tensor,
                              pixel_values: torch.Tensor | None = None,
                              images_spatial_crop: torch.Tensor | None = None,
                              features: ImageFeatures | None = None,
                              progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Text embeddings with image tokens scattered in: [B, T, D]."""
        dtype = self.compute_dtype
        embeds = self.language.embed(input_ids, dtype)  # [B, T, D]
        if features is None and pixel_values is not None and images_seq_mask.any():
            features = self.encode_images(pixel_values, images_spatial_crop, progress=progress)
        if features is None:
            return embeds
        for b, feats in enumerate(features.per_row):
            scatter_image_tokens(embeds[b], images_seq_mask[b], feats, f"row {b}: ")
        return embeds

    # ---- whole forward (reference prefill) -------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, images_seq_mask: torch.Tensor,
                pixel_values: torch.Tensor | None = None, images_spatial_crop: torch.Tensor | None = None,
                *, inputs_embeds: torch.Tensor | None = None, output_hidden_states: bool = False,
                output_routing: bool = False, logits: str = "all") -> LMOutput:
        """One left-padded batch, no cache: the reference's prefill forward."""
        if inputs_embeds is None:
            inputs_embeds = self.prepare_inputs_embeds(input_ids, images_seq_mask, pixel_values, images_spatial_crop)
        _, ctx = self.language.padded_context(attention_mask, inputs_embeds.dtype)
        return self.language(inputs_embeds, ctx, output_hidden_states=output_hidden_states,
                             output_routing=output_routing, logits=logits)
