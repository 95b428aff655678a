"""Prefix caching: full KV blocks content-addressed by (adapter, previous block, token ids).

A LoRA on any layer changes the keys and values of every later layer, so a block's contents
depend on the adapter as much as on its tokens. Each chain of block hashes therefore starts
from a *root* naming the adapter and its load generation (``lora.registry``): the base model
never shares a block with an adapter, nor one adapter with another, and a reloaded adapter
(new generation) never reads its predecessor's blocks.

Hashes are SHA-256 (truncated to 16 bytes) of the parent hash and the block's token ids, so
one hash names one exact token prefix under one root: a collision would hand one request
another's keys and values, so a non-cryptographic hash that a client could aim at is not
used. A block of 16 tokens costs about a microsecond to hash.

``PrefixCache`` is the table only: hash -> block, and the least recently freed unreferenced
cached blocks, which the block manager evicts first when it needs a block. Reference
counting lives in ``block_manager.BlockManager``.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

BlockHash = bytes
Root = BlockHash  # hash standing for "no tokens yet" under one adapter


def root_hash(adapter: tuple[str, int] | None) -> Root:
    """The chain root of the base model (``None``) or one adapter generation."""
    name = b"base" if adapter is None else f"adapter\0{adapter[0]}\0{adapter[1]}".encode()
    return hashlib.sha256(name).digest()[:16]


def extend_block_hashes(root: Root, hashes: list[BlockHash], tail: list[int],
                        block_size: int) -> list[BlockHash]:
    """Append to ``hashes`` (the hashes of a sequence's first ``len(hashes)`` blocks) the
    hashes of the full blocks in ``tail``, its token ids from position
    ``len(hashes) * block_size`` on; returns ``hashes``. Block i's hash =
    sha256(hash of block i-1 (``root`` for i = 0) + its token ids)."""
    parent = hashes[-1] if hashes else root
    for start in range(0, len(tail) - block_size + 1, block_size):
        data = array("q", tail[start : start + block_size]).tobytes()
        parent = hashlib.sha256(parent + data).digest()[:16]
        hashes.append(parent)
    return hashes


class PrefixCache:
    """hash <-> block for cached full blocks, plus LRU order of the unreferenced ones.

    A cached block is in ``evictable`` exactly when no sequence references it; the block
    manager moves it in (``release``) and out (``acquire``, ``evict``). Blocks are grouped by
    root so that an adapter's unload drops its blocks from the table at once.
    """

    def __init__(self) -> None:
        self.block_of: dict[BlockHash, int] = {}
        self.hash_of: dict[int, BlockHash] = {}
        self.root_of: dict[int, Root] = {}
        self.by_root: dict[Root, set[int]] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()  # oldest first
        self.dropped: set[Root] = set()  # retired adapter generations: never cached again
        self.queries = 0  # prompt tokens looked up at admission
        self.hits = 0  # of which served from the cache

    def __len__(self) -> int:
        return len(self.block_of)

    def match(self, hashes: list[BlockHash]) -> list[int]:
        """Blocks of the longest cached prefix of ``hashes``."""
        blocks = []
        for h in hashes:
            b = self.block_of.get(h)
            if b is None:
                break
            blocks.append(b)
        return blocks

    def insert(self, block: int, h: BlockHash, root: Root) -> bool:
        """Cache ``block`` (full, its K/V written, referenced) under ``h``. False when ``h``
        is cached already (by another block computed in parallel: this one stays private)
        or its root was dropped."""
        if h in self.block_of or block in self.hash_of or root in self.dropped:
            return False
        self.block_of[h], self.hash_of[block], self.root_of[block] = block, h, root
        self.by_root.setdefault(root, set()).add(block)
        return True

    def acquire(self, block: int) -> None:
        """A sequence takes a reference on a cached block: it is no longer evictable."""
        self.evictable.pop(block, None)

    def release(self, block: int) -> bool:
        """The last reference went: keep it, evictable (True), unless it is not cached."""
        if block not in self.hash_of:
            return False
        self.evictable[block] = None
        return True

    def evict(self) -> int | None:
        """Forget the least recently released unreferenced block; None if there is none."""
        if not self.evictable:
            return None
        block, _ = self.evictable.popitem(last=False)
        self._forget(block)
        return block

    def drop_root(self, root: Root) -> list[int]:
        """Forget every block of ``root`` (an unloaded adapter generation); returns the
        unreferenced ones, which are free blocks again. Referenced ones stay with their
        sequences, uncached."""
        self.dropped.add(root)
        freed = []
        for block in self.by_root.pop(root, set()):
            self._forget(block, keep_root_index=True)
            if block in self.evictable:
                del self.evictable[block]
                freed.append(block)
        return freed

    def _forget(self, block: int, keep_root_index: bool = False) -> None:
        h = self.hash_of.pop(block)
        root = self.root_of.pop(block)
        del self.block_of[h]
        if not keep_root_index:
            members = self.by_root[root]
            members.discard(block)
            if not members:
                del self.by_root[root]
