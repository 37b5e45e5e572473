"""KVCacheManager: exact block tables, prefix-cache hits, sliding-window release, hybrid hit rules, allocation."""

from __future__ import annotations

import pytest

from tokenfab.engine.block_pool import NULL_BLOCK
from tokenfab.engine.kv_cache_manager import KVCacheManager
from tokenfab.engine.types import Request, SamplingParams

BS = 4


def make_request(rid: str, tokens, arrival: float = 0.0) -> Request:
    return Request(rid, list(tokens), SamplingParams(max_tokens=8), arrival)


def admit(kv: KVCacheManager, request: Request) -> int:
    """What the scheduler does on admission: take the cached prefix, start from there."""
    hit = kv.get_computed_blocks(request)
    kv.check_integrity()
    request.num_computed_tokens = hit
    return hit


def compute(kv: KVCacheManager, request: Request, n: int) -> None:
    """Allocate slots for n tokens and run them (what one engine step does for this request)."""
    assert kv.allocate_slots(request, n)
    kv.check_integrity()
    request.num_computed_tokens += n
    kv.cache_full_blocks(request)
    kv.check_integrity()


def decode(kv: KVCacheManager, request: Request, token: int) -> None:
    """Sample `token` (its KV is computed by the next step) after the request caught up."""
    assert request.num_computed_tokens == request.num_tokens
    request.output_token_ids.append(token)


def release(kv: KVCacheManager, request: Request) -> None:
    kv.free(request)
    kv.check_integrity()


def run_prompt(kv: KVCacheManager, request: Request) -> None:
    admit(kv, request)
    compute(kv, request, request.num_tokens - request.num_computed_tokens)


# -- single full-attention group ---------------------------------------------------------------------------------


def test_block_tables_have_exact_ids_for_one_full_group():
    kv = KVCacheManager([None], [10], BS)
    assert kv.capacity_tokens() == 9 * BS
    a = make_request("a", range(10))
    assert admit(kv, a) == 0
    assert kv.block_tables("a") == ([],)
    compute(kv, a, 4)
    assert kv.block_tables("a") == ([1],)
    compute(kv, a, 6)
    assert kv.block_tables("a") == ([1, 2, 3],)
    assert kv.num_free_blocks() == [6]
    # Decodes fill the third block before a fourth is taken.
    decode(kv, a, 100)
    compute(kv, a, 1)
    assert kv.block_tables("a") == ([1, 2, 3],)
    decode(kv, a, 101)
    compute(kv, a, 1)
    assert kv.block_tables("a") == ([1, 2, 3],)
    decode(kv, a, 102)
    compute(kv, a, 1)
    assert kv.block_tables("a") == ([1, 2, 3, 4],)
    assert kv.num_free_blocks() == [5]

    b = make_request("b", range(50, 55))
    run_prompt(kv, b)
    assert kv.block_tables("b") == ([5, 6],)
    assert kv.num_free_blocks() == [3]
    assert kv.usage == pytest.approx(6 / 9)
    with pytest.raises(KeyError):
        kv.block_tables("nope")


def test_prefix_hit_returns_the_same_blocks_and_counts_stats():
    kv = KVCacheManager([None], [12], BS)
    prefix = list(range(10, 22))  # 3 full blocks
    a = make_request("a", prefix + [1, 2])
    run_prompt(kv, a)
    assert kv.block_tables("a") == ([1, 2, 3, 4],)
    assert kv.stats.queries == 14 and kv.stats.hits == 0

    b = make_request("b", prefix + [7, 8, 9])
    assert admit(kv, b) == 12
    assert kv.block_tables("b") == ([1, 2, 3],)
    assert kv.stats.queries == 14 + 15
    assert kv.stats.hits == 12
    pool = kv.pools[0]
    assert [pool.blocks[i].ref_count for i in (1, 2, 3, 4)] == [2, 2, 2, 1]
    compute(kv, b, 3)
    assert kv.block_tables("b") == ([1, 2, 3, 5],)
    assert kv.block_tables("a") == ([1, 2, 3, 4],)

    # A prompt sharing only the first block gets only that block.
    c = make_request("c", prefix[:4] + [0] * 9)
    assert admit(kv, c) == 4
    assert kv.block_tables("c") == ([1],)
    assert kv.stats.hits == 16
    release(kv, c)


