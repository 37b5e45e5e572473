"""BlockPool: ids handed out, free-queue (eviction) order, refcounts and the verified prefix-hash map."""

from __future__ import annotations

import pytest

from tokenfab.engine.block_hash import block_hash
from tokenfab.engine.block_pool import NULL_BLOCK, Block, BlockPool


def key(*tokens: int, parent: bytes | None = None) -> tuple[bytes | None, tuple[int, ...]]:
    return (parent, tuple(tokens))


def register_full(pool: BlockPool, block_id: int, tokens: tuple[int, ...], parent: bytes | None = None) -> bytes:
    h = block_hash(parent, tokens)
    pool.register(block_id, h, (parent, tokens))
    return h


def test_needs_a_real_block_besides_the_null_block():
    with pytest.raises(ValueError):
        BlockPool(1)
    with pytest.raises(ValueError):
        BlockPool(0)
    pool = BlockPool(2)
    assert pool.num_blocks == 2 and pool.num_free == 1
    assert pool.allocate() == 1
    pool.check_integrity()


def test_fresh_pool_hands_out_ids_in_order_and_never_the_null_block():
    pool = BlockPool(6)
    pool.check_integrity()
    assert pool.num_blocks == 6
    assert pool.num_free == 5
    assert NULL_BLOCK not in pool.free
    got = []
    for expected_free in (4, 3, 2, 1, 0):
        got.append(pool.allocate())
        pool.check_integrity()
        assert pool.num_free == expected_free
    assert got == [1, 2, 3, 4, 5]
    assert all(pool.blocks[i].ref_count == 1 for i in got)
    assert pool.blocks[NULL_BLOCK].ref_count == 0
    with pytest.raises((KeyError, IndexError, RuntimeError)):
        pool.allocate()
    pool.check_integrity()
    assert pool.num_free == 0


def test_release_appends_to_the_tail_of_the_free_queue():
    pool = BlockPool(6)
    ids = [pool.allocate() for _ in range(4)]
    assert ids == [1, 2, 3, 4]
    assert list(pool.free) == [5]
    pool.release(2)
    pool.check_integrity()
    assert list(pool.free) == [5, 2]
    pool.release(1)
    pool.check_integrity()
    assert list(pool.free) == [5, 2, 1]
    assert pool.blocks[2].ref_count == 0
    # Reuse order is the free-queue order: never-used first, then least recently freed.
    assert [pool.allocate() for _ in range(3)] == [5, 2, 1]
    pool.check_integrity()
    assert pool.num_free == 0


def test_null_block_release_is_a_no_op():
    pool = BlockPool(3)
    pool.release(NULL_BLOCK)
    pool.release(NULL_BLOCK)
    pool.check_integrity()
    assert list(pool.free) == [1, 2]
    assert pool.blocks[NULL_BLOCK].ref_count == 0


def test_double_release_raises_and_leaves_the_pool_consistent():
    pool = BlockPool(4)
    b = pool.allocate()
    pool.release(b)
    pool.check_integrity()
    with pytest.raises(RuntimeError):
        pool.release(b)
    pool.check_integrity()
    assert pool.blocks[b].ref_count == 0
    assert list(pool.free).count(b) == 1
    # A block that was never handed out cannot be released either.
    with pytest.raises(RuntimeError):
        pool.release(3)
    pool.check_integrity()


def test_register_and_lookup_verify_the_key():
    pool = BlockPool(5)
    b = pool.allocate()
    h = register_full(pool, b, (1, 2, 3, 4))
    pool.check_integrity()
    assert pool.cached == {h: b}
    assert pool.blocks[b].hash == h and pool.blocks[b].key == key(1, 2, 3, 4)
    assert pool.lookup(h, key(1, 2, 3, 4)) == b
    # Same hash, other tokens: a collision is a miss, never a wrong hit.
    assert pool.lookup(h, key(1, 2, 3, 5)) is None
    # Same tokens after another parent: a miss too.
    assert pool.lookup(h, key(1, 2, 3, 4, parent=b"\x07" * 32)) is None
    assert pool.lookup(bytes(32), key(1, 2, 3, 4)) is None


def test_colliding_hash_with_other_contents_is_not_registered_and_misses():
    pool = BlockPool(5)
    a, b = pool.allocate(), pool.allocate()
    chosen = 424242
    pool.register(a, chosen, key(1, 1, 1, 1))
    pool.register(b, chosen, key(2, 2, 2, 2))
    pool.check_integrity()
    # The first block with that hash stays canonical; the colliding one stays unindexed.
    assert pool.cached == {chosen: a}
    assert pool.blocks[b].hash is None and pool.blocks[b].key is None
    assert pool.lookup(chosen, key(2, 2, 2, 2)) is None
    assert pool.lookup(chosen, key(1, 1, 1, 1)) == a


def test_register_is_first_wins_per_block():
    pool = BlockPool(4)
    b = pool.allocate()
    pool.register(b, 11, key(1))
    pool.register(b, 22, key(2))
    pool.check_integrity()
    assert pool.cached == {11: b}
    assert pool.blocks[b].hash == 11
    assert pool.lookup(22, key(2)) is None


