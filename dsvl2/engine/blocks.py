"""The block pool: which KV-cache blocks are free, held, or cached for reuse.

Ids only, no tensors (the storage is ``model/cache.py``'s ``KVCache``); vLLM's block pool
is the anchor. Block 0 is the null block (never handed out).

* A block is held by the requests whose block tables name it (a reference count).
* A full block whose content is known (a hash chained over the tokens of its request up
  to its end, ``prefix.py``) is registered under that hash, so a later request with the
  same prefix takes it instead of computing it again (its count goes up). A request's
  last, partly filled block is registered when the request ends, as a candidate to copy
  (copy on write: the next request continues it in a block of its own).
* A registered block nobody holds stays cached, least recently released first in line
  for eviction; it is evicted only when the pool needs a block and none is free.
* Free blocks are handed out lowest id first: the pool tensor is committed by the
  operating system page by page as it is written, so low ids keep the touched part small.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict

from ..model.cache import NULL_BLOCK


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, block_bytes: int):
        if num_blocks < 2:
            raise ValueError(f"the pool needs at least 2 blocks (one is the null block), got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.block_bytes = block_bytes
        self._free = list(range(1, num_blocks))  # a heap: lowest id first
        self._refs = [0] * num_blocks
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, held by nobody; LRU first
        self._hash_of: dict[int, bytes] = {}  # registered full blocks
        self._by_hash: dict[bytes, int] = {}
        self._children: dict[bytes, dict[int, tuple]] = {}  # parent hash -> {block: its keys}
        self._parent_of: dict[int, bytes] = {}
        self.used = 0  # blocks held by requests
        self.peak = 0

    # ---- sizes ---------------------------------------------------------------------------
    @property
    def usable(self) -> int:
        """Blocks a request may ever hold (all but the null block)."""
        return self.num_blocks - 1

    @property
    def available(self) -> int:
        """Blocks that ``allocate`` can hand out now (free + cached that nobody holds)."""
        return len(self._free) + len(self._evictable)

    @property
    def cached(self) -> int:
        """Blocks kept for reuse that nobody holds."""
        return len(self._evictable)

    # ---- holding ---------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int] | None:
        """``n`` fresh blocks (held once each), or None (and nothing taken) if fewer are available."""
        if n > self.available:
            return None
        out = []
        for _ in range(n):
            if self._free:
                b = heapq.heappop(self._free)
            else:
                b, _ = self._evictable.popitem(last=False)
                self._forget(b)
            self._refs[b] = 1
            out.append(b)
        self._count(n)
        return out

    def take(self, block: int) -> None:
        """Hold a registered block (a prefix hit)."""
        if self._refs[block] == 0:
            self._evictable.pop(block, None)
            self._count(1)
        self._refs[block] += 1

    def release(self, blocks: list[int]) -> None:
        """Let go of ``blocks`` (a request's table, in order). Registered ones nobody holds any
        more are queued for eviction last block first (a prefix's tail goes before its head)."""
        for b in reversed(blocks):
            if b == NULL_BLOCK:
                continue
            self._refs[b] -= 1
            if self._refs[b] > 0:
                continue
            self.used -= 1
            if b in self._parent_of:
                self._evictable[b] = None
            else:
                heapq.heappush(self._free, b)

    def holders(self, block: int) -> int:
        return self._refs[block]

    def _count(self, n: int) -> None:
        self.used += n
        self.peak = max(self.peak, self.used)

    # ---- the cache of known blocks --------------------------------------------------------
    def register(self, block: int, parent: bytes, keys: tuple, digest: bytes | None) -> None:
        """Record ``block``'s content: the keys of its tokens after the prefix ``parent``;
        ``digest`` (full blocks) makes it findable by ``lookup``. A block already known, or
        a digest another block already answers for, is left as it is."""
        if block in self._parent_of:
            return
        if digest is not None:
            if digest in self._by_hash:
                return
            self._by_hash[digest] = block
            self._hash_of[block] = digest
        self._parent_of[block] = parent
        self._children.setdefault(parent, {})[block] = keys

    def lookup(self, digest: bytes) -> int | None:
        return self._by_hash.get(digest)

    def children(self, parent: bytes) -> dict[int, tuple]:
        """Known blocks that continue the prefix ``parent``: block -> keys of its tokens."""
        return self._children.get(parent, {})

    def _forget(self, block: int) -> None:
        digest = self._hash_of.pop(block, None)
        if digest is not None:
            del self._by_hash[digest]
        parent = self._parent_of.pop(block, None)
        if parent is not None:
            kids = self._children[parent]
            del kids[block]
            if not kids:
                del self._children[parent]

    def check(self) -> None:
        """Internal consistency (tests): every block is exactly one of free / held / cached."""
        free = set(self._free)
        held = {b for b in range(1, self.num_blocks) if self._refs[b] > 0}
        cached = set(self._evictable)
        assert len(free) == len(self._free), "a block is twice on the free list"
        assert not (free & held or free & cached or held & cached), "a block is in two states"
        assert free | held | cached == set(range(1, self.num_blocks)), "a block is lost"
        assert len(held) == self.used <= self.peak
        assert all(b in self._parent_of for b in cached)
        assert all(self._by_hash[h] == b for b, h in self._hash_of.items())