def test_the_last_prompt_token_is_never_a_hit():
    kv = KVCacheManager([None], [12], BS)
    a = make_request("a", range(8))
    run_prompt(kv, a)
    # Both blocks of the 8-token prompt are full and cached...
    assert len(kv.pools[0].cached) == 2
    # ...but an identical prompt only hits the first: the last token must be recomputed for its logits.
    b = make_request("b", range(8))
    assert admit(kv, b) == 4
    assert kv.block_tables("b") == ([1],)
    compute(kv, b, 4)
    assert kv.block_tables("b") == ([1, 3],)

    # A 4-token prompt (one block) cannot hit anything.
    c = make_request("c", range(4))
    assert admit(kv, c) == 0
    assert kv.block_tables("c") == ([],)

    # One more token after the same 8 makes both blocks usable.
    d = make_request("d", list(range(8)) + [99])
    assert admit(kv, d) == 8
    assert kv.block_tables("d") == ([1, 2],)
    assert kv.stats.hits == 12


def test_partial_blocks_are_not_cached():
    kv = KVCacheManager([None], [12], BS)
    a = make_request("a", range(10))
    run_prompt(kv, a)
    assert len(kv.pools[0].cached) == 2
    b = make_request("b", list(range(10)) + [5, 6, 7])
    assert admit(kv, b) == 8
    assert kv.block_tables("b") == ([1, 2],)


def test_generated_tokens_fill_cacheable_blocks():
    kv = KVCacheManager([None], [12], BS)
    a = make_request("a", range(6))
    run_prompt(kv, a)
    assert len(kv.pools[0].cached) == 1
    decode(kv, a, 40)
    compute(kv, a, 1)
    decode(kv, a, 41)
    compute(kv, a, 1)
    # Positions 0..7 computed: the block holding tokens 4, 5, 40, 41 is now cached.
    assert len(kv.pools[0].cached) == 2
    b = make_request("b", [0, 1, 2, 3, 4, 5, 40, 41, 0])
    assert admit(kv, b) == 8
    assert kv.block_tables("b") == ([1, 2],)


def test_prefix_caching_disabled_never_hits():
    kv = KVCacheManager([None], [12], BS, enable_prefix_caching=False)
    a = make_request("a", range(13))
    run_prompt(kv, a)
    assert kv.pools[0].cached == {}
    b = make_request("b", range(13))
    assert admit(kv, b) == 0
    assert kv.block_tables("b") == ([],)
    assert kv.stats.queries == 0 and kv.stats.hits == 0
    compute(kv, b, 13)
    assert kv.block_tables("b") == ([5, 6, 7, 8],)


def test_free_releases_in_reverse_so_the_tail_is_evicted_first():
    kv = KVCacheManager([None], [8], BS)
    pool = kv.pools[0]
    a = make_request("a", range(13))
    run_prompt(kv, a)
    assert kv.block_tables("a") == ([1, 2, 3, 4],)
    release(kv, a)
    assert "a" not in kv.requests
    assert list(pool.free) == [5, 6, 7, 4, 3, 2, 1]
    assert kv.num_free_blocks() == [7]
    assert len(pool.cached) == 3

    # Four fresh blocks: the never-used ones, then a's partial (unhashed) tail block: nothing evicted.
    x = make_request("x", range(100, 116))
    run_prompt(kv, x)
    assert kv.block_tables("x") == ([5, 6, 7, 4],)
    assert pool.evictions == 0
    # The next allocation evicts a's third block (its deepest cached one), not its first.
    y = make_request("y", range(200, 203))
    run_prompt(kv, y)
    assert kv.block_tables("y") == ([3],)
    assert pool.evictions == 1
    assert sorted(pool.cached.values()) == [1, 2, 4, 5, 6, 7]  # a's first two blocks, x's four

    # a's prompt now only hits the two surviving blocks.
    a2 = make_request("a2", range(13))
    assert admit(kv, a2) == 8
    assert kv.block_tables("a2") == ([1, 2],)
    assert kv.num_free_blocks() == [0]
    release(kv, a2)
    release(kv, x)
    release(kv, y)
    assert kv.num_free_blocks() == [7]


