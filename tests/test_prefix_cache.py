"""Prefix-cache bookkeeping (kvcache/prefix_cache.py, kvcache/block_manager.py), pure Python:
hash chains keyed by adapter generation, reference counts, LRU eviction, invalidation."""

from __future__ import annotations

import hashlib
from array import array

import pytest

from loraplex.kvcache.block_manager import BlockManager
from loraplex.kvcache.prefix_cache import extend_block_hashes, root_hash

BS = 4


def hashes_of(tokens: list[int], adapter=None) -> list[bytes]:
    return extend_block_hashes(root_hash(adapter), [], tokens, BS)


def test_hash_chain_is_sha256_of_parent_and_tokens():
    tokens = list(range(10, 21))  # 2 full blocks and a partial one
    root = root_hash(None)
    h0 = hashlib.sha256(root + array("q", tokens[:4]).tobytes()).digest()[:16]
    h1 = hashlib.sha256(h0 + array("q", tokens[4:8]).tobytes()).digest()[:16]
    assert hashes_of(tokens) == [h0, h1]  # the partial block has no hash
    # incremental: the tail from block 1 on extends the first hash only
    assert extend_block_hashes(root, [h0], tokens[4:], BS) == [h0, h1]


def test_roots_separate_base_adapters_and_generations():
    tokens = list(range(8))
    chains = {str(a): hashes_of(tokens, a) for a in (None, ("x", 1), ("x", 2), ("y", 1))}
    firsts = [c[0] for c in chains.values()]
    assert len(set(firsts)) == len(firsts)
    # the same block after different prefixes differs too (the parent is in the hash)
    assert hashes_of([0, 0, 0, 0] + tokens[4:])[1] != hashes_of(tokens)[1]


def test_shared_blocks_refcounts_and_lru_eviction():
    bm = BlockManager(6, BS, enable_prefix_caching=True)
    a = list(range(100, 110))  # 2 full blocks + 2 tokens
    ha = hashes_of(a)
    bm.allocate(1, len(a))
    bm.commit(1, ha, 2, root_hash(None))
    assert bm.match(ha) == bm.tables[1][:2]
    # a second sequence with the same prefix shares both full blocks
    hits = bm.match(ha)
    bm.allocate(2, len(a), hits)
    assert bm.tables[2][:2] == hits and bm.tables[2][2] != bm.tables[1][2]
    assert [bm.ref_counts[b] for b in hits] == [2, 2]
    assert bm.num_free == 6 - 4
    bm.free_seq(1)
    bm.free_seq(2)
    assert sum(bm.ref_counts) == 0 and bm.num_free == 6
    assert bm.match(ha) == hits  # still cached after both finished
    # filling the pool evicts cached blocks only once the free list is empty, tail first
    bm.allocate(3, 4 * BS)  # 4 fresh blocks: the 4 uncached free ones
    assert bm.match(ha) == hits
    bm.allocate(4, BS)  # needs one more: evicts the prefix's last block (freed first)
    assert bm.match(ha) == hits[:1]
    assert not bm.can_allocate(2 * BS)
    assert bm.can_allocate(BS, hits[:1])  # a hit on the idle block needs no new one
    bm.free_seq(3)
    bm.free_seq(4)
    assert sum(bm.ref_counts) == 0 and bm.num_free == 6


def test_twin_blocks_stay_private_and_idle_hits_count_against_free():
    bm = BlockManager(4, BS, enable_prefix_caching=True)
    t = list(range(8))
    h = hashes_of(t)
    bm.allocate(1, 8)
    bm.allocate(2, 8)  # computed the same prefix in parallel
    bm.commit(1, h, 2, root_hash(None))
    bm.commit(2, h, 2, root_hash(None))  # already cached: seq 2's blocks stay uncached
    assert bm.match(h) == bm.tables[1]
    bm.free_seq(1)
    bm.free_seq(2)
    assert len(bm.free) == 2 and len(bm.cache.evictable) == 2
    assert bm.can_allocate(16, bm.match(h))  # 2 idle hits + 2 free blocks
    assert not bm.can_allocate(20, bm.match(h))


def test_drop_root_uncaches_an_adapter_generation_and_frees_idle_blocks():
    bm = BlockManager(8, BS, enable_prefix_caching=True)
    t = list(range(8))
    key, other = ("a", 3), ("b", 4)
    for seq_id, adapter in ((1, key), (2, other), (3, key)):
        h = hashes_of(t, adapter)
        bm.allocate(seq_id, 9, bm.match(h))
        bm.commit(seq_id, h, 2, root_hash(adapter))
    assert bm.tables[3][:2] == bm.tables[1][:2]  # same adapter generation shares
    assert set(bm.tables[2][:2]).isdisjoint(bm.tables[1])  # another adapter never does
    bm.free_seq(1)
    bm.drop_root(root_hash(key))  # unloaded while seq 3 still runs on it
    assert bm.match(hashes_of(t, key)) == [] and len(bm.match(hashes_of(t, other))) == 2
    # seq 3 keeps its blocks; a retired generation never caches again
    bm.commit(3, hashes_of(t + [1, 2, 3, 4], key), 3, root_hash(key))
    assert bm.match(hashes_of(t, key)) == []
    bm.free_seq(2)
    bm.free_seq(3)
    assert sum(bm.ref_counts) == 0 and bm.num_free == 8
    assert len(bm.free) == 8 - 2  # only the other adapter's two blocks are still cached


def test_without_prefix_caching_nothing_is_shared():
    bm = BlockManager(4, BS)
    assert bm.match(hashes_of(list(range(8)))) == []
    bm.allocate(1, 8)
    bm.commit(1, hashes_of(list(range(8))), 2, root_hash(None))
    bm.free_seq(1)
    assert len(bm.free) == 4


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5])
def test_blocks_needed(n):
    assert BlockManager(4, BS).blocks_needed(n) == -(-n // BS)
