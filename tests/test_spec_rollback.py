"""KV rollback under a randomized workload with speculation on: a scripted proposer drafts the true greedy
continuation with random corruptions and random lengths, on a tiny Gemma 3 (sliding-window and full-attention
block pools) with a KV cache small enough to preempt. After every step the allocator is consistent, every
running request holds exactly the blocks its computed tokens need, and every block in the prefix cache holds
tokens of a real sequence (never a rejected draft); at the end outputs equal plain greedy and no block leaks."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiny_models import write_tiny_model
from tokenfab import LLM, SamplingParams
from tokenfab.attention.backend import KVCache
from tokenfab.config import SpeculativeConfig
from tokenfab.engine.speculative.proposer import Proposal, Proposer

BS = 8
MAX_NEW = 16
LEN = 64
MAX_SEQS = 4


class ScriptedProposer(Proposer):
    """Drafts the known greedy continuation, cut short and corrupted at random."""

    name = "scripted"

    def __init__(self, truth: dict[tuple[int, ...], list[int]], rng: random.Random) -> None:
        self.truth = truth
        self.rng = rng

    def rounds(self, k: int) -> int:
        return 1 if k else 0

    def propose(self, step, requests, budgets):
        proposals = []
        for r, k in zip(requests, budgets):
            done = r.num_output_tokens
            draft = list(self.truth[tuple(r.prompt_token_ids)][done : done + self.rng.randint(0, k)])
            for i in range(len(draft)):
                if self.rng.random() < 0.25:
                    draft[i] = self.rng.randrange(4, 512)
            proposals.append(Proposal(draft))
        return proposals


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny_model("gemma3", tmp_path_factory.mktemp("rollback") / "gemma3")


@pytest.fixture(scope="module")
def base(model):
    return LLM(str(model), dtype="float32", kv_cache_memory_gb=0.01, max_model_len=LEN, block_size=BS,
               num_threads=1)


@dataclass(frozen=True)
class Spec:
    arrive: int
    prompt_len: int
    shared: int
    max_tokens: int
    n: int
    abort_at: int | None


@st.composite
def workloads(draw):
    specs = [Spec(draw(st.integers(0, 4)), draw(st.integers(1, 40)), draw(st.integers(0, 40)),
                  draw(st.integers(1, MAX_NEW)), draw(st.sampled_from([1, 1, 1, 2])),
                  draw(st.one_of(st.none(), st.none(), st.integers(0, 25))))
             for _ in range(draw(st.integers(1, 8)))]
    return (specs, draw(st.sampled_from([8, 16, 48])), draw(st.sampled_from([9, 10, 16])),
            draw(st.integers(1, 6)), draw(st.integers(0, 1000)))


def kv_gb(blocks: int) -> float:
    """A KV budget giving each block pool (sliding-window layers, full-attention layer) this many blocks."""
    per_block = KVCache.bytes_per_block(1, BS, 1, 32, torch.float32) + KVCache.bytes_per_block(5, BS, 1, 32,
                                                                                               torch.float32)
    return (blocks + 0.5) * per_block / (1 << 30)


def check_step(core, sequences: set[tuple[int, ...]]) -> None:
    kv = core.kv
    kv.check_integrity()
    for request in core.scheduler.running:
        state = kv.requests[request.request_id]
        for table in state.tables:
            assert len(table) == -(-request.num_computed_tokens // BS), request.request_id
    for pool in kv.pools:
        for block in pool.blocks[1:]:
            if block.key is not None:
                assert block.key[1] in sequences, "a cached block holds tokens no sequence has"


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(workloads())
def test_randomized_speculation_keeps_the_kv_cache_consistent(model, base, workload):
    specs, budget, blocks, k, seed = workload
    rng = random.Random(seed)
    shared = [9 + (i * 37) % 500 for i in range(40)]
    prompts = [shared[: min(s.shared, s.prompt_len)] + [rng.randrange(4, 512) for _ in range(s.prompt_len - min(
        s.shared, s.prompt_len))] for s in specs]
    truth = {tuple(p): o.outputs[0].token_ids for p, o in zip(prompts, base.generate(
        prompts, SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True)))}
    sequences = {tuple((list(p) + out)[i : i + BS]) for p, out in truth.items() for i in range(0, LEN, BS)}
    llm = LLM(str(model), dtype="float32", kv_cache_memory_gb=kv_gb(blocks), max_model_len=LEN,
              block_size=BS, max_num_batched_tokens=budget, max_num_seqs=MAX_SEQS, num_threads=1,
              speculative=SpeculativeConfig("ngram", None, k, adaptive=False))
    core = llm.engine.core
    core.speculator.proposer = ScriptedProposer(truth, rng)
    engine, ids, results, step = llm.engine, {}, {}, 0
    while len(ids) < len(specs) or engine.has_unfinished_requests():
        for i, s in enumerate(specs):
            if s.arrive == step and i not in ids:
                ids[i] = engine.add_request(prompts[i], SamplingParams(n=s.n, max_tokens=s.max_tokens, temperature=0,
                                                                       ignore_eos=True))
            if s.abort_at == step and i in ids and ids[i] not in results:
                engine.abort_request(ids[i])
                results[ids[i]] = None
        for out in engine.step():
            if out.finished and out.request_id not in results:
                results[out.request_id] = out
        check_step(core, sequences)
        step += 1
        assert step < 500, "the workload did not finish"
    for i, s in enumerate(specs):
        out = results[ids[i]]
        if out is not None:
            for completion in out.outputs:
                assert completion.token_ids == truth[tuple(prompts[i])][: s.max_tokens]
    core.kv.check_integrity()
    assert core.kv.num_free_blocks() == [p.num_blocks - 1 for p in core.kv.pools]
    assert core.stats().spec.proposed_tokens >= core.stats().spec.accepted_tokens