def test_evicted_prefix_gives_a_shorter_hit_and_a_fully_evicted_one_none():
    kv = KVCacheManager([None], [6], BS)
    a = make_request("a", range(17))
    run_prompt(kv, a)
    assert kv.block_tables("a") == ([1, 2, 3, 4, 5],)
    release(kv, a)
    assert list(kv.pools[0].free) == [5, 4, 3, 2, 1]

    b = make_request("b", range(17))
    assert admit(kv, b) == 16
    release(kv, b)
    assert list(kv.pools[0].free) == [5, 4, 3, 2, 1]

    filler = make_request("f", range(500, 507))  # 2 blocks: 5 (unhashed), then 4 (a's block 3)
    run_prompt(kv, filler)
    assert kv.block_tables("f") == ([5, 4],)
    c = make_request("c", range(17))
    assert admit(kv, c) == 12
    assert kv.block_tables("c") == ([1, 2, 3],)
    release(kv, c)
    release(kv, filler)

    # The free queue now ends with filler's blocks (freed last) behind c's: c's go first.
    assert list(kv.pools[0].free) == [3, 2, 1, 4, 5]
    big = make_request("big", range(600, 612))
    run_prompt(kv, big)
    assert kv.block_tables("big") == ([3, 2, 1],)
    d = make_request("d", range(17))
    assert admit(kv, d) == 0
    assert kv.block_tables("d") == ([],)


def test_shared_blocks_survive_one_owner_being_freed():
    kv = KVCacheManager([None], [10], BS)
    pool = kv.pools[0]
    a = make_request("a", range(9))
    run_prompt(kv, a)
    b = make_request("b", range(9))
    assert admit(kv, b) == 8
    compute(kv, b, 1)
    assert kv.block_tables("a") == ([1, 2, 3],)
    assert kv.block_tables("b") == ([1, 2, 4],)
    release(kv, a)
    assert list(pool.free) == [5, 6, 7, 8, 9, 3]
    assert pool.blocks[1].ref_count == 1 and pool.blocks[2].ref_count == 1
    release(kv, b)
    assert list(pool.free) == [5, 6, 7, 8, 9, 3, 4, 2, 1]
    release(kv, b)  # freeing an unknown request is a no-op
    assert kv.num_free_blocks() == [9]


# -- allocation ----------------------------------------------------------------------------------------------------


def test_allocate_slots_is_all_or_nothing():
    kv = KVCacheManager([None], [4], BS)
    a = make_request("a", range(8))
    run_prompt(kv, a)
    assert kv.num_free_blocks() == [1]
    b = make_request("b", range(20, 28))
    admit(kv, b)
    assert not kv.allocate_slots(b, 8)
    kv.check_integrity()
    assert kv.block_tables("b") == ([],)
    assert kv.num_free_blocks() == [1]
    # A smaller chunk still fits.
    assert kv.allocate_slots(b, 4)
    kv.check_integrity()
    assert kv.block_tables("b") == ([3],)
    assert kv.num_free_blocks() == [0]
    b.num_computed_tokens = 4
    assert not kv.allocate_slots(b, 1)
    kv.check_integrity()
    assert kv.block_tables("b") == ([3],)
    release(kv, a)
    assert kv.allocate_slots(b, 4)
    kv.check_integrity()
    assert kv.block_tables("b") == ([3, 2],)  # a's tail block is reused first


def test_allocate_slots_all_or_nothing_across_groups():
    kv = KVCacheManager([None, 8], [10, 3], BS)
    # The sliding group has 2 usable blocks: 3 blocks for 12 tokens do not fit there, so nothing is taken anywhere.
    a = make_request("a", range(12))
    admit(kv, a)
    assert not kv.allocate_slots(a, 12)
    kv.check_integrity()
    assert kv.block_tables("a") == ([], [])
    assert kv.num_free_blocks() == [9, 2]
    assert kv.allocate_slots(a, 8)
    kv.check_integrity()
    assert kv.block_tables("a") == ([1, 2], [1, 2])
    assert kv.num_free_blocks() == [7, 0]


