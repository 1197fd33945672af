"""The KV-cache manager: block tables of requests over the block pool, and prefix sharing.

Legend: BS tokens per block; a request's "tokens" are its prompt followed by the output
tokens that went through a forward (after a preemption, all of them are prefilled again).

* ``admit(r)``: the leading blocks of ``r`` that are already resident (a hash chain over
  its keys, ``prefix.py``) are taken (shared, counted), the prefix of a known block that
  continues the chain is copied into a block of its own (copy on write), and blocks for
  the rest of its tokens are allocated, all or nothing. At least one token is always
  computed again, so the request gets logits for its next token.
* Requests at the same time: the full blocks an admitted request is about to compute are
  announced (``pending``); a request whose next block is announced by another waits for
  it instead of computing it too (``Match.wait``), so N requests about one photo run
  the vision tower and the prefill once.
* ``grow(r)``: the block for a decode step's new token; ``computed(r)``: register the
  blocks that became full; ``release(r)``: give the table back (the last, partly filled
  block stays known for copy on write unless the content is not trusted).
"""

from __future__ import annotations

from dataclasses import dataclass

from .blocks import BlockPool
from .prefix import ROOT, chain, common_prefix
from .request import Request


@dataclass
class Match:
    """What a request would reuse: ``blocks`` (full, shared) then ``copy_n`` tokens of
    block ``copy_from`` (copied); ``wait``: another request is computing its next block."""

    blocks: list[int]
    copy_from: int | None = None
    copy_n: int = 0
    wait: bool = False

    def tokens(self, block_size: int) -> int:
        return len(self.blocks) * block_size + self.copy_n


class KVManager:
    def __init__(self, pool: BlockPool, prefix_caching: bool = True):
        self.pool = pool
        self.bs = pool.block_size
        self.prefix_caching = prefix_caching
        self.pending: dict[bytes, int] = {}  # digest of a block being computed -> request id
        self.hit_tokens = 0  # prompt tokens taken from resident blocks, since start
        self.copies: list[tuple[int, int]] = []  # (src, dst) block copies still to do (src held)

    # ---- keys and hashes --------------------------------------------------------------------
    def _block_keys(self, r: Request, i: int, n: int | None = None) -> tuple:
        lo = i * self.bs
        return tuple(r.token_key(p) for p in range(lo, lo + (self.bs if n is None else n)))

    def _hashes(self, r: Request, blocks: int) -> list[bytes]:
        """The chain hashes of ``r``'s first ``blocks`` full blocks (computed once, kept)."""
        while len(r.hashes) < blocks:
            i = len(r.hashes)
            r.hashes.append(chain(r.hashes[-1] if i else ROOT, self._block_keys(r, i)))
        return r.hashes

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.bs)

    # ---- admission ------------------------------------------------------------------------
    def match(self, r: Request) -> Match:
        """The longest reusable prefix of ``r``'s tokens (keeps one token to compute)."""
        if not self.prefix_caching or r.keys is None:
            return Match([])
        limit = r.prefill_len - 1
        full = limit // self.bs
        hashes = self._hashes(r, full)
        blocks = []
        for h in hashes:
            b = self.pool.lookup(h)
            if b is None:
                break
            blocks.append(b)
        f = len(blocks)
        wait = f < full and self.pending.get(hashes[f], r.rid) != r.rid
        parent = hashes[f - 1] if f else ROOT
        rest = limit - f * self.bs
        best, best_n = None, 0
        if rest > 0 and not wait:
            want = self._block_keys(r, f, min(rest, self.bs))
            for b, keys in self.pool.children(parent).items():
                n = common_prefix(keys, want)
                if n > best_n:
                    best, best_n = b, n
        return Match(blocks, best, best_n, wait)

    def admit(self, r: Request, m: Match, reserve: int = 0) -> bool:
        """Give ``r`` its table for all its tokens: the matched blocks, then fresh ones (the
        first one a copy of ``m.copy_from``'s prefix). False (nothing changed) when fewer
        than the fresh blocks + ``reserve`` are available."""
        need = self.blocks_for(r.prefill_len) - len(m.blocks)
        # matched blocks nobody holds are counted as available but are not fresh
        idle = sum(1 for b in m.blocks if self.pool.holders(b) == 0)
        if m.copy_from is not None and self.pool.holders(m.copy_from) == 0:
            idle += 1  # it must survive the allocation to be copied
        if need + reserve > self.pool.available - idle:
            return False
        for b in m.blocks:
            self.pool.take(b)
        if m.copy_from is not None:
            self.pool.take(m.copy_from)  # held while the fresh blocks are allocated
        fresh = self.pool.allocate(need)
        assert fresh is not None  # checked above
        if m.copy_from is not None:
            self.copies.append((m.copy_from, fresh[0]))  # still held, until copied
        r.blocks = list(m.blocks) + fresh
        r.registered = len(m.blocks)
        reused = m.tokens(self.bs)
        self.hit_tokens += reused
        if self.prefix_caching and r.keys is not None:  # announce the full blocks it will compute
            for h in self._hashes(r, r.prefill_len // self.bs)[len(m.blocks):]:
                self.pending.setdefault(h, r.rid)
        r.length = r.prefilled = reused
        return True

    def grow(self, r: Request) -> bool:
        """A block for the token at position ``r.length`` (a decode step); False if none is left."""
        if r.length < len(r.blocks) * self.bs:
            return True
        got = self.pool.allocate(1)
        if got is None:
            return False
        r.blocks.extend(got)
        return True

    def computed(self, r: Request) -> None:
        """Register ``r``'s blocks that are now full (their KV is final)."""
        if not self.prefix_caching or r.keys is None:
            return
        full = r.length // self.bs
        if full <= r.registered:
            return
        hashes = self._hashes(r, full)
        for i in range(r.registered, full):
            self.pool.register(r.blocks[i], hashes[i - 1] if i else ROOT, self._block_keys(r, i), hashes[i])
            if self.pending.get(hashes[i]) == r.rid:
                del self.pending[hashes[i]]
        r.registered = full

    def release(self, r: Request, keep: bool = True) -> None:
        """Give ``r``'s blocks back. ``keep``: its last, partly filled block stays known (copy
        on write for a request that continues it); False when its content is not trusted."""
        if self.prefix_caching and r.keys is not None:
            for h in r.hashes[r.registered:]:
                if self.pending.get(h) == r.rid:
                    del self.pending[h]
            i, n = divmod(r.length, self.bs)
            if keep and n and i < len(r.blocks) and r.registered == i:
                parent = self._hashes(r, i)[i - 1] if i else ROOT
                self.pool.register(r.blocks[i], parent, self._block_keys(r, i, n), None)
        self.pool.release(r.blocks)
        r.blocks = []
        r.registered = 0

    def run_copies(self, copy) -> None:
        """Do the block copies of this step's admissions (``copy(src, dst)``) before anything
        is written, then let go of their sources."""
        pairs, self.copies = self.copies, []
        for src, dst in pairs:
            copy(src, dst)
            self.pool.release([src])
