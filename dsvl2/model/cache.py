"""KV cache storage and the per-step attention context.

Legend: R cache rows (request slots), S capacity in tokens, B rows in a step, T new
tokens per row in a step, Hk kv heads, hd head size, r kv_lora_rank, dr qk_rope_head_dim.

Layout: token-major, one row per request slot, each row packed from position 0 (no
padding inside the cache). A step writes row b's T new tokens at slots
``start[b] .. start[b] + T - 1``; rows may be right-padded inside a step (only the first
``n[b]`` tokens are real; the pad tokens are written past the row's end, never visible,
and overwritten by the row's next step). So rows start, advance and finish
independently, which is what continuous batching needs.

* MHA: ``k``, ``v`` [R, S, Hk, hd] per layer.
* MLA: one tensor [R, S, r + dr] per layer = the RMS-normalised latent followed by the
  rotated ``k_pe``: exactly ``kv_lora_rank + qk_rope_head_dim`` values per token per layer
  (576 for the real small / base), never heads x (k + v).

Capacity grows in blocks (``ensure_capacity``): one copy per block, not a ``torch.cat`` of
the whole cache at every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import LanguageConfig

BLOCK = 256


class KVCache:
    """Per-layer cache tensors for R rows of up to S tokens."""

    def __init__(self, cfg: LanguageConfig, rows: int, capacity: int = BLOCK,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.rows = rows
        self.dtype = dtype
        self.device = torch.device(device)
        self.capacity = 0
        self.layers: list[tuple[torch.Tensor, ...]] = [() for _ in range(cfg.num_hidden_layers)]
        self.ensure_capacity(capacity)

    def _shapes(self, capacity: int) -> list[tuple[int, ...]]:
        c = self.cfg
        if c.use_mla:
            return [(self.rows, capacity, c.kv_lora_rank + c.qk_rope_head_dim)]
        return [(self.rows, capacity, c.kv_heads, c.head_dim)] * 2

    def ensure_capacity(self, needed: int) -> None:
        """Grow (in blocks) so that every row can hold ``needed`` tokens."""
        if needed > self.capacity:
            self._resize(self.rows, -(-needed // BLOCK) * BLOCK)

    def ensure_rows(self, needed: int) -> None:
        """Grow to ``needed`` rows (slots), keeping the content of the existing ones.

        Rows are added as requests arrive, so one conversation never pays for the memory
        of a full batch (a real tiny fp32 row of 4096 tokens is 0.5 GB).
        """
        if needed > self.rows:
            self._resize(needed, self.capacity)

    def _resize(self, rows: int, capacity: int) -> None:
        old_rows, old_cap = self.rows, self.capacity
        self.rows = rows
        for i, old in enumerate(self.layers):
            fresh = tuple(torch.zeros(s, dtype=self.dtype, device=self.device) for s in self._shapes(capacity))
            for f, o in zip(fresh, old):
                f[:old_rows, :old_cap].copy_(o)
            self.layers[i] = fresh
        self.capacity = capacity

    @property
    def values_per_token_per_layer(self) -> int:
        return sum(s[2] if len(s) == 3 else s[2] * s[3] for s in self._shapes(1))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer)


@dataclass
class StepContext:
    """What every attention layer needs for one forward step.

    cos / sin [B, T, d]; mask [B, 1, T, S] additive (0 or dtype min); with a cache:
    ``rows`` [B] cache rows of the step's rows (None = rows 0..B-1), ``write_pos`` [B, T]
    slots the new tokens go to, ``kv_len`` = S (keys read per row).
    """

    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor
    cache: KVCache | None = None
    rows: torch.Tensor | None = None
    write_pos: torch.Tensor | None = None
    kv_len: int = 0

    def __post_init__(self):
        # Consecutive rows (the usual case: one request, or a batch started together) are
        # read through a slice view; only scattered rows need a gathering copy.
        self._span = None
        if self.cache is not None:
            if self.rows is None:
                self._span = (0, self.write_pos.shape[0])
            else:
                r = self.rows.tolist()
                if r == list(range(r[0], r[0] + len(r))):
                    self._span = (r[0], r[0] + len(r))

    def write_and_read(self, layer: int, new: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Write each new [B, T, ...] tensor into the cache, return [B, S, ...] views of it."""
        stored = self.cache.layers[layer]
        out = []
        for buf, x in zip(stored, new):
            if self._span is not None:
                view = buf[self._span[0]:self._span[1]]
                rows = torch.arange(view.shape[0], device=buf.device)[:, None]
                view[rows, self.write_pos] = x.to(buf.dtype)
                out.append(view[:, : self.kv_len])
            else:
                buf[self.rows[:, None], self.write_pos] = x.to(buf.dtype)
                out.append(buf[self.rows, : self.kv_len])
        return tuple(out)
