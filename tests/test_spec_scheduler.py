"""Scheduler and KV manager with draft tokens, on exact block ids: drafts ride token catch-up, are the first thing
given up when budget or blocks run short, and rollback returns exactly the blocks that hold only rejected drafts."""

from __future__ import annotations

from tokenfab.engine.kv_cache_manager import KVCacheManager
from tokenfab.engine.scheduler import Scheduler
from tokenfab.engine.types import Request, SamplingParams

BS = 4


def decoding(sched: Scheduler, prompts: dict[str, int]) -> list[Request]:
    """Requests whose prompts were computed in one step and that have sampled their first token."""
    requests = [Request(rid, list(range(100, 100 + n)), SamplingParams(max_tokens=50), float(i))
                for i, (rid, n) in enumerate(prompts.items())]
    for r in requests:
        sched.add(r)
    assert [s.request for s in sched.schedule().scheduled] == requests
    for r in requests:
        r.num_computed_tokens = r.num_tokens
        r.output_token_ids.append(7)
    return requests


def test_drafts_are_scheduled_after_the_last_token_and_trimmed_by_budget():
    sched = Scheduler(KVCacheManager([None], [20], BS), 4, 4)
    (r,) = decoding(sched, {"a": 4})
    r.spec_token_ids = [1, 2, 3, 4, 5]
    (s,) = sched.schedule().scheduled
    assert (s.start, s.num_tokens, s.spec_token_ids, s.num_spec, s.samples) == (4, 4, [1, 2, 3], 3, True)
    assert s.token_ids() == [7, 1, 2, 3] and s.num_logit_rows == 4
    assert r.spec_token_ids == []  # consumed by the step that verifies them
    assert sched.kv.block_tables("a") == ([1, 2],)


def test_drafts_are_dropped_before_anyone_is_preempted():
    kv = KVCacheManager([None], [4], BS)  # three usable blocks
    sched = Scheduler(kv, 4, 16)
    a, b = decoding(sched, {"a": 4, "b": 2})  # blocks 1 and 2
    a.spec_token_ids = [1, 2, 3, 4, 5, 6]  # would need blocks for positions 4..10: two more
    b.spec_token_ids = [9]  # fits in its own block
    plan = sched.schedule()
    assert plan.preempted == []
    assert [(s.request.request_id, s.num_tokens, s.num_spec) for s in plan.scheduled] == [("a", 1, 0), ("b", 2, 1)]
    assert kv.block_tables("a") == ([1, 3],) and kv.block_tables("b") == ([2],)


def test_rollback_returns_the_blocks_of_rejected_drafts_to_the_front_of_the_free_queue():
    kv = KVCacheManager([None], [10], BS)
    sched = Scheduler(kv, 4, 16)
    (r,) = decoding(sched, {"a": 6})
    r.spec_token_ids = [1, 2, 3, 4, 5, 6, 7]  # positions 6..13
    (s,) = sched.schedule().scheduled
    assert kv.block_tables("a") == ([1, 2, 3, 4],)
    # One draft accepted: tokens 7 and 1 join the sequence, KV holds positions 0..6.
    r.output_token_ids += [1, 42]
    r.num_computed_tokens = 8
    kv.rollback(r)
    kv.cache_full_blocks(r)
    assert kv.block_tables("a") == ([1, 2],)
    assert list(kv.pools[0].free)[:2] == [3, 4]  # never held reusable KV: handed out first
    kv.check_integrity()
    assert kv.pools[0].blocks[2].key == (kv.pools[0].blocks[1].hash, (104, 105, 7, 1))  # accepted tokens only
