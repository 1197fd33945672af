"""The scheduler: queue, cache slots, and which admission work runs in a step.

It knows requests, slots and token counts only; no tensors, no model.

Per-step token budget (``step_tokens``): every running row costs 1 (its decode token);
what is left goes to requests being admitted, first come first served: a vision tile
costs ``tile_cost`` tokens (its patches: 729 for a 384 px tile with patch 14, about the
compute of as many prompt tokens in the real tiny model), a prefill chunk costs its
tokens. At least one unit of admission work runs per step (one tile, or one chunk), so
admission never starves; a step therefore lasts about one decode forward plus one
budget's worth of admission work, which bounds the gap between two tokens of a running
stream while a 7-tile image request is admitted. ``step_tokens=None`` means no budget:
all admission work of the step runs at once (whole prefill, the reference's way).

A request's images are encoded before its prompt is prefilled; a later request does not
start its tiles while an earlier one still has tiles left (first come, first served), but
its prefill chunks may share a forward with another request's chunks.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from .prefix import PrefixCache
from .request import Request


@dataclass
class Vision:
    """Encode the next ``k`` tiles of ``req``."""

    req: Request
    k: int


@dataclass
class Prefill:
    """One packed prefill forward: (request, tokens) chunks at each request's own offset."""

    chunks: list[tuple[Request, int]]


class Scheduler:
    def __init__(self, max_batch_size: int, step_tokens: int | None = None, tile_cost: int = 729,
                 prefix: PrefixCache | None = None):
        if step_tokens is not None and (not isinstance(step_tokens, int) or step_tokens < 1):
            raise ValueError(f"step_tokens must be a positive integer or None, got {step_tokens!r}")
        self.max_batch_size = max_batch_size
        self.step_tokens = step_tokens
        self.tile_cost = max(1, tile_cost)
        self.free_slots: list[int] = list(range(max_batch_size))
        self.waiting: deque[Request] = deque()
        self.admitting: list[Request] = []
        self.running: list[Request] = []
        self.prefix = prefix or PrefixCache(0)

    def __len__(self) -> int:
        return len(self.waiting) + len(self.admitting) + len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.admitting or self.running)

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def admit(self) -> list[Request]:
        """Give slots to waiting requests (in order); returns the newly admitted.

        A request whose prompt starts like a kept row takes that row (``req.cached_tokens``
        set); else a free slot; else the least recently used kept row is given up."""
        new = []
        while self.waiting:
            req = self.waiting[0]
            hit = self.prefix.take(req.keys) if self.prefix.enabled and req.keys else None
            if hit is not None:
                req.slot, req.cached_tokens = hit
            elif self.free_slots:
                req.slot = self.free_slots.pop(0)
            else:
                slot = self.prefix.evict_lru()
                if slot is None:
                    break
                req.slot = slot
            self.waiting.popleft()
            self.admitting.append(req)
            new.append(req)
        return new

    def plan(self) -> list[Vision | Prefill]:
        """The admission work of this step, in order, within the token budget."""
        left = math.inf if self.step_tokens is None else self.step_tokens - len(self.running)
        forced = True  # nothing done yet: one unit runs even without budget
        tiles = {r.rid: r.tiles_total - r.tiles_done for r in self.admitting}
        toks = {r.rid: r.prompt_len - r.prefilled for r in self.admitting}
        work: list[Vision | Prefill] = []
        blocked = False
        while not blocked:
            chunks = []
            for r in self.admitting:
                if tiles[r.rid]:
                    if left < self.tile_cost and not forced:
                        blocked = True
                        break
                    k = tiles[r.rid] if left == math.inf else max(1, min(tiles[r.rid], int(left // self.tile_cost)))
                    work.append(Vision(r, k))
                    tiles[r.rid] -= k
                    left -= k * self.tile_cost
                    forced = False
                    if tiles[r.rid]:
                        blocked = True  # its remaining tiles come first in the next step
                        break
                if not toks[r.rid]:
                    continue
                cap = toks[r.rid] if r.chunk_size is None else min(toks[r.rid], r.chunk_size)
                n = min(cap, left) if left > 0 else (min(cap, self.step_tokens or cap) if forced else 0)
                if n <= 0:
                    blocked = True
                    break
                chunks.append((r, int(n)))
                toks[r.rid] -= n
                left -= n
                forced = False
            if chunks:
                work.append(Prefill(chunks))
            if not chunks or left <= 0 or not any(toks.values()):
                break
        return work

    def start_running(self, req: Request) -> None:
        self.admitting.remove(req)
        self.running.append(req)

    def release(self, req: Request, keep: list | None = None, row_bytes: int = 0) -> None:
        """Take a finished or cancelled request out, wherever it is; its slot becomes free,
        or is kept for the prefix cache with ``keep`` (the keys of the tokens in its row)."""
        for group in (self.running, self.admitting):
            if req in group:
                group.remove(req)
                freed = [req.slot]
                if keep and self.prefix.enabled:
                    freed = self.prefix.keep(req.slot, keep, row_bytes)
                self.free_slots.extend(freed)
                self.free_slots.sort()
                return
        if req in self.waiting:
            self.waiting.remove(req)