def test_free_cached_block_stays_findable_until_evicted_in_least_recently_freed_order():
    pool = BlockPool(5)
    ids = [pool.allocate() for _ in range(4)]
    hashes = {}
    parent = None
    for i, b in enumerate(ids):
        tokens = (i, i, i, i)
        hashes[b] = register_full(pool, b, tokens, parent)
        parent = hashes[b]
    pool.check_integrity()
    for b in (3, 1, 4, 2):
        pool.release(b)
        pool.check_integrity()
    assert list(pool.free) == [3, 1, 4, 2]
    assert pool.num_free == 4
    # Freed but not reused: every block is still a hit.
    for b in ids:
        assert pool.lookup(hashes[b], pool.blocks[b].key) == b
    assert pool.evictions == 0

    evicted = []
    for expected in (3, 1):
        stale_key = pool.blocks[expected].key
        got = pool.allocate()
        pool.check_integrity()
        evicted.append(got)
        assert got == expected
        assert hashes[got] not in pool.cached
        assert pool.blocks[got].hash is None and pool.blocks[got].key is None
        assert pool.lookup(hashes[got], stale_key) is None
    assert evicted == [3, 1]
    assert pool.evictions == 2
    # The blocks not yet reused are still cached.
    assert pool.lookup(hashes[4], pool.blocks[4].key) == 4
    assert pool.lookup(hashes[2], pool.blocks[2].key) == 2
    assert set(pool.cached.values()) == {2, 4}


def test_reusing_an_unhashed_block_is_not_an_eviction():
    pool = BlockPool(4)
    a, b = pool.allocate(), pool.allocate()
    register_full(pool, b, (9, 9))
    pool.release(a)
    pool.release(b)
    assert list(pool.free) == [3, 1, 2]
    assert pool.allocate() == 3
    assert pool.allocate() == 1
    assert pool.evictions == 0
    assert pool.allocate() == 2
    assert pool.evictions == 1
    assert pool.cached == {}
    pool.check_integrity()


def test_touch_revives_a_cached_free_block():
    pool = BlockPool(5)
    ids = [pool.allocate() for _ in range(3)]
    h = register_full(pool, 2, (5, 6, 7, 8))
    for b in ids:
        pool.release(b)
    pool.check_integrity()
    assert list(pool.free) == [4, 1, 2, 3]
    found = pool.lookup(h, key(5, 6, 7, 8))
    assert found == 2
    pool.touch(found)
    pool.check_integrity()
    assert pool.blocks[2].ref_count == 1
    assert 2 not in pool.free
    assert list(pool.free) == [4, 1, 3]
    assert pool.num_free == 3
    # Allocation now skips the revived block, and it keeps its hash.
    assert [pool.allocate() for _ in range(3)] == [4, 1, 3]
    assert pool.num_free == 0
    assert pool.cached == {h: 2}
    assert pool.evictions == 0
    pool.check_integrity()
    # When released again it goes to the tail and is still a hit.
    pool.release(2)
    pool.check_integrity()
    assert list(pool.free) == [2]
    assert pool.lookup(h, key(5, 6, 7, 8)) == 2


def test_touch_on_a_block_in_use_shares_it():
    pool = BlockPool(4)
    b = pool.allocate()
    h = register_full(pool, b, (1, 2))
    pool.touch(b)
    pool.check_integrity()
    assert pool.blocks[b].ref_count == 2
    assert list(pool.free) == [2, 3]
    pool.release(b)
    pool.check_integrity()
    assert pool.blocks[b].ref_count == 1
    assert b not in pool.free
    pool.release(b)
    pool.check_integrity()
    assert list(pool.free) == [2, 3, b]
    assert pool.lookup(h, key(1, 2)) == b
    with pytest.raises(RuntimeError):
        pool.release(b)


def test_block_hash_is_chained_on_the_parent():
    t = (1, 2, 3, 4)
    assert block_hash(None, t) == block_hash(None, t)
    assert block_hash(None, t) != block_hash(None, (1, 2, 3, 5))
    h0 = block_hash(None, t)
    assert block_hash(h0, t) != h0
    assert block_hash(h0, t) == block_hash(h0, tuple(t))


def test_check_integrity_detects_corruption():
    pool = BlockPool(4)
    b = pool.allocate()
    pool.check_integrity()
    pool.blocks[b].ref_count = 0  # not in the free queue but unreferenced
    with pytest.raises(AssertionError):
        pool.check_integrity()

    pool = BlockPool(4)
    pool.blocks[2].ref_count = 1  # referenced but still in the free queue
    with pytest.raises(AssertionError):
        pool.check_integrity()

    pool = BlockPool(4)
    b = pool.allocate()
    pool.register(b, 5, key(1))
    pool.cached[6] = b  # hash map entry pointing at a block with another hash
    with pytest.raises(AssertionError):
        pool.check_integrity()

    pool = BlockPool(4)
    pool.free[NULL_BLOCK] = None
    with pytest.raises(AssertionError):
        pool.check_integrity()


def test_block_defaults():
    b = Block(7)
    assert (b.block_id, b.ref_count, b.hash, b.key) == (7, 0, None, None)
