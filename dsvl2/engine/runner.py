"""The model runner: the forwards of one step over the paged KV cache, nothing else.

Legend: B rows in a forward, T tokens per row, D width, V vocab, N tiles, W blocks per row.

* ``vision(req, k)``: the next k tiles of a request through the tower and projector (in
  balanced batches of at most ``tile_batch``, bounded memory); when its last tile is done the prompt
  embeddings are assembled (text embeddings with the image tokens scattered in).
* ``prefill(chunks)``: one packed forward of prompt chunks, each row at its own true
  positions through its own block table, so any chunking of a row equals its whole
  prefill (the reference's ``incremental_prefilling`` gets left-padded rows wrong); rows
  whose prompt is complete get ``next_logits``. After a preemption the "prompt" is the
  prompt followed by the output so far.
* ``decode(reqs)``: one token per row, one batched forward, inside ``ops.decoding()``
  (products with bf16 weights compute in bf16 whatever the number of rows, so a row's
  numbers do not depend on its batch).
"""

from __future__ import annotations

import time

import torch

from ..model import ops
from ..model.cache import KVCache, block_table
from ..model.vl import DeepseekVL2, scatter_image_tokens
from .request import Request


# Tiles a vision batch encodes at most: its activations (the tower's rows of a tile are 729
# patches) bound the memory of a step however many tiles it takes; 8 holds the 7 tiles of a
# typical photo in one batch.
TILE_BATCH = 8


class ModelRunner:
    def __init__(self, model: DeepseekVL2, cache: KVCache, tile_batch: int = TILE_BATCH):
        self.model = model
        self.cfg = model.cfg.language
        self.device = cache.device
        self.dtype = model.compute_dtype
        self.cache = cache
        self.tile_batch = tile_batch
        self.tiles_encoded = 0  # since start (metrics)

    def _table(self, reqs) -> torch.Tensor:
        return block_table([r.blocks for r in reqs], device=self.device)  # [B, W]

    # ---- admission --------------------------------------------------------------------
    def vision(self, req: Request, k: int) -> None:
        """The next k tiles, in as few batches of at most ``tile_batch`` as there can be, of
        sizes that differ by at most one (10 tiles: 5 and 5, not 8 and 2)."""
        t0 = time.perf_counter()
        n = -(-k // self.tile_batch)  # batches
        for b in range(n):
            i = req.tiles_done
            j = i + k // n + (b < k % n)
            req.projected.append(self.model.tile_features(req.tiles[i:j]))  # [j - i, h*w, D]
            req.tiles_done = j
            self.tiles_encoded += j - i
        req.timings.vision_s += time.perf_counter() - t0

    def ensure_embeds(self, req: Request) -> torch.Tensor:
        """The embeddings [L, D] of the tokens to prefill (prompt, then any output tokens
        computed again after a preemption), built once the request's tiles are all encoded."""
        if req.embeds is None:
            ids = req.input_ids
            if req.output_ids:
                ids = torch.cat([ids, torch.tensor(req.output_ids, dtype=ids.dtype, device=ids.device)])
            embeds = self.model.language.embed(ids, self.dtype)  # [L, D]
            if req.projected:
                feats = self.model.assemble_images(torch.cat(req.projected), req.crops)
                scatter_image_tokens(embeds, req.seq_mask, feats)  # image slots: all in the prompt
                req.projected = []
            req.embeds = embeds
        return req.embeds

    def prefill(self, chunks: list[tuple[Request, int]]) -> list[Request]:
        """Run the chunks in one packed forward; returns the requests whose prompt is complete."""
        t0 = time.perf_counter()
        lm = self.model.language
        t = max(n for _, n in chunks)
        x = torch.zeros(len(chunks), t, self.cfg.hidden_size, dtype=self.dtype, device=self.device)  # [B, T, D]
        for i, (r, n) in enumerate(chunks):
            x[i, :n] = self.ensure_embeds(r)[r.prefilled:r.prefilled + n]
        start = torch.tensor([r.prefilled for r, _ in chunks])
        _, ctx = lm.step_context(self.cache, start, torch.tensor([n for _, n in chunks]), t,
                                 self._table([r for r, _ in chunks]), dtype=self.dtype)
        out = lm(x, ctx, logits="none")
        done = [(i, r, n) for i, (r, n) in enumerate(chunks) if r.prefilled + n == r.prefill_len]
        if done:
            h = torch.stack([out.last_hidden[i, n - 1] for i, _, n in done])  # [b, D]
            logits = lm.lm_head(h).float()  # [b, V]
            for j, (_, r, _) in enumerate(done):
                r.next_logits = logits[j]
        dt = (time.perf_counter() - t0) / len(chunks)
        for r, n in chunks:
            r.prefilled_chunk(n)
            r.timings.prefill_s += dt
        return [r for _, r, _ in done]

    # ---- decode -----------------------------------------------------------------------
    def decode(self, reqs: list[Request]) -> None:
        lm = self.model.language
        ids = torch.tensor([[r.output_ids[-1]] for r in reqs], device=self.device)  # [B, 1]
        x = lm.embed(ids, self.dtype)  # [B, 1, D]
        start = torch.tensor([r.length for r in reqs])
        _, ctx = lm.step_context(self.cache, start, torch.ones_like(start), 1, self._table(reqs), dtype=self.dtype)
        with ops.decoding():
            logits = lm(x, ctx, logits="last").logits[:, 0]  # [B, V]
        for i, r in enumerate(reqs):
            r.next_logits = logits[i]
            r.decoded()
