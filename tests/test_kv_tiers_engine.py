"""KV tiers in the engine (tiny Gemma 3: sliding-window and full-attention layers, prompts past the window): a prefix
the pool evicted comes back from the host tier or the disk tier with exactly the tokens of an engine without tiers,
alone and inside a mixed batch; disk blocks are found again by a restarted engine, damaged files are recomputed
(never served), another KV layout's files are never loaded, and a tier slower than recomputing is not used."""

from __future__ import annotations

import pytest

from tokenfab import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
SESSION = [5 + (i * 7) % 200 for i in range(120)]
"""A prompt well past the sliding window (24 tokens)."""
FILLERS = [[300 + (k * 13 + i * 3) % 180 for i in range(120)] for k in range(6)]
NEXT_TURN = SESSION + [40, 41, 42, 43, 44, 45, 46]
OTHERS = [[7 + i % 50 for i in range(30)], [90 + i % 20 for i in range(55)]]


@pytest.fixture(scope="module")
def model(tiny_model):
    return str(tiny_model("gemma3"))


def engine(model: str, **tiers) -> LLM:
    """A pool of about 60 blocks of 8 tokens: the fillers push the session out of it."""
    return LLM(model, dtype="float32", kv_cache_memory_gb=0.0006, max_model_len=256, block_size=8,
               max_num_batched_tokens=64, num_threads=1, **tiers)


@pytest.fixture(scope="module")
def expected(model):
    """The tokens of an engine without tiers: the next turn alone, and inside a batch."""
    llm = engine(model)
    alone = llm.generate([NEXT_TURN], GREEDY)[0].outputs[0].token_ids
    batch = [o.outputs[0].token_ids for o in llm.generate([OTHERS[0], NEXT_TURN, OTHERS[1]], GREEDY)]
    return alone, batch


@pytest.mark.parametrize("tiers", ["host", "disk", "host+disk"])
def test_an_evicted_prefix_comes_back_from_a_tier_with_the_same_tokens(model, expected, tmp_path, tiers):
    options = {"host": {"kv_host_gb": 0.01}, "disk": {"kv_disk_dir": str(tmp_path)},
               "host+disk": {"kv_host_gb": 0.0002, "kv_disk_dir": str(tmp_path)}}[tiers]
    llm = engine(model, **options)
    core = llm.engine.core
    llm.generate([SESSION], GREEDY)
    llm.generate(FILLERS, GREEDY)
    pool_only = core.kv.prefix_stats().hits
    out = llm.generate([NEXT_TURN], GREEDY)[0]
    assert out.outputs[0].token_ids == expected[0]
    stats = core.kv_tiers.snapshot()
    loaded = stats.host_hit_tokens + stats.disk_hit_tokens
    assert loaded > 0 and out.num_cached_tokens >= 112 and core.kv.prefix_stats().hits - pool_only >= 112
    if tiers != "host":
        assert stats.disk_stored > 0 and stats.disk_hit_tokens > 0
    # Again, inside a mixed batch, after the fillers pushed it out once more.
    llm.generate(FILLERS, GREEDY)
    batch = [o.outputs[0].token_ids for o in llm.generate([OTHERS[0], NEXT_TURN, OTHERS[1]], GREEDY)]
    assert batch == expected[1]
    assert core.kv_tiers.snapshot().host_hit_tokens + core.kv_tiers.snapshot().disk_hit_tokens > loaded
    core.kv.check_integrity()
    core.close()


def test_disk_blocks_outlive_the_engine_and_damaged_ones_are_recomputed(model, expected, tmp_path):
    first = engine(model, kv_disk_dir=str(tmp_path))
    first.generate([SESSION], GREEDY)
    first.generate(FILLERS, GREEDY)
    first.engine.core.close()  # writes what is queued
    files = sorted(tmp_path.rglob("*.kv"))
    assert files

    restarted = engine(model, kv_disk_dir=str(tmp_path))
    out = restarted.generate([NEXT_TURN], GREEDY)[0]
    assert out.outputs[0].token_ids == expected[0] and out.num_cached_tokens >= 112
    assert restarted.engine.core.kv_tiers.snapshot().disk_hit_tokens >= 112
    restarted.engine.core.close()

    for path in tmp_path.rglob("*.kv"):
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x40
        path.write_bytes(bytes(data))
    damaged = engine(model, kv_disk_dir=str(tmp_path))
    out = damaged.generate([NEXT_TURN], GREEDY)[0]
    assert out.outputs[0].token_ids == expected[0]
    stats = damaged.engine.core.kv_tiers.snapshot()
    assert stats.corrupt_blocks > 0 and stats.disk_hit_tokens == 0 and out.num_cached_tokens == 0
    damaged.engine.core.close()

    other_layout = LLM(model, dtype="float32", kv_cache_memory_gb=0.0006, max_model_len=256, block_size=16,
                       num_threads=1, kv_disk_dir=str(tmp_path))
    assert other_layout.engine.core.kv_tiers.snapshot().disk_blocks == 0  # another block size: another namespace
    other_layout.engine.core.close()


def test_a_tier_slower_than_recomputing_is_left_alone(model, expected, tmp_path):
    llm = engine(model, kv_disk_dir=str(tmp_path))
    core = llm.engine.core
    llm.generate([SESSION], GREEDY)
    llm.generate(FILLERS, GREEDY)
    core.kv_tiers.bandwidth["DISK"] = 1e3  # as if each block took seconds to read
    before = core.kv_tiers.snapshot()
    out = llm.generate([NEXT_TURN], GREEDY)[0]
    assert out.outputs[0].token_ids == expected[0] and out.num_cached_tokens < 64
    stats = core.kv_tiers.snapshot()
    assert stats.loads_declined > before.loads_declined and stats.disk_hit_tokens == before.disk_hit_tokens
    core.close()


def test_tiers_refuse_what_they_cannot_keep(model):
    with pytest.raises(ValueError, match="MTP"):
        LLM(model, kv_host_gb=1.0, speculative="mtp")
    with pytest.raises(ValueError, match="kv_host_gb must be >= 0"):
        LLM(model, kv_host_gb=-1.0)