def test_allocate_zero_tokens_is_a_no_op():
    kv = KVCacheManager([None], [4], BS)
    a = make_request("a", range(4))
    admit(kv, a)
    assert kv.allocate_slots(a, 0)
    assert kv.block_tables("a") == ([],)
    kv.check_integrity()


def test_check_integrity_detects_a_table_out_of_sync_with_refcounts():
    kv = KVCacheManager([None], [6], BS)
    a = make_request("a", range(8))
    run_prompt(kv, a)
    kv.requests["a"].tables[0].pop()
    with pytest.raises(AssertionError):
        kv.check_integrity()


# -- sliding window ------------------------------------------------------------------------------------------------


def test_sliding_group_releases_blocks_that_left_the_window():
    kv = KVCacheManager([None, 8], [10, 10], BS)
    full, sliding = kv.pools
    a = make_request("a", range(10))
    run_prompt(kv, a)
    assert kv.block_tables("a") == ([1, 2, 3], [1, 2, 3])
    assert kv.num_free_blocks() == [6, 6]

    # Position 10 attends to 3..10: block 0 (tokens 0..3) is still needed.
    decode(kv, a, 100)
    compute(kv, a, 1)
    assert kv.block_tables("a") == ([1, 2, 3], [1, 2, 3])
    # Position 11 attends to 4..11: block 0 left the window and goes back to the pool.
    decode(kv, a, 101)
    assert kv.allocate_slots(a, 1)
    kv.check_integrity()
    assert kv.block_tables("a") == ([1, 2, 3], [NULL_BLOCK, 2, 3])
    assert kv.num_free_blocks() == [6, 7]
    assert list(sliding.free)[-1] == 1
    assert sliding.blocks[1].ref_count == 0
    assert full.blocks[1].ref_count == 1
    a.num_computed_tokens += 1
    kv.cache_full_blocks(a)
    kv.check_integrity()

    decode(kv, a, 102)
    compute(kv, a, 1)  # position 12 attends to 5..12: a fourth block; block 1 is still needed
    assert kv.block_tables("a") == ([1, 2, 3, 4], [NULL_BLOCK, 2, 3, 4])
    assert kv.num_free_blocks() == [5, 6]
    for token in (103, 104, 105):
        decode(kv, a, token)
        compute(kv, a, 1)
    # After position 15 was computed, position 16 needs 9..16: block 1 (4..7) is dropped, a fifth is taken.
    decode(kv, a, 106)
    compute(kv, a, 1)
    assert kv.block_tables("a") == ([1, 2, 3, 4, 5], [NULL_BLOCK, NULL_BLOCK, 3, 4, 5])
    assert kv.num_free_blocks() == [4, 6]
    # The sliding group never holds more than the window (plus the block being filled); the full group keeps all.
    release(kv, a)
    assert kv.num_free_blocks() == [9, 9]
    # The dropped blocks were released first, then the rest tail first.
    assert list(sliding.free) == [6, 7, 8, 9, 1, 2, 5, 4, 3]


def test_sliding_group_drops_blocks_before_a_prefill_chunk():
    kv = KVCacheManager([None, 8], [12, 12], BS)
    a = make_request("a", range(24))
    admit(kv, a)
    compute(kv, a, 8)
    compute(kv, a, 8)
    # Chunk starting at 16 attends back to 9: block 0 and block 1 (4..7) are out of the window.
    assert kv.allocate_slots(a, 8)
    kv.check_integrity()
    assert kv.block_tables("a") == ([1, 2, 3, 4, 5, 6], [NULL_BLOCK, NULL_BLOCK, 3, 4, 5, 6])
    assert kv.num_free_blocks() == [5, 7]


