"""service/engine/block_manager.py on its own: allocate, share, free, evict; refcounts and free counts after each."""

from __future__ import annotations

import pytest

from service.engine.block_manager import SCRATCH_BLOCK, BlockManager


def test_a_new_pool_hands_out_every_block_but_the_scratch_one():
    blocks = BlockManager(num_blocks=5, block_size=4)
    assert blocks.usable == 4 and blocks.free == 4 and blocks.held == 0
    table = blocks.allocate([], 13)  # 13 positions: 4 blocks
    assert len(table) == 4 and SCRATCH_BLOCK not in table and table == sorted(table)
    assert blocks.free == 0 and blocks.held == 4
    assert sorted(blocks.take_fresh()) == table and blocks.take_fresh() == []  # reported once
    blocks.release(table)
    assert table == [] and blocks.free == 4 and blocks.cached_free == 0  # nothing sealed: nothing cached


def test_a_pool_needs_a_block_besides_the_scratch_one():
    with pytest.raises(ValueError, match="at least 2 blocks"):
        BlockManager(num_blocks=1, block_size=16)


def test_grow_adds_a_block_only_when_a_position_crosses_into_it():
    blocks = BlockManager(num_blocks=8, block_size=4)
    table = blocks.allocate([], 4)
    assert len(table) == 1
    blocks.grow(table, 4)
    assert len(table) == 1
    blocks.grow(table, 5)
    assert len(table) == 2 and blocks.free == 5


def test_sealed_blocks_are_shared_by_a_prompt_that_starts_with_them():
    blocks = BlockManager(num_blocks=10, block_size=4)
    ids = list(range(100, 110))  # 2 full blocks and 2 positions
    a = blocks.allocate([], len(ids))
    assert blocks.seal(a, ids, computed=10, sealed=0) == 2  # the partial third block stays unsealed
    assert blocks.match(ids + [1, 2], limit=10) == a[:2]
    assert blocks.match(ids[:4] + [0] * 8, limit=10) == a[:1]  # only the first block matches
    assert blocks.match([0] + ids, limit=10) == []
    assert blocks.match(ids, limit=1) == a[:1]  # the caller's limit (the last prompt token is computed)
    shared = blocks.match(ids + [1, 2], limit=10)
    assert blocks.fresh_needed(shared, 12) == 1  # the two shared are held already: one new block
    b = blocks.allocate(shared, 12)
    assert b[:2] == a[:2] and b[2] != a[2]
    assert [blocks.blocks[i].ref_count for i in a] == [2, 2, 1]
    assert blocks.free == 10 - 1 - 4


def test_freed_sealed_blocks_stay_cached_until_the_pool_needs_them_least_recent_first():
    blocks = BlockManager(num_blocks=5, block_size=2)  # 4 usable blocks
    first, second = [1, 2, 3, 4], [5, 6, 7, 8]
    a = blocks.allocate([], 4)
    blocks.seal(a, first, 4, 0)
    blocks.release(a)
    b = blocks.allocate([], 4)
    blocks.seal(b, second, 4, 0)
    blocks.release(b)
    assert blocks.free == 4 and blocks.cached_free == 4
    assert len(blocks.match(first, 2)) == 2 and len(blocks.match(second, 2)) == 2
    # a fresh block must evict: the least recently freed first, and of a table its last block first
    c = blocks.allocate([], 2)
    assert blocks.cached_free == 3
    assert len(blocks.match(first, 2)) == 1 and len(blocks.match(second, 2)) == 2
    # a cached block taken by a matching prompt leaves the free list without being evicted
    shared = blocks.match(second, 2)
    assert blocks.fresh_needed(shared, 4) == 2
    d = blocks.allocate(shared, 4)
    assert d == shared and blocks.free == 1 and blocks.cached_free == 1
    blocks.release(c)
    blocks.release(d)
    assert blocks.free == 4 and blocks.held == 0


def test_a_shared_block_is_freed_only_when_its_last_holder_lets_go():
    blocks = BlockManager(num_blocks=6, block_size=2)
    ids = [1, 2, 3, 4]
    a = blocks.allocate([], 4)
    blocks.seal(a, ids, 4, 0)
    b = blocks.allocate(blocks.match(ids + [9], 2), 5)
    blocks.release(a)
    assert blocks.free == 5 - 3 and all(blocks.blocks[i].ref_count == 1 for i in b)
    blocks.release(b)
    assert blocks.free == 5 and blocks.cached_free == 2


def test_a_hash_collision_is_not_a_match():
    blocks = BlockManager(num_blocks=4, block_size=2)
    a = blocks.allocate([], 2)
    blocks.seal(a, [1, 2], 2, 0)
    blocks.blocks[a[0]].token_ids = (7, 7)  # as if another block's ids had hashed the same
    assert blocks.match([1, 2, 3], 1) == []
