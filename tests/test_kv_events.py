"""Stable block hashes (against an independent cbor2 + hashlib implementation, vLLM's own when installed, and a
second process) and KV events: a subscriber that loses messages recovers them through replay and ends with
exactly the engine's set of cached blocks."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import cbor2
import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import random_prompts
from tokenfab import LLM, SamplingParams
from tokenfab.engine import kv_events as ours
from tokenfab.engine.block_hash import DEFAULT_SEED, ROOT, block_hash, block_hashes, external_hash, root_hash
from tokenfab.engine.kv_events import KVEventSubscriber


def reference_hash(parent: bytes, tokens: list[int], extra: Any = None) -> bytes:
    return hashlib.sha256(cbor2.dumps((parent, tuple(tokens), extra), canonical=True)).digest()


def test_root_is_sha256_cbor_of_the_seed():
    assert root_hash("vllm-none-hash") == hashlib.sha256(cbor2.dumps("vllm-none-hash", canonical=True)).digest()
    assert root_hash("vllm-none-hash").hex() == "9bd96a485ad84efdafb72ee48a1d7a69bcead0f8f0433173941b276b9581eef0"
    assert root_hash("0") != root_hash("1")
    expected_seed = os.environ.get("PYTHONHASHSEED") or DEFAULT_SEED
    assert ROOT == root_hash(expected_seed)


@given(st.lists(st.lists(st.integers(0, 2**40), min_size=1, max_size=40), min_size=1, max_size=5),
       st.one_of(st.none(), st.tuples(st.text(max_size=8)), st.tuples(st.integers(0, 2**20), st.text(max_size=4))))
@settings(max_examples=200, deadline=None)
def test_chained_hashes_equal_an_independent_cbor2_implementation(blocks, extra):
    parent = ROOT
    ours: bytes | None = None
    for tokens in blocks:
        ours = block_hash(ours, tokens, extra)
        parent = reference_hash(parent, tokens, extra)
        assert ours == parent


def test_block_hashes_covers_full_blocks_only_and_the_64_bit_form_is_the_low_bytes():
    tokens = list(range(50))
    hashes = block_hashes(tokens, 16)
    assert len(hashes) == 3
    assert hashes[0] == reference_hash(ROOT, tokens[:16])
    assert hashes[2] == reference_hash(reference_hash(hashes[0], tokens[16:32]), tokens[32:48])
    assert external_hash(hashes[0]) == int.from_bytes(hashes[0], "big") & (2**64 - 1)


VLLM_HASHES = """
import json, os, sys
os.environ.pop("PYTHONHASHSEED", None)
from vllm.v1.core import kv_cache_utils as k
from vllm.utils.hashing import sha256_cbor
k.init_none_hash(sha256_cbor)
parent, out = None, []
for block in json.loads(sys.stdin.read()):
    parent = k.hash_block_tokens(sha256_cbor, parent, tuple(block), None)
    out.append([bytes(parent).hex(), k.maybe_convert_block_hash(parent)])
print(json.dumps([bytes(k.NONE_HASH).hex(), out]))
"""


def vllm_python() -> Path:
    """The vLLM peer's interpreter (benchmarks/peers/setup_peers.sh vllm); the test is skipped without it."""
    peers = Path(os.environ.get("TOKENFAB_PEERS_DIR", Path(__file__).resolve().parent.parent / ".peers"))
    python = peers / "vllm" / "bin" / "python"
    if not python.exists():
        pytest.skip("the vLLM peer is not installed (benchmarks/peers/setup_peers.sh vllm)")
    return python


def test_vllm_computes_the_same_hashes():
    """vLLM's own functions in the peer's environment."""
    python = vllm_python()
    blocks = [[5, 17, 300000, 2], list(range(16)), [262143] * 16]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
    out = subprocess.run([str(python), "-c", VLLM_HASHES], input=msgspec.json.encode(blocks), capture_output=True,
                         env=env, check=True, timeout=300, cwd=python.parent)
    root, theirs = msgspec.json.decode(out.stdout.splitlines()[-1])
    assert root == root_hash(DEFAULT_SEED).hex()
    parent = root_hash(DEFAULT_SEED)  # vLLM's root without PYTHONHASHSEED, whatever this process's environment
    for block, (digest, external) in zip(blocks, theirs):
        parent = block_hash(parent, block)
        assert parent.hex() == digest and external_hash(parent) == external


def test_a_second_process_computes_the_same_hashes():
    tokens = random_prompts([200], seed=9, vocab=262144)[0]
    code = ("import sys, json; from tokenfab.engine.block_hash import block_hashes; "
            "print(json.dumps([h.hex() for h in block_hashes(json.loads(sys.stdin.read()), 16)]))")
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-c", code], input=msgspec.json.encode(tokens), capture_output=True,
                         env=env, check=True, timeout=60)
    assert msgspec.json.decode(out.stdout) == [h.hex() for h in block_hashes(tokens, 16)]


# -- events -------------------------------------------------------------------------------------------------------


