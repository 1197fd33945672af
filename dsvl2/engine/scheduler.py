"""The scheduler: queue, seats, KV blocks, and which admission work runs in a step.

It knows requests, seats, blocks and token counts only; no tensors, no model.

Admission: first come, first served, while a seat is free (``max_batch_size`` requests
at most hold one) and the KV manager can give the request blocks for all its tokens
(keeping one block per active request in reserve for their next decode tokens). A
request whose prefix another request is computing right now waits for it and is passed
over meanwhile (``KVManager.match``); the first one that does not fit stops admission
(no overtaking by smaller requests: a big one is not starved).

Preemption: when a running request needs a block for its next token and none is left,
the newest active request gives its blocks back and goes to the front of the queue, to
be computed again later (vLLM's recompute policy); the oldest request therefore always
progresses, and a request that fits the pool alone always finishes.

Per-step token budget (``step_tokens``): every running row costs 1 (its decode token);
what is left goes to requests being admitted, first come first served: a vision tile
costs ``tile_cost`` tokens (its patches: 729 for a 384 px tile with patch 14, about the
compute of as many prompt tokens in the real tiny model), a prefill chunk costs its
tokens. At least one unit of admission work runs per step (one tile, or one chunk), so
admission never starves; a step therefore lasts about one decode forward plus one
budget's worth of admission work, which bounds the gap between two tokens of a running
stream while a 7-tile image request is admitted. ``step_tokens=None`` means no budget:
all admission work of the step runs at once (whole prefill, the reference's way).
A step in which no stream is running has no token to hold up: its budget is
``idle_tokens`` where that is larger (None: ``step_tokens`` always). A lone prompt then
prefills in one chunk instead of a chunk per ``step_tokens``, which saves what every chunk
pays again: the weights dequantised or read per product, the cached rows re-expanded by
MLA (a 1431-token prompt on the real tiny model: 6.6 s in one chunk, 7.5-8 s in three).
Where ``idle_tokens`` is set, such a step's first unit of work, if it is a request's tiles,
takes all of them whatever their cost (the runner still encodes them in batches of its
``tile_batch``, which bound the memory): one pass of the tower over a 7-tile photo (batches
of 7) instead of two steps (batches of 4, 1 and 2) took 2.73-2.83 s instead of 2.89-2.97
on the real tiny model (an Intel Xeon with AMX, 2 threads); nobody waits for a token.

A request's images are encoded before its prompt is prefilled; a later request does not
start its tiles while an earlier one still has tiles left (first come, first served), but
its prefill chunks may share a forward with another request's chunks.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from .kv_manager import KVManager
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
    def __init__(self, max_batch_size: int, kv: KVManager, step_tokens: int | None = None, tile_cost: int = 729,
                 idle_tokens: int | None = None):
        for name, value in (("step_tokens", step_tokens), ("idle_tokens", idle_tokens)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        self.max_batch_size = max_batch_size
        self.kv = kv
        self.step_tokens = step_tokens
        self.idle_tokens = idle_tokens
        self.tile_cost = max(1, tile_cost)
        self.free_slots: list[int] = list(range(max_batch_size))
        self.waiting: deque[Request] = deque()
        self.admitting: list[Request] = []
        self.running: list[Request] = []
        self.preemptions = 0

    def __len__(self) -> int:
        return len(self.waiting) + len(self.admitting) + len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.admitting or self.running)

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def admit(self) -> list[Request]:
        """Give seats and blocks to waiting requests (in order); returns the newly admitted
        (``req.length`` = tokens reused from shared blocks)."""
        new = []
        for req in list(self.waiting):
            if not self.free_slots:
                break
            m = self.kv.match(req)
            if m.wait:
                continue  # another request is computing its prefix: take it when done
            if not self.kv.admit(req, m, reserve=len(self.running) + len(self.admitting)):
                break
            req.slot = self.free_slots.pop(0)
            self.waiting.remove(req)
            self.admitting.append(req)
            new.append(req)
        return new

    def preempt_newest(self) -> Request:
        """The newest active request gives its blocks and seat back and waits again (first
        in line); returns it."""
        victim = max(self.running + self.admitting, key=lambda r: r.rid)
        self._leave(victim, keep=True)
        victim.preempt()
        self.preemptions += 1
        self.waiting.appendleft(victim)
        return victim

    def plan(self) -> list[Vision | Prefill]:
        """The admission work of this step, in order, within the token budget."""
        idle = not self.running
        if self.step_tokens is None:
            left = math.inf
        elif not idle:
            left = self.step_tokens - len(self.running)
        else:  # no stream waits for a token: the idle budget where it is larger
            left = max(self.step_tokens, self.idle_tokens or 0)
        forced = True  # nothing done yet: one unit runs even without budget
        tiles = {r.rid: r.tiles_total - r.tiles_done for r in self.admitting}
        toks = {r.rid: r.prefill_len - r.prefilled for r in self.admitting}
        work: list[Vision | Prefill] = []
        blocked = False
        while not blocked:
            chunks = []
            for r in self.admitting:
                if tiles[r.rid]:
                    if left < self.tile_cost and not forced:
                        blocked = True
                        break
                    # idle (and a budget to spend): all its tiles (the module docstring)
                    whole = left == math.inf or (idle and forced and self.idle_tokens is not None)
                    k = tiles[r.rid] if whole else max(1, min(tiles[r.rid], int(left // self.tile_cost)))
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

    def release(self, req: Request, keep: bool = True) -> None:
        """Take a finished or cancelled request out, wherever it is; its seat and blocks are
        given back (``keep``: its blocks' content is trusted and stays known for reuse)."""
        if not self._leave(req, keep) and req in self.waiting:
            self.waiting.remove(req)

    def _leave(self, req: Request, keep: bool) -> bool:
        for group in (self.running, self.admitting):
            if req in group:
                group.remove(req)
                self.kv.release(req, keep)
                self.free_slots.append(req.slot)
                self.free_slots.sort()
                return True
        return False
