"""Paged KV-cache bookkeeping, pure Python: a free list of fixed-size blocks and one block
table per sequence. Block ``i`` owns cache slots ``i * block_size .. (i+1) * block_size - 1``."""

from __future__ import annotations

from collections import deque


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free: deque[int] = deque(range(num_blocks))
        self.tables: dict[int, list[int]] = {}  # seq_id -> block ids

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) <= len(self.free)

    def allocate(self, seq_id: int, num_tokens: int) -> list[int]:
        """Blocks for a sequence's first ``num_tokens`` tokens (prefill)."""
        assert seq_id not in self.tables, f"sequence {seq_id} already has blocks"
        n = self.blocks_needed(num_tokens)
        assert n <= len(self.free), "allocate() without can_allocate()"
        self.tables[seq_id] = [self.free.popleft() for _ in range(n)]
        return self.tables[seq_id]

    def can_append(self, seq_id: int, num_tokens: int) -> bool:
        """Whether the sequence can grow to ``num_tokens`` tokens."""
        return self.blocks_needed(num_tokens) - len(self.tables[seq_id]) <= len(self.free)

    def append(self, seq_id: int, num_tokens: int) -> None:
        table = self.tables[seq_id]
        while len(table) < self.blocks_needed(num_tokens):
            table.append(self.free.popleft())

    def free_seq(self, seq_id: int) -> None:
        for b in self.tables.pop(seq_id, []):
            self.free.append(b)

    def slot(self, seq_id: int, pos: int) -> int:
        return self.tables[seq_id][pos // self.block_size] * self.block_size + pos % self.block_size
