"""KV cache storage: a pool of fixed-size blocks per layer, and the per-step attention context.

Legend: NB blocks in the pool, BS tokens per block, B rows in a step, T new tokens per
row in a step, W blocks in a row's table, S keys read per row, Hk kv heads, hd head
size, r kv_lora_rank, dr qk_rope_head_dim.

Paged layout (vLLM's PagedAttention): each layer's cache is ONE tensor of NB blocks of
BS token slots; a request owns a block table (the ids of its blocks, in order), so its
token at position p lives in block ``table[p // BS]``, slot ``p % BS``. Blocks are handed
out and taken back by the engine (``engine/blocks.py``); this module only stores them
and translates positions to slots. Memory is what the budget allows and never grows: no
rectangle of rows x longest row, no copy when a request grows.

* MHA: ``k``, ``v`` [NB, BS, Hk, hd] per layer (token-major inside a block, so a block
  of one layer is one contiguous stretch of memory the native attention streams).
* MLA: one tensor [NB, BS, r + dr] per layer = the RMS-normalised latent followed by the
  rotated ``k_pe``: exactly ``kv_lora_rank + qk_rope_head_dim`` values per token per layer
  (576 for the real small / base), never heads x (k + v).

Block 0 is the null block: never given to a request. Writes of padding tokens (rows
right-padded inside a packed step) go there, and reads past a row's end come from there
(they are masked).

Memory: on Linux CPUs each pool is an anonymous mapping made with ``MAP_NORESERVE``: the
operating system gives a page when it is first written, so an idle pool costs address
space, not memory, and the engine hands out the lowest free ids first to keep the
touched part compact. ``MAP_NORESERVE`` keeps the untouched part out of the kernel's
commit accounting (a default budget of several GB reserved with plain ``malloc`` made
``fork`` fail with ENOMEM in a process holding a few engines). Elsewhere (GPUs, other
systems) the pool is an ordinary ``torch.empty``.
"""

from __future__ import annotations

import math
import mmap
import platform
import sys
from dataclasses import dataclass

import torch

from ..config import LanguageConfig

NULL_BLOCK = 0


