"""KV tiers without a model: the disk tier's files (checks, bounds, restarts, a failing disk), the host tier's LRU
spilling to disk, and the scheduler + KV cache manager + tiers driven by a randomized workload in which the test
plays the model — every position's KV is a fingerprint of the tokens up to it, so a block loaded from a tier must
hold exactly the KV of the tokens it is found for."""

from __future__ import annotations

import shutil
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenfab.attention.backend import KVCache, KVGroupSpec
from tokenfab.engine.block_hash import block_hash, external_hash
from tokenfab.engine.block_pool import NULL_BLOCK
from tokenfab.engine.kv_cache_manager import KVCacheManager
from tokenfab.engine.kv_events import BlockRemoved, BlockStored
from tokenfab.engine.kv_tiers import DiskTier, HostTier, KVTiers
from tokenfab.engine.scheduler import Scheduler
from tokenfab.engine.types import Request, SampleResult, SamplingParams

BS, WINDOW = 4, 6
GROUPS = [KVGroupSpec(None, (0,)), KVGroupSpec(WINDOW, (1,))]


def key_of(tokens: list[int], parent: bytes | None = None):
    return (parent, tuple(tokens))


def kv_block(value: float, layers: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.full((layers, BS, 1, 2), value)
    return k, k + 0.5


def never(*_):
    raise AssertionError("nothing should be evicted here")


# -- the disk tier ---------------------------------------------------------------------------------------------------


def test_disk_blocks_survive_a_restart_and_fail_their_checks_when_damaged(tmp_path):
    disk = DiskTier(tmp_path, "model-a", 1 << 20)
    keys = [key_of([i, i + 1, i + 2, i + 3]) for i in range(4)]
    hashes = [block_hash(*k) for k in keys]
    for i, (h, k) in enumerate(zip(hashes, keys)):
        assert disk.put(0, h, k, *kv_block(float(i)), never)
    got = disk.get(0, hashes[1], keys[1])  # served from memory or disk, whichever holds it now
    assert got is not None and torch.equal(got[0], kv_block(1.0)[0]) and torch.equal(got[1], kv_block(1.0)[1])
    disk.close()

    again = DiskTier(tmp_path, "model-a", 1 << 20)
    assert again.num_blocks == 4 and all(again.has(0, h) for h in hashes)
    assert torch.equal(again.get(0, hashes[2], keys[2])[0], kv_block(2.0)[0])
    assert again.get(0, hashes[2], key_of([9, 9, 9, 9])) is None  # other tokens under this hash: a miss
    assert again.has(0, hashes[2]) and again.corrupt == 0
    files = sorted((tmp_path / "model-a").glob("*/*.kv"))
    assert len(files) == 4
    path = again.path(0, hashes[0])
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # one flipped bit of KV
    path.write_bytes(bytes(data))
    truncated = again.path(0, hashes[3])
    truncated.write_bytes(truncated.read_bytes()[:-10])
    assert again.get(0, hashes[0], keys[0]) is None and again.get(0, hashes[3], keys[3]) is None
    assert again.corrupt == 2 and not again.has(0, hashes[0]) and not again.has(0, hashes[3])
    again.close()
    assert not path.exists() and not truncated.exists()
    other = DiskTier(tmp_path, "model-b", 1 << 20)  # another model's namespace: nothing of model-a is found
    assert other.num_blocks == 0 and not other.has(0, hashes[1])
    other.close()


def test_the_disk_tier_is_bounded_and_drops_least_recently_used_files(tmp_path):
    one = len(_encoded())
    disk = DiskTier(tmp_path, "m", 3 * one)
    dropped = []
    keys = [key_of([i] * BS) for i in range(5)]
    hashes = [block_hash(*k) for k in keys]
    for i in range(3):
        disk.put(0, hashes[i], keys[i], *kv_block(float(i)), never)
    assert disk.get(0, hashes[0], keys[0]) is not None  # 0 is now the most recently used
    for i in (3, 4):
        disk.put(0, hashes[i], keys[i], *kv_block(float(i)), lambda g, h, k, kv: dropped.append(h))
    assert dropped == [hashes[1], hashes[2]] and disk.used_bytes <= 3 * one
    disk.close()
    assert len(list((tmp_path / "m").glob("*/*.kv"))) == 3


def test_a_disk_that_fails_to_write_stops_the_tier_not_the_engine(tmp_path):
    disk = DiskTier(tmp_path, "m", 1 << 20)
    shutil.rmtree(disk.dir)
    disk.dir.write_text("not a directory")  # every write now fails, as on a full or broken disk
    k = key_of([1, 2, 3, 4])
    h = block_hash(*k)
    assert disk.put(0, h, k, *kv_block(1.0), never)
    disk.close()  # the writer has tried
    assert disk.take_failed() == [(0, h)] and not disk.has(0, h) and disk.num_blocks == 0
    assert not disk.accepting and disk.write_errors == 1
    assert not disk.put(0, h, k, *kv_block(1.0), never)  # takes no more


def _encoded() -> bytes:
    from tokenfab.engine.kv_tiers.disk import encode

    return encode(0, key_of([0] * BS), *kv_block(0.0))


# -- the host tier over the disk tier, through KVTiers ---------------------------------------------------------------


def test_blocks_the_host_tier_drops_go_to_disk_and_every_change_is_an_event(tmp_path):
    cache = KVCache(GROUPS, [8, 8], BS, 1, 2, torch.float32, torch.device("cpu"))
    host = HostTier([(2, 1, BS, 1, 2)] * 2, [2, 2], torch.float32)
    disk = DiskTier(tmp_path, "m", 1 << 20)
    tiers = KVTiers(cache, [host, disk])
    tiers.events = []
    keys = [key_of([i] * BS) for i in range(3)]
    for i, k in enumerate(keys):
        cache.k[0][:, (i + 1) * BS : (i + 2) * BS] = float(i)
        tiers.save(0, i + 1, block_hash(*k), k)
    h0 = block_hash(*keys[0])
    assert tiers.find(0, h0) == 1 and tiers.find(0, block_hash(*keys[2])) == 0  # block 0 went down to disk
    kv = tiers.fetch(0, h0, keys[0], 1)
    assert kv is not None and torch.equal(kv[0], torch.zeros(1, BS, 1, 2))
    media = [(type(e).__name__, e.medium, e.block_hashes) for e in tiers.events]
    x0 = external_hash(h0)
    assert media[:2] == [("BlockStored", "CPU_TIER", [x0]), ("BlockStored", "CPU_TIER", [external_hash(block_hash(*keys[1]))])]
    assert ("BlockRemoved", "CPU_TIER", [x0]) in media and ("BlockStored", "DISK", [x0]) in media
    stats = tiers.snapshot()
    assert (stats.host_blocks, stats.disk_blocks, stats.host_stored, stats.disk_stored) == (2, 1, 3, 1)
    tiers.clear()
    assert host.num_blocks == 0 and disk.num_blocks == 0
    assert any(isinstance(e, BlockRemoved) and e.medium == "DISK" for e in tiers.events)
    tiers.close()


# -- scheduler + manager + tiers, the test playing the model -------------------------------------------------------


def fingerprint(tokens: list[int]) -> float:
    v = 0
    for t in tokens:
        v = (v * 31 + t + 1) % 9973
    return float(v)


class Model:
    """Writes each computed position's fingerprint into the real KV cache; checks every position a chunk
    attends to holds the fingerprint of its own tokens."""

    def __init__(self, kv: KVCacheManager, cache: KVCache) -> None:
        self.kv, self.cache = kv, cache

    def run(self, plan) -> None:
        for s in plan.scheduled:
            r = s.request
            tokens = r.all_token_ids
            for g, (window, table) in enumerate(zip(self.kv.windows, self.kv.block_tables(r.request_id))):
                lo = 0 if window is None else max(0, s.start - window + 1)
                for p in range(lo, s.start):
                    block = table[p // BS]
                    assert block != NULL_BLOCK, (r.request_id, g, p)
                    slot = block * BS + p % BS
                    expect = fingerprint(tokens[: p + 1])
                    assert self.cache.k[g][0, slot, 0, 0].item() == expect, (r.request_id, g, p)
                    assert self.cache.v[g][0, slot, 0, 0].item() == expect + 0.5, (r.request_id, g, p)
                for p in range(s.start, s.end):
                    slot = table[p // BS] * BS + p % BS
                    self.cache.k[g][:, slot] = fingerprint(tokens[: p + 1])
                    self.cache.v[g][:, slot] = fingerprint(tokens[: p + 1]) + 0.5


def tiered(tmp_path, host_slots: int, disk: bool, blocks: int = 12) -> tuple[Scheduler, KVCache, KVTiers, list]:
    """A scheduler over a two-group pool with tiers; the last item collects every step's KV events."""
    cache = KVCache(GROUPS, [blocks, blocks], BS, 1, 2, torch.float32, torch.device("cpu"))
    kv = KVCacheManager([None, WINDOW], [blocks, blocks], BS)
    kv.record_events()
    stores = []
    if host_slots:
        stores.append(HostTier([(2, 1, BS, 1, 2)] * 2, [host_slots, host_slots], torch.float32))
    if disk:
        stores.append(DiskTier(tmp_path, "m", 1 << 22))
    tiers = KVTiers(cache, stores)
    kv.attach_tiers(tiers)
    sched, events = Scheduler(kv, 3, 8), []
    sched.hooks.append(lambda update: events.extend(update.kv_events))
    return sched, cache, tiers, events


def drive(sched: Scheduler, cache: KVCache, requests: list[Request]) -> None:
    model = Model(sched.kv, cache)
    for r in requests:
        sched.add(r)
    for step in range(500):
        if not sched.has_unfinished():
            return
        plan = sched.schedule()
        model.run(plan)
        samplers = [s for s in plan.scheduled if s.samples]
        sched.update(plan, samplers, SampleResult([[700 + step] for _ in samplers], [None] * len(samplers),
                                                  [0] * len(samplers)))
        sched.kv.check_integrity()
    raise AssertionError("workload did not finish")


def test_a_prefix_evicted_from_the_pool_comes_back_from_the_host_and_the_disk_tier(tmp_path):
    sched, cache, tiers, events = tiered(tmp_path / "a", host_slots=4, disk=True)
    session = list(range(10, 30))  # 5 blocks
    first = Request("a", session, SamplingParams(max_tokens=2), 0.0)
    drive(sched, cache, [first])
    fillers = [Request(f"f{i}", list(range(100 * (i + 1), 100 * (i + 1) + 30)), SamplingParams(max_tokens=2),
                       1.0 + i) for i in range(3)]
    drive(sched, cache, fillers)  # the pool has had to reuse the session's blocks
    assert not any(p.lookup(block_hash(None, tuple(session[:BS])), key_of(session[:BS])) for p in sched.kv.pools)
    again = Request("a2", session + [5, 6, 7, 8], SamplingParams(max_tokens=2), 9.0)
    drive(sched, cache, [again])  # Model.run checked the loaded blocks' KV position by position
    assert again.num_cached_tokens == 20
    stats = tiers.snapshot()
    assert stats.host_hit_tokens + stats.disk_hit_tokens >= 20 - WINDOW
    assert stats.disk_stored > 0  # the host tier (4 blocks per group) spilled
    assert any(isinstance(e, BlockStored) and e.medium == "CPU_TIER" for e in events)
    tiers.close()


@st.composite
def workloads(draw):
    host_slots = draw(st.sampled_from([0, 2, 6]))
    disk = draw(st.booleans()) or host_slots == 0
    bases = [[draw(st.integers(min_value=10, max_value=60)) for _ in range(16)] for _ in range(3)]
    specs = []
    for _ in range(draw(st.integers(min_value=2, max_value=9))):
        base = draw(st.sampled_from(bases))
        shared = draw(st.integers(min_value=0, max_value=16))
        tail = draw(st.lists(st.integers(min_value=61, max_value=90), min_size=1, max_size=10))
        specs.append((base[:shared] + tail, draw(st.integers(min_value=1, max_value=4))))
    return host_slots, disk, specs


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(workloads())
def test_randomized_workloads_load_only_the_exact_kv_of_their_tokens(tmp_path_factory, workload):
    host_slots, disk, specs = workload
    sched, cache, tiers, events = tiered(tmp_path_factory.mktemp("disk"), host_slots, disk, blocks=10)
    try:
        for i, (prompt, max_tokens) in enumerate(specs):
            drive(sched, cache, [Request(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens), float(i))])
        for pool in sched.kv.pools:
            assert pool.num_free == pool.num_blocks - 1
    finally:
        tiers.close()


def test_a_tier_slower_than_recomputing_is_not_loaded(tmp_path):
    sched, cache, tiers, events = tiered(tmp_path, host_slots=0, disk=True)
    session = list(range(10, 30))
    drive(sched, cache, [Request("a", session, SamplingParams(max_tokens=1), 0.0)])
    drive(sched, cache, [Request(f"f{i}", list(range(100 * i, 100 * i + 30)), SamplingParams(max_tokens=1), 1.0 + i)
                         for i in range(1, 4)])
    tiers.bandwidth["DISK"] = 1e3  # a kilobyte per second: recomputing 20 tokens is faster
    tiers.seconds_per_token = 1e-3
    again = Request("b", session + [1, 2], SamplingParams(max_tokens=1), 9.0)
    drive(sched, cache, [again])
    assert again.num_cached_tokens == 0 and tiers.snapshot().loads_declined == 1
    assert tiers.snapshot().disk_hit_tokens == 0
    tiers.close()


@pytest.mark.parametrize("host_slots", [0, 4])
def test_the_pool_and_tiers_agree_with_the_events(tmp_path, host_slots):
    """The events of pool and tiers, applied in order per medium, name exactly what each holds."""
    sched, cache, tiers, events = tiered(tmp_path, host_slots=host_slots, disk=True)
    for i in range(6):
        prompt = list(range(10 + i % 3, 26 + i % 3)) + [80 + i]
        drive(sched, cache, [Request(f"r{i}", prompt, SamplingParams(max_tokens=2), float(i))])
    held: dict[str, set] = {}
    for e in events + sched.kv.take_events():
        media = held.setdefault(e.medium, set()) if hasattr(e, "medium") else None
        if isinstance(e, BlockStored):
            media.update((e.group_idx, h) for h in e.block_hashes)
        elif isinstance(e, BlockRemoved):
            media.difference_update((e.group_idx, h) for h in e.block_hashes)
    assert held.get(None, set()) == sched.kv.cached_block_hashes()
    for store in tiers.stores:
        assert held.get(store.medium, set()) == {(g, external_hash(h)) for g, h in store.held()}
    tiers.close()


# -- sessions: blocks kept for a next turn ------------------------------------------------------------------------


def test_pinned_blocks_go_last_and_only_until_their_deadline():
    from tokenfab.engine.block_pool import BlockPool

    pool = BlockPool(5)
    ids = [pool.allocate() for _ in range(4)]
    for i, b in enumerate(ids):
        pool.register(b, block_hash(None, (i,)), key_of([i]))
    now = time.monotonic()
    pool.release(ids[0], keep_until=now + 60)
    pool.release(ids[1], keep_until=now + 30)
    pool.release(ids[2])
    pool.release(ids[3])
    assert pool.num_free == 4 and len(pool.pinned) == 2
    assert [pool.allocate(), pool.allocate()] == [ids[2], ids[3]]  # the unpinned ones first
    assert pool.allocate() == ids[1] and pool.pins_reclaimed == 1  # then the earliest deadline
    pool.check_integrity()
    pool.expire(now + 61)
    assert pool.pinned == {} and pool.pin_expiries == 1 and list(pool.free) == [ids[0]]
    pool.check_integrity()


def test_a_session_turn_keeps_its_prefix_through_other_work_until_its_ttl():
    kv = KVCacheManager([None, WINDOW], [14, 14], BS)
    sched = Scheduler(kv, 3, 8)
    cache = KVCache(GROUPS, [14, 14], BS, 1, 2, torch.float32, torch.device("cpu"))
    session = list(range(10, 30))
    drive(sched, cache, [Request("t1", session, SamplingParams(max_tokens=1, keep_kv_s=30.0), 0.0)])
    assert kv.kv_stats().pinned_blocks > 0
    fillers = [Request(f"f{i}", list(range(100 * i, 100 * i + 22)), SamplingParams(max_tokens=1), 1.0 + i)
               for i in range(1, 5)]
    drive(sched, cache, fillers)  # each filler fits beside the kept blocks
    turn = Request("t2", session + [1, 2, 3], SamplingParams(max_tokens=1), 9.0)
    drive(sched, cache, [turn])
    assert turn.num_cached_tokens == 20
    for pool in kv.pools:
        pool.expire(time.monotonic() + 31)
    stats = kv.kv_stats()
    assert stats.pinned_blocks == 0 and stats.pin_expiries > 0


def test_the_ladder_gains_the_kv_tier_rungs():
    from tokenfab.bench.ladder import rungs

    *before, small, tier = rungs((1, 4), "none", replicas=1, kv_pool_gb=0.15)
    assert before == rungs((1, 4))
    assert small.flags == (*before[-1].flags, "--kv-cache-memory-gb", "0.15")
    assert tier.flags == (*small.flags, "--kv-host-gb", "2")


def test_a_kept_session_pushed_to_the_host_tier_is_brought_back_before_its_next_turn(tmp_path):
    """A session's turn is kept (TTL); a long request needs the whole pool, so the kept blocks go to the host
    tier; once that request is done, prefetch brings them back into the pool, pinned — the next turn finds its
    prefix in the pool, not in the tier."""
    sched, cache, tiers, _ = tiered(tmp_path, host_slots=8, disk=False, blocks=12)
    kv = sched.kv
    session = list(range(10, 30))  # 5 full blocks
    drive(sched, cache, [Request("t1", session, SamplingParams(max_tokens=1, keep_kv_s=60.0), 0.0)])
    big = Request("big", list(range(200, 240)), SamplingParams(max_tokens=1), 1.0)  # 10 of 11 blocks
    drive(sched, cache, [big])
    assert kv.kv_stats().pins_reclaimed > 0
    full_pool = kv.pools[0]
    assert tiers.snapshot().prefetched_blocks > 0  # at the big request's last step, when its blocks were freed
    assert sum(full_pool.lookup(block_hash(*k), k) is not None for k in _keys(session)) == 5
    before = tiers.snapshot().host_hit_tokens
    turn = Request("t2", session + [1, 2, 3], SamplingParams(max_tokens=1), 9.0)
    drive(sched, cache, [turn])  # Model.run checks the prefetched blocks' KV position by position
    assert turn.num_cached_tokens == 20 and tiers.snapshot().host_hit_tokens == before


def test_write_through_copies_a_block_to_the_tier_once_it_is_hit_often(tmp_path):
    sched, cache, tiers, _ = tiered(tmp_path, host_slots=8, disk=False)
    tiers.write_through_hits = 2
    shared = list(range(10, 26))  # 4 full blocks
    stored = []
    for i in range(3):
        drive(sched, cache, [Request(f"r{i}", shared + [90 + i], SamplingParams(max_tokens=1), float(i))])
        stored.append(tiers.snapshot().host_stored)
    # Hit once by the second request, twice by the third: copied then — the 4 full-attention blocks and the
    # sliding group's blocks in the window — with nothing evicted (not write-back).
    assert stored[:2] == [0, 0] and stored[2] == 4 + 2
    assert sum(pool.evictions for pool in sched.kv.pools) == 0


def _keys(tokens: list[int]) -> list:
    keys, parent = [], None
    for i in range(len(tokens) // BS):
        key = (parent, tuple(tokens[i * BS : (i + 1) * BS]))
        keys.append(key)
        parent = block_hash(*key)
    return keys


def test_removals_from_the_pool_and_a_tier_stay_separate_events():
    """The pool and the tiers write to one event list: a pool block removed right after a tier block of the same
    group is its own event, with the pool's medium."""
    from tokenfab.engine.kv_events import record_removed

    events: list = []
    record_removed(events, 1, "CPU_TIER", 0)
    record_removed(events, 2, "CPU", 0)
    record_removed(events, 3, "CPU", 0)
    record_removed(events, 4, "CPU", 1)
    assert [(e.medium, e.group_idx, e.block_hashes) for e in events] == [
        ("CPU_TIER", 0, [1]), ("CPU", 0, [2, 3]), ("CPU", 1, [4])]