def test_hybrid_hit_survives_eviction_of_out_of_window_sliding_blocks():
    kv = KVCacheManager([None, 8], [20, 8], BS)
    full, sliding = kv.pools
    a = make_request("a", range(17))
    run_prompt(kv, a)
    assert kv.block_tables("a") == ([1, 2, 3, 4, 5], [1, 2, 3, 4, 5])
    decode(kv, a, 300)
    assert kv.allocate_slots(a, 1)  # position 17 needs 10..17: sliding blocks 0 and 1 are dropped
    kv.check_integrity()
    assert kv.block_tables("a")[1] == [NULL_BLOCK, NULL_BLOCK, 3, 4, 5]
    assert kv.num_free_blocks() == [14, 4]
    release(kv, a)
    assert list(sliding.free) == [6, 7, 1, 2, 5, 4, 3]

    # Another prompt takes four sliding blocks: the two never used, then a's dropped blocks 0 and 1.
    b = make_request("b", range(100, 116))
    run_prompt(kv, b)
    assert kv.block_tables("b") == ([6, 7, 8, 9], [6, 7, 1, 2])
    assert sliding.evictions == 2 and full.evictions == 0
    release(kv, b)

    # a's 16-token prefix: all 4 blocks cached in the full group, only the last window's in the sliding one.
    c = make_request("c", range(17))
    assert admit(kv, c) == 16
    assert kv.block_tables("c") == ([1, 2, 3, 4], [NULL_BLOCK, NULL_BLOCK, 3, 4])
    assert kv.stats.hits == 16
    compute(kv, c, 1)
    assert kv.block_tables("c") == ([1, 2, 3, 4, 10], [NULL_BLOCK, NULL_BLOCK, 3, 4, 5])


def test_hybrid_hit_is_limited_by_the_sliding_group():
    kv = KVCacheManager([None, 8], [20, 8], BS)
    full, sliding = kv.pools
    a = make_request("a", range(17))
    run_prompt(kv, a)
    release(kv, a)
    assert list(sliding.free) == [6, 7, 5, 4, 3, 2, 1]
    # Four sliding blocks go: 6, 7, a's partial block 5 and a's block 3 (id 4), the last block of its prefix.
    b = make_request("b", range(100, 116))
    run_prompt(kv, b)
    assert kv.block_tables("b") == ([6, 7, 8, 9], [6, 7, 5, 4])
    release(kv, b)
    assert {1, 2, 3, 4} <= set(full.cached.values())

    # The full group could serve 16 tokens but the sliding group's window for 16 is broken: 12 it is, and the
    # sliding table keeps only what position 12 attends to (5..12), padding block 0 with the null block.
    c = make_request("c", range(17))
    assert admit(kv, c) == 12
    assert kv.block_tables("c") == ([1, 2, 3], [NULL_BLOCK, 2, 3])
    assert sliding.blocks[1].ref_count == 0 and 1 in sliding.free
    assert full.blocks[4].ref_count == 0
    compute(kv, c, 5)
    assert kv.block_tables("c")[1][:3] == [NULL_BLOCK, 2, 3]
    assert len(kv.block_tables("c")[0]) == 5 and len(kv.block_tables("c")[1]) == 5


def test_hybrid_hit_needs_the_whole_last_window_in_the_sliding_group():
    kv = KVCacheManager([None, 8], [20, 8], BS)
    sliding = kv.pools[1]
    a = make_request("a", range(17))
    run_prompt(kv, a)
    decode(kv, a, 300)
    compute(kv, a, 1)
    release(kv, a)
    assert list(sliding.free) == [6, 7, 1, 2, 5, 4, 3]
    # Evict down to (and including) a's sliding block 3 (id 4); block 2 (id 3) alone is not a window for any prefix.
    b = make_request("b", range(100, 124))
    run_prompt(kv, b)
    assert sliding.evictions == 3
    release(kv, b)
    c = make_request("c", range(17))
    assert admit(kv, c) == 0
    assert kv.block_tables("c") == ([], [])


def test_hit_with_two_sliding_windows_is_backed_in_both_groups():
    kv = KVCacheManager([None, 8, 32], [20, 8, 10], BS)
    a = make_request("a", range(25))
    admit(kv, a)
    compute(kv, a, 24)
    compute(kv, a, 1)  # window-8 group drops blocks 0..3; the window-32 group keeps everything
    release(kv, a)
    b = make_request("b", range(100, 116))
    run_prompt(kv, b)  # evicts a's blocks 0..3 in the window-8 group, block 5 and the partial tail in the other
    release(kv, b)
    # Window 8 alone could serve 24 tokens (blocks 4, 5); window 32 alone 20 (blocks 0..4); together nothing:
    # 20 tokens would need blocks 3 and 4 in the window-8 group.
    c = make_request("c", range(25))
    assert admit(kv, c) == 0
    assert kv.block_tables("c") == ([], [], [])
