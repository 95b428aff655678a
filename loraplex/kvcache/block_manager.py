"""Paged KV-cache bookkeeping, pure Python: reference-counted fixed-size blocks and one block
table per sequence. Block ``i`` owns cache slots ``i * block_size .. (i+1) * block_size - 1``.

With prefix caching (``prefix_cache.py``) a full block whose K/V are written is registered
under its content hash; sequences with the same adapter and token prefix share it (one
reference each), and when its last reference goes it stays cached, evictable least recently
released first, until the pool needs a block. Invariants: a block is in exactly one of
``free``, ``PrefixCache.evictable`` or some table(s), with ``ref_counts`` = the number of
tables holding it; a shared block is full and never written again (a sequence writes only
past the prefix it matched).
"""

from __future__ import annotations

from collections import deque

from loraplex.kvcache.prefix_cache import BlockHash, PrefixCache, Root


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int,
                 enable_prefix_caching: bool = False) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free: deque[int] = deque(range(num_blocks))
        self.ref_counts = [0] * num_blocks
        self.tables: dict[int, list[int]] = {}  # seq_id -> block ids
        self.cache = PrefixCache() if enable_prefix_caching else None
        self._num_cached: dict[int, int] = {}  # seq_id -> leading blocks registered or shared

    @property
    def num_free(self) -> int:
        """Blocks a sequence can take: free ones plus unreferenced cached ones."""
        return len(self.free) + (len(self.cache.evictable) if self.cache else 0)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix matching -------------------------------------------------------------------------
    def match(self, hashes: list[BlockHash]) -> list[int]:
        """Cached blocks for the longest prefix of ``hashes`` (no references taken)."""
        return self.cache.match(hashes) if self.cache else []

    def can_allocate(self, num_tokens: int, hits: list[int] = ()) -> bool:
        """Whether a sequence sharing ``hits`` can get blocks for ``num_tokens`` tokens."""
        idle_hits = sum(1 for b in hits if self.ref_counts[b] == 0)  # counted in num_free
        return self.blocks_needed(num_tokens) - len(hits) + idle_hits <= self.num_free

    def allocate(self, seq_id: int, num_tokens: int, hits: list[int] = ()) -> list[int]:
        """The block table of a new sequence: the shared ``hits`` (from ``match``), then
        fresh blocks up to ``num_tokens`` tokens."""
        assert seq_id not in self.tables, f"sequence {seq_id} already has blocks"
        assert self.can_allocate(num_tokens, hits), "allocate() without can_allocate()"
        for b in hits:
            if self.ref_counts[b] == 0:
                self.cache.acquire(b)
            self.ref_counts[b] += 1
        table = self.tables[seq_id] = list(hits)
        self._num_cached[seq_id] = len(hits)
        self._grow(table, num_tokens)
        return table

    def can_append(self, seq_id: int, num_tokens: int) -> bool:
        """Whether the sequence can grow to ``num_tokens`` tokens."""
        return self.blocks_needed(num_tokens) - len(self.tables[seq_id]) <= self.num_free

    def append(self, seq_id: int, num_tokens: int) -> None:
        self._grow(self.tables[seq_id], num_tokens)

    def _grow(self, table: list[int], num_tokens: int) -> None:
        while len(table) < self.blocks_needed(num_tokens):
            table.append(self._take())

    def _take(self) -> int:
        if self.free:
            b = self.free.popleft()
        else:
            b = self.cache.evict() if self.cache else None
            assert b is not None, "no free block: check can_allocate / can_append first"
        self.ref_counts[b] = 1
        return b

    def commit(self, seq_id: int, hashes: list[BlockHash], num_full: int, root: Root) -> None:
        """Register the sequence's first ``num_full`` blocks, now full with their K/V
        written; ``hashes`` holds at least their hashes (``prefix_cache.extend_block_hashes``
        under ``root``)."""
        if self.cache is None:
            return
        table = self.tables[seq_id]
        start = self._num_cached[seq_id]
        for i in range(start, num_full):
            self.cache.insert(table[i], hashes[i], root)  # False: a twin is cached; keep ours
        self._num_cached[seq_id] = max(start, num_full)

    def free_seq(self, seq_id: int) -> None:
        """Drop the sequence's references; its cached blocks stay, evictable. The tail goes
        first so that LRU eviction takes a prefix's last blocks before its first ones."""
        self._num_cached.pop(seq_id, None)
        for b in reversed(self.tables.pop(seq_id, [])):
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0 and not (self.cache and self.cache.release(b)):
                self.free.append(b)

    def drop_root(self, root: Root) -> None:
        """Uncache an unloaded adapter generation's blocks (referenced ones stay in use)."""
        if self.cache is not None:
            self.free.extend(self.cache.drop_root(root))

    def slot(self, seq_id: int, pos: int) -> int:
        return self.tables[seq_id][pos // self.block_size] * self.block_size + pos % self.block_size
