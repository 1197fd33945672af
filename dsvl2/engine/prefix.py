"""Prefix keys: what makes two requests' KV the same, token by token and block by block.

A follow-up question in a chat resends the whole conversation (the same images, the
same earlier turns, then a new question); several users may ask about the same photo or
share a system prompt. Their KV-cache blocks are computed once and shared
(``blocks.py``, ``kv_manager.py``); these functions say when two prefixes are the same.

* Keys: a request's tokens as a list with one entry per token: the token id, or for an
  image slot the content hash of its image (the ``<image>`` id is the same for every
  image, so ids alone would match different photos). Output tokens are keyed by id.
* A full block is known by a hash chained over the keys of every token up to its end
  (``chain``): equal hashes mean the same tokens at the same positions, images included,
  so the same KV (up to float32 rounding of the batch shape that computed it).
* Exact: the reused KV is what a fresh prefill computes, up to float32 rounding in
  float32 (a test compares the answers). With bf16 weights the KV of output tokens came
  from decode steps (bf16 products) where a fresh prefill computes in float32, so
  answers can differ as between two batch compositions.
"""

from __future__ import annotations

import hashlib

import torch

ROOT = b"dsvl2-kv"  # the parent of a request's first block


def chain(parent: bytes, keys: tuple) -> bytes:
    """The hash of a block whose tokens have ``keys``, after the prefix hashed ``parent``."""
    return hashlib.blake2b(parent + repr(keys).encode(), digest_size=16).digest()

def image_hashes(tiles: torch.Tensor | None, crops: list[tuple[int, int]]) -> list[bytes]:
    """Content hash of each image's tiles (global view + locals), in order."""
    out, k = [], 0
    for tw, th in crops:
        n = 1 + tw * th
        data = tiles[k:k + n].detach().to("cpu").contiguous().numpy().tobytes()
        out.append(hashlib.blake2b(data, digest_size=16).digest())
        k += n
    return out


def prompt_keys(ids: list[int], seq_mask: list[bool], tokens_per_image: list[int], hashes: list[bytes]) -> list:
    """One key per prompt token: its id, or its image's hash at image slots."""
    keys: list = []
    img, left = 0, tokens_per_image[0] if tokens_per_image else 0
    for tok, is_img in zip(ids, seq_mask):
        if is_img:
            while left == 0:
                img += 1
                left = tokens_per_image[img]
            keys.append(hashes[img])
            left -= 1
        else:
            keys.append(tok)
    return keys


def common_prefix(a: list, b: list) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
