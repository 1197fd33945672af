"""Prefix cache: finished requests leave their KV-cache row behind for a follow-up.

A follow-up question in a chat resends the whole conversation: the same images, the same
earlier turns, then a new question. When a new request's prompt starts like a kept row
(same token ids and, at image positions, the same image content), it takes that row over
and prefills only the tokens after the common prefix; if every image of the prompt lies
inside the prefix, the vision tower is skipped too.

* Keys: a request's prompt as a list with one entry per token: the token id, or for an
  image slot the content hash of its image (the ``<image>`` id is the same for every
  image, so ids alone would match different photos).
* A kept row holds the keys of the tokens whose KV is in it (prompt + output but the
  last sampled token, which never went through a forward). At least one prompt token
  is always prefilled again, so the new request gets logits for its next token.
* Bounded by bytes (``budget_bytes``): least recently used rows go first, and a kept row
  is given up whenever a new request needs a slot and none is free: it never makes a
  request wait.
* Exact: the reused KV is what a fresh prefill computes, up to float32 rounding in
  float32 (a test compares the answers). With bf16 weights the kept output tokens'
  KV came from decode steps (bf16 products) where a fresh prefill computes in float32,
  so answers can differ as between two batch compositions.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch


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


class PrefixCache:
    """Kept rows: slot -> keys of the tokens in that row, least recently used first."""

    def __init__(self, budget_bytes: int = 0, min_tokens: int = 16):
        self.budget_bytes = budget_bytes
        self.min_tokens = min_tokens
        self.rows: OrderedDict[int, list] = OrderedDict()
        self.hits = 0
        self.reused_tokens = 0

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    def keep(self, slot: int, keys: list, row_bytes: int) -> list[int]:
        """Keep ``slot``'s content; returns the slots evicted to stay within the budget."""
        self.rows[slot] = keys
        self.rows.move_to_end(slot)
        limit = self.budget_bytes // max(row_bytes, 1)
        evicted = []
        while len(self.rows) > limit:
            evicted.append(self.rows.popitem(last=False)[0])
        return evicted

    def take(self, keys: list) -> tuple[int, int] | None:
        """The kept row sharing the longest prefix with ``keys`` (at least ``min_tokens``):
        (slot, tokens to reuse), the row leaves the cache. None if none is worth it."""
        best, best_n = None, 0
        for slot, kept in self.rows.items():
            n = min(common_prefix(keys, kept), len(keys) - 1)  # one token is always prefilled
            if n > best_n:
                best, best_n = slot, n
        if best is None or best_n < self.min_tokens:
            return None
        del self.rows[best]
        self.hits += 1
        self.reused_tokens += best_n
        return best, best_n

    def evict_lru(self) -> int | None:
        if not self.rows:
            return None
        return self.rows.popitem(last=False)[0]
