"""Conversations -> one left-padded batch of model inputs, exactly as the reference.

Per conversation (``Processor._process_one``):
  messages -> ``normalize_conversation`` -> ``prompt_pieces`` -> each text piece split at
  ``<image>``, every sub-piece encoded on its own (so BPE never merges across an image and
  a space before an image stays its own token) -> one run of ``num_image_tokens`` image
  ids per tag. In an OpenAI-style message an ``<image>`` typed as text is no tag: it is
  encoded as its characters (``conversation.Text``, ``Tokenizer.encode``). Images are tiled with cropping only if the conversation holds <= 2 images
  in total; otherwise every image uses (S, S): one local tile duplicating the global view.

Limits, checked before any pixel is tiled: at most ``max_images`` (16) images per
conversation, counted before any is decoded: with more than 2 images each costs 421
tokens, so 10 already overflow the 4096-token window of the released models, and
without the cap 1000 one-pixel images (a 70 kB request) would become 4 GB of float
tiles before the context check could refuse them. And at most ``max_pixels`` decoded
pixels per conversation (Pillow's own per-image limit, ~179 MP, ~0.5 GB as RGB), checked
after each image is decoded, so at most one image beyond it is ever held.

Batching (``Processor.collate``), same layout as the reference's ``batchify``:
  left padding with the pad id; tiles padded with all-zero float tiles to the batch
  maximum; ``images_spatial_crop`` padded with [0, 0] rows to the largest image count
  (at least one row); a text-only conversation has one all-zero placeholder tile and
  [[0, 0]]. Unlike the reference, ``images_seq_mask`` stays bool when rows differ in
  length (the reference's int64 mask made such batches crash).

Legend: B conversations, T tokens (longest row), n tiles (longest row, >= 1),
N images (most in a row, >= 1), S tile side (384).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from ..config import ProcessorConfig, load_processor_config
from ..errors import CheckpointError, ConfigError, ConversationError, ImageError, ImageTooLargeError
from .conversation import IMAGE_TAG, Special, Text, normalize_conversation, prompt_pieces
from .image import (image_to_tiles, load_image, normalize_tiles, num_image_tokens, pad_color,
    select_best_resolution, tokens_per_tile_side)
from .tokenizer import Tokenizer

__all__ = ["Processor", "BatchInputs"]

# Cropping (a local grid larger than one tile) only when a conversation has at most this
# many images; beyond it every image gets one local tile (the reference's rule).
MAX_IMAGES_WITH_CROPPING = 2
# Request limits (see the module docstring); instance attributes of Processor.
MAX_IMAGES = 16
MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS  # Pillow's hard limit for one image, ~179 MP


@dataclasses.dataclass
class BatchInputs:
    """Model inputs for B conversations (tensors) plus what later layers need (lists)."""

    input_ids: torch.Tensor            # [B, T] int64, left-padded with the pad id
    attention_mask: torch.Tensor       # [B, T] bool
    images_seq_mask: torch.Tensor      # [B, T] bool, True at the image-embedding slots
    images_spatial_crop: torch.Tensor  # [B, N, 2] int64 (tw, th); [0, 0] = no image
    pixel_values: torch.Tensor         # [B, n, 3, S, S] float32; padding tiles are 0.0
    tile_is_real: torch.Tensor         # [B, n] bool
    seq_lens: list[int]                                  # unpadded length per row
    num_image_tokens: list[list[int]]                    # per row, per image
    best_resolutions: list[list[tuple[int, int]]]        # local canvas (w, h) per image
    image_sizes: list[list[tuple[int, int]]]             # original (w, h) per image
    images: list[list[Image.Image]]                      # the loaded RGB originals
    prompts: list[str]                                   # tokenized text, one <image> per image (and any typed as text)

    _TENSORS = ("input_ids", "attention_mask", "images_seq_mask", "images_spatial_crop",
                "pixel_values", "tile_is_real")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "BatchInputs":
        """A copy with every tensor on ``device``; ``dtype`` (optional) applies to pixel_values only."""
        moved = {name: getattr(self, name).to(device) for name in self._TENSORS}
        if dtype is not None:
            moved["pixel_values"] = moved["pixel_values"].to(dtype)
        return dataclasses.replace(self, **moved)


@dataclasses.dataclass
class _Sample:
    """One conversation, unpadded."""

    ids: list[int]
    seq_mask: list[bool]
    tiles: np.ndarray                  # [n_i, 3, S, S] uint8, n_i = 0 for text-only
    crops: list[tuple[int, int]]       # (tw, th) per image
    num_tokens: list[int]
    best: list[tuple[int, int]]
    sizes: list[tuple[int, int]]
    images: list[Image.Image]
    prompt: str


class Processor:
    """DeepSeek-VL2 input processor: conversations -> ``BatchInputs``.

    Example::

        proc = Processor.from_pretrained("checkpoints/deepseek-vl2-tiny")
        batch = proc([{"role": "user", "content": [{"type": "image", "image": "cat.jpg"},
                                                   {"type": "text", "text": "Describe"}]}])
        batch.input_ids.shape      # [1, T]
        batch.pixel_values.shape   # [1, 1 + tw*th, 3, 384, 384]
    """

    def __init__(self, tokenizer: Tokenizer, config: ProcessorConfig):
        self.tokenizer = tokenizer
        self.config = config
        self.image_size = config.image_size  # S: the first candidate's width, as in the reference
        self.tokens_per_side = tokens_per_tile_side(self.image_size, config.patch_size, config.downsample_ratio)
        self.pad_color = pad_color(config.image_mean)
        self.max_images, self.max_pixels = MAX_IMAGES, MAX_PIXELS
        if config.image_token != IMAGE_TAG:
            raise CheckpointError(f"processor_config.image_token {config.image_token!r} is not supported "
                                  f"(only {IMAGE_TAG!r})")
        if tokenizer.image_token != config.image_token:
            raise CheckpointError(f"tokenizer image token {tokenizer.image_token!r} differs from the "
                                  f"processor's {config.image_token!r}")
        bad = [c for c in config.candidate_resolutions if c[0] % self.image_size or c[1] % self.image_size]
        if bad:
            raise ConfigError(f"processor_config.candidate_resolutions {bad} are not multiples of the tile "
                              f"size {self.image_size} (the first candidate's width)")
        # normalize=false keeps ToTensor's x / 255 only; the pad colour still comes from the mean
        self._mean, self._std = ((config.image_mean, config.image_std) if config.normalize
                                 else ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path) -> "Processor":
        """Build from a checkpoint folder: tokenizer files + ``processor_config.json``."""
        path = Path(checkpoint_dir)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint folder not found: {str(path)!r}")
        config = load_processor_config(path)
        tokenizer = Tokenizer.from_dir(path, image_token=config.image_token, pad_token=config.pad_token)
        return cls(tokenizer, config)

    # ---- one conversation -------------------------------------------------------------
    def _process_one(self, messages: Sequence[Mapping[str, Any]], images: Sequence | None) -> _Sample:
        turns = normalize_conversation(messages, images)
        sources = [src for t in turns for src in t.images]
        loaded = self._load_images(sources)
        cropping = len(loaded) <= MAX_IMAGES_WITH_CROPPING
        S = self.image_size

        tiles, crops, n_tokens, best_list = [], [], [], []
        for img in loaded:
            best = select_best_resolution(img.width, img.height, self.config.candidate_resolutions) if cropping else (S, S)
            t, (tw, th) = image_to_tiles(img, best, S, self.pad_color)  # [1 + tw*th, 3, S, S]
            tiles.append(t)
            crops.append((tw, th))
            n_tokens.append(num_image_tokens(tw, th, self.tokens_per_side))
            best_list.append(best)

        tok = self.tokenizer
        ids: list[int] = []
        seq_mask: list[bool] = []
        prompt: list[str] = []
        k = 0  # next image
        for piece in prompt_pieces(turns):
            if piece is Special.BOS or piece is Special.EOS:
                ids.append(tok.bos_id if piece is Special.BOS else tok.eos_id)
                seq_mask.append(False)
                prompt.append(tok.bos_token if piece is Special.BOS else tok.eos_token)
                continue
            prompt.append(piece)
            literal = isinstance(piece, Text)  # its other <image> are text (an OpenAI-style message)
            parts = piece.split_tags() if literal else piece.split(IMAGE_TAG)
            for j, part in enumerate(parts):
                if j > 0:  # an image sits between parts j-1 and j
                    ids.extend([tok.image_id] * n_tokens[k])
                    seq_mask.extend([True] * n_tokens[k])
                    k += 1
                text_ids = tok.encode(part, image_tag_is_text=literal)
                ids.extend(text_ids)
                seq_mask.extend([False] * len(text_ids))
        assert k == len(loaded)

        S3 = (3, S, S)
        all_tiles = np.concatenate(tiles) if tiles else np.zeros((0, *S3), dtype=np.uint8)
        return _Sample(ids=ids, seq_mask=seq_mask, tiles=all_tiles, crops=crops, num_tokens=n_tokens,
                       best=best_list, sizes=[img.size for img in loaded], images=loaded, prompt="".join(prompt))

    def _load_images(self, sources: Sequence) -> list[Image.Image]:
        """Decode the images of one conversation within ``max_images`` / ``max_pixels``."""
        if len(sources) > self.max_images:
            per_image = num_image_tokens(1, 1, self.tokens_per_side)
            raise ConversationError(
                f"the conversation has {len(sources)} images; at most {self.max_images} are allowed "
                f"(beyond {MAX_IMAGES_WITH_CROPPING} images each costs {per_image} prompt tokens)")
        loaded, pixels = [], 0
        for k, src in enumerate(sources):
            img = load_image(src)
            pixels += img.width * img.height
            if pixels > self.max_pixels:
                raise ImageTooLargeError(
                    f"the conversation's images hold {pixels} pixels by image {k + 1} of {len(sources)} "
                    f"({img.width}x{img.height}); at most {self.max_pixels} pixels are allowed in one conversation")
            loaded.append(img)
        return loaded

    # ---- batch ------------------------------------------------------------------------
    def collate(self, samples: Sequence[_Sample]) -> BatchInputs:
        """Left-pad and stack samples into one batch (the reference's ``batchify``)."""
        B = len(samples)
        T = max(len(s.ids) for s in samples)
        n_tiles = max(max(len(s.tiles), 1) for s in samples)  # a text-only row still has one placeholder
        n_images = max(max(len(s.crops), 1) for s in samples)
        S = self.image_size

        input_ids = torch.full((B, T), self.tokenizer.pad_id, dtype=torch.int64)
        attention_mask = torch.zeros((B, T), dtype=torch.bool)
        images_seq_mask = torch.zeros((B, T), dtype=torch.bool)
        crops = torch.zeros((B, n_images, 2), dtype=torch.int64)
        pixel_values = torch.zeros((B, n_tiles, 3, S, S), dtype=torch.float32)
        tile_is_real = torch.zeros((B, n_tiles), dtype=torch.bool)
        for b, s in enumerate(samples):
            L = len(s.ids)
            input_ids[b, T - L:] = torch.tensor(s.ids, dtype=torch.int64)
            attention_mask[b, T - L:] = True
            images_seq_mask[b, T - L:] = torch.tensor(s.seq_mask, dtype=torch.bool)
            if s.crops:
                crops[b, :len(s.crops)] = torch.tensor(s.crops, dtype=torch.int64)
            if len(s.tiles):
                normalize_tiles(torch.from_numpy(s.tiles), self._mean, self._std, out=pixel_values[b, :len(s.tiles)])
                tile_is_real[b, :len(s.tiles)] = True
        return BatchInputs(
            input_ids=input_ids, attention_mask=attention_mask, images_seq_mask=images_seq_mask,
            images_spatial_crop=crops, pixel_values=pixel_values, tile_is_real=tile_is_real,
            seq_lens=[len(s.ids) for s in samples], num_image_tokens=[s.num_tokens for s in samples],
            best_resolutions=[s.best for s in samples], image_sizes=[s.sizes for s in samples],
            images=[s.images for s in samples], prompts=[s.prompt for s in samples])

    def __call__(self, conversations, images: Sequence | None = None) -> BatchInputs:
        """Process one conversation (a list of message dicts) or a list of conversations.

        ``images``: for one conversation, a list of image sources for its bare image parts
        / untagged messages; for a batch, one such list (or None) per conversation.
        """
        if isinstance(conversations, (str, bytes, Mapping)) or not isinstance(conversations, Sequence):
            raise ConversationError("expected a conversation (a list of message dicts) or a list of "
                                    f"conversations, got {type(conversations).__name__}")
        if not conversations:
            raise ConversationError("no conversation given (an empty list)")
        if isinstance(conversations[0], Mapping):  # one conversation
            return self.collate([self._process_one(conversations, images)])
        if images is None:
            images = [None] * len(conversations)
        elif len(images) != len(conversations):
            raise ConversationError(f"{len(conversations)} conversations but {len(images)} image lists; "
                                    "pass one list (or None) per conversation")
        samples = []
        for i, (conv, imgs) in enumerate(zip(conversations, images)):
            try:
                samples.append(self._process_one(conv, imgs))
            except (ConversationError, ImageError) as e:
                if len(conversations) == 1:
                    raise
                raise type(e)(f"conversation {i}: {e}") from None
        return self.collate(samples)