def test_vllms_own_decoder_reads_our_event_batches():
    python = vllm_python()
    batch = ours.EventBatch(12.5, [
        ours.BlockStored([1, 2], None, list(range(32)), 16, None, "CPU", None, group_idx=1,
                         kv_cache_spec_kind="sliding_window", kv_cache_spec_sliding_window=512),
        ours.BlockRemoved([3], "CPU", 0), ours.AllBlocksCleared()])
    code = ("import sys, msgspec; from vllm.distributed.kv_events import KVEventBatch; "
            "b = msgspec.msgpack.Decoder(KVEventBatch).decode(sys.stdin.buffer.read()); "
            "print(msgspec.json.encode([b.ts, [[type(e).__name__, msgspec.structs.asdict(e)] for e in b.events]]).decode())")
    out = subprocess.run([str(python), "-c", code], input=msgspec.msgpack.encode(batch), capture_output=True,
                         check=True, timeout=300, cwd=python.parent)
    ts, events = msgspec.json.decode(out.stdout.splitlines()[-1])
    assert ts == 12.5 and [name for name, _ in events] == ["BlockStored", "BlockRemoved", "AllBlocksCleared"]
    stored, removed = events[0][1], events[1][1]
    assert stored["block_hashes"] == [1, 2] and stored["token_ids"] == list(range(32)) and stored["group_idx"] == 1
    assert stored["kv_cache_spec_sliding_window"] == 512 and removed == {**removed, "block_hashes": [3], "group_idx": 0}


class VllmEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """The types of vLLM's example KV event subscriber, declared independently of tokenfab's."""

    ts: float
    events: list[Any]


class VllmKVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class BlockStored(VllmKVCacheEvent):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None


class BlockRemoved(VllmKVCacheEvent):
    block_hashes: list[int | bytes]
    medium: str | None
    group_idx: int | None = None


class AllBlocksCleared(VllmKVCacheEvent):
    pass


class VllmKVEventBatch(VllmEventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


@pytest.fixture(scope="module")
def events_llm(tiny_model):
    llm = LLM(str(tiny_model("gemma3")), dtype="float32", kv_cache_memory_gb=0.0015, max_model_len=512,
              max_num_batched_tokens=64, block_size=8, kv_events_endpoint="tcp://127.0.0.1:*",
              kv_events_replay_endpoint="tcp://127.0.0.1:*")
    yield llm
    llm.engine.core.close()


def test_events_decode_with_vllms_subscriber_types_and_name_the_prompt_blocks(events_llm):
    core = events_llm.engine.core
    info = core.info()
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.connect(info.kv_events_endpoint)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv-events")
    prompt = random_prompts([40], seed=11)[0]
    decoder = msgspec.msgpack.Decoder(VllmKVEventBatch)
    stored: list[BlockStored] = []
    for _ in range(20):  # a SUB socket joins asynchronously: repeat until it sees a batch
        core.reset_prefix_cache()
        events_llm.generate([prompt], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
        core.kv_events.flush()
        while sub.poll(200):
            topic, seq, payload = sub.recv_multipart()
            assert topic == b"kv-events" and len(seq) == 8
            stored += [e for e in decoder.decode(payload).events if isinstance(e, BlockStored)]
        if stored:
            break
    sub.close(linger=0)
    full = [e for e in stored if e.kv_cache_spec_kind == "full_attention"]
    assert full, "no BlockStored event arrived"
    event = full[-1]
    hashes = block_hashes(prompt, 8)
    assert event.block_hashes[0] == external_hash(hashes[0]) and event.parent_block_hash is None
    assert event.token_ids[:8] == prompt[:8] and event.block_size == 8 and event.medium == "CPU"
    sliding = {(e.group_idx, e.kv_cache_spec_sliding_window) for e in stored if e.group_idx != event.group_idx}
    assert len(sliding) == 1 and next(iter(sliding))[1] is not None  # gemma3's sliding-window group


@st.composite
def workloads(draw):
    """Rounds of requests over a few shared prefixes (hits, shared blocks and, with a small cache, evictions)."""
    prefixes = [random_prompts([n], seed=s)[0] for s, n in enumerate((24, 40, 9))]
    rounds = []
    for _ in range(draw(st.integers(1, 3))):
        batch = []
        for _ in range(draw(st.integers(1, 5))):
            prefix = prefixes[draw(st.integers(0, 2))][:draw(st.integers(0, 40))]
            tail = draw(st.lists(st.integers(1, 511), min_size=1, max_size=30))
            batch.append((prefix + tail, draw(st.integers(1, 12))))
        rounds.append((batch, draw(st.booleans()) and draw(st.booleans())))
    return rounds, draw(st.sets(st.integers(0, 400), max_size=60))


@given(workloads())
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_a_subscriber_that_loses_messages_rebuilds_the_cached_blocks_through_replay(events_llm, workload):
    rounds, lost = workload
    core = events_llm.engine.core
    info = core.info()
    sub = KVEventSubscriber(info.kv_events_endpoint, info.kv_events_replay_endpoint)
    try:
        sub.catch_up()  # everything published before this subscriber existed
        for batch, reset in rounds:
            if reset:
                core.reset_prefix_cache()
            params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for _, n in batch]
            events_llm.generate([p for p, _ in batch], params)
            core.kv_events.flush()
            sub.poll(50, drop=lambda seq: seq % 401 in lost)
        sub.catch_up()
        assert sub.blocks == core.kv.cached_block_hashes()
    finally:
        sub.close()


def test_replay_recovers_dropped_batches_and_the_cache_saw_evictions(events_llm):
    core = events_llm.engine.core
    info = core.info()
    sub = KVEventSubscriber(info.kv_events_endpoint, info.kv_events_replay_endpoint)
    try:
        sub.catch_up()
        evictions = sum(p.evictions for p in core.kv.pools)
        capacity = core.kv.capacity_tokens()
        for seed in (21, 22, 23):  # each round alone fills most of the cache, so later rounds evict earlier blocks
            prompts = random_prompts([capacity // 3] * 2, seed=seed)
            events_llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
        core.kv_events.flush()
        sub.poll(200, drop=lambda seq: seq % 2 == 0)
        sub.catch_up()
        assert sum(p.evictions for p in core.kv.pools) > evictions  # the workload overflowed the cache
        assert sub.replayed > 0
        assert sub.blocks == core.kv.cached_block_hashes()
    finally:
        sub.close()