class KVCache:
    """Per-layer pools of ``num_blocks`` blocks of ``block_size`` token slots."""

    def __init__(self, cfg: LanguageConfig, num_blocks: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if num_blocks < 2:
            raise ValueError(f"a KV cache needs at least 2 blocks (one is the null block), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.cfg = cfg
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        self.device = torch.device(device)
        self.layers: list[tuple[torch.Tensor, ...]] = [
            tuple(_pool(s, dtype, self.device) for s in self._shapes()) for _ in range(cfg.num_hidden_layers)]
        for layer in self.layers:  # the null block: finite values, so masked reads stay finite
            for t in layer:
                t[NULL_BLOCK].zero_()

    def touch(self, blocks: int) -> int:
        """Write the first ``blocks`` blocks after the null block of every pool (zeros), so
        their pages are committed now rather than by the first request's prefill: the block
        pool hands out the lowest free ids first (``engine/blocks.py``). ``api.load`` touches
        a first photo's worth (2048 tokens: 45 thousand page faults out of tiny's first c01
        request). Returns the blocks touched."""
        n = max(0, min(int(blocks), self.num_blocks - 1))
        if n:
            for layer in self.layers:
                for t in layer:
                    t[1:1 + n].zero_()
        return n

    def _shapes(self) -> list[tuple[int, ...]]:
        c, nb, bs = self.cfg, self.num_blocks, self.block_size
        if c.use_mla:
            return [(nb, bs, c.kv_lora_rank + c.qk_rope_head_dim)]
        return [(nb, bs, c.kv_heads, c.head_dim)] * 2

    @staticmethod
    def bytes_per_token(cfg: LanguageConfig, dtype: torch.dtype) -> int:
        """Bytes one token takes in every layer's cache together."""
        per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim if cfg.use_mla else 2 * cfg.kv_heads * cfg.head_dim
        return per_layer * cfg.num_hidden_layers * torch.empty((), dtype=dtype).element_size()

    @property
    def values_per_token_per_layer(self) -> int:
        return sum(s[2] if len(s) == 3 else s[2] * s[3] for s in self._shapes())

    @property
    def block_bytes(self) -> int:
        """Bytes of one block in every layer together."""
        return self.nbytes() // self.num_blocks

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer)

    def copy_block(self, src: int, dst: int) -> None:
        """Copy block ``src``'s content into ``dst`` in every layer (copy on write)."""
        for layer in self.layers:
            for t in layer:
                t[dst].copy_(t[src])


def _noreserve_flag() -> int:
    """Linux's MAP_NORESERVE (Python's mmap module exposes it only from 3.13): 0x4000 on
    x86-64 and arm64, the architectures checked here; 0 (no such path) elsewhere."""
    flag = getattr(mmap, "MAP_NORESERVE", 0)
    if not flag and sys.platform.startswith("linux") and platform.machine().lower() in (
            "x86_64", "amd64", "aarch64", "arm64"):
        flag = 0x4000
    return flag


def _pool(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor whose pages are committed only when written (see the module
    docstring); zeros where never written, on the anonymous-mapping path."""
    flags = _noreserve_flag()
    if device.type != "cpu" or not flags or not hasattr(mmap, "MAP_ANONYMOUS"):
        return torch.empty(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | flags)
    return torch.frombuffer(buf, dtype=dtype).view(shape)  # the tensor keeps the mapping alive


def block_table(tables: list[list[int]], width: int | None = None,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Rows' block tables as one int64 tensor [B, W], short rows padded with the null block."""
    w = max(width or 0, max((len(t) for t in tables), default=0), 1)
    out = torch.full((len(tables), w), NULL_BLOCK, dtype=torch.int64)
    for i, t in enumerate(tables):
        if t:
            out[i, :len(t)] = torch.tensor(t, dtype=torch.int64)
    return out.to(device)


def slots_of(table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flat slot indices (block * BS + offset) of ``positions`` [B, T] through ``table`` [B, W];
    positions past a row's table (or negative) map into the null block."""
    w = table.shape[1]
    blk = positions.div(block_size, rounding_mode="floor")
    inside = (blk >= 0) & (blk < w)
    ids = table.gather(1, blk.clamp(0, w - 1)).masked_fill(~inside, NULL_BLOCK)
    return ids * block_size + positions.remainder(block_size)


@dataclass
class StepContext:
    """What every attention layer needs for one forward step.

    cos / sin [B, T, d]; mask [B, 1, T, S] additive (0 or dtype min); with a cache:
    ``table`` [B, W] the rows' block tables, ``write_pos`` [B, T] the positions of the new
    tokens (pads: past the row's real tokens), ``real`` [B, T] which new tokens are real
    (pads are written to the null block), ``kv_len`` = S (keys read per row), ``valid``
    [B] each row's tokens after this step's writes: positions from there on are read from
    the null block (a block's unwritten slots hold whatever the memory held, NaN maybe,
    and a masked NaN still poisons a softmax).
    """

    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor
    cache: KVCache | None = None
    table: torch.Tensor | None = None
    write_pos: torch.Tensor | None = None
    real: torch.Tensor | None = None
    kv_len: int = 0
    valid: torch.Tensor | None = None

    def __post_init__(self):
        self._write_slots = self._read_slots = None

    @property
    def write_slots(self) -> torch.Tensor:
        """[B, T] flat slots the new tokens go to (pads: the null block)."""
        if self._write_slots is None:
            bs = self.cache.block_size
            slots = slots_of(self.table, self.write_pos, bs)
            if self.real is not None:
                slots = torch.where(self.real, slots, NULL_BLOCK * bs + self.write_pos.remainder(bs))
            self._write_slots = slots
        return self._write_slots

    @property
    def read_slots(self) -> torch.Tensor:
        """[B, S] flat slots of positions 0 .. S - 1 of every row."""
        if self._read_slots is None:
            pos = torch.arange(self.kv_len, device=self.table.device).expand(self.table.shape[0], -1)
            if self.valid is not None:
                pos = pos.masked_fill(pos >= self.valid[:, None], -1)  # -1: the null block
            self._read_slots = slots_of(self.table, pos, self.cache.block_size)
        return self._read_slots

    def write_and_read(self, layer: int, new: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Write each new [B, T, ...] tensor into the cache, return [B, S, ...] gathered copies."""
        out = []
        for buf, x in zip(self.cache.layers[layer], new):
            flat = buf.view(-1, *buf.shape[2:])  # [NB * BS, ...]
            flat[self.write_slots] = x.to(buf.dtype)
            out.append(flat[self.read_slots])
        return tuple(out)


def row_tables(rows: int, capacity: int, block_size: int, order: torch.Tensor | None = None) -> torch.Tensor:
    """Block tables [rows, W] giving each of ``rows`` rows its own ``capacity`` tokens of a
    pool of ``1 + rows * W`` blocks (the null block first); ``order``: a permutation of
    the ``rows * W`` blocks (default: in order). For running the language model over a
    cache without the engine (tests, research)."""
    w = -(-capacity // block_size)
    ids = torch.arange(1, 1 + rows * w) if order is None else 1 + order
    return ids.view(rows, w)
